"""Caption pretraining of the tiny model on synthetic clips of the built-in sample's scene kinds.

A random-weight tiny model writes noise, so every stage fed by it (questions, filtering, evaluation)
shows noise too. Pretrained here for a few hundred CPU steps, the same weights caption what a clip
shows in one fixed-grammar sentence ("The video shows a solid red screen."), so a run on the sample
reads as the right thing, small. A quarter of the clips are instead posed as a multiple-choice
question in the training prompt's format ("Which of these does the video show?"), answered
`<think>The video shows ...</think><answer>B</answer>`: as an instruction-tuned base VLM does, the
model then answers the filter's questions with an option, so their pass rates can spread over easy,
medium and hard instead of all being 0.

The clips are drawn with numpy in memory (no ffmpeg, no files): the kinds of picture the sample's
scenes show (colour bars, test patterns, cellular automata, the game of life, a Mandelbrot zoom,
gradients, solid colours), each with random layout and motion, a burned-in label like the sample's,
at the sample's frame size, through a lossy codec; a third of them cut from one kind to another, as
a clip that spans two of the sample's scenes does. They go through the caption stage's preprocessing
(`models.video.build_video_inputs`) with the caption stage's prompt, so training and inference see
the same inputs.

Everything is seeded by the recipe: the same recipe on the same software gives byte-identical
weights, and `PretrainRecipe.key` (a hash of every setting that affects the weights) names the
cached build.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise
from typing import Any

import numpy as np

from models.video import VideoPreprocessConfig, build_video_inputs, resized_frames

# Bump when a renderer, the caption grammar or the training loop changes: the weights change with it.
PRETRAIN_VERSION = 2

# The caption stage's default prompt (`CaptionConfig.prompt` in tasks/config.py, a layer this one
# cannot import); a test checks they agree, since the model answers this prompt with a caption.
CAPTION_PROMPT = "Elaborate on the visual and narrative elements of the video in detail."
# The training prompt's rules for a multiple-choice question (`tasks.grading.prompts`, written out for
# the same reason; a test checks that a posed clip's prompt is `user_prompt`'s).
ANSWER_RULE = "Answer with the letter of the correct option."
FORMAT_RULE = (
    "First think step by step about what happens in the video and when, inside <think> </think>; "
    "then give only the final answer inside <answer> </answer>."
)
WHICH_SHOWN = "Which of these does the video show?"
OPTION_LETTERS = "ABCD"

# The sample's frame size (tasks/samples/videos.py takes its default from here) and clip length, so
# pictures are resized and sampled in time as the caption stage does with the sample's clips.
FRAME_HEIGHT, FRAME_WIDTH = 240, 320
CLIP_SECONDS = 10.0
FPS = 25.0  # rows per second a cellular automaton scrolls by

Frames = np.ndarray  # (T, H, W, 3) uint8
Picture = np.ndarray  # (T, H, W, 3) float32 in 0-255: what a renderer draws, before the label and codec
Renderer = Callable[[np.random.Generator, np.ndarray], Picture]  # (rng, frame times in s (T,)) -> picture


@dataclass(frozen=True)
class PretrainRecipe:
    """Every setting that affects the pretrained weights (with the base model's shape and seed)."""

    # 400 steps captioned 27 of the (three-video) sample's 32 clips right; with a quarter of the clips posed as
    # questions instead, 400 gave 25 (garbled names: "a solor gradients"), 500 gave 28.
    steps: int = 500
    batch_size: int = 8
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.0
    num_frames: int = 8  # frames per clip, as the tiny profile's caption stage samples
    cut_fraction: float = 0.35  # clips that cut from one kind to another, as a sample clip spanning two scenes does
    # Clips posed as "which of these does the video show?" in the training prompt's format, answered
    # `<think>caption</think><answer>letter</answer>`: real base VLMs are instruction-tuned, so the filter's
    # base model answers questions (some right, some wrong) instead of captioning them.
    answer_fraction: float = 0.25
    seed: int = 0
    prompt: str = CAPTION_PROMPT

    def key(self, base: str) -> str:
        """A short hash of this recipe applied to the base model `base` (its name, shape and seed)."""
        doc = {"version": PRETRAIN_VERSION, "base": base, "kinds": [(k.name, k.share) for k in SCENE_KINDS], **asdict(self)}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]


# --- pictures -----------------------------------------------------------------------------------
def _canvas(times: np.ndarray) -> np.ndarray:
    return np.zeros((len(times), FRAME_HEIGHT, FRAME_WIDTH, 3), dtype=np.float32)


def _solid(rgb: tuple[int, int, int]) -> Renderer:
    def draw(rng: np.random.Generator, times: np.ndarray) -> Picture:
        out = _canvas(times)
        out[:] = np.asarray(rgb, dtype=np.float32) * rng.uniform(0.9, 1.0)
        return out

    return draw


_BAR_COLOURS = np.array(
    [[1, 1, 1], [1, 1, 0], [0, 1, 1], [0, 1, 0], [1, 0, 1], [1, 0, 0], [0, 0, 1], [0, 0, 0]], dtype=np.float32
)  # white, yellow, cyan, green, magenta, red, blue, black: the order of SMPTE, PAL and HD bars


def _fill_row(out: np.ndarray, top: int, bottom: int, blocks: list[tuple[float, tuple[int, int, int] | None]]) -> None:
    """Fill rows [top, bottom) with blocks of the given relative widths; None is a black-to-white ramp."""
    edges = (np.cumsum([0.0] + [w for w, _ in blocks]) / sum(w for w, _ in blocks) * FRAME_WIDTH).astype(int)
    for (_, colour), (a, b) in zip(blocks, pairwise(edges)):
        out[:, top:bottom, a:b] = np.linspace(0, 255, b - a)[:, None] if colour is None else colour


def _colour_bars(rng: np.random.Generator, times: np.ndarray) -> Picture:
    """SMPTE bars (7 bars over reversed blocks and a dark strip), PAL bars (8 full-height bars) or
    HD bars (grey sides, rows of blocks and a ramp below), at 75 or 100 percent."""
    out = _canvas(times)
    level = int(rng.choice([191, 255]))
    white, yellow, cyan, green, magenta, red, blue, black = [tuple(int(v) for v in c * level) for c in _BAR_COLOURS]
    layout, split = int(rng.integers(3)), rng.uniform(0.55, 0.7)
    top, middle = int(FRAME_HEIGHT * split), int(FRAME_HEIGHT * (split + rng.uniform(0.06, 0.1)))
    seven = [(1, c) for c in (white, yellow, cyan, green, magenta, red, blue)]
    if layout == 0:
        _fill_row(out, 0, top, seven)
        _fill_row(out, top, middle, [(1, c) for c in (blue, black, magenta, black, cyan, black, white)])
        _fill_row(out, middle, FRAME_HEIGHT, [(1.25, (0, 33, 76)), (1.25, (255, 255, 255)), (1.25, (50, 0, 106)), (3.25, (19, 19, 19))])
    elif layout == 1:
        _fill_row(out, 0, FRAME_HEIGHT, [*seven, (1, black)])
    else:
        grey, side = (102, 102, 102), 1.0
        _fill_row(out, 0, top, [(side, grey), *seven, (side, grey)])
        below = int(FRAME_HEIGHT * (split + 0.17))
        _fill_row(out, top, middle, [(side, (0, 255, 255)), (1, (0, 63, 105)), (6, (191, 191, 191)), (side, (0, 0, 255))])
        _fill_row(out, middle, below, [(side, (255, 255, 0)), (1, (65, 0, 119)), (6, None), (side, (255, 0, 0))])
        _fill_row(out, below, FRAME_HEIGHT, [(side, (38, 38, 38)), (1.5, (0, 0, 0)), (2, (255, 255, 255)), (3.5, (0, 0, 0)), (side, (38, 38, 38))])
    return out


def _moving_test_pattern(rng: np.random.Generator, times: np.ndarray) -> Picture:
    """ffmpeg's testsrc2: six bars, a rainbow band and grey blocks that move, a timer box top left."""
    out = _canvas(times)
    colours = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 1]], dtype=np.float32) * 255
    edges = np.linspace(0, FRAME_WIDTH, 7).astype(int)
    for colour, (a, b) in zip(colours, pairwise(edges)):
        out[:, :, a:b] = colour
    yy, xx = np.mgrid[0:FRAME_HEIGHT, 0:FRAME_WIDTH].astype(np.float32)
    slope, phase, speed = rng.uniform(-0.8, -0.3), rng.uniform(0, 2 * math.pi), rng.uniform(0.3, 1.0)
    for i, t in enumerate(times):
        offset = FRAME_HEIGHT * (0.5 + 0.4 * math.sin(phase + speed * t))
        band = np.abs(yy - (offset + slope * (xx - FRAME_WIDTH / 2))) < 8
        hue = (xx / FRAME_WIDTH * 6 + t) % 6
        rainbow = np.stack([np.clip(np.abs(hue - 3) - 1, 0, 1), np.clip(2 - np.abs(hue - 2), 0, 1),
                            np.clip(2 - np.abs(hue - 4), 0, 1)], axis=-1) * 255
        out[i][band] = rainbow[band]
        bx = int((FRAME_WIDTH - 60) * (0.5 + 0.5 * math.sin(phase + 0.7 * t)))
        by = int((FRAME_HEIGHT - 60) * (0.5 + 0.5 * math.cos(phase + 0.5 * t)))
        out[i, by : by + int(rng.integers(8, 50)), bx : bx + int(rng.integers(8, 60))] = 128
        out[i, 0:36, 0:88] = 20  # the timer box
        out[i, 6:30, 6:82][rng.random((24, 76)) < 0.3] = [255, 140, 0]
    return out


def _rgb_test_pattern(rng: np.random.Generator, times: np.ndarray) -> Picture:
    """ffmpeg's rgbtestsrc: red, green and blue bands top to bottom, each dark on the left."""
    out = _canvas(times)
    ramp = np.linspace(0, 255, FRAME_WIDTH, dtype=np.float32) * rng.uniform(0.9, 1.0)
    edges = np.linspace(0, FRAME_HEIGHT, 4).astype(int)
    for channel, (a, b) in enumerate(pairwise(edges)):
        out[:, a:b, :, channel] = ramp
    return out


def _yuv_test_pattern(rng: np.random.Generator, times: np.ndarray) -> Picture:
    """ffmpeg's yuvtestsrc: a grey ramp, an olive-to-violet ramp and a green-to-pink ramp."""
    out = _canvas(times)
    ramp = np.linspace(0, 1, FRAME_WIDTH, dtype=np.float32)[:, None]
    bands = [([0, 0, 0], [255, 255, 255]), ([140, 150, 0], [120, 100, 255]), ([0, 220, 130], [255, 40, 130])]
    edges = np.linspace(0, FRAME_HEIGHT, 4).astype(int)
    for (start, end), (a, b) in zip(bands, pairwise(edges)):
        start_, end_ = np.asarray(start, np.float32), np.asarray(end, np.float32)
        out[:, a:b] = (start_ + ramp * (end_ - start_)) * rng.uniform(0.9, 1.0)
    return out


def _cellular_automaton(rng: np.random.Generator, times: np.ndarray) -> Picture:
    """An elementary cellular automaton (rules 30, 90, 110, 150), white on black, scrolling up."""
    rule = int(rng.choice([30, 90, 110, 150]))
    table = np.array([(rule >> i) & 1 for i in range(8)], dtype=np.uint8)
    scroll = (times - times[0]) * FPS
    rows = FRAME_HEIGHT + int(scroll[-1]) + 1
    grid = np.zeros((rows, FRAME_WIDTH), dtype=np.uint8)
    grid[0] = rng.random(FRAME_WIDTH) < 0.5
    for r in range(1, rows):
        prev = grid[r - 1]
        grid[r] = table[(np.roll(prev, 1) << 2) | (prev << 1) | np.roll(prev, -1)]
    out = _canvas(times)
    for i, s in enumerate(scroll.astype(int)):
        out[i] = grid[s : s + FRAME_HEIGHT, :, None] * 255.0
    return out


def _game_of_life(rng: np.random.Generator, times: np.ndarray) -> Picture:
    """Conway's game of life: yellow cells on black, a few generations between frames."""
    alive = rng.random((FRAME_HEIGHT, FRAME_WIDTH)) < rng.uniform(0.05, 0.3)
    colour = np.array([255, 255, 0], dtype=np.float32) * rng.uniform(0.8, 1.0)
    out = _canvas(times)
    for i in range(len(times)):
        for _ in range(int(rng.integers(1, 4)) + (0 if i else int(rng.integers(0, 12)))):  # an evolved start
            neighbours = sum(np.roll(np.roll(alive, dy, 0), dx, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)
            alive = (neighbours == 3) | (alive & (neighbours == 2))
        out[i][alive] = colour
    return out


def _mandelbrot(rng: np.random.Generator, times: np.ndarray) -> Picture:
    """ffmpeg's mandelbrot: a zoom towards a point of the set's edge; outside, a pale background
    turning to bands of colour near the edge; inside, colour by where the orbit ends."""
    centres = [(-0.743643, -0.131826), (-0.1011, 0.9563), (-1.25066, 0.02012), (0.2549, 0.0005), (-0.75, 0.1)]
    cx, cy = centres[int(rng.integers(len(centres)))]
    start, rate = rng.uniform(1.5, 3.5), rng.uniform(0.02, 0.1)
    background = np.array([255, 128, 255], dtype=np.float32) * rng.uniform(0.7, 1.0, 3).astype(np.float32)
    phase = rng.uniform(0, 2 * math.pi)
    h, w = FRAME_HEIGHT // 2, FRAME_WIDTH // 2  # drawn at half size: the model sees less than that anyway
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    out = _canvas(times)
    for i, t in enumerate(times):
        scale = start * math.exp(-rate * t) / w
        c = (cx + (xx - w / 2) * scale) + 1j * (cy + (yy - h / 2) * scale)
        z = np.zeros_like(c)
        escape = np.full(c.shape, 48.0)
        for n in range(48):
            inside = escape == 48.0
            z[inside] = z[inside] ** 2 + c[inside]
            escape[inside & (np.abs(z) > 2)] = n
        bands = 127.5 * (1 + np.sin(escape[..., None] * 0.6 + phase + np.array([0.0, 2.1, 4.2])))
        near = np.clip(escape / 12, 0, 1)[..., None]
        picture = (1 - near) * background + near * bands
        angle = np.angle(z)[..., None]
        orbit = 255 * np.concatenate([0.5 + 0.5 * np.cos(angle), 0.5 + 0.5 * np.sin(angle), np.zeros_like(angle)], -1)
        picture = np.where(escape[..., None] == 48.0, orbit, picture)
        out[i] = picture.repeat(2, 0).repeat(2, 1)
    return out


def _vivid(rng: np.random.Generator) -> np.ndarray:
    """A random colour of some saturation and brightness (RGB, 0-255)."""
    hue, saturation, value = rng.uniform(0, 6), rng.uniform(0.4, 1.0), rng.uniform(0.7, 1.0)
    rgb = np.clip(np.abs((hue + np.array([0.0, 4.0, 2.0])) % 6 - 3) - 1, 0, 1)
    return ((1 - saturation + saturation * rgb) * value * 255).astype(np.float32)


def _colour_gradients(rng: np.random.Generator, times: np.ndarray) -> Picture:
    """Two random vivid colours meeting in a soft edge whose direction and place drift over time."""
    a, b = _vivid(rng), _vivid(rng)
    angle, speed, width = rng.uniform(0, 2 * math.pi), rng.uniform(0.05, 0.3), rng.uniform(0.15, 1.0) * FRAME_WIDTH
    yy, xx = np.mgrid[0:FRAME_HEIGHT, 0:FRAME_WIDTH].astype(np.float32)
    out = _canvas(times)
    for i, t in enumerate(times):
        direction = angle + speed * t
        shift = 0.3 * FRAME_WIDTH * math.sin(speed * t + angle)
        u = (xx - FRAME_WIDTH / 2) * math.cos(direction) + (yy - FRAME_HEIGHT / 2) * math.sin(direction) - shift
        mix = np.clip(u / width + 0.5, 0, 1)[..., None]
        out[i] = a + mix * (b - a)
    return out


@dataclass(frozen=True)
class SceneKind:
    name: str  # what a caption names, a phrase found in no other kind's caption
    draw: Renderer
    share: int = 1  # clips per round of the schedule: kinds with more variety get more


# The sample's scene kinds, plus two solid colours it does not show, so that colour words are learnt
# as colours rather than as the only three solid scenes.
SCENE_KINDS: tuple[SceneKind, ...] = (
    SceneKind("color bars", _colour_bars, share=2),
    SceneKind("a moving test pattern", _moving_test_pattern),
    SceneKind("an RGB test pattern", _rgb_test_pattern),
    SceneKind("a YUV test pattern", _yuv_test_pattern),
    SceneKind("a cellular automaton", _cellular_automaton),
    SceneKind("the game of life", _game_of_life),
    SceneKind("a Mandelbrot zoom", _mandelbrot),
    SceneKind("drifting color gradients", _colour_gradients, share=2),
    SceneKind("a solid red screen", _solid((255, 0, 0))),
    SceneKind("a solid green screen", _solid((0, 128, 0))),
    SceneKind("a solid blue screen", _solid((0, 0, 255))),
    SceneKind("a solid yellow screen", _solid((255, 255, 0))),
    SceneKind("a solid white screen", _solid((255, 255, 255))),
)
KIND_NAMES = tuple(k.name for k in SCENE_KINDS)


def shown(kinds: Sequence[str]) -> str:
    """What a clip showing `kinds` in turn shows, as captions and options name it."""
    return ", then ".join(kinds)


def caption_for(kinds: Sequence[str]) -> str:
    """The one sentence the pretrained model writes for a clip showing `kinds` in turn."""
    return f"The video shows {shown(kinds)}."


def kinds_named_in(caption: str) -> list[str]:
    """The scene kinds a caption names, in the order it names them."""
    return [name for _, name in sorted((caption.find(name), name) for name in KIND_NAMES if name in caption)]


def _burn_label(rng: np.random.Generator, frames: Picture) -> None:
    """A label burned in at the bottom centre like the sample's ("Scene 3: ..." in white on a
    translucent dark box), naming a random kind, so the model learns to look past it."""
    from PIL import Image, ImageDraw, ImageFont

    text = f"Scene {int(rng.integers(1, 10))}: {KIND_NAMES[int(rng.integers(len(KIND_NAMES)))]}"
    font = ImageFont.load_default(size=17)  # Pillow's own font: no system font, same pixels for a Pillow version
    left, top, right, bottom = font.getbbox(text)
    mask = Image.new("L", (right - left, bottom - top))
    ImageDraw.Draw(mask).text((-left, -top), text, font=font, fill=255)
    glyphs = np.asarray(mask, dtype=np.float32)[..., None] / 255
    height, width = glyphs.shape[:2]
    x0, y0 = max(0, (FRAME_WIDTH - width) // 2), FRAME_HEIGHT - 12 - height
    box = frames[:, y0 - 4 : y0 + height + 4, max(0, x0 - 4) : x0 + width + 4]
    box *= 0.4
    region = frames[:, y0 : y0 + height, x0 : x0 + width]
    glyphs = glyphs[:, : region.shape[2]]
    region[:] = region * (1 - glyphs) + 255 * glyphs


def render_clip(rng: np.random.Generator, kinds: Sequence[SceneKind], num_frames: int) -> Frames:
    """`num_frames` frames of a `CLIP_SECONDS` clip, sampled at the centres of equal spans as the
    caption stage samples a clip: of one kind, or of two with a cut between two frames (as where a
    clip of the sample spans two scenes); each scene with its label box, all through a codec."""
    times = (np.arange(num_frames) + 0.5) * CLIP_SECONDS / num_frames
    cuts = [0, *sorted(rng.choice(np.arange(1, num_frames), len(kinds) - 1, replace=False)), num_frames]
    parts = []
    for kind, (a, b) in zip(kinds, pairwise(cuts)):
        part = kind.draw(rng, times[a:b] + rng.uniform(0, 20))  # somewhere in the first 30 s of a scene
        _burn_label(rng, part)
        parts.append(part)
    frames = np.clip(np.concatenate(parts), 0, 255).round().astype(np.uint8)
    return _coded(frames, int(rng.integers(30, 90)))


def _coded(frames: Frames, quality: int) -> Frames:
    """The frames through a lossy codec (JPEG, 4:2:0 chroma like the sample's H.264): the blocks,
    ringing and halved colour resolution the model meets in real clips."""
    from PIL import Image

    out = np.empty_like(frames)
    for i, frame in enumerate(frames):
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=quality, subsampling="4:2:0")
        out[i] = np.asarray(Image.open(buffer).convert("RGB"))
    return out


@dataclass(frozen=True)
class BatchJob:
    """What one training step shows: `kinds[i]` are the scene kinds of clip i, in turn."""

    seed: int
    step: int
    kinds: tuple[tuple[int, ...], ...]
    num_frames: int
    preprocess: VideoPreprocessConfig


def render_batch(job: BatchJob) -> list[Frames]:
    """A step's clips, resized as the model's preprocessing will (so it only normalizes them); a
    function of the job alone, so batches are the same whichever process renders them."""
    rng = np.random.default_rng([job.seed, job.step])
    return [resized_frames(render_clip(rng, [SCENE_KINDS[k] for k in kinds], job.num_frames), job.preprocess) for kinds in job.kinds]


def schedule(recipe: PretrainRecipe) -> list[tuple[tuple[int, ...], ...]]:
    """Each step's clips as kind indices: kinds come in shuffled rounds of every kind (`share`
    times), so none is starved; a `recipe.cut_fraction` of clips show a second kind after a cut."""
    rng = np.random.default_rng(recipe.seed)
    round_ = [i for i, kind in enumerate(SCENE_KINDS) for _ in range(kind.share)]
    queue: list[int] = []

    def next_kind() -> int:
        nonlocal queue
        if not queue:
            queue = [round_[int(k)] for k in rng.permutation(len(round_))]
        return queue.pop()

    steps = []
    for _ in range(recipe.steps):
        clips = []
        for _ in range(recipe.batch_size):
            first = next_kind()
            if rng.random() < recipe.cut_fraction:
                second = int(rng.integers(len(SCENE_KINDS) - 1))
                clips.append((first, second + (second >= first)))  # any other kind
            else:
                clips.append((first,))
        steps.append(tuple(clips))
    return steps


@dataclass(frozen=True)
class Posed:
    """A clip posed as a multiple-choice question instead of captioned: its options and the right letter."""

    options: tuple[str, ...]
    letter: str


def pose(plan: list[tuple[tuple[int, ...], ...]], recipe: PretrainRecipe) -> list[tuple[Posed | None, ...]]:
    """Which clips of each step of `plan` (`schedule`) are posed as questions (`recipe.answer_fraction` of them), with
    options: what the clip shows and three other kinds or orders (for a cut clip, its two kinds the
    other way round is one of them), the right one at a seeded random letter."""
    rng = np.random.default_rng([recipe.seed, 1])
    steps = []
    for clips in plan:
        posed: list[Posed | None] = []
        for kinds in clips:
            if rng.random() >= recipe.answer_fraction:
                posed.append(None)
                continue
            names = [KIND_NAMES[k] for k in kinds]
            wrong = [shown(names[::-1])] if len(names) == 2 else []
            others = [n for n in KIND_NAMES if n not in names]
            wrong += [others[int(i)] for i in rng.permutation(len(others))[: len(OPTION_LETTERS) - 1 - len(wrong)]]
            options = [shown(names), *wrong]
            order = rng.permutation(len(options))
            options = [options[int(i)] for i in order]
            posed.append(Posed(tuple(options), OPTION_LETTERS[options.index(shown(names))]))
        steps.append(tuple(posed))
    return steps


def posed_prompt(options: Sequence[str]) -> str:
    """The training prompt's user text (`tasks.grading.prompts.user_prompt`) for "which is shown"."""
    lines = [WHICH_SHOWN, *(f"{letter}. {option}" for letter, option in zip(OPTION_LETTERS, options))]
    return "\n".join(lines) + f"\n\n{ANSWER_RULE}\n{FORMAT_RULE}"


def example(caption_prompt: str, names: Sequence[str], posed: Posed | None) -> tuple[str, str]:
    """(prompt, target) of a clip showing `names`: its caption, or its posed question's answer in the
    training format with the caption as the thinking."""
    if posed is None:
        return caption_prompt, caption_for(names)
    return posed_prompt(posed.options), f"<think>{caption_for(names)}</think><answer>{posed.letter}</answer>"


# --- training -----------------------------------------------------------------------------------
def training_inputs(tokenizer, preprocess: VideoPreprocessConfig, prompts: Sequence[str], clips: Sequence[Frames],
                    targets: Sequence[str]) -> dict[str, Any]:
    """Model inputs for teacher-forced targets: each clip's user turn (its video, then its prompt)
    followed by its target and the end of the turn; `labels` are -100 except on those."""
    # The stages' user turn, `models.vlm.video_messages`: vlm imports models.tiny, which imports
    # this module, so it is written out here; a test checks the two agree.
    rendered = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}], tokenize=False, add_generation_prompt=True
        )
        for prompt in prompts
    ]
    ends = tokenizer.eos_token
    inputs = build_video_inputs(
        tokenizer, [r + t + ends for r, t in zip(rendered, targets)], list(clips), preprocess,
        fps_per_video=[len(c) / CLIP_SECONDS for c in clips], padding_side="right",  # a clip's sampled fps
    )
    labels = inputs["input_ids"].clone()
    labels[inputs["attention_mask"] == 0] = -100
    for row, text in enumerate(targets):
        target = tokenizer(text + ends, add_special_tokens=False)["input_ids"]
        end = int(inputs["attention_mask"][row].sum())
        if labels[row, end - len(target) : end].tolist() != target:
            raise AssertionError(f"the target {text!r} does not tokenize the same inside the prompt")
        labels[row, : end - len(target)] = -100
    inputs["labels"] = labels
    return inputs


def learning_rate(step: int, recipe: PretrainRecipe) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < recipe.warmup_steps:
        return recipe.learning_rate * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def pretrain_captioner(model, tokenizer, preprocess: VideoPreprocessConfig, recipe: PretrainRecipe,
                       log: Callable[[int, float], None] | None = None) -> list[float]:
    """Train `model` in place to caption synthetic clips; returns the loss of every step.

    One worker process renders the clips a few steps ahead of the model (`models.prefetch`). Only
    generators seeded from `recipe.seed` are used, and the caller's RNG state is left as it was."""
    import torch

    from models.prefetch import Prefetcher

    plan = schedule(recipe)
    posed = pose(plan, recipe)
    jobs = (BatchJob(recipe.seed, step, kinds, recipe.num_frames, preprocess) for step, kinds in enumerate(plan))
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]), Prefetcher(workers=1, depth=4) as prefetcher:
        torch.manual_seed(recipe.seed)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
        for step, (kinds, asked, clips) in enumerate(zip(plan, posed, prefetcher.map(render_batch, jobs))):
            prompts, targets = zip(*(example(recipe.prompt, [KIND_NAMES[k] for k in clip], p) for clip, p in zip(kinds, asked)))
            inputs = training_inputs(tokenizer, preprocess, prompts, clips.result(), targets)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, recipe)
            loss = model(**inputs).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
            if log is not None:
                log(step, losses[-1])
        model.eval()
    return losses
