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
    OPTION_LETTERS,
    WHICH_SHOWN,
    BatchJob,
    PretrainRecipe,
    caption_for,
    example,
    kinds_named_in,
    learning_rate,
    pose,
    render_batch,
    render_clip,
    schedule,
    shown,
    training_inputs,
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
    inputs = training_inputs(tokenizer, _preprocess(), [CAPTION_PROMPT], [render_clip(np.random.default_rng(0), SCENE_KINDS[:1], 8)], ["x"])
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


def test_only_the_target_and_the_end_of_turn_are_labelled():
    tokenizer = build_tiny_tokenizer()
    rng = np.random.default_rng(0)
    posed = pose([((0, 4),)], PretrainRecipe(answer_fraction=1.0))[0][0]
    examples = [example(CAPTION_PROMPT, ["a solid red screen"], None), example(CAPTION_PROMPT, ["color bars", "the game of life"], posed)]
    clips = [render_clip(rng, SCENE_KINDS[:1], 8), render_clip(rng, SCENE_KINDS[:2], 8)]
    inputs = training_inputs(tokenizer, _preprocess(), [p for p, _ in examples], clips, [t for _, t in examples])
    for row, (_, target) in enumerate(examples):
        labelled = inputs["labels"][row][inputs["labels"][row] != -100].tolist()
        assert tokenizer.decode(labelled) == target + tokenizer.eos_token
    assert examples[1][1] == f"<think>The video shows color bars, then the game of life.</think><answer>{posed.letter}</answer>"


def test_a_posed_clip_is_asked_as_the_stages_ask_a_multiple_choice_question():
    from tasks.grading.answers import AnswerKey, grade
    from tasks.grading.prompts import MULTIPLE_CHOICE, user_prompt

    (posed,) = pose([((3,),)], PretrainRecipe(answer_fraction=1.0))[0]
    prompt, target = example(CAPTION_PROMPT, [KIND_NAMES[3]], posed)
    assert prompt == user_prompt(WHICH_SHOWN, MULTIPLE_CHOICE, posed.options)
    verdict = grade(target, AnswerKey(WHICH_SHOWN, MULTIPLE_CHOICE, posed.letter, posed.options))
    assert verdict.correct and verdict.format_ok  # the target is a right, well-formed answer to the stages' grader


def test_posed_clips_have_one_right_option_at_a_random_letter_and_a_reversed_order_for_cuts():
    recipe = PretrainRecipe(steps=200, batch_size=8)
    plan = schedule(recipe)
    posed = pose(plan, recipe)
    pairs = [(kinds, p) for step, asked in zip(plan, posed) for kinds, p in zip(step, asked)]
    asked = [(kinds, p) for kinds, p in pairs if p is not None]
    assert 0.2 < len(asked) / len(pairs) < 0.3  # answer_fraction 0.25
    for kinds, p in asked:
        names = [KIND_NAMES[k] for k in kinds]
        assert len(set(p.options)) == len(p.options) == len(OPTION_LETTERS)
        assert p.options[OPTION_LETTERS.index(p.letter)] == shown(names)
        if len(names) == 2:
            assert shown(names[::-1]) in p.options  # the same two kinds the other way round
    letters = [p.letter for _, p in asked]
    assert all(letters.count(x) > len(letters) / 8 for x in OPTION_LETTERS)  # no letter favoured
    assert posed == pose(plan, recipe) and all(p is None for step in pose(plan, replace(recipe, answer_fraction=0.0)) for p in step)


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
                         ("weight_decay", 0.1), ("num_frames", 4), ("cut_fraction", 0.0), ("seed", 1), ("prompt", "p"),
                         ("answer_fraction", 0.5)]:
        keys.add(replace(base, **{field: value}).key("tiny"))
    assert len(keys) == 12


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
