"""Deterministic synthetic "long" videos to run the pipeline on without any downloads.

Each video is a row of labelled scenes drawn by ffmpeg's lavfi sources, each with
its own sine tone, written in one ffmpeg run.  The bytes are identical on every
run on the same machine (bit-exact muxing, single-threaded x264, seeded random
sources), so outputs built from them can be compared across runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import ffmpeg

from models.pretrain import FRAME_HEIGHT, FRAME_WIDTH
from tasks.config import cache_dir
from tasks.engine.store import LOCAL, write_bytes_atomic
from tasks.media.ffmpeg import MediaError, run_tool, stderr_tail

FONT_PATH = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
SCENES_FILE = "scenes.json"
# The folder under lvr's cache dir the sample is written to on first use; existing videos are kept
# there, so the name changes with what a render gives (v2: the gradients scene drawn by geq) or with
# the videos listed (v3: six, so a three-video checkout and this one never rewrite each other's scenes.json).
SAMPLE_CACHE_SUBDIR = "sample-videos-v3"
AUDIO_SAMPLE_RATE = 44100
# ffmpeg-python escapes drawtext's text for ':' ',' '[' ']' but mangles quotes and
# '%', so labels stay within characters that survive both escaping layers.
_LABEL_PATTERN = re.compile(r"[A-Za-z0-9 ,.:()\-]+")
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_\-]+")
log = logging.getLogger("lvr.samples")


@dataclass(frozen=True)
class SampleSpec:
    name: str
    seconds: int
    # (label, lavfi source with its own options but without size/rate, which come from the spec,
    # optionally followed by filters after a comma); the video's seconds are shared equally among the scenes.
    scenes: tuple[tuple[str, str], ...]
    fps: int = 25
    # Frames from keyframe to keyframe, fixed; None leaves it to x264 (scene-cut keyframes). The
    # default, a keyframe every 2 s at 25 fps, lets a stream copy land within 1 s of every mark.
    gop: int | None = 50
    # The frame size the tiny captioner is pretrained at.
    width: int = FRAME_WIDTH
    height: int = FRAME_HEIGHT

    def __post_init__(self) -> None:
        if not _NAME_PATTERN.fullmatch(self.name):
            raise ValueError(f"sample name {self.name!r} must match {_NAME_PATTERN.pattern}")
        if not self.scenes or self.seconds % len(self.scenes):
            raise ValueError(
                f"{self.name}: {self.seconds} s must split into whole seconds over "
                f"{len(self.scenes)} scenes"
            )
        for label, _ in self.scenes:
            if not _LABEL_PATTERN.fullmatch(label):
                raise ValueError(f"{self.name}: scene label {label!r} must match {_LABEL_PATTERN.pattern}")

    @property
    def scene_seconds(self) -> int:
        return self.seconds // len(self.scenes)


@dataclass(frozen=True)
class Scene:
    index: int
    label: str
    text: str  # what is burned into the picture
    source: str
    tone_hz: int
    start_s: float
    end_s: float

    @property
    def filters(self) -> list[str]:
        """The scene's lavfi chain, filter by filter: the source first (it takes size and rate),
        the filter that draws the picture last."""
        return self.source.split(",")


# Where a frame is on the soft edge between two colours (0 to 1), the edge turning about the centre
# of a 320x240 frame at 0.3 rad/s; written without commas, which separate lavfi's filters.
_EDGE = "(0.5+0.5*tanh(((X-160)*cos(T*0.3)+(Y-120)*sin(T*0.3))/60))"


def _gradient(red: str, green: str, blue: str) -> str:
    """A drifting colour gradient, drawn by geq from each channel's expression (in terms of `_EDGE`):
    ffmpeg 5.1's `gradients` source gives other pixels on every run (seed and colours given or not),
    which changed the video's bytes, so its clip ids, captions and questions, on every fresh machine."""
    return f"color=c=black,format=rgb24,geq=r='{red}':g='{green}':b='{blue}'"


SAMPLE_SPECS: tuple[SampleSpec, ...] = (
    # 250-frame GOP at 30 fps: keyframes every 8.33 s, so 10 s clips cannot be
    # stream-copied without snapping cuts far from their marks.
    SampleSpec(
        name="sample_a_30fps_gop250",
        seconds=150,
        fps=30,
        gop=250,
        scenes=(
            ("moving test pattern", "testsrc2"),
            ("SMPTE color bars", "smptebars"),
            ("cellular automaton rule 30", "cellauto=rule=30:seed=12:scroll=1"),
            ("RGB test pattern", "rgbtestsrc"),
            ("PAL color bars", "pal100bars"),
            ("solid red", "color=c=red"),
        ),
    ),
    SampleSpec(
        name="sample_b_25fps",
        seconds=100,
        scenes=(
            # Two colours meeting in a soft edge that turns.
            ("drifting color gradients", _gradient(f"255-223*{_EDGE}", "64", f"255*{_EDGE}")),
            ("YUV test pattern", "yuvtestsrc"),
            ("Mandelbrot zoom", "mandelbrot"),
            ("HD color bars", "smptehdbars"),
            ("solid blue", "color=c=blue"),
        ),
    ),
    SampleSpec(
        name="sample_c_25fps",
        seconds=70,
        scenes=(
            ("PAL 75 percent color bars", "pal75bars"),
            ("game of life", "life=seed=31:ratio=0.3:mold=10:life_color=yellow"),
            ("cellular automaton rule 110", "cellauto=rule=110:seed=32:scroll=1"),
            ("solid green", "color=c=green"),
            ("moving test pattern", "testsrc2"),
        ),
    ),
    # The same kinds of scene in other orders and lengths: with three videos the eval split held ~75
    # questions, too few for a lead of 10 points to be told from noise.
    SampleSpec(
        name="sample_d_25fps",
        seconds=120,
        scenes=(
            ("game of life", "life=seed=47:ratio=0.2:mold=10:life_color=yellow"),
            ("solid yellow", "color=c=yellow"),
            ("Mandelbrot zoom", "mandelbrot"),
            ("RGB test pattern", "rgbtestsrc"),
            ("cellular automaton rule 90", "cellauto=rule=90:seed=48:scroll=1"),
            ("HD color bars", "smptehdbars"),
        ),
    ),
    SampleSpec(
        name="sample_e_25fps",
        seconds=90,
        scenes=(
            ("YUV test pattern", "yuvtestsrc"),
            ("solid white", "color=c=white"),
            ("moving test pattern", "testsrc2"),
            ("PAL 75 percent color bars", "pal75bars"),
            ("drifting color gradients", _gradient(f"255*{_EDGE}", f"255-191*{_EDGE}", "32")),
            ("solid red", "color=c=red"),
        ),
    ),
    SampleSpec(
        name="sample_f_25fps",
        seconds=100,
        scenes=(
            ("Mandelbrot zoom", "mandelbrot"),
            ("cellular automaton rule 150", "cellauto=rule=150:seed=61:scroll=1"),
            ("solid blue", "color=c=blue"),
            ("game of life", "life=seed=62:ratio=0.25:mold=10:life_color=yellow"),
            ("SMPTE color bars", "smptebars"),
        ),
    ),
)


def scenes_of(spec: SampleSpec) -> list[Scene]:
    length = spec.scene_seconds
    return [
        Scene(
            index=i,
            label=label,
            text=f"Scene {i + 1}: {label}",
            source=source,
            # Distinct per scene so audio-based checks can tell scenes apart.
            tone_hz=220 + 110 * i,
            start_s=float(i * length),
            end_s=float((i + 1) * length),
        )
        for i, (label, source) in enumerate(spec.scenes)
    ]


def built_in_sample() -> Path:
    """The folder `lvr run` clips when given no source: the sample, written into lvr's cache by the first
    caller on this machine (existing videos are kept, so later callers only list it)."""
    directory = cache_dir() / SAMPLE_CACHE_SUBDIR
    write_sample_videos(directory)
    return directory


def write_sample_videos(out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> list[Path]:
    """Write every SAMPLE_SPECS video (skipping existing ones unless overwrite) and scenes.json."""
    font = find_font()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    targets = [(spec, out / f"{spec.name}.mp4") for spec in SAMPLE_SPECS]
    pending = [(spec, path) for spec, path in targets if overwrite or not path.exists()]
    if pending:
        # The first run's first minute on 2 cores (~50 s on a slow one) would otherwise pass in silence.
        seconds = sum(spec.seconds for spec, _ in pending)
        videos = f"{len(pending)} video{'s' if len(pending) > 1 else ''}"
        log.info("writing the built-in sample: %s (%d:%02d in all) into %s", videos, seconds // 60, seconds % 60, out)
    # Each ffmpeg encodes single-threaded for determinism, so run them side by side.
    with ThreadPoolExecutor(max_workers=max(1, min(len(pending), os.cpu_count() or 1))) as pool:
        list(pool.map(lambda job: write_sample_video(job[0], job[1], font=font), pending))
    _write_atomically(out / SCENES_FILE, json.dumps(_scenes_document(SAMPLE_SPECS), indent=2) + "\n")
    return [path for _, path in targets]


def find_font() -> Path:
    if not FONT_PATH.is_file():
        raise FileNotFoundError(
            f"font {FONT_PATH} not found; it is needed to burn scene labels into the sample "
            "videos: install the Debian package fonts-dejavu-core"
        )
    return FONT_PATH


def write_sample_video(spec: SampleSpec, path: Path, *, font: Path) -> Path:
    """Render one spec to `path` in a single ffmpeg run; the file appears only when complete.

    The temporary is this render's own: two runs filling the shared sample cache at once (a
    scheduled deployment and a `make run` on a fresh machine) each render whole and the last rename
    wins, where one fixed name had both ffmpegs write one file and the second rename fail."""
    partial = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    result = run_tool(_render_argv(spec, partial, font))
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise MediaError("ffmpeg_failed", f"rendering {spec.name} failed: {stderr_tail(result.stderr)}")
    os.replace(partial, path)
    return path


def _render_argv(spec: SampleSpec, path: Path, font: Path) -> list[str]:
    parts = []
    for scene in scenes_of(spec):
        parts += _scene_streams(spec, scene, font)
    joined = ffmpeg.concat(*parts, v=1, a=1).node
    keyframe_args = (
        {} if spec.gop is None else {"g": spec.gop, "keyint_min": spec.gop, "sc_threshold": 0}
    )
    output = ffmpeg.output(
        joined[0],
        joined[1],
        str(path),
        format="mp4",
        **{
            "c:v": "libx264",
            "preset": "veryfast",
            "crf": 26,
            "pix_fmt": "yuv420p",
            # x264's frame threads make output depend on scheduling.
            "threads": 1,
            "c:a": "aac",
            "b:a": "64k",
            "fflags": "+bitexact",
            "flags:v": "+bitexact",
            "flags:a": "+bitexact",
            "map_metadata": -1,
            **keyframe_args,
        },
    )
    return output.global_args("-hide_banner", "-nostdin", "-v", "error").compile(overwrite_output=True)


def _scene_streams(spec: SampleSpec, scene: Scene, font: Path) -> list[ffmpeg.nodes.FilterableStream]:
    length = scene.end_s - scene.start_s
    # Size and rate go to the source, the first filter of the scene's graph.
    source, *after = scene.filters
    separator = ":" if "=" in source else "="
    chain = ",".join([f"{source}{separator}size={spec.width}x{spec.height}:rate={spec.fps}", *after])
    video = (
        ffmpeg.input(chain, f="lavfi", t=length)
        .drawtext(
            text=scene.text,
            fontfile=str(font),
            fontsize=max(12, spec.height // 14),
            fontcolor="white",
            box=1,
            boxcolor="black@0.6",
            boxborderw=4,
            x="(w-text_w)/2",
            y="h-text_h-12",
        )
        # Sources differ in pixel format and aspect flags; concat needs them equal.
        .filter("setsar", 1)
        .filter("format", "yuv420p")
    )
    audio = ffmpeg.input(f"sine=frequency={scene.tone_hz}:sample_rate={AUDIO_SAMPLE_RATE}", f="lavfi", t=length)
    return [video, audio]


def _scenes_document(specs: tuple[SampleSpec, ...]) -> dict:
    return {
        "videos": [
            {
                "file": f"{spec.name}.mp4",
                "duration_s": float(spec.seconds),
                "fps": spec.fps,
                "gop": spec.gop,
                "width": spec.width,
                "height": spec.height,
                "scenes": [
                    {
                        "index": scene.index,
                        "label": scene.label,
                        "text": scene.text,
                        "tone_hz": scene.tone_hz,
                        "start_s": scene.start_s,
                        "end_s": scene.end_s,
                    }
                    for scene in scenes_of(spec)
                ],
            }
            for spec in specs
        ]
    }


def _write_atomically(path: Path, text: str) -> None:
    write_bytes_atomic(LOCAL, str(path), text.encode("utf-8"))
