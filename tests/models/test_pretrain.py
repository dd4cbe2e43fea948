"""The tiny captioner's pretraining: its data, its caption grammar, its recipe key and a deterministic build."""

from __future__ import annotations

from dataclasses import replace
from itertools import permutations

import numpy as np
import pytest

from models.pretrain import (
    CAPTION_PROMPT,
    KIND_NAMES,
    SCENE_KINDS,
    BatchJob,
    PretrainRecipe,
    caption_for,
    caption_inputs,
    kinds_named_in,
    learning_rate,
    render_batch,
    render_clip,
    schedule,
)
from models.tiny import (
    PRETRAIN_STEPS_ENV,
    TINY,
    TINY_CAPTIONER,
    build_tiny_qwen2_5_vl,
    build_tiny_tokenizer,
    default_tiny_dir,
    ensure_tiny_model,
)
from models.video import VideoPreprocessConfig, frame_size


def _preprocess() -> VideoPreprocessConfig:
    from models.tiny import _video_preprocessor_dict

    return VideoPreprocessConfig.from_dict(_video_preprocessor_dict())


def test_the_prompt_and_user_turn_are_the_caption_stages():
    from models.vlm import video_messages
    from tasks.config import CaptionConfig

    assert CAPTION_PROMPT == CaptionConfig.model_fields["prompt"].default
    tokenizer = build_tiny_tokenizer()
    inputs = caption_inputs(tokenizer, _preprocess(), CAPTION_PROMPT, [render_clip(np.random.default_rng(0), SCENE_KINDS[:1], 8)], ["x"])
    expected = tokenizer.apply_chat_template(video_messages(CAPTION_PROMPT), tokenize=False, add_generation_prompt=True)
    text = tokenizer.decode(inputs["input_ids"][0])
    assert text.startswith(expected.split("<|video_pad|>")[0]) and text.endswith(expected.split("<|video_pad|>")[-1] + "x<|im_end|>")


def test_every_caption_names_its_kinds_in_order():
    for name in KIND_NAMES:
        assert kinds_named_in(caption_for([name])) == [name]
        assert [other for other in KIND_NAMES if other in name] == [name]  # no name hides inside another
    for first, second in permutations(KIND_NAMES, 2):
        assert kinds_named_in(caption_for([first, second])) == [first, second]
    assert kinds_named_in("a red circle") == []


def test_only_the_caption_and_the_end_of_turn_are_labelled():
    tokenizer = build_tiny_tokenizer()
    rng = np.random.default_rng(0)
    captions = [caption_for(["a solid red screen"]), caption_for(["color bars", "the game of life"])]
    clips = [render_clip(rng, SCENE_KINDS[:1], 8), render_clip(rng, SCENE_KINDS[:2], 8)]
    inputs = caption_inputs(tokenizer, _preprocess(), CAPTION_PROMPT, clips, captions)
    for row, caption in enumerate(captions):
        labelled = inputs["labels"][row][inputs["labels"][row] != -100].tolist()
        assert tokenizer.decode(labelled) == caption + tokenizer.eos_token


def test_clips_have_the_sample_frame_size_and_batches_depend_only_on_their_job():
    rng = np.random.default_rng(0)
    for kind in SCENE_KINDS:
        frames = render_clip(rng, [kind], 8)
        assert frames.shape == (8, 240, 320, 3) and frames.dtype == np.uint8
    job = BatchJob(seed=3, step=5, kinds=((0,), (4, 8)), num_frames=8, preprocess=_preprocess())
    first, again = render_batch(job), render_batch(job)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert first[0].shape == (8, *frame_size(240, 320, _preprocess()), 3)  # already at the model's size
    assert not np.array_equal(first[0], render_batch(replace(job, step=6))[0])


def test_cut_clips_change_kind_between_frames():
    red, blue = SCENE_KINDS[KIND_NAMES.index("a solid red screen")], SCENE_KINDS[KIND_NAMES.index("a solid blue screen")]
    frames = render_clip(np.random.default_rng(1), [red, blue], 8)
    reds = frames[:, :100, :, 0].mean(axis=(1, 2)) > 128  # above the label box
    assert reds[0] and not reds[-1] and list(reds) == sorted(reds, reverse=True)


def test_schedule_shows_every_kind_its_share():
    per_round = sum(kind.share for kind in SCENE_KINDS)
    recipe = PretrainRecipe(steps=per_round, batch_size=4)  # four rounds
    plan = schedule(recipe)
    firsts = [clip[0] for step in plan for clip in step]
    assert len(plan) == per_round and all(len(step) == 4 for step in plan)
    assert np.bincount(firsts, minlength=len(SCENE_KINDS)).tolist() == [4 * kind.share for kind in SCENE_KINDS]
    assert max(kind.share for kind in SCENE_KINDS) > 1
    cuts = [clip for step in plan for clip in step if len(clip) == 2]
    assert cuts and all(a != b for a, b in cuts)
    assert plan == schedule(recipe)


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    recipe = PretrainRecipe(steps=100, warmup_steps=10, learning_rate=1.0)
    rates = [learning_rate(s, recipe) for s in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert rates[10:] == sorted(rates[10:], reverse=True) and rates[-1] == pytest.approx(0.1, abs=1e-3)


def test_the_recipe_key_changes_with_every_setting():
    base = PretrainRecipe()
    keys = {base.key("tiny"), base.key("other base")}
    for field, value in [("steps", 7), ("batch_size", 3), ("learning_rate", 1e-4), ("warmup_steps", 1),
                         ("weight_decay", 0.1), ("num_frames", 4), ("cut_fraction", 0.0), ("seed", 1), ("prompt", "p")]:
        keys.add(replace(base, **{field: value}).key("tiny"))
    assert len(keys) == 11


def test_the_captioner_is_cached_under_its_recipe(monkeypatch):
    monkeypatch.setenv(PRETRAIN_STEPS_ENV, "2")
    short = default_tiny_dir(TINY_CAPTIONER)
    monkeypatch.setenv(PRETRAIN_STEPS_ENV, "3")
    assert default_tiny_dir(TINY_CAPTIONER) != short and short.name.startswith(f"{TINY_CAPTIONER}-")
    assert default_tiny_dir(TINY).name == "tiny-qwen2.5-vl"  # random models have no recipe


def test_two_builds_give_byte_identical_weights_that_pretraining_changed(tmp_path, monkeypatch):
    monkeypatch.setenv(PRETRAIN_STEPS_ENV, "2")  # as the test session's (tests/conftest.py): often cached already
    first = ensure_tiny_model(name=TINY_CAPTIONER)
    second = build_tiny_qwen2_5_vl(tmp_path / "again", name=TINY_CAPTIONER)
    files = sorted(p.name for p in first.iterdir())
    assert files == sorted(p.name for p in second.iterdir())
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    untrained = ensure_tiny_model()  # the same init, not pretrained
    assert (untrained / "model.safetensors").read_bytes() != (first / "model.safetensors").read_bytes()
