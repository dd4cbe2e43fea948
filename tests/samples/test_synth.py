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
from tasks.grading.prompts import LETTERS, MULTIPLE_CHOICE, OPEN_ENDED
from tasks.samples.synth import KINDS, PALETTE, SynthSpec, plan_segments, write_synth


def nearest_colour(pixel: np.ndarray) -> str:
    return min(PALETTE, key=lambda c: float(np.abs(pixel.astype(int) - np.array(c[1])).sum()))[0]


def seen_slots(uri: str, spec: SynthSpec) -> list[str]:
    """The colour of each slot as the model's frames show it (two frames per slot, checked equal)."""
    frames = read_frames(uri, FrameSampling(num_frames=spec.num_frames))
    seen = [nearest_colour(f[spec.size // 2, spec.size // 2]) for f in frames.frames]
    assert all(seen[2 * k] == seen[2 * k + 1] for k in range(spec.slots)), seen
    return seen[::2]


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
        # Two frames per one-second slot: each temporal patch of the model shows one colour.
        slots = seen_slots(rows.video_uri.iloc[0], spec)
        runs = [(c, sum(1 for _ in g)) for c, g in groupby(slots)]
        truth = {"first": runs[0][0], "last": runs[-1][0], "longest": max(runs, key=lambda r: r[1])[0]}
        assert [r[1] for r in runs].count(max(r[1] for r in runs)) == 1
        for row in rows.itertuples():
            kind = next(k for k, kind in KINDS.items() if kind.question == row.question)
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


def test_compositional_questions_have_the_answers_the_frames_imply(tmp_path):
    kinds = ("first", "last", "longest", "after_longest", "returns", "same_ends")
    spec = SynthSpec(videos=8, segments=4, kinds=kinds, repeats=True, reasoning="chain", seed=2)
    assert write_synth(str(tmp_path), spec).rows == 8 * len(kinds)
    table = read_stage_table(Workdir(str(tmp_path)), "filter", FILTER).to_pandas()
    options = [name for name, _ in PALETTE]
    for _, rows in table.groupby("video_id"):
        slots = seen_slots(rows.video_uri.iloc[0], spec)
        runs = [(c, sum(1 for _ in g)) for c, g in groupby(slots)]
        assert len(runs) == spec.segments
        longest_run = max(range(len(runs)), key=lambda i: runs[i][1])
        truth = {
            "first": runs[0][0], "last": runs[-1][0], "longest": max(set(slots), key=slots.count),
            "after_longest": runs[longest_run + 1][0], "returns": str(sum(c == runs[0][0] for c, _ in runs)),
            "same_ends": "yes" if runs[0][0] == runs[-1][0] else "no",
        }
        for row in rows.itertuples():
            kind = next(k for k, kind in KINDS.items() if kind.question == row.question)
            if row.question_type == MULTIPLE_CHOICE:
                assert list(row.options) == options and row.answer == LETTERS[options.index(truth[kind])]
            else:
                assert row.question_type == OPEN_ENDED and row.options is None and row.answer == truth[kind]
            # The chain names every slot's colour in order, then derives the answer the grader accepts.
            assert row.target.startswith(f"<think>Colours: {' '.join(slots)}. ")
            key = AnswerKey(row.question, row.question_type, row.answer, tuple(row.options) if row.options is not None else None)
            assert grade(row.target, key).correct and grade(row.target, key).format_ok
            wrong = "3" if row.answer != "3" else "1"
            assert not grade(f"<think>x</think><answer>{wrong}</answer>", key).correct


def test_colours_that_come_back_end_on_the_first_colour_about_half_the_time():
    spec = SynthSpec(segments=4, kinds=("longest", "after_longest", "returns", "same_ends"), repeats=True)
    rng = random.Random(0)
    plans = [plan_segments(rng, spec) for _ in range(400)]
    for segments in plans:
        colours, lengths = [c for c, _ in segments], [n for _, n in segments]
        assert sum(lengths) == spec.slots and min(lengths) >= 1 and lengths.count(max(lengths)) == 1
        assert all(a != b for a, b in zip(colours, colours[1:]))  # adjacent segments differ
        assert lengths.index(max(lengths)) < len(lengths) - 1  # something comes after the longest
    same_ends = sum(s[0][0] == s[-1][0] for s in plans)
    assert 160 <= same_ends <= 240
    assert any(sum(c == s[0][0] for c, _ in s) == 2 and s[0][0] != s[-1][0] for s in plans)  # back in the middle
    with pytest.raises(ValueError, match="repeats"):
        SynthSpec(kinds=("returns",))
