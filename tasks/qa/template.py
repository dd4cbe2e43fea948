"""The offline `template` backend: real QA items with verifiable answers, from captions alone.

No model reads the captions, so nothing is understood; what can be known for certain is *where*
each caption's words occur. Every question quotes a distinctive snippet of a clip's caption (a run
of words found in no other clip of the video, so each quote points at exactly one moment), and its
answer follows from the clips' order and time ranges. That works on any text, the tiny CPU model's
token soup included. The categories are framed honestly within that limit:

- Temporal: order of events. Multiple-choice: the order of three quoted moments, options being
  orderings such as "(2), then (1), then (3)". Open-ended: which of two quoted moments comes first.
- Goal and Purpose: the end state a sequence builds toward. Multiple-choice: starting from a
  quoted moment, which of four moments after it the video arrives at last. Open-ended: what the
  video shows at its end, starting from a quoted moment.
- Spatial: where in the video, i.e. which segment (time range) shows a quoted moment; options
  are the time ranges of other clips.
- Plot and Narrative: how moments connect. Multiple-choice: what happens between two quoted
  moments two clips apart (options: the middle moment and other moments). Open-ended: what happens
  right after a quoted moment.

An open-ended answer names a moment without pointing at it, so it need not be distinctive: it is the
moment's quote, or else its caption when short ("a solid red screen" ends a video although "color
bars, then a solid red screen" says it too); a moment with neither is not asked for.

Consecutive clips with the same caption are one moment (`segments`): a scene longer than a clip is
described alike clip after clip, and "which comes first" between two halves of one scene has no
answer. A caption is quoted whole when it is short (after the words every caption of the video
starts with, e.g. "The video shows"), else by its shortest distinctive run of words.

A window of a long video (`tasks.qa.windows`) is asked about its own clips, quoting snippets that are
distinctive in the whole video. A question that a video cannot support (too few clips with distinctive snippets, e.g. a one- or
two-clip video, or duplicate captions) is simply not drafted. The raw reasoning is written the way
an LLM that read the captions writes it ("The caption of shot 3 (00:20-00:30) describes (1)"),
shots being the video's moments numbered from its start (a window's too). `rewrite_reasoning` is
the template refinement: a deterministic rewrite into short steps about the video's shots ("(1) is
shot 3.", then the derivation: "In time order: (2), then (1), then (3), option C."), naming moments
by their role in the question ((1), the quote, option B) rather than quoting them again and by shot
number rather than time range: the CPU profile's tiny model learns to write ~60 such tokens within
its training budget, where ~100 tokens of time ranges stayed noise (`configs/tiny.yaml`).
Drafts are rendered as the JSON answer an LLM would give and go through the same parser and row
building as LLM answers. Everything is seeded from the video id, so reruns are byte-identical.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

from tasks.engine.store import stable_hash
from tasks.qa.captions import Clip, VideoCaptions
from tasks.qa.prompts import LETTERS

TEMPLATE_VERSION = 4  # 4: open-ended answers need not be distinctive; Goal questions start anywhere
GENERATOR_MODEL = f"lvr-template-v{TEMPLATE_VERSION}"
REFINER_MODEL = f"lvr-template-rewrite-v{TEMPLATE_VERSION}"
PROMPT_VERSION = f"template-v{TEMPLATE_VERSION}"

SNIPPET_WORDS = (6, 10, 14)  # window sizes tried in turn: short quotes first
WHOLE_CAPTION_WORDS = 10  # a caption this short (after the video's common opening) is quoted whole
MAX_SNIPPET_CHARS = 100
_EDGE = " ,.;:!?\"'\u201c\u201d\u2018\u2019()[]"
_UNQUOTABLE = re.compile(r"caption|</?\s*(?:think|answer)\s*>", re.IGNORECASE)
_DANGLING = frozenset("a an the and or but of to in into on onto at by for with from over under as his her its their".split())
_RAW_STEP = re.compile(r"^Step \d+: ")
_RAW_SEEN = re.compile(r"^The caption of shot (\d+) \(\d+:\d\d-\d+:\d\d\) describes (.+)\.$")


def _normal(text: str) -> str:
    return " ".join(text.casefold().split())


def _windows(words: list[str]) -> Iterator[str]:
    for size in sorted({min(s, len(words)) for s in SNIPPET_WORDS}):
        for start in range(len(words) - size + 1):
            window = words[start : start + size]
            while len(window) > 1 and window[-1].casefold().strip(_EDGE) in _DANGLING:
                window = window[:-1]  # "pours olive oil into a" reads better as "pours olive oil"
            text = " ".join(window).strip(_EDGE)
            if text and len(text) <= MAX_SNIPPET_CHARS:
                yield text


def _segment_starts(clips: tuple[Clip, ...]) -> list[int]:
    return [i for i, c in enumerate(clips) if i == 0 or _normal(c.caption) != _normal(clips[i - 1].caption)]


def segments(clips: tuple[Clip, ...], starts: list[int] | None = None) -> tuple[Clip, ...]:
    """Runs of consecutive clips with the same caption, each as one clip spanning the run
    (`starts`: the runs' first clips, when already known)."""
    starts = _segment_starts(clips) if starts is None else starts
    ends = [*starts[1:], len(clips)]
    return tuple(Clip(clips[a].clip_id, clips[a].start_s, clips[b - 1].end_s, clips[a].caption) for a, b in zip(starts, ends))


def _common_opening(captions: list[str]) -> int:
    """How many leading words every caption shares (0 for fewer than two captions), leaving each at
    least one word of its own."""
    if len(captions) < 2:
        return 0
    words = [[w.casefold() for w in c.split()] for c in captions]
    shared = 0
    while all(len(w) > shared + 1 for w in words) and len({w[shared] for w in words}) == 1:
        shared += 1
    return shared


def _short_caption(caption: str, opening: int) -> str | None:
    """The caption after the video's common opening, when short enough to be quoted whole."""
    words = caption.split()[opening:]
    whole = " ".join(words).strip(_EDGE)
    return whole if whole and len(words) <= WHOLE_CAPTION_WORDS and len(whole) <= MAX_SNIPPET_CHARS else None


def _candidates(caption: str, opening: int) -> Iterator[str]:
    whole = _short_caption(caption, opening)
    if whole is not None:
        yield whole
    yield from _windows(caption.split()[opening:])


def answer_texts(video: VideoCaptions, snippets: dict[int, str]) -> dict[int, str]:
    """Clip index -> what an open-ended answer naming the clip says: its distinctive snippet, else its
    whole caption (after the video's common opening) when short and quotable."""
    opening = _common_opening([c.caption for c in video.clips])
    texts: dict[int, str] = {}
    for i, clip in enumerate(video.clips):
        # Never a fragment: a long caption cut short may say something else.
        text = snippets.get(i) or _short_caption(clip.caption, opening)
        if text is not None and not _UNQUOTABLE.search(text):
            texts[i] = text
    return texts


def distinctive_snippets(video: VideoCaptions) -> dict[int, str]:
    """Clip index -> a quote from its caption that occurs in no other clip's caption."""
    normals = [_normal(c.caption) for c in video.clips]
    opening = _common_opening([c.caption for c in video.clips])
    snippets: dict[int, str] = {}
    for i, clip in enumerate(video.clips):
        others = [n for j, n in enumerate(normals) if j != i]
        if normals[i] in others:
            continue  # a duplicate caption: nothing in it can single this clip out
        for candidate in _candidates(clip.caption, opening):
            if _UNQUOTABLE.search(candidate):
                continue
            key = _normal(candidate)
            if not any(key in other for other in others):
                snippets[i] = candidate
                break
    return snippets


@dataclass(frozen=True)
class Draft:
    question: str
    options: tuple[str, ...] | None
    answer: str  # a letter for multiple-choice
    steps: tuple[str, ...]


def _q(text: str) -> str:
    return f"\u201c{text}\u201d"


@dataclass(frozen=True)
class Moments:
    """The moments a question may quote: `clips` (one per segment, a run of equal captions), `snip`
    (segment index -> its distinctive quote), `answer` (segment index -> what an open-ended answer
    naming it says: `answer_texts`), `first` (the index in the whole video of `clips[0]`, nonzero for
    a window: reasoning numbers segments as the whole video does)."""

    clips: tuple[Clip, ...]
    snip: dict[int, str]
    answer: dict[int, str]
    first: int = 0

    def number(self, i: int) -> int:
        return self.first + i + 1

    def seen(self, i: int, what: str) -> str:
        return f"The caption of shot {self.number(i)} ({self.clips[i].span}) describes {what}."


def _choice(correct: str, wrong: list[str], rng: random.Random) -> tuple[tuple[str, ...], str]:
    options = [correct, *wrong]
    rng.shuffle(options)
    return tuple(options), LETTERS[options.index(correct)]


def _temporal(m: Moments, qtype: str, rng: random.Random) -> Draft | None:
    usable = sorted(m.snip)
    if qtype == "multiple_choice":
        if len(usable) < 3:
            return None
        shown = rng.sample(usable, 3)  # labelled (1), (2), (3) in this (random) order
        in_time = sorted(range(3), key=lambda k: shown[k])
        correct = ", then ".join(f"({k + 1})" for k in in_time)
        perms = [", then ".join(f"({k + 1})" for k in p) for p in itertools.permutations(range(3))]
        options, letter = _choice(correct, rng.sample([p for p in perms if p != correct], 3), rng)
        listed = "; ".join(f"({k + 1}) {_q(m.snip[i])}" for k, i in enumerate(shown))
        steps = [m.seen(shown[k], f"({k + 1})") for k in range(3)]
        steps.append(f"In time order: {correct}, option {letter}.")
        return Draft(f"In what order do these moments happen in the video: {listed}?", options, letter, tuple(steps))
    if len(usable) < 2:
        return None
    a, b = rng.sample(usable, 2)
    first = min(a, b)
    steps = (
        m.seen(a, "the first"),
        m.seen(b, "the second"),
        f"Shot {m.number(first)} is before shot {m.number(a + b - first)}, so the {'first' if first == a else 'second'}.",
    )
    return Draft(f"Which happens first in the video: {_q(m.snip[a])} or {_q(m.snip[b])}?", None, m.snip[first], steps)


def _goal(m: Moments, qtype: str, rng: random.Random) -> Draft | None:
    """Starting from any quoted moment that leaves enough after it, so a video asks more than one
    such question (from its first moment only, a video had one of each)."""
    usable = sorted(m.snip)
    if len(usable) < 2:
        return None
    if qtype == "multiple_choice":
        if len(usable) < 4:
            return None
        after = usable[rng.randrange(len(usable) - 3):]  # the start and at least three moments after it
        start, end = after[0], after[-1]
        pool = after[1:-1] if len(after) >= 5 else after[:-1]
        picked = sorted([end, *rng.sample(pool, 3)])
        options, letter = _choice(m.snip[end], [m.snip[i] for i in picked if i != end], rng)
        steps = [m.seen(start, "the start")]
        steps += [m.seen(i, f"option {LETTERS[options.index(m.snip[i])]}") for i in picked]
        steps.append(f"The last is shot {m.number(end)}, option {letter}.")
        question = f"Starting from {_q(m.snip[start])}, which of these moments does the video arrive at last, as the outcome of the sequence?"
        return Draft(question, options, letter, tuple(steps))
    end = len(m.clips) - 1  # "at the end" is only true of the final clip
    starts = [i for i in usable if i < end]
    if end not in m.answer or not starts:
        return None
    start = rng.choice(starts)
    steps = (
        m.seen(start, "the start"),
        f"The last shot, {m.number(end)}, shows {_q(m.answer[end])}.",
    )
    return Draft(f"Starting from {_q(m.snip[start])}, what does the video show at the end of the sequence?", None, m.answer[end], steps)


def _spatial(m: Moments, qtype: str, rng: random.Random) -> Draft | None:
    clips = m.clips
    if not m.snip or len(clips) < (4 if qtype == "multiple_choice" else 2):
        return None
    subject = rng.choice(sorted(m.snip))
    question = f"In which segment of the video (which time range) is {_q(m.snip[subject])} shown?"
    span = clips[subject].span
    if qtype == "multiple_choice":
        others = sorted(rng.sample([i for i in range(len(clips)) if i != subject], 3))
        options, letter = _choice(span, [clips[i].span for i in others], rng)
        steps = (m.seen(subject, "the quote"), f"Shot {m.number(subject)} is {span}, option {letter}.")
        return Draft(question, options, letter, steps)
    steps = (m.seen(subject, "the quote"), f"Shot {m.number(subject)} is {span}.")
    return Draft(question, None, span, steps)


def _plot(m: Moments, qtype: str, rng: random.Random) -> Draft | None:
    snip = m.snip
    if qtype == "multiple_choice":
        triples = [i for i in snip if i + 1 in snip and i + 2 in snip]
        if not triples or len(snip) < 4:
            return None
        a = rng.choice(sorted(triples))
        b, c = a + 1, a + 2
        wrong = rng.sample(sorted(i for i in snip if i != b), 3)
        options, letter = _choice(snip[b], [snip[i] for i in wrong], rng)
        steps = (
            m.seen(a, "the first"),
            m.seen(c, "the second"),
            m.seen(b, f"option {letter}"),
            f"Shot {m.number(b)} is between them, option {letter}.",
        )
        return Draft(f"What happens in the video between {_q(snip[a])} and {_q(snip[c])}?", options, letter, steps)
    pairs = [i for i in snip if i + 1 in m.answer]
    if not pairs:
        return None
    a = rng.choice(sorted(pairs))
    steps = (
        m.seen(a, "the quote"),
        f"The next shot, {m.number(a + 1)}, shows {_q(m.answer[a + 1])}.",
    )
    return Draft(f"What happens right after {_q(snip[a])} in the video?", None, m.answer[a + 1], steps)


_DRAFTERS = {"Temporal": _temporal, "Goal and Purpose": _goal, "Spatial": _spatial, "Plot and Narrative": _plot}


def draft_questions(video: VideoCaptions, category: str, question_type: str, n_questions: int, clips: range | None = None) -> list[Draft]:
    """Up to `n_questions` distinct drafts; fewer (or none) when the video cannot support more.

    `clips`: a window of consecutive clips to ask about (default: all). Quotes stay distinctive in
    the whole video, since the questions are put to someone watching all of it, and "what the video
    shows at the end" is asked only of a window that reaches the video's end."""
    starts = _segment_starts(video.clips)
    whole = VideoCaptions(video.video_id, segments(video.clips, starts))
    snip = distinctive_snippets(whole)
    answer = answer_texts(whole, snip)
    first = 0
    if clips is not None and (clips.start, clips.stop) != (0, len(video.clips)):
        if clips.stop < len(video.clips) and (category, question_type) == ("Goal and Purpose", "open_ended"):
            return []
        # The window's moments: the segments that start among its clips.
        inside = [k for k, start in enumerate(starts) if start in clips]
        if not inside:
            return []
        first, stop = inside[0], inside[-1] + 1
        snip, answer = ({k - first: text for k, text in d.items() if first <= k < stop} for d in (snip, answer))
        whole = VideoCaptions(video.video_id, whole.clips[first:stop])
    moments = Moments(whole.clips, snip, answer, first)
    drafts: dict[str, Draft] = {}
    for attempt in range(4 * n_questions):
        seed = int(stable_hash([whole.video_id, category, question_type, attempt]), 16)
        draft = _DRAFTERS[category](moments, question_type, random.Random(seed))
        if draft is None:
            break  # the video cannot support this kind of question at all
        drafts.setdefault(draft.question, draft)
        if len(drafts) == n_questions:
            break
    return list(drafts.values())


def render_answer(drafts: list[Draft]) -> str:
    """The drafts as the strict JSON answer the generation prompt asks an LLM for."""
    items = []
    for d in drafts:
        item: dict[str, object] = {"question": d.question}
        if d.options is not None:
            item["options"] = dict(zip(LETTERS, d.options))
        item["answer"] = d.answer
        item["reasoning"] = "\n".join(f"Step {k}: {s}" for k, s in enumerate(d.steps, 1))
        items.append(item)
    return json.dumps({"questions": items}, ensure_ascii=False, indent=1)


def rewrite_reasoning(raw: str) -> str:
    """Template refinement: numbered steps about the video's shots, not about captions ("(1) is shot 3.")."""
    lines = [_refined_step(_RAW_STEP.sub("", ln.strip())) for ln in raw.splitlines() if ln.strip()]
    return "\n".join(f"{k}. {ln}" for k, ln in enumerate(lines, 1))


def _refined_step(step: str) -> str:
    seen = _RAW_SEEN.match(step)
    if seen is None:
        return step
    number, what = seen.groups()
    return f"{what[:1].upper()}{what[1:]} is shot {number}."
