"""`lvr synth`: coloured-segment videos whose answers are exact, published as a complete filter/."""

from __future__ import annotations

import random
from itertools import groupby

import numpy as np
import pandas as pd
import pytest

from data_schemas import FILTER
from models.video import FrameSampling, read_frames
from tasks.engine.manifest import read_manifest
from tasks.engine.stage import read_stage_table
from tasks.engine.store import Workdir
from tasks.grading.answers import AnswerKey, grade
from tasks.grading.prompts import LETTERS
from tasks.samples.synth import KINDS, PALETTE, SynthSpec, plan_segments, write_synth


def nearest_colour(pixel: np.ndarray) -> str:
    return min(PALETTE, key=lambda c: float(np.abs(pixel.astype(int) - np.array(c[1])).sum()))[0]


def test_the_set_is_verifiable_from_the_frames_the_models_see(tmp_path):
    spec = SynthSpec(videos=10, seed=3)
    report = write_synth(str(tmp_path), spec)
    assert report.status == "done" and report.rows == 30
    table = read_stage_table(Workdir(str(tmp_path)), "filter", FILTER).to_pandas()  # schema-checked
    assert sorted(table.split.unique()) == ["eval", "rl", "sft"]
    assert table.groupby("video_id").split.nunique().max() == 1  # a video is in one split only
    assert (table.groupby("split").video_id.nunique() == pd.Series({"eval": 2, "rl": 5, "sft": 3})).all()

    options = [name for name, _ in PALETTE]
    for video_id, rows in table.groupby("video_id"):
        frames = read_frames(rows.video_uri.iloc[0], FrameSampling(num_frames=spec.num_frames))
        seen = [nearest_colour(f[spec.size // 2, spec.size // 2]) for f in frames.frames]
        # Two frames per one-second slot: each temporal patch of the model shows one colour.
        assert all(seen[2 * k] == seen[2 * k + 1] for k in range(spec.slots)), seen
        slots = seen[::2]
        runs = [(c, sum(1 for _ in g)) for c, g in groupby(slots)]
        truth = {"first": runs[0][0], "last": runs[-1][0], "longest": max(runs, key=lambda r: r[1])[0]}
        assert [r[1] for r in runs].count(max(r[1] for r in runs)) == 1
        for row in rows.itertuples():
            kind = next(k for k, (q, _) in KINDS.items() if q == row.question)
            assert row.answer == LETTERS[options.index(truth[kind])]
            key = AnswerKey(row.question, row.question_type, row.answer, tuple(row.options))
            assert grade(row.target, key).correct and grade(row.target, key).format_ok

    assert write_synth(str(tmp_path), spec).status == "cached"
    assert read_manifest(Workdir(str(tmp_path)), "filter")["config"]["synth"]["videos"] == 10


def test_segments_have_a_unique_longest_and_distinct_colours():
    spec = SynthSpec()
    rng = random.Random(0)
    for _ in range(200):
        segments = plan_segments(rng, spec)
        lengths = [n for _, n in segments]
        assert sum(lengths) == spec.slots and lengths.count(max(lengths)) == 1 and min(lengths) >= 1
        assert len({c for c, _ in segments}) == spec.segments
    with pytest.raises(ValueError, match="segments"):
        SynthSpec(segments=5)
