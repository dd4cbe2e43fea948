"""Frame sampling, decoding and Qwen2-VL video preprocessing (models/video.py).

The reference for preprocessing is transformers' own PIL-backend Qwen2-VL image processor
(``Qwen2VLImageProcessorPil``, which needs no torchvision): our video patches must equal its
per-frame output rearranged for the temporal patch.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from models.video import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    FrameSampling,
    SampledFrames,
    VideoPreprocessConfig,
    VideoReadError,
    build_video_inputs,
    frame_range,
    num_video_tokens,
    preprocess_video,
    read_frames,
    sample_frame_indices,
    smart_resize,
    video_grid_thw_for,
)

FFMPEG = shutil.which("ffmpeg") or ("/usr/bin/ffmpeg" if Path("/usr/bin/ffmpeg").exists() else None)


def _make_clip(path: Path, *, seconds: float, fps: int, size: str = "160x120", codec: list[str] | None = None) -> Path:
    if FFMPEG is None:
        pytest.skip("ffmpeg not available")
    codec = codec or ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", str(fps)]
    cmd = [FFMPEG, "-hide_banner", "-loglevel", "error", "-nostdin", "-y",
           "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={fps}:duration={seconds}",
           *codec, str(path)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    return {
        "mp4": _make_clip(d / "short.mp4", seconds=4, fps=25),
        "webm": _make_clip(d / "short.webm", seconds=3, fps=24, codec=["-c:v", "libvpx", "-b:v", "200k"]),
        "long": _make_clip(d / "long.mp4", seconds=20, fps=25),
    }


# ---------------------------------------------------------------------------------------------
# smart_resize
# ---------------------------------------------------------------------------------------------
def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        smart_resize as hf_pil,
    )

    try:  # the torchvision-backed module has its own copy; it cannot import without torchvision
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import (
            smart_resize as hf_fast,
        )
    except ImportError:
        hf_fast = hf_pil

    sizes = [1, 2, 13, 14, 27, 28, 29, 41, 55, 56, 57, 97, 100, 120, 160, 223, 224, 240, 320, 333, 360,
             480, 500, 640, 720, 1000, 1080, 1280, 1920, 2160, 3840]
    bounds = [(56 * 56, 28 * 28 * 1280), (4 * 28 * 28, 64 * 28 * 28), (128 * 28 * 28, 768 * 28 * 28),
              (256 * 28 * 28, 256 * 28 * 28 * 2), (3136, 12845056)]
    n = 0
    for h in sizes:
        for w in sizes:
            if max(h, w) / min(h, w) > 200:
                with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
                    smart_resize(h, w)
                with pytest.raises(ValueError):
                    hf_pil(h, w)
                continue
            for factor in (28, 32):
                for lo, hi in bounds:
                    ours = smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi)
                    assert ours == tuple(hf_pil(h, w, factor=factor, min_pixels=lo, max_pixels=hi)), (h, w, lo, hi)
                    assert ours == tuple(hf_fast(h, w, factor=factor, min_pixels=lo, max_pixels=hi)), (h, w, lo, hi)
                    assert ours[0] % factor == 0 and ours[1] % factor == 0
                    n += 1
    assert n > 5000


def test_constants_match_transformers():
    from transformers.image_utils import OPENAI_CLIP_MEAN as M
    from transformers.image_utils import OPENAI_CLIP_STD as S

    assert tuple(OPENAI_CLIP_MEAN) == tuple(M) and tuple(OPENAI_CLIP_STD) == tuple(S)
    cfg = VideoPreprocessConfig()
    assert (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size, cfg.factor) == (14, 2, 2, 28)
    assert cfg.image_mean == tuple(M) and cfg.image_std == tuple(S) and cfg.rescale_factor == 1 / 255


def test_config_roundtrip(tmp_path):
    cfg = VideoPreprocessConfig(min_pixels=3136, max_pixels=50176)
    cfg.save_pretrained(tmp_path)
    assert VideoPreprocessConfig.from_pretrained(tmp_path) == cfg
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        VideoPreprocessConfig(min_pixels=10, max_pixels=5)


# ---------------------------------------------------------------------------------------------
# preprocess_video vs Qwen2VLImageProcessorPil
# ---------------------------------------------------------------------------------------------
def _reference_video_patches(frames: np.ndarray, cfg: VideoPreprocessConfig):
    """Qwen2VLImageProcessorPil per frame, rearranged into the video patch layout.

    The image processor lays a single image out as (gh/m, gw/m, mh, mw, C, tp, ph, pw) with the
    image broadcast over the tp axis.  A video's temporal patch g holds frames 2g and 2g+1 in
    that tp axis, giving (grid_t, gh/m, gw/m, mh, mw, C, tp, ph, pw) - Qwen2VLVideoProcessor's
    layout.  An odd frame count is padded with the last frame (as that processor does).
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    ip = Qwen2VLImageProcessorPil(size={"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels})
    out = ip(images=list(frames), return_tensors="np")
    pv, grid = out["pixel_values"], out["image_grid_thw"]
    tp, p, c = cfg.temporal_patch_size, cfg.patch_size, 3
    assert (grid[:, 0] == 1).all() and (grid == grid[:1]).all()
    n = int(grid[0, 1] * grid[0, 2])
    per = pv.reshape(len(frames), n, c, tp, p, p)
    assert np.array_equal(per[:, :, :, 0], per[:, :, :, 1])  # image broadcast over tp
    single = per[:, :, :, 0]  # (T, N, C, p, p)
    if pad := -len(frames) % tp:
        single = np.concatenate([single, np.repeat(single[-1:], pad, axis=0)])
    t = single.shape[0]
    video = single.reshape(t // tp, tp, n, c, p, p).transpose(0, 2, 3, 1, 4, 5)  # (gt, N, C, tp, p, p)
    return video.reshape(-1, c * tp * p * p), (t // tp, int(grid[0, 1]), int(grid[0, 2]))


@pytest.mark.parametrize(
    "shape,bounds",
    [
        ((6, 120, 160), (56 * 56, 64 * 28 * 28)),  # mild resize (120x160 -> 112x168)
        ((5, 97, 203), (56 * 56, 64 * 28 * 28)),  # odd frame count, awkward size
        ((4, 60, 40), (16 * 28 * 28, 64 * 28 * 28)),  # upscaled by min_pixels
        ((2, 360, 640), (4 * 28 * 28, 32 * 28 * 28)),  # downscaled by max_pixels
        ((2, 112, 168), (56 * 56, 64 * 28 * 28)),  # already on the grid: no resize
    ],
)
def test_pixel_values_match_pil_image_processor(shape, bounds):
    rng = np.random.default_rng(sum(shape))
    t, h, w = shape
    # noise plus a gradient: harsh on resampling, and not a constant image
    frames = rng.integers(0, 256, size=(t, h, w, 3), dtype=np.uint8)
    frames[:, : h // 2] = (np.linspace(0, 255, w, dtype=np.float32)[None, None, :, None]).astype(np.uint8)
    cfg = VideoPreprocessConfig(min_pixels=bounds[0], max_pixels=bounds[1])
    ours = preprocess_video(frames, cfg)
    ref, ref_grid = _reference_video_patches(frames, cfg)
    pv = ours["pixel_values_videos"]
    assert pv.dtype == torch.float32 and ours["video_grid_thw"].dtype == torch.long
    assert tuple(ours["video_grid_thw"].shape) == (1, 3)
    assert tuple(ours["video_grid_thw"][0].tolist()) == ref_grid
    assert tuple(ours["video_grid_thw"][0].tolist()) == video_grid_thw_for(t, h, w, cfg)
    assert pv.shape == ref.shape == (math.prod(ref_grid), 3 * 2 * 14 * 14)
    diff = float(np.abs(pv.numpy() - ref).max())
    print(f"\n{shape}: grid {ref_grid}, max |ours - Qwen2VLImageProcessorPil| = {diff}")
    assert diff <= 1e-5


def test_two_identical_frames_equal_one_image():
    """For a 2-frame video of one image the layouts coincide exactly: the image processor
    broadcasts the image over the temporal patch axis."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
    cfg = VideoPreprocessConfig(min_pixels=56 * 56, max_pixels=64 * 28 * 28)
    ip = Qwen2VLImageProcessorPil(size={"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels})
    ref = ip(images=[img], return_tensors="np")
    ours = preprocess_video(np.stack([img, img]), cfg)
    assert np.abs(ours["pixel_values_videos"].numpy() - ref["pixel_values"]).max() <= 1e-5
    assert ours["video_grid_thw"].tolist() == ref["image_grid_thw"].tolist()  # [[1, gh, gw]]
    # a single frame is padded to the same thing
    assert torch.equal(preprocess_video(img[None], cfg)["pixel_values_videos"], ours["pixel_values_videos"])


def test_preprocess_rejects_bad_input():
    with pytest.raises(ValueError, match=r"frames must be \(T, H, W, 3\) RGB"):
        preprocess_video(np.zeros((2, 10, 10), dtype=np.uint8))
    with pytest.raises(ValueError, match="frames must be uint8"):
        preprocess_video(np.zeros((2, 56, 56, 3), dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# sample_frame_indices
# ---------------------------------------------------------------------------------------------
def _check_indices(idx, lo, hi, tp=2):
    assert len(idx) > 0 and len(idx) % tp == 0
    assert all(lo <= i < hi for i in idx)
    assert all(a <= b for a, b in zip(idx, idx[1:]))
    distinct = sorted(set(idx))
    # repeats only pad the last temporal patch with the last frame
    assert idx[: len(distinct)] == distinct and set(idx[len(distinct):]) <= {distinct[-1]}
    assert len(idx) - len(distinct) < tp
    if len(distinct) > 2:  # uniform: gaps differ by at most one frame
        gaps = np.diff(distinct)
        assert gaps.max() - gaps.min() <= 1


def test_frame_sampling_validation():
    assert FrameSampling().num_frames == 16 and FrameSampling().fps is None
    s = FrameSampling(fps=2.0)
    assert s.num_frames is None and s.fps == 2.0
    for bad, problem in [(dict(num_frames=8, fps=1.0), "exactly one of num_frames / fps"),
                         (dict(num_frames=None), "exactly one of num_frames / fps"),
                         (dict(num_frames=0), "num_frames must be a positive int"), (dict(fps=-1.0), "fps must be a positive number"),
                         (dict(fps=1.0, min_frames=10, max_frames=4), "min_frames <= max_frames")]:
        with pytest.raises(ValueError, match=problem):
            FrameSampling(**bad)


def test_sample_indices_num_frames_mode():
    for total in [1, 2, 3, 5, 16, 17, 100, 101, 1000, 7919]:
        for fps in [1.0, 24.0, 29.97, 30.0]:
            for n in [1, 2, 3, 4, 7, 8, 16, 31, 64]:
                idx = sample_frame_indices(total, fps, FrameSampling(num_frames=n))
                _check_indices(idx, 0, total)
                want = -(-n // 2) * 2
                if total >= want:
                    assert len(idx) == want and len(set(idx)) == want  # rounded up, all distinct
                else:
                    assert len(set(idx)) == total  # every frame, last repeated if odd
    # segment centres
    assert sample_frame_indices(100, 25.0, FrameSampling(num_frames=4)) == [12, 37, 62, 87]
    assert sample_frame_indices(100, 25.0, FrameSampling(num_frames=7)) == sample_frame_indices(
        100, 25.0, FrameSampling(num_frames=8))
    assert sample_frame_indices(3, 25.0, FrameSampling(num_frames=16)) == [0, 1, 2, 2]
    assert sample_frame_indices(1, 25.0, FrameSampling(num_frames=16)) == [0, 0]


def test_sample_indices_fps_mode_clamps():
    # 60 s at 30 fps
    s = FrameSampling(fps=0.5, min_frames=4, max_frames=64)
    assert len(sample_frame_indices(1800, 30.0, s)) == 30  # 60 s * 0.5
    assert len(sample_frame_indices(1800, 30.0, FrameSampling(fps=0.01))) == 4  # min_frames
    assert len(sample_frame_indices(1800, 30.0, FrameSampling(fps=10.0))) == 64  # max_frames
    assert len(sample_frame_indices(1800, 30.0, FrameSampling(fps=10.0, max_frames=33))) == 32  # floored to even
    assert len(sample_frame_indices(1800, 30.0, FrameSampling(fps=0.01, min_frames=5))) == 6  # rounded up
    assert len(sample_frame_indices(1800, 30.0, FrameSampling(fps=1.0), 10.0, 20.0)) == 10  # span, not video
    # never more distinct frames than the video holds, even if min_frames asks for more
    idx = sample_frame_indices(3, 30.0, FrameSampling(fps=1.0, min_frames=8))
    assert idx == [0, 1, 2, 2]
    for total, vfps in [(1800, 30.0), (250, 25.0), (97, 23.976), (10, 1.0)]:
        for f in [0.1, 0.5, 1.0, 2.0, 4.0, 100.0]:
            idx = sample_frame_indices(total, vfps, FrameSampling(fps=f))
            _check_indices(idx, 0, total)
            assert len(idx) <= 64


def test_sample_indices_time_range():
    total, fps = 1500, 25.0  # 60 s
    for start, end in [(0.0, 10.0), (10.0, 12.5), (30.02, 30.9), (59.0, None), (None, 0.5), (12.34, 12.35), (-5, 3)]:
        lo, hi = frame_range(total, fps, start, end)
        assert 0 <= lo < hi <= total
        if start is not None and start >= 0:
            # frames in [start, end): timestamps at or after start (except a sub-frame range)
            assert lo / fps >= start - 1 / fps
        if end is not None:
            assert (hi - 1) / fps < end
        for s in [FrameSampling(num_frames=8), FrameSampling(fps=2.0), FrameSampling(num_frames=3)]:
            idx = sample_frame_indices(total, fps, s, start, end)
            _check_indices(idx, lo, hi)
    assert frame_range(1500, 25.0, 10.0, 12.5) == (250, 313)
    assert frame_range(1500, 25.0, 12.34, 12.35) == (308, 309)  # between frames: the one before
    for bad, problem in [((10.0, 10.0), "empty time range"), ((12.0, 10.0), "empty time range"),
                         ((61.0, 70.0), "outside the video"), ((-3.0, 0.0), "outside the video")]:
        with pytest.raises(ValueError, match=problem):
            sample_frame_indices(total, fps, FrameSampling(), *bad)
    with pytest.raises(ValueError, match="video has no frames"):
        sample_frame_indices(0, fps, FrameSampling())


# ---------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mp4", "webm"])
@pytest.mark.parametrize("sampling", [FrameSampling(num_frames=8), FrameSampling(fps=3.0), FrameSampling(num_frames=5)])
def test_decord_and_pyav_agree(clips, kind, sampling):
    t0 = time.perf_counter()
    a = read_frames(clips[kind], sampling, backend="decord")
    t1 = time.perf_counter()
    b = read_frames(clips[kind], sampling, backend="pyav")
    t2 = time.perf_counter()
    assert (a.backend, b.backend) == ("decord", "pyav")
    assert a.indices == b.indices and a.timestamps_s == b.timestamps_s
    assert a.source_fps == b.source_fps and a.total_frames == b.total_frames
    assert a.sampled_fps == b.sampled_fps and a.span_s == b.span_s
    assert a.frames.shape == b.frames.shape and a.frames.dtype == b.frames.dtype == np.uint8
    assert a.frames.shape[1:] == (120, 160, 3) and len(a) % 2 == 0
    diff = np.abs(a.frames.astype(np.int16) - b.frames.astype(np.int16))
    print(f"\n{kind} {sampling}: idx {a.indices}; decord {t1 - t0:.3f}s pyav {t2 - t1:.3f}s; "
          f"max |decord - pyav| = {diff.max()}, mean {diff.mean():.4f}")
    assert diff.max() <= 2 and diff.mean() <= 0.1
    assert [round(t, 6) for t in a.timestamps_s] == [round(i / a.source_fps, 6) for i in a.indices]


def test_auto_backend_prefers_decord(clips):
    fr = read_frames(clips["mp4"], FrameSampling(num_frames=4))
    assert isinstance(fr, SampledFrames) and fr.backend == "decord"
    assert fr.total_frames == 100 and fr.source_fps == 25.0 and fr.indices == [12, 37, 62, 87]
    assert fr.sampled_fps == pytest.approx(1.0)  # 4 frames over 4 s
    # frames really differ (testsrc2 is animated) and are RGB
    assert not np.array_equal(fr.frames[0], fr.frames[-1])


def test_time_range_of_long_video(clips):
    sampling = FrameSampling(num_frames=6)
    start, end = 13.0, 15.5
    a = read_frames(clips["long"], sampling, start_s=start, end_s=end, backend="pyav")  # seeks
    b = read_frames(clips["long"], sampling, start_s=start, end_s=end, backend="decord")
    assert a.indices == b.indices
    assert all(start <= t < end for t in a.timestamps_s)
    assert a.span_s == (13.0, 15.52)  # frames 325..387 (timestamps 13.00 .. 15.48)
    assert a.indices == sample_frame_indices(500, 25.0, sampling, start, end) == [330, 340, 351, 361, 372, 382]
    assert np.abs(a.frames.astype(np.int16) - b.frames.astype(np.int16)).max() <= 2
    # the same frames as sampling the whole video at those indices would give
    full = read_frames(clips["long"], FrameSampling(fps=25.0, max_frames=500), backend="decord")
    pos = {i: k for k, i in enumerate(full.indices)}
    assert all(i in pos for i in a.indices)
    ref = full.frames[[pos[i] for i in a.indices]]
    assert np.abs(ref.astype(np.int16) - a.frames.astype(np.int16)).max() <= 2
    # fps mode over the range: 2.5 s at 2 fps -> 5 frames -> rounded up to 6
    c = read_frames(clips["long"], FrameSampling(fps=2.0), start_s=start, end_s=end)
    assert len(c) == 6 and all(start <= t < end for t in c.timestamps_s)
    assert c.sampled_fps == pytest.approx(6 / 2.52)
    with pytest.raises(ValueError, match="outside the video"):
        read_frames(clips["long"], sampling, start_s=25.0, end_s=30.0)


def test_bad_files_raise_clear_errors(tmp_path, clips):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 100)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(clips["mp4"].read_bytes()[:5000])  # moov atom at the end is lost
    for path in (junk, empty, truncated):
        for backend in ("auto", "decord", "pyav"):
            with pytest.raises(VideoReadError, match="cannot read video") as info:
                read_frames(path, FrameSampling(num_frames=4), backend=backend)
            assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError):
        read_frames(tmp_path / "missing.mp4")
    with pytest.raises(ValueError, match="backend must be 'auto', 'decord' or 'pyav'"):
        read_frames(clips["mp4"], backend="opencv")


# ---------------------------------------------------------------------------------------------
# build_video_inputs
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from models.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


def test_build_video_inputs_single_and_batch(tokenizer, clips):
    cfg = VideoPreprocessConfig(min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28)
    a = read_frames(clips["mp4"], FrameSampling(num_frames=4))
    b = read_frames(clips["webm"], FrameSampling(num_frames=6), start_s=0.5, end_s=2.5)
    video_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens first?"}]}]

    one = build_video_inputs(tokenizer, msgs, [a], cfg)
    grid = one["video_grid_thw"]
    assert grid.tolist() == [[2, 8, 12]]  # 120x160 -> 112x168
    n_tok = num_video_tokens(grid[0], cfg.merge_size)
    assert n_tok == 2 * 8 * 12 // 4
    assert int((one["input_ids"] == video_id).sum()) == n_tok
    assert one["pixel_values_videos"].shape == (2 * 8 * 12, 1176)
    assert torch.equal(one["mm_token_type_ids"], (one["input_ids"] == video_id).long() * 2)
    assert one["attention_mask"].all()
    # second_per_grid_ts = temporal_patch_size / sampled fps (4 frames over 4 s -> 1 fps -> 2 s)
    assert one["second_per_grid_ts"].tolist() == [pytest.approx(2.0)]
    # the rendered prompt survives around the expanded placeholder
    text = tokenizer.decode(one["input_ids"][0])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert text.count("<|video_pad|>") == n_tok and "<|vision_start|><|video_pad|>" in text

    # batch: sample 2 has two videos (given flat, in order), explicit fps, left padding
    msgs2 = [{"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "video"}, {"type": "video"}]}]
    batch = build_video_inputs(tokenizer, [msgs, msgs2], [a, b, a], cfg, fps_per_video=[1.0, 3.0, 1.0])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[0] == 2 and batch["video_grid_thw"].shape == (3, 3)
    assert batch["second_per_grid_ts"].tolist() == pytest.approx([2.0, 2 / 3, 2.0])
    counts = [num_video_tokens(g, 2) for g in batch["video_grid_thw"]]
    assert int((ids[0] == video_id).sum()) == counts[0]
    assert int((ids[1] == video_id).sum()) == counts[1] + counts[2]
    assert batch["pixel_values_videos"].shape[0] == int(batch["video_grid_thw"].prod(-1).sum())
    lengths = mask.sum(1).tolist()
    short = int(np.argmin(lengths))
    pad = ids.shape[1] - lengths[short]
    assert pad > 0 and (mask[short, :pad] == 0).all() and (mask[short, pad:] == 1).all()  # left padding
    assert (ids[short, :pad] == tokenizer.pad_token_id).all()
    assert (batch["mm_token_type_ids"][short, :pad] == 0).all()
    assert short == 0 and torch.equal(ids[0, pad:], one["input_ids"][0])
    assert torch.equal(batch["mm_token_type_ids"][0, pad:], one["mm_token_type_ids"][0])

    # pre-rendered prompt string and a plain array with explicit fps
    prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    same = build_video_inputs(tokenizer, prompt, [a.frames], cfg, fps_per_video=1.0)
    assert torch.equal(same["input_ids"], one["input_ids"])
    assert torch.equal(same["pixel_values_videos"], one["pixel_values_videos"])

    with pytest.raises(ValueError, match="placeholders"):
        build_video_inputs(tokenizer, msgs, [a, b], cfg)
    with pytest.raises(ValueError, match="fps_per_video"):
        build_video_inputs(tokenizer, msgs, [a.frames], cfg)
