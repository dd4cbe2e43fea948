"""Context windows: a video too long for one generation prompt is asked about in parts.

With `qa.context_tokens` set, a video whose prompt (its caption lines in the longest of the
configured category x type templates) plus `qa.max_tokens` of answer would not fit the endpoint's
context is split into windows of consecutive clips, each asked for its own questions. A caption is
never split; one that does not fit a window even alone makes the video a failure row.

Tokens are estimated without the endpoint's tokenizer (`estimate_tokens`), on the side of too many:
text is cut into runs of letters, single digits, single other characters and newlines; a run of
letters costs one token per 3 UTF-8 bytes (rounded up: English BPE tokens average about 4 letters,
a CJK character is 3 bytes and about one token), every digit, punctuation mark, symbol and newline
one token (tokenizers such as Qwen's split digits one by one, and a caption line's timestamps are
mostly digits); spaces are free (they merge into the next word). Each message adds
`MESSAGE_OVERHEAD` for the chat template's role markers. It is an estimate, not a bound: leave
the endpoint some margin for prose of rare words (or a tokenizer with a small vocabulary).

The estimate is additive over a prompt's parts (a caption line never shares a run with the text
around it), so a window's cost is its frame (`prompts.prompt_frame`: the prompt without lines, the
largest over the configured templates) plus its lines and the newlines between them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from tasks.qa.captions import Clip, VideoCaptions, Window, caption_line
from tasks.qa.prompts import PromptSet, prompt_frame

MESSAGE_OVERHEAD = 8  # role markers and separators a chat template wraps around one message
_RUN = re.compile(r"(?P<letters>[^\W\d_]+)|\d|\n|[^\w\s]|_")


def estimate_tokens(text: str) -> int:
    """A tokenizer-free, deliberately high token count of `text` (rules in the module docstring)."""
    total = 0
    for match in _RUN.finditer(text):
        total += -(-len(match.group().encode()) // 3) if match.lastgroup == "letters" else 1
    return total


def messages_tokens(messages: Sequence[dict[str, Any]]) -> int:
    """Estimated prompt tokens of chat messages (string contents)."""
    return sum(estimate_tokens(m["content"]) + MESSAGE_OVERHEAD for m in messages) + MESSAGE_OVERHEAD  # + the reply's opening


class ItemTooLarge(ValueError):
    """An item that does not fit a window even alone."""

    def __init__(self, index: int, cost: int, budget: int) -> None:
        super().__init__(f"item {index} costs {cost}, more than the budget of {budget}")
        self.index, self.cost, self.budget = index, cost, budget


def split_windows(costs: Sequence[int], budget: int) -> list[range]:
    """Consecutive groups of items, in order, each costing at most `budget` in all: the fewest
    groups that fit, as even as that allows (the smallest largest group), so that no last window
    is left with a scrap. Raises `ItemTooLarge` for an item costing more than `budget` alone."""
    for i, cost in enumerate(costs):
        if cost > budget:
            raise ItemTooLarge(i, cost, budget)
    if not costs:
        return []
    fewest = len(_greedy(costs, budget))
    low, high = max(costs), budget  # the smallest cap that still needs only `fewest` groups: greedy is monotone in the cap
    while low < high:
        mid = (low + high) // 2
        if len(_greedy(costs, mid)) <= fewest:
            high = mid
        else:
            low = mid + 1
    return _greedy(costs, low)


def _greedy(costs: Sequence[int], cap: int) -> list[range]:
    groups, start, total = [], 0, 0
    for i, cost in enumerate(costs):
        if i > start and total + cost > cap:
            groups.append(range(start, i))
            start, total = i, 0
        total += cost
    groups.append(range(start, len(costs)))
    return groups


class NoRoom(ValueError):
    """`qa.context_tokens` leaves no room for a single caption line: a configuration error."""


class CaptionTooLong(ValueError):
    """One clip's caption does not fit a window even alone: the video's own fault."""

    def __init__(self, clip: Clip, tokens: int, context_tokens: int) -> None:
        super().__init__(
            f"the caption of clip {clip.clip_id} ({clip.span}) does not fit a context window even alone: its prompt and "
            f"the answer's max_tokens need ~{tokens} tokens (estimated), qa.context_tokens is {context_tokens}"
        )
        self.clip, self.tokens = clip, tokens  # tokens: the prompt with this caption alone, plus max_tokens


def plan_windows(
    prompts: PromptSet, video: VideoCaptions, kinds: Sequence[tuple[str, str]], n_questions: int, max_tokens: int, context_tokens: int | None
) -> list[Window]:
    """The windows of `video` for generation requests of every (category, question type) in `kinds`:
    the whole video when it fits `context_tokens` (or when that is None), else consecutive parts
    whose every prompt (estimated) plus `max_tokens` fits. Raises `CaptionTooLong` or `NoRoom`."""
    whole = Window.whole_video(video)
    if context_tokens is None or not video.clips:
        return [whole]
    lines = [estimate_tokens(caption_line(c)) + 1 for c in video.clips]  # + the newline after it (one too many: a margin)
    if frame_tokens(prompts, video, kinds, n_questions, windowed=False) + sum(lines) + max_tokens <= context_tokens:
        return [whole]
    frame = frame_tokens(prompts, video, kinds, n_questions, windowed=True)
    budget = context_tokens - max_tokens - frame
    if budget <= 1:
        raise NoRoom(
            f"qa.context_tokens={context_tokens} leaves no room for captions: the prompt alone needs ~{frame} tokens "
            f"(estimated) and the answer qa.max_tokens={max_tokens}"
        )
    try:
        groups = split_windows(lines, budget)
    except ItemTooLarge as exc:
        raise CaptionTooLong(video.clips[exc.index], frame + exc.cost + max_tokens, context_tokens) from None
    return [Window(video, i, g.start, g.stop) for i, g in enumerate(groups)]


def frame_tokens(prompts: PromptSet, video: VideoCaptions, kinds: Sequence[tuple[str, str]], n_questions: int, windowed: bool) -> int:
    """The largest estimated prompt without caption lines over `kinds`."""
    return max(messages_tokens(prompt_frame(prompts, video, c, t, n_questions, windowed).messages) for c, t in kinds)
