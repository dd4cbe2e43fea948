"""Caption accuracy against the built-in sample's scene specification."""

from __future__ import annotations

import pytest

from data_schemas import CAPTIONS, CLIPS
from models.pretrain import KIND_NAMES, caption_for
from tasks.config import load_config
from tasks.engine.run import run_stage
from tasks.engine.stage import StageContext
from tasks.engine.store import Workdir
from tasks.samples.caption_accuracy import (
    caption_accuracy,
    scene_kind,
    shown_kinds,
    workdir_caption_accuracy,
)
from tasks.samples.videos import SAMPLE_SPECS, scenes_of
from tests.support.stand_ins import Published

A, C = "sample_a_30fps_gop250.mp4", "sample_c_25fps.mp4"


def test_every_sample_scene_is_a_kind_the_captioner_learns():
    kinds = [scene_kind(scene) for spec in SAMPLE_SPECS for scene in scenes_of(spec)]
    assert set(kinds) <= set(KIND_NAMES)
    assert {"a solid red screen", "a solid blue screen", "a solid green screen", "color bars"} <= set(kinds)


def test_a_clip_shows_the_scene_covering_most_of_it():
    assert shown_kinds(A, 0, 10) == ({"a moving test pattern"}, {"a moving test pattern"})
    # sample_c: PAL bars 0-14 s, game of life 14-28 s
    assert shown_kinds(C, 10, 20) == ({"the game of life"}, {"color bars", "the game of life"})
    # sample_a: test pattern 0-25 s, SMPTE bars 25-50 s: an equal split allows either
    assert shown_kinds(A, 20, 30)[0] == {"a moving test pattern", "color bars"}
    with pytest.raises(KeyError):
        shown_kinds("not_a_sample.mp4", 0, 10)


def test_accuracy_counts_captions_that_name_what_the_clip_shows():
    red = (A, 130, 140)  # solid red 125-150 s
    rows = [
        ("right", *red, caption_for(["a solid red screen"])),
        ("wrong colour", *red, caption_for(["a solid blue screen"])),
        ("noise", *red, "office2 nois>S slow throwsughlver"),
        ("both scenes", C, 10, 20, caption_for(["color bars", "the game of life"])),
        ("the lesser scene only", C, 10, 20, caption_for(["color bars"])),
        ("a scene it does not show", *red, caption_for(["a solid red screen", "a Mandelbrot zoom"])),
    ]
    accuracy = caption_accuracy(rows)
    assert (accuracy.right, accuracy.total) == (2, 6) and accuracy.fraction == pytest.approx(1 / 3)
    assert [clip for clip, _, _ in accuracy.wrong] == ["wrong colour", "noise", "the lesser scene only", "a scene it does not show"]


def test_accuracy_of_a_workdir_joins_captions_to_their_source_videos(tmp_path):
    workdir = Workdir(str(tmp_path / "wd"))
    ctx = StageContext(workdir, load_config("tiny"))
    clip = {"video_id": "v", "clip_index": 0, "clip_uri": "c.mp4", "start_s": 0.0, "end_s": 10.0, "duration_s": 10.0,
            "n_frames": 250, "mode": "copy", "fps": 25.0, "width": 320, "height": 240}
    clips = [{**clip, "clip_id": "a-0", "source_uri": f"/videos/{A}"}, {**clip, "clip_id": "c-0", "source_uri": f"s3://b/{C}"}]
    caption = {"video_id": "v", "start_s": 0.0, "end_s": 10.0, "model": "m", "backend": "hf", "prompt_hash": "h",
               "frames_used": 8, "tokens_in": 1, "tokens_out": 1, "latency_s": 0.1}
    captions = [{**caption, "clip_id": "a-0", "caption": caption_for(["a moving test pattern"])},
                {**caption, "clip_id": "c-0", "caption": caption_for(["a moving test pattern"])}]  # c starts with PAL bars
    assert run_stage(Published("clip", CLIPS, clips), ctx).status == "done"
    assert run_stage(Published("caption", CAPTIONS, captions), ctx).status == "done"
    accuracy = workdir_caption_accuracy(workdir)
    assert (accuracy.right, accuracy.total) == (1, 2) and accuracy.wrong[0][0] == "c-0"
