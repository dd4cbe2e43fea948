"""Qwen2/2.5-VL mRoPE positions (models/positions.py): Qwen's layout (text after a vision block continues
at the block's largest position + 1) checked against Qwen2.5-VL's documented example, transformers 5's
layout for the models that declare it, and both used by the models lvr loads, in a forward and in
incremental generation."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from models.positions import (
    TEXT_AFTER_VISION_KEY,
    WIDEST_SIDE,
    mrope_positions,
    use_trained_positions,
    vision_positions,
)
from models.tiny import ensure_tiny_model
from models.video import build_video_inputs
from models.vlm import HFVideoLM, video_messages


def types(*runs: tuple[int, int]) -> torch.Tensor:
    """mm_token_type_ids of one sample from (kind, count) runs."""
    return torch.tensor([[kind for kind, n in runs for _ in range(n)]])


def test_qwen25_documented_example_three_patches_fifty_apart_then_text_at_101():
    # Qwen2.5-VL's own example: 3 temporal patches, a 2 x 2 merged grid, fps 1 (2 s a patch),
    # 25 tokens per second: temporal ids 0, 50, 100; the text after starts at 101.
    positions, deltas = mrope_positions(
        types((2, 12), (0, 5)), spatial_merge_size=2, tokens_per_second=25,
        video_grid_thw=torch.tensor([[3, 4, 4]]), second_per_grid_ts=torch.tensor([2.0]),
    )
    t, h, w = positions[:, 0].tolist()
    assert t[:12] == [0] * 4 + [50] * 4 + [100] * 4
    assert h[:12] == [0, 0, 1, 1] * 3 and w[:12] == [0, 1, 0, 1] * 3
    assert t[12:] == h[12:] == w[12:] == [101, 102, 103, 104, 105]
    assert deltas.tolist() == [[106 - 17]]


def test_text_after_a_long_video_comes_after_all_of_it_not_among_its_temporal_positions():
    # 3 text tokens, 10 temporal patches 4 apart on a 4 x 4 merged grid, then the question.
    kwargs = dict(spatial_merge_size=2, tokens_per_second=2, video_grid_thw=torch.tensor([[10, 8, 8]]), second_per_grid_ts=torch.tensor([2.0]))
    positions, deltas = mrope_positions(types((0, 3), (2, 160), (0, 4)), **kwargs)
    video, question = positions[:, 0, 3:163], positions[:, 0, 163:]
    assert int(video[0].min()) == 3 and int(video[0].max()) == 3 + 9 * 4
    assert question[0].tolist() == [40, 41, 42, 43] and torch.equal(question[0], question[1]) and torch.equal(question[1], question[2])
    assert deltas.tolist() == [[44 - 167]]
    # transformers 5's layout: the question right after the block's start + its widest merged side
    widest, widest_deltas = mrope_positions(types((0, 3), (2, 160), (0, 4)), text_after_vision=WIDEST_SIDE, **kwargs)
    assert torch.equal(widest[:, 0, :163], positions[:, 0, :163])
    assert widest[0, 0, 163:].tolist() == [7, 8, 9, 10]
    assert widest_deltas.tolist() == [[40 - 167]]  # from the largest position, the video's last temporal id
    with pytest.raises(ValueError, match="text_after_vision"):
        mrope_positions(types((0, 1)), text_after_vision="middle", **kwargs)


def test_qwen2_vl_patches_one_apart_and_images_continue_after_their_widest_side():
    positions, deltas = mrope_positions(
        types((2, 4 * 4), (0, 1), (1, 2 * 3), (0, 2)), spatial_merge_size=2, tokens_per_second=None,
        video_grid_thw=torch.tensor([[4, 4, 4]]), second_per_grid_ts=torch.tensor([5.0]), image_grid_thw=torch.tensor([[1, 4, 6]]),
    )
    t = positions[0, 0].tolist()
    assert t[:16] == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4  # Qwen2-VL: no spacing by time
    assert t[16] == 4  # after max(t, h, w) = 3
    image = positions[:, 0, 17:23]
    assert image[0].tolist() == [5] * 6 and image[1].tolist() == [5, 5, 5, 6, 6, 6] and image[2].tolist() == [5, 6, 7] * 2
    assert t[23:] == [8, 9] and deltas.tolist() == [[10 - 25]]


def test_left_padding_changes_nothing_but_the_padding_and_grid_rows_go_to_samples_in_order():
    a = types((0, 2), (2, 8), (0, 3))[0]
    b = types((0, 1), (2, 4), (0, 1))[0]
    batch = torch.zeros(2, 13, dtype=torch.long)
    batch[0], batch[1, 7:] = a, b
    mask = torch.zeros(2, 13, dtype=torch.long)
    mask[0], mask[1, 7:] = 1, 1
    grids, seconds = torch.tensor([[2, 4, 4], [1, 4, 4]]), torch.tensor([3.0, 1.0])
    positions, deltas = mrope_positions(batch, spatial_merge_size=2, tokens_per_second=2, video_grid_thw=grids,
                                        second_per_grid_ts=seconds, attention_mask=mask)
    alone_a, delta_a = mrope_positions(a[None], spatial_merge_size=2, tokens_per_second=2, video_grid_thw=grids[:1], second_per_grid_ts=seconds[:1])
    alone_b, delta_b = mrope_positions(b[None], spatial_merge_size=2, tokens_per_second=2, video_grid_thw=grids[1:], second_per_grid_ts=seconds[1:])
    assert torch.equal(positions[:, 0], alone_a[:, 0]) and torch.equal(positions[:, 1, 7:], alone_b[:, 0])
    assert positions[:, 1, :7].eq(0).all()
    assert deltas.tolist() == [delta_a[0].tolist(), delta_b[0].tolist()]


def test_blocks_that_do_not_match_the_grids_are_refused():
    with pytest.raises(ValueError, match="more video blocks"):
        mrope_positions(types((2, 4), (0, 1), (2, 4)), spatial_merge_size=2, tokens_per_second=2,
                        video_grid_thw=torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match="a block of 5 vision tokens for a grid of 4"):
        mrope_positions(types((2, 5)), spatial_merge_size=2, tokens_per_second=2, video_grid_thw=torch.tensor([[1, 4, 4]]))


def test_fractional_spacing_is_quantised_after_the_product():
    # 0.75 ids a patch: 0, 0.75, 1.5, 2.25 -> 0, 0, 1, 2 (truncating the spacing first would give all 0)
    assert vision_positions(10, (4, 2, 2), 2, 0.75)[0].tolist() == [10, 10, 11, 12]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A checkpoint as Qwen publishes one: the tiny model without its declared layout."""
    folder = tmp_path_factory.mktemp("qwen") / "model"
    shutil.copytree(ensure_tiny_model(), folder)
    config = json.loads((folder / "config.json").read_text())
    assert config.pop(TEXT_AFTER_VISION_KEY) == WIDEST_SIDE
    (folder / "config.json").write_text(json.dumps(config))
    return HFVideoLM(str(folder), device="cpu")


def video_inputs(lm: HFVideoLM, frames: int = 8) -> dict:
    rng = np.random.default_rng(0)
    video = rng.integers(0, 255, size=(frames, 56, 84, 3), dtype=np.uint8)
    return build_video_inputs(lm.tokenizer, [video_messages("What happens last?")], [video], lm.preprocess, fps_per_video=0.5)


def loaded_positions(lm: HFVideoLM, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The positions the loaded model gives the inputs, and the masks of its video tokens and of the text after them."""
    positions, _ = lm.model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"],
        second_per_grid_ts=inputs["second_per_grid_ts"], attention_mask=inputs["attention_mask"],
    )
    video = inputs["mm_token_type_ids"][0] == 2
    return positions[:, 0], video, torch.arange(video.numel()) > int(video.nonzero().max())


def test_a_qwen_checkpoint_loaded_by_lvr_gets_the_question_after_the_video(lm):
    positions, video, after = loaded_positions(lm, video_inputs(lm))
    assert int(positions[0, video].max()) > int(positions[1, video].max())  # time spans more ids than space here
    assert int(positions[:, after].min()) == int(positions[:, video].max()) + 1


def test_lvrs_tiny_models_keep_the_layout_they_were_trained_with():
    tiny = HFVideoLM("tiny", device="cpu")
    assert getattr(tiny.model.config, TEXT_AFTER_VISION_KEY) == WIDEST_SIDE
    inputs = video_inputs(tiny)
    positions, video, after = loaded_positions(tiny, inputs)
    start = int(positions[0, video].min())
    widest = int(inputs["video_grid_thw"][0, 1:].max()) // tiny.model.config.vision_config.spatial_merge_size
    assert int(positions[:, after].min()) == start + widest < int(positions[0, video].max())


def test_generation_continues_the_reference_positions(lm):
    # Greedy generation with the cache (positions from the rope deltas) scores each new token as a
    # full forward over prompt + tokens so far (positions computed afresh) does.
    inputs = video_inputs(lm)
    with torch.no_grad():
        out = lm.model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        n = inputs["input_ids"].shape[1]
        full = {**inputs, "input_ids": out.sequences, "attention_mask": torch.ones_like(out.sequences),
                "mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, 4, dtype=torch.long)], dim=1)}
        logits = lm.model(**full).logits[0, n - 1 : n + 3]
    assert torch.allclose(torch.stack(out.logits)[:, 0], logits, atol=1e-4)


def test_other_models_are_left_alone():
    class Other(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"model_type": "qwen3_vl"})()

        def get_rope_index(self, *args, **kwargs):
            return "own"

    other = Other()
    assert use_trained_positions(other) is other and other.get_rope_index() == "own"
