"""How many of a run's captions of the built-in sample name what the clip shows.

The sample's scene specification (`tasks.samples.videos.SAMPLE_SPECS`) says which lavfi source fills
each scene; each source is one of the pretrained tiny captioner's scene kinds
(`models.pretrain.SCENE_KINDS`). A clip's caption is right when it names the kind of the scene that
fills most of the clip (either, when two scenes share it equally) and no kind the clip does not show.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

from data_schemas import CAPTIONS, CLIPS
from models.pretrain import kinds_named_in
from tasks.engine.stage import read_stage_table
from tasks.engine.store import Workdir
from tasks.samples.videos import SAMPLE_SPECS, Scene, scenes_of

# lavfi filter that draws the picture (the source, or the last filter of a chain) -> the scene kind a
# caption of it names.
_KIND_OF_FILTER = {
    "testsrc2": "a moving test pattern",
    "smptebars": "color bars",
    "smptehdbars": "color bars",
    "pal100bars": "color bars",
    "pal75bars": "color bars",
    "rgbtestsrc": "an RGB test pattern",
    "yuvtestsrc": "a YUV test pattern",
    "cellauto": "a cellular automaton",
    "life": "the game of life",
    "mandelbrot": "a Mandelbrot zoom",
    "geq": "drifting color gradients",  # the sample's only geq scene: two colours, a turning soft edge
}


def scene_kind(scene: Scene) -> str:
    """The scene kind that names what `scene` shows; KeyError for a source no kind covers."""
    name, _, options = scene.filters[-1].partition("=")
    if name == "color":  # color=c=<colour>
        return f"a solid {options.removeprefix('c=')} screen"
    return _KIND_OF_FILTER[name]


def shown_kinds(video_file: str, start_s: float, end_s: float) -> tuple[set[str], set[str]]:
    """What `video_file`'s span [start_s, end_s] shows: the kinds of the scene covering most of it
    (of each, when scenes cover it equally) and the kinds of every scene it overlaps. KeyError for
    a file that is not a sample video."""
    specs = {f"{spec.name}.mp4": spec for spec in SAMPLE_SPECS}
    overlaps = [(min(end_s, s.end_s) - max(start_s, s.start_s), s) for s in scenes_of(specs[video_file])]
    most = max(overlap for overlap, _ in overlaps)
    main = {scene_kind(s) for overlap, s in overlaps if most - overlap < 1e-6}
    return main, {scene_kind(s) for overlap, s in overlaps if overlap > 1e-6}


@dataclass(frozen=True)
class CaptionAccuracy:
    right: int
    total: int
    wrong: tuple[tuple[str, str, str], ...]  # (clip id, caption, what it should name), for a report

    @property
    def fraction(self) -> float:
        return self.right / self.total if self.total else 0.0


def caption_accuracy(clips: Iterable[tuple[str, str, float, float, str]]) -> CaptionAccuracy:
    """Score (clip id, source video file name, start s, end s, caption) rows of sample clips: a
    caption is right when it names the kind of the scene covering most of the clip and no kind the
    clip does not show."""
    right, total, wrong = 0, 0, []
    for clip_id, video_file, start_s, end_s, caption in clips:
        main, shown = shown_kinds(video_file, start_s, end_s)
        named = set(kinds_named_in(caption))
        total += 1
        if named & main and named <= shown:
            right += 1
        else:
            wrong.append((clip_id, caption, " or ".join(sorted(main)) + (f" (shown: {', '.join(sorted(shown))})" if shown != main else "")))
    return CaptionAccuracy(right, total, tuple(wrong))


def workdir_caption_accuracy(workdir: Workdir) -> CaptionAccuracy:
    """`caption_accuracy` of a workdir whose clip and caption stages ran on the sample."""
    sources = {
        row["clip_id"]: PurePosixPath(row["source_uri"]).name
        for row in read_stage_table(workdir, "clip", CLIPS).select(["clip_id", "source_uri"]).to_pylist()
    }
    captions = read_stage_table(workdir, "caption", CAPTIONS).select(["clip_id", "start_s", "end_s", "caption"]).to_pylist()
    return caption_accuracy(
        (row["clip_id"], sources[row["clip_id"]], row["start_s"], row["end_s"], row["caption"]) for row in captions
    )
