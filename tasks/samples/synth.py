"""A synthetic, verifiable video QA set for checking that training learns (`lvr synth`).

Each video is a row of solid-colour segments (colours from `PALETTE`, each segment lasting whole
one-second slots); each video gets one question per kind in `SynthSpec.kinds`, with the exact answer
known by construction. Two families of kinds (`KINDS`):

- perception, multiple choice over the whole palette in a fixed order: which colour comes first,
  last, or is shown longest;
- composition of several observations across the video: which colour comes right after the
  longest segment (multiple choice), how many separate times the first colour is shown (open-ended,
  a number) and whether the last colour is the first one again (open-ended, yes or no). The last two
  need colours that come back (`SynthSpec.repeats`: adjacent segments still differ).

A video is planned so that every kind asked about it has one answer: a unique longest segment, a
unique colour shown longest in total, a longest segment that is not the last one; with repeats,
half the videos (by a seeded coin) end on their first colour.

The SFT target (`SynthSpec.reasoning`) is either the answer in a sentence,
`<think>The first colour is red.</think><answer>A</answer>`, or a chain that names the colour of
every slot in order and then derives the answer from them (the shape of the paper's CoT-SFT data),
`<think>Colours: red red blue blue blue red green green. Longest blue, then red.</think><answer>A</answer>`.

Sampling `2 * slots` frames across a video (`SynthSpec.num_frames`) takes two frames per slot, so
each of Qwen's temporal patches (two frames) sees exactly one slot's colour.

The set is published as a complete `filter/` (the FILTER schema, with `split` sft / rl / eval
drawn per video, so no video is both trained on and evaluated) by a stage run through the normal
engine, so `lvr run --workdir W --from sft` trains and evaluates on it. The videos live under
`filter/_synth/`. Items were not answered by a base model: `n_runs` is 0 and `difficulty` a
placeholder ("medium").
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np

from data_schemas import FILTER
from tasks.config import DEFAULT_CONFIG, PipelineConfig, load_config
from tasks.engine.run import run_stage
from tasks.engine.stage import ShardResult, Stage, StageContext, StageReport, WorkItem
from tasks.engine.store import Workdir, stable_hash
from tasks.grading.prompts import LETTERS, MULTIPLE_CHOICE, OPEN_ENDED, user_prompt

PALETTE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (230, 25, 25)), ("green", (25, 170, 50)), ("blue", (30, 60, 230)), ("yellow", (240, 220, 30)),
)
CATEGORY = "Temporal"
VIDEOS_DIR = "_synth"

Segment = tuple[str, int]  # (colour name, slots)


def slot_colours(segments: list[Segment]) -> list[str]:
    """The colour of every one-second slot, in order."""
    return [colour for colour, slots in segments for _ in range(slots)]


def longest_segment(segments: list[Segment]) -> int:
    return max(range(len(segments)), key=lambda i: segments[i][1])


def longest_shown(segments: list[Segment]) -> str:
    """The colour shown for the most slots in total (the longest segment's when colours are distinct)."""
    colours = slot_colours(segments)
    return max(dict.fromkeys(colours), key=colours.count)


def times_shown(segments: list[Segment], colour: str) -> int:
    return sum(c == colour for c, _ in segments)


@dataclass(frozen=True)
class Kind:
    """One kind of question: its text, its type (multiple choice over `PALETTE`, or open-ended), its
    answer (a colour for multiple choice, the answer text otherwise) and the sentences that state
    (`says`) or derive from the observed colours (`derives`) that answer."""

    question: str
    question_type: str
    answer: Callable[[list[Segment]], str]
    says: Callable[[list[Segment]], str]
    derives: Callable[[list[Segment]], str]
    needs_repeats: bool = False


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


KINDS: dict[str, Kind] = {
    "first": Kind(
        "Which colour is shown first in the video?", MULTIPLE_CHOICE, lambda s: s[0][0],
        lambda s: f"The first colour is {s[0][0]}.", lambda s: f"First {s[0][0]}.",
    ),
    "last": Kind(
        "Which colour is shown last in the video?", MULTIPLE_CHOICE, lambda s: s[-1][0],
        lambda s: f"The last colour is {s[-1][0]}.", lambda s: f"Last {s[-1][0]}.",
    ),
    "longest": Kind(
        "Which colour is shown for the longest time in the video?", MULTIPLE_CHOICE, longest_shown,
        lambda s: f"The longest colour is {longest_shown(s)}.", lambda s: f"Longest {longest_shown(s)}.",
    ),
    "after_longest": Kind(
        "Which colour comes right after the longest segment of the video?", MULTIPLE_CHOICE,
        lambda s: s[longest_segment(s) + 1][0],
        lambda s: f"After the longest segment comes {s[longest_segment(s) + 1][0]}.",
        lambda s: f"Longest {s[longest_segment(s)][0]}, then {s[longest_segment(s) + 1][0]}.",
    ),
    "returns": Kind(
        "How many separate times is the first colour of the video shown?", OPEN_ENDED,
        lambda s: str(times_shown(s, s[0][0])),
        lambda s: f"The first colour is shown {times_shown(s, s[0][0])} times.",
        lambda s: f"First {s[0][0]}, shown {times_shown(s, s[0][0])} times.",
        needs_repeats=True,
    ),
    "same_ends": Kind(
        "Is the last colour of the video the same as the first one? Answer yes or no.", OPEN_ENDED,
        lambda s: _yes_no(s[0][0] == s[-1][0]),
        lambda s: f"The first and last colours are {'the same' if s[0][0] == s[-1][0] else 'different'}.",
        lambda s: f"First {s[0][0]}, last {s[-1][0]}: {_yes_no(s[0][0] == s[-1][0])}.",
        needs_repeats=True,
    ),
}


@dataclass(frozen=True)
class SynthSpec:
    videos: int = 600
    slots: int = 8  # seconds per video; every segment lasts a whole number of them
    segments: int = 3  # colour segments per video (distinct colours unless `repeats`)
    kinds: tuple[str, ...] = ("first", "last", "longest")
    repeats: bool = False  # a colour may come back after another one (adjacent segments always differ)
    reasoning: Literal["answer", "chain"] = "answer"  # the SFT target's <think>: the answer, or every slot's colour then a derivation
    fps: int = 4
    size: int = 56  # pixels per side: one 2 x 2 token grid per temporal patch with the tiny model
    eval_fraction: float = 0.2  # of the videos
    sft_fraction: float = 0.3  # of the videos; the rest are rl
    seed: int = 0

    def __post_init__(self) -> None:
        most = self.slots - 1 if self.repeats else min(len(PALETTE), self.slots - 1)
        if not 2 <= self.segments <= most:
            raise ValueError(f"segments must be in [2, {most}] (slots - 1{'' if self.repeats else ', palette size'}), got {self.segments}")
        unknown = set(self.kinds) - set(KINDS)
        if unknown or not self.kinds:
            raise ValueError(f"kinds must be among {sorted(KINDS)}, got {list(self.kinds)}")
        needing = [k for k in self.kinds if KINDS[k].needs_repeats]
        if needing and not (self.repeats and self.segments >= 3):
            raise ValueError(f"kinds {needing} ask about colours that come back: they need repeats=True and segments >= 3")
        if self.reasoning not in ("answer", "chain"):
            raise ValueError(f"reasoning must be 'answer' or 'chain', got {self.reasoning!r}")
        if self.eval_fraction + self.sft_fraction > 1:
            raise ValueError("eval_fraction + sft_fraction must not exceed 1")

    @property
    def num_frames(self) -> int:
        """Frames to sample per video: two per slot, i.e. one temporal patch per slot."""
        return 2 * self.slots


def answerable(segments: list[Segment], kinds: tuple[str, ...]) -> bool:
    """Whether every kind has exactly one answer about these segments."""
    lengths = [n for _, n in segments]
    if lengths.count(max(lengths)) != 1:
        return False
    colours = slot_colours(segments)
    totals = sorted((colours.count(c) for c in set(colours)), reverse=True)
    if "longest" in kinds and len(totals) > 1 and totals[0] == totals[1]:
        return False
    return not ("after_longest" in kinds and longest_segment(segments) == len(segments) - 1)


def plan_segments(rng: random.Random, spec: SynthSpec) -> list[Segment]:
    """Colours with lengths summing to `slots`, answerable for every kind of the spec; distinct
    colours, or (with `repeats`) adjacent ones differing, ending on the first colour as a seeded coin says."""
    names = [name for name, _ in PALETTE]
    same_ends = rng.random() < 0.5 if spec.repeats else False
    while True:
        cuts = sorted(rng.sample(range(1, spec.slots), spec.segments - 1))
        lengths = [b - a for a, b in zip([0, *cuts], [*cuts, spec.slots])]
        if lengths.count(max(lengths)) != 1:
            continue
        if spec.repeats:
            colours = [rng.choice(names)]
            for _ in range(spec.segments - 1):
                colours.append(rng.choice([c for c in names if c != colours[-1]]))
        else:
            colours = rng.sample(names, spec.segments)
        segments = list(zip(colours, lengths))
        if answerable(segments, spec.kinds) and (colours[0] == colours[-1]) == same_ends:
            return segments


def reasoning_text(segments: list[Segment], kind: str, style: str) -> str:
    """The SFT target's thinking: the answer in a sentence, or every slot's colour then the derivation."""
    if style == "answer":
        return KINDS[kind].says(segments)
    # "Colours:" first, so that every colour name is the same token (" red"), the first one included.
    return f"Colours: {' '.join(slot_colours(segments))}. {KINDS[kind].derives(segments)}"


def write_video(path: Path, segments: list[Segment], spec: SynthSpec) -> None:
    """`spec.fps` frames per slot of each segment's colour, H.264 (near-lossless on flat colour)."""
    import av

    rgb = dict(PALETTE)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=spec.fps, options={"crf": "10", "preset": "ultrafast", "threads": "1"})
        stream.width = stream.height = spec.size
        stream.pix_fmt = "yuv420p"
        for colour, slots in segments:
            frame = np.empty((spec.size, spec.size, 3), dtype=np.uint8)
            frame[...] = rgb[colour]
            for _ in range(slots * spec.fps):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    tmp.replace(path)


@lru_cache(maxsize=8)
def video_splits(spec: SynthSpec) -> tuple[str, ...]:
    """eval / sft / rl per video: a seeded permutation of the videos cut at the fractions."""
    order = random.Random(f"split-{spec.seed}").sample(range(spec.videos), spec.videos)
    n_eval, n_sft = round(spec.eval_fraction * spec.videos), round(spec.sft_fraction * spec.videos)
    split = {video: "eval" if rank < n_eval else "sft" if rank < n_eval + n_sft else "rl" for rank, video in enumerate(order)}
    return tuple(split[i] for i in range(spec.videos))


def item_rows(index: int, segments: list[Segment], uri: str, split: str, spec: SynthSpec) -> list[dict[str, Any]]:
    """FILTER rows of one video's questions."""
    palette = [name for name, _ in PALETTE]
    video_id = f"synth-{spec.seed}-{index:05d}"
    rows = []
    for kind in spec.kinds:
        question, question_type = KINDS[kind].question, KINDS[kind].question_type
        answer = KINDS[kind].answer(segments)  # a colour for multiple choice
        options = palette if question_type == MULTIPLE_CHOICE else None
        key = LETTERS[palette.index(answer)] if options else answer
        reasoning = reasoning_text(segments, kind, spec.reasoning)
        rows.append({
            "qa_id": stable_hash({"video_id": video_id, "kind": kind}), "video_id": video_id, "video_uri": uri, "category": CATEGORY,
            "question_type": question_type, "question": question, "options": options, "answer": key,
            "prompt": user_prompt(question, question_type, options), "target": f"<think>{reasoning}</think><answer>{key}</answer>",
            "n_runs": 0, "n_correct": 0, "n_format_ok": 0, "pass_rate": 0.0, "difficulty": "medium",
            "reasoning_words": len(reasoning.split()), "quality": 1.0, "split": split, "model": "synth", "num_frames": spec.num_frames,
        })
    return rows


class SynthStage(Stage):
    """Publishes the synthetic set as the `filter` stage's output (one work item per video)."""

    name = "filter"
    code_version = "synth-1"
    output = FILTER

    def __init__(self, spec: SynthSpec) -> None:
        self.spec = spec

    def settings(self, ctx: StageContext) -> dict[str, Any]:
        return {"synth": asdict(self.spec)}

    def shard_size(self, ctx: StageContext) -> int:
        return 64

    def list_items(self, ctx: StageContext) -> list[WorkItem]:
        return [WorkItem(f"{i:05d}", key=stable_hash({"spec": asdict(self.spec), "video": i})) for i in range(self.spec.videos)]

    def process_shard(self, ctx: StageContext, items: list[WorkItem]) -> ShardResult:
        spec = self.spec
        rows: list[dict[str, Any]] = []
        for item in items:
            index = int(item.item_id)
            segments = plan_segments(random.Random(f"video-{spec.seed}-{index}"), spec)
            path = Path(ctx.stage_path(self.name, VIDEOS_DIR, f"{item.key}.mp4"))
            if not path.is_file():
                write_video(path, segments, spec)
            rows += item_rows(index, segments, str(path), video_splits(spec)[index], spec)
        return ShardResult({FILTER.name: FILTER.from_rows(rows)}, [])


def write_synth(workdir: str | Workdir, spec: SynthSpec, config: PipelineConfig | None = None) -> StageReport:
    """Write the synthetic set into `workdir` as a complete `filter/` (local workdirs only)."""
    wd = workdir if isinstance(workdir, Workdir) else Workdir(workdir)
    if not wd.is_local:
        raise ValueError(f"lvr synth writes videos with local file I/O: use a local workdir, not {wd.url}")
    wd.makedirs()
    return run_stage(SynthStage(spec), StageContext(wd, config or load_config(DEFAULT_CONFIG)))
