"""The offline tiny Qwen2.5-VL (models/tiny.py): deterministic build, reload, tokenizer, chat
template, and generation on a real (ffmpeg-made) video through models/video.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from models.tiny import (
    MARKER_FILE,
    REASONING_TOKENS,
    SPECIAL_TOKENS,
    TINY_SEED,
    VIDEO_PREPROCESSOR_FILE,
    build_tiny_qwen2_5_vl,
    default_tiny_dir,
    ensure_tiny_model,
)
from models.video import (
    FrameSampling,
    VideoPreprocessConfig,
    build_video_inputs,
    read_frames,
)

FFMPEG = shutil.which("ffmpeg") or ("/usr/bin/ffmpeg" if Path("/usr/bin/ffmpeg").exists() else None)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    times = []
    paths = []
    for name in ("a", "b"):
        t0 = time.perf_counter()
        paths.append(build_tiny_qwen2_5_vl(root / name, seed=TINY_SEED))
        times.append(time.perf_counter() - t0)
    print(f"\ntiny build times: {', '.join(f'{t:.2f}s' for t in times)} (first includes imports)")
    return paths, times


@pytest.fixture(scope="module")
def tiny_dir(builds) -> Path:
    return builds[0][0]


@pytest.fixture(scope="module")
def model(tiny_dir):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    if FFMPEG is None:
        pytest.skip("ffmpeg not available")
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    cmd = [FFMPEG, "-hide_banner", "-loglevel", "error", "-nostdin", "-y",
           "-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=3",
           "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    return path


def test_build_is_deterministic_and_fast(builds, tmp_path):
    (a, b), times = builds
    fa, fb = _files(a), _files(b)
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "chat_template.jinja", VIDEO_PREPROCESSOR_FILE, MARKER_FILE}
    assert expected <= set(fa), sorted(fa)
    assert set(fa) == set(fb)
    for name in fa:
        assert fa[name] == fb[name], f"{name} differs between two builds with the same seed"
    assert times[1] < 30, times  # a few seconds in practice; generous for slow CI
    # another seed: other weights, same tokenizer
    c = build_tiny_qwen2_5_vl(tmp_path / "c", seed=TINY_SEED + 1)
    fc = _files(c)
    assert fc["model.safetensors"] != fa["model.safetensors"]
    assert fc["tokenizer.json"] == fa["tokenizer.json"]
    with pytest.raises(FileExistsError):
        build_tiny_qwen2_5_vl(c)
    assert build_tiny_qwen2_5_vl(c, overwrite=True) == c
    assert _files(c)["model.safetensors"] == fa["model.safetensors"]  # rebuilt with TINY_SEED


def test_reload_and_config(model, tokenizer, tiny_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    again = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir)
    assert list(model.state_dict()) == list(again.state_dict())  # zip below stops at the shorter one
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    cfg = model.config
    tc, vc = cfg.text_config, cfg.vision_config
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads) == (64, 2, 4, 2)
    assert tc.intermediate_size == 128 and tc.vocab_size == len(tokenizer)
    head_dim = tc.hidden_size // tc.num_attention_heads
    assert sum(tc.rope_parameters["mrope_section"]) == head_dim // 2 == 8
    assert (vc.depth, vc.hidden_size, vc.num_heads) == (2, 32, 2)
    assert (vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size) == (14, 2, 2)
    assert vc.out_hidden_size == tc.hidden_size
    ids = tokenizer.convert_tokens_to_ids
    assert cfg.image_token_id == ids("<|image_pad|>") and cfg.video_token_id == ids("<|video_pad|>")
    assert cfg.vision_start_token_id == ids("<|vision_start|>")
    assert cfg.vision_end_token_id == ids("<|vision_end|>")
    gc = model.generation_config
    assert gc.eos_token_id == ids("<|im_end|>") == tokenizer.eos_token_id
    assert gc.pad_token_id == ids("<|endoftext|>") == tokenizer.pad_token_id
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\ntiny model: {n_params:,} parameters, vocab {len(tokenizer)}")
    assert n_params < 1_000_000
    video_cfg = VideoPreprocessConfig.from_pretrained(tiny_dir)
    assert (video_cfg.patch_size, video_cfg.merge_size, video_cfg.temporal_patch_size) == (14, 2, 2)
    assert video_cfg.min_pixels < video_cfg.max_pixels
    assert json.loads((tiny_dir / MARKER_FILE).read_text())["seed"] == TINY_SEED


def test_tokenizer_tokens(tokenizer):
    assert 1000 <= len(tokenizer) <= 2000
    seen = set()
    for tok in SPECIAL_TOKENS + REASONING_TOKENS:
        ids = tokenizer.encode(tok, add_special_tokens=False)
        assert len(ids) == 1, (tok, ids)
        assert tokenizer.convert_ids_to_tokens(ids[0]) == tok
        seen.add(ids[0])
    assert len(seen) == len(SPECIAL_TOKENS) + len(REASONING_TOKENS)
    assert set(SPECIAL_TOKENS) <= set(tokenizer.all_special_tokens)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    text = "<think>The red car opens the door at 00:15, then it turns left.</think><answer>B</answer>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode("The", add_special_tokens=False) != tokenizer.encode(" The", add_special_tokens=False)
    # reasoning tags are kept when special tokens are skipped; chat tokens are dropped
    wrapped = tokenizer.encode("<|im_start|>" + text + "<|im_end|>", add_special_tokens=False)
    assert tokenizer.decode(wrapped, skip_special_tokens=True) == text
    # unseen text still round-trips (byte-level BPE)
    odd = "Zebra 🎬 naïve ∑ 12345"
    assert tokenizer.decode(tokenizer.encode(odd, add_special_tokens=False)) == odd


def test_chat_template_renders_video(tokenizer):
    msgs = [
        {"role": "user", "content": [{"type": "video", "video": "clip.mp4"}, {"type": "text", "text": "What happens?"}]},
    ]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What happens?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert text == no_prompt + "<|im_start|>assistant\n"
    msgs2 = [
        {"role": "system", "content": "Think first."},
        {"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Same?"}]},
        {"role": "assistant", "content": "<think>yes</think><answer>A</answer>"},
    ]
    text2 = tokenizer.apply_chat_template(msgs2, tokenize=False)
    assert text2 == (
        "<|im_start|>system\nThink first.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "<|vision_start|><|video_pad|><|vision_end|>Same?<|im_end|>\n"
        "<|im_start|>assistant\n<think>yes</think><answer>A</answer><|im_end|>\n"
    )
    ids = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
    ids = ids["input_ids"] if isinstance(ids, dict) else ids
    assert ids.count(tokenizer.convert_tokens_to_ids("<|video_pad|>")) == 1


def test_generate_on_real_video(model, tokenizer, tiny_dir, clip):
    video_cfg = VideoPreprocessConfig.from_pretrained(tiny_dir)
    frames = read_frames(clip, FrameSampling(num_frames=8))
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Which colour appears first?"}]}]
    inputs = build_video_inputs(tokenizer, msgs, [frames], video_cfg)
    assert "mm_token_type_ids" in inputs and "second_per_grid_ts" in inputs

    # the 3D (M-RoPE) positions are really used: temporal ids of video tokens step by
    # tokens_per_second * second_per_grid_ts per temporal patch, unlike plain 1D positions
    pos, _ = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"],
        second_per_grid_ts=inputs["second_per_grid_ts"], attention_mask=inputs["attention_mask"],
    )
    vmask = inputs["mm_token_type_ids"][0] == 2
    t_ids = pos[0, 0][vmask].unique()
    step = model.config.vision_config.tokens_per_second * float(inputs["second_per_grid_ts"][0])
    grid_t = int(inputs["video_grid_thw"][0, 0])
    assert grid_t == 4 and step == pytest.approx(1.5)  # 8 frames over 3 s: 2 / (8 / 3) s per patch
    assert torch.equal(t_ids - t_ids[0], (torch.arange(grid_t) * step).long())

    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    dt = time.perf_counter() - t0
    n_in = inputs["input_ids"].shape[1]
    assert out.shape == (1, n_in + 6)
    assert torch.equal(out[:, :n_in], inputs["input_ids"])
    print(f"\ngenerate: {n_in} prompt tokens (video grid {inputs['video_grid_thw'].tolist()}) "
          f"-> 6 new in {dt:.2f}s: {tokenizer.decode(out[0, n_in:])!r}")

    # batched, left-padded, two prompts with different videos
    other = read_frames(clip, FrameSampling(num_frames=4), start_s=1.0, end_s=2.0)
    msgs2 = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe."}]}]
    batch = build_video_inputs(tokenizer, [msgs, msgs2], [frames, other], video_cfg)
    with torch.no_grad():
        out2 = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out2.shape == (2, batch["input_ids"].shape[1] + 4)
    # left padding (with the 3D positions computed under the attention mask) does not change the
    # padded sample's next-token logits
    padded = int(batch["attention_mask"].sum(1).argmin())
    assert not batch["attention_mask"][padded].all()
    alone = build_video_inputs(tokenizer, [msgs, msgs2][padded], [[frames, other][padded]], video_cfg)
    with torch.no_grad():
        lb = model(**batch).logits[padded, -1]
        la = model(**alone).logits[0, -1]
    assert torch.allclose(lb, la, atol=1e-4), float((lb - la).abs().max())

    # training-style forward with labels
    labels = inputs["input_ids"].clone()
    labels[inputs["mm_token_type_ids"] != 0] = -100
    loss = model(**inputs, labels=labels).loss
    assert torch.isfinite(loss)


def test_default_dir_and_ensure(tmp_path, monkeypatch):
    monkeypatch.setenv("LVR_CACHE_DIR", str(tmp_path / "cache"))
    d = default_tiny_dir()
    assert d == (tmp_path / "cache" / "tiny-qwen2.5-vl").resolve()
    monkeypatch.delenv("LVR_CACHE_DIR")
    assert default_tiny_dir() == (Path.home() / ".cache" / "lvr" / "tiny-qwen2.5-vl").resolve()
    monkeypatch.setenv("LVR_CACHE_DIR", str(tmp_path / "cache"))

    p = ensure_tiny_model()
    assert p == d and (p / MARKER_FILE).is_file()
    stamp = (p / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model() == p
    assert (p / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    # an interrupted build (no marker) is rebuilt
    (p / MARKER_FILE).unlink()
    (p / "model.safetensors").unlink()
    assert ensure_tiny_model(p) == p
    assert (p / MARKER_FILE).is_file() and (p / "model.safetensors").is_file()
    assert not [q for q in p.parent.iterdir() if q.name.startswith(".")]  # no temp folders left


def test_a_cached_build_of_other_dimensions_is_rebuilt(tmp_path, monkeypatch):
    """Changing a model's shape without bumping TINY_FORMAT_VERSION must not load the old weights."""
    from models import tiny

    out = ensure_tiny_model(tmp_path / "tiny")
    assert json.loads((out / "config.json").read_text())["text_config"]["hidden_size"] == tiny.TINY_SHAPES[tiny.TINY].hidden
    narrower = replace(tiny.TINY_SHAPES[tiny.TINY], hidden=32, intermediate=64)
    monkeypatch.setitem(tiny.TINY_SHAPES, tiny.TINY, narrower)
    assert ensure_tiny_model(out) == out
    assert json.loads((out / "config.json").read_text())["text_config"]["hidden_size"] == 32
    # and the pretrained captioner's cache folder is named after its geometry too
    monkeypatch.setitem(tiny.TINY_SHAPES, tiny.TINY_CAPTIONER, narrower)
    narrow_dir = default_tiny_dir(tiny.TINY_CAPTIONER)
    monkeypatch.undo()
    assert default_tiny_dir(tiny.TINY_CAPTIONER) != narrow_dir
