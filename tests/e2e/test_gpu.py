"""CUDA code paths. Skipped on CPU machines; run on a lent GPU (see the issue notes for numbers)."""

from __future__ import annotations

import pytest

from tests.support.videos import make_video

pytestmark = pytest.mark.gpu


def test_hf_captioner_on_cuda(tmp_path):
    from models.captioners import CaptionSettings, ClipRequest, HFCaptioner
    from models.video import FrameSampling

    clip = make_video(tmp_path / "c.mp4", 4, fps=25, gop=25)
    settings = CaptionSettings(prompt="Describe.", sampling=FrameSampling(num_frames=8), max_new_tokens=16, temperature=1.0, top_p=1.0, batch_size=2)
    captioner = HFCaptioner("tiny", settings, device="cuda")
    assert str(next(captioner.lm.model.parameters()).device).startswith("cuda")
    (result,) = captioner.caption([ClipRequest("c", str(clip))])
    assert result.error_kind is None and result.tokens_out > 0 and result.frames_used == 8


def test_vllm_captioner(tmp_path):
    pytest.importorskip("vllm")
    from models.captioners import CaptionSettings, ClipRequest, VLLMCaptioner
    from models.video import FrameSampling

    clip = make_video(tmp_path / "c.mp4", 4, fps=25, gop=25)
    settings = CaptionSettings(prompt="Describe.", sampling=FrameSampling(num_frames=8), max_new_tokens=16, temperature=1.0, top_p=1.0, batch_size=2)
    (result,) = VLLMCaptioner("tiny", settings).caption([ClipRequest("c", str(clip))])
    assert result.error_kind is None and result.tokens_out > 0
