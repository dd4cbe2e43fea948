"""RL examples: the filter stage's `rl` split, and how a question is posed and graded."""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from data_schemas import FILTER
from models.video import FrameSampling, VideoTokenBudget
from models.vlm import video_messages
from parallel.embedding_cache import VideoRequest
from tasks.config import VideoInputs
from tasks.engine.stage import read_stage_table
from tasks.engine.store import Workdir, stable_hash
from tasks.grading.answers import AnswerKey
from tasks.grading.prompts import LETTERS, MULTIPLE_CHOICE, user_prompt
from tasks.media.frames import read_video_frames

RL_SPLIT = "rl"


@dataclass(frozen=True)
class RLExample:
    """One RL question about a whole source video. `prompt` is the user turn's text after the
    video, as `tasks.grading.prompts.user_prompt` wrote it for the filter stage."""

    qa_id: str
    video_id: str
    video_uri: str
    question_type: str
    question: str
    options: tuple[str, ...] | None
    answer: str
    prompt: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RLExample:
        return cls(**{**d, "options": tuple(d["options"]) if d["options"] is not None else None})

    def messages(self) -> list[dict[str, Any]]:
        return video_messages(self.prompt)

    def answer_key(self) -> AnswerKey:
        return AnswerKey(self.question, self.question_type, self.answer, self.options)

    def with_options_shuffled(self, seed: object) -> RLExample:
        """The same question with its options in an order drawn from `seed` (a multiple-choice
        question; any other is returned as is), the answer letter and the prompt following."""
        if self.question_type != MULTIPLE_CHOICE or not self.options:
            return self
        order = list(range(len(self.options)))
        random.Random(stable_hash([seed, self.qa_id])).shuffle(order)
        options = tuple(self.options[k] for k in order)
        answer = LETTERS[order.index(LETTERS.index(self.answer.strip().upper()))]
        return replace(self, options=options, answer=answer, prompt=user_prompt(self.question, self.question_type, options))

    def video_key(self, sampling: FrameSampling, budget: VideoTokenBudget | None = None) -> str:
        """Identity of the video input this question is asked about (the embedding cache's key; the
        cache's namespace adds the vision weights and the preprocessing): the video, how its frames
        are sampled and the token budget they are sized under."""
        return stable_hash({
            "video_id": self.video_id, "uri": self.video_uri, "sampling": asdict(sampling),
            "budget": asdict(budget) if budget is not None else None,
        })


def video_requests(examples: Sequence[RLExample], cfg: VideoInputs) -> list[VideoRequest]:
    """The questions with readers of their videos' frames as `cfg` samples them, keyed by the sampling
    and the budget the embeddings are made under (`cfg.video_budget()`, given to `encode_requests`
    with them). Nothing is read here: `encode_requests` reads a video (once) only on a cache miss."""
    sampling, budget = cfg.frame_sampling(), cfg.video_budget()
    uris = dict.fromkeys(e.video_uri for e in examples)
    readers = {uri: functools.cache(functools.partial(read_video_frames, uri, sampling)) for uri in uris}
    return [VideoRequest(e.messages(), readers[e.video_uri], e.video_key(sampling, budget)) for e in examples]


def load_rl_examples(workdir: Workdir) -> list[RLExample]:
    """The RL split of a workdir, sorted by qa_id: the only place that maps the filter table's
    columns to RL examples."""
    rows = read_stage_table(workdir, "filter", FILTER).to_pylist()
    return sorted(
        (RLExample.from_dict({k: r[k] for k in RLExample.__dataclass_fields__}) for r in rows if r["split"] == RL_SPLIT),
        key=lambda e: e.qa_id,
    )
