"""A synthetic, verifiable video QA set for checking that training learns (`lvr synth`).

Each video is a row of solid-colour segments (distinct colours from `PALETTE`, each lasting whole
one-second slots, one segment strictly longest); each video gets one question per kind in `KINDS`
(which colour comes first, last, or lasts longest), multiple choice over the whole palette in a
fixed order, with the exact answer known by construction. The SFT target names the colour, then
the letter: `<think>The first colour is red.</think><answer>A</answer>`.

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
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from data_schemas import FILTER
from tasks.config import DEFAULT_CONFIG, PipelineConfig, load_config
from tasks.engine.run import run_stage
from tasks.engine.stage import ShardResult, Stage, StageContext, StageReport, WorkItem
from tasks.engine.store import Workdir, stable_hash
from tasks.grading.prompts import LETTERS, MULTIPLE_CHOICE, user_prompt

PALETTE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (230, 25, 25)), ("green", (25, 170, 50)), ("blue", (30, 60, 230)), ("yellow", (240, 220, 30)),
)
KINDS = {
    "first": ("Which colour is shown first in the video?", "first"),
    "last": ("Which colour is shown last in the video?", "last"),
    "longest": ("Which colour is shown for the longest time in the video?", "longest"),
}
CATEGORY = "Temporal"
VIDEOS_DIR = "_synth"

Segment = tuple[str, int]  # (colour name, slots)


@dataclass(frozen=True)
class SynthSpec:
    videos: int = 600
    slots: int = 8  # seconds per video; every segment lasts a whole number of them
    segments: int = 3  # colours per video (distinct, at most len(PALETTE))
    kinds: tuple[str, ...] = ("first", "last", "longest")
    fps: int = 4
    size: int = 56  # pixels per side: one 2 x 2 token grid per temporal patch with the tiny model
    eval_fraction: float = 0.2  # of the videos
    sft_fraction: float = 0.3  # of the videos; the rest are rl
    seed: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.segments <= min(len(PALETTE), self.slots - 1):
            raise ValueError(f"segments must be in [2, min({len(PALETTE)}, slots - 1)], got {self.segments}")
        unknown = set(self.kinds) - set(KINDS)
        if unknown or not self.kinds:
            raise ValueError(f"kinds must be among {sorted(KINDS)}, got {list(self.kinds)}")
        if self.eval_fraction + self.sft_fraction > 1:
            raise ValueError("eval_fraction + sft_fraction must not exceed 1")

    @property
    def num_frames(self) -> int:
        """Frames to sample per video: two per slot, i.e. one temporal patch per slot."""
        return 2 * self.slots


def plan_segments(rng: random.Random, spec: SynthSpec) -> list[Segment]:
    """Distinct colours with lengths summing to `slots`, one length strictly the longest."""
    while True:
        cuts = sorted(rng.sample(range(1, spec.slots), spec.segments - 1))
        lengths = [b - a for a, b in zip([0, *cuts], [*cuts, spec.slots])]
        if lengths.count(max(lengths)) == 1:
            break
    colours = rng.sample([name for name, _ in PALETTE], spec.segments)
    return list(zip(colours, lengths))


def answer_colour(segments: list[Segment], kind: str) -> str:
    if kind == "first":
        return segments[0][0]
    if kind == "last":
        return segments[-1][0]
    return max(segments, key=lambda s: s[1])[0]


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
    options = [name for name, _ in PALETTE]
    video_id = f"synth-{spec.seed}-{index:05d}"
    rows = []
    for kind in spec.kinds:
        question, phrase = KINDS[kind]
        colour = answer_colour(segments, kind)
        letter = LETTERS[options.index(colour)]
        reasoning = f"The {phrase} colour is {colour}."
        rows.append({
            "qa_id": stable_hash({"video_id": video_id, "kind": kind}), "video_id": video_id, "video_uri": uri, "category": CATEGORY,
            "question_type": MULTIPLE_CHOICE, "question": question, "options": options, "answer": letter,
            "prompt": user_prompt(question, MULTIPLE_CHOICE, options), "target": f"<think>{reasoning}</think><answer>{letter}</answer>",
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
