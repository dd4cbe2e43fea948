"""Context windows of the QA stage: a video too long for one prompt is asked about in consecutive parts.

The windowing and the token estimate are pure functions; the stage runs go through the real engine,
against the OpenAI-protocol test server (which records every prompt as it received it) or offline
with the template backend.
"""

from __future__ import annotations

import json
import random
import re

import pandas as pd
import pyarrow as pa
import pytest

from data_schemas import QA, validate_table
from tasks.engine.run import run_stage
from tasks.engine.stage import StageError
from tasks.media.timecode import mmss
from tasks.qa.captions import Clip, VideoCaptions, Window, caption_line
from tasks.qa.prompts import PromptSet, generation_prompt
from tasks.qa.stage import QAStage
from tasks.qa.windows import (
    CaptionTooLong,
    ItemTooLarge,
    NoRoom,
    estimate_tokens,
    frame_tokens,
    messages_tokens,
    plan_windows,
    split_windows,
)
from tests.qa.test_stage import KEY_ENV, SECRET, failures, make_ctx, qa_table
from tests.support.openai_server import (
    KITCHEN_CAPTIONS,
    OpenAITestServer,
    Reply,
    caption_rows,
    is_refine_request,
    r1_responder,
)

CATEGORIES = ("Temporal", "Goal and Purpose", "Spatial", "Plot and Narrative")
KINDS = [(c, t) for c in CATEGORIES for t in ("multiple_choice", "open_ended")]
PROMPTS = PromptSet("generate", "v1")
ANIMALS = ["heron", "otter", "badger", "falcon", "beaver", "marten", "weasel", "kestrel", "lynx", "osprey"]
TOOLS = ["ladle", "whisk", "skillet", "colander", "grater", "mortar", "sieve", "cleaver", "tongs", "kettle"]


def long_captions(n: int, seconds: float = 10.0) -> list[tuple[float, float, str]]:
    """Captions of a long video, every one distinctive (its own animal and tool pair)."""
    return [
        (i * seconds, (i + 1) * seconds, f"A carved {ANIMALS[i % 10]} figurine sits beside the {TOOLS[i // 10 % 10]} while the cook stirs pot {i}.")
        for i in range(n)
    ]


def video_of(video_id: str, captions: list[tuple[float, float, str]]) -> VideoCaptions:
    return VideoCaptions(video_id, tuple(Clip(f"{video_id}-{i:05d}", a, b, c) for i, (a, b, c) in enumerate(captions)))


# -- the token estimate ---------------------------------------------------------------------------


def test_estimate_counts_letters_by_three_bytes_and_every_digit_and_mark_as_one():
    assert estimate_tokens("") == 0 and estimate_tokens("   ") == 0
    # From(2) 0 0 : 1 0 (5) to(1) 0 0 : 2 0 (5) :(1) She(1) dices(2) .(1)
    assert estimate_tokens("From 00:10 to 00:20: She dices.") == 18
    assert estimate_tokens("切番茄") == 3  # 9 UTF-8 bytes: one token a character
    assert estimate_tokens("a\n\nb") == 4
    assert estimate_tokens("snake_case") == 2 + 1 + 2


def test_estimate_is_additive_over_lines_and_high_for_prose():
    lines = [caption_line(c) for c in video_of("k", KITCHEN_CAPTIONS).clips]
    assert estimate_tokens("\n".join(lines)) == sum(map(estimate_tokens, lines)) + len(lines) - 1
    for line in lines:  # English runs about 4 characters a token; the estimate stays above that
        assert estimate_tokens(line) > len(line.encode()) / 4


# -- windowing (pure) -----------------------------------------------------------------------------


def test_split_windows_boundaries():
    assert split_windows([], 10) == []
    assert split_windows([3, 3, 4], 10) == [range(3)]  # exactly the budget: one window
    assert split_windows([10], 10) == [range(1)]
    assert split_windows([3, 3, 5], 10) == [range(2), range(2, 3)]  # one over: split, never a caption
    assert split_windows([2, 10, 2], 10) == [range(1), range(1, 2), range(2, 3)]
    # The fewest windows, evened out: not 10 + 1.
    assert split_windows([1] * 11, 10) == [range(6), range(6, 11)]


def test_split_windows_oversized_item_is_named():
    with pytest.raises(ItemTooLarge) as exc:
        split_windows([2, 11, 2], 10)
    assert (exc.value.index, exc.value.cost, exc.value.budget) == (1, 11, 10)


def test_split_windows_cover_in_order_within_budget_with_fewest_windows():
    rng = random.Random(7)
    for _ in range(300):
        costs = [rng.randint(1, 30) for _ in range(rng.randint(1, 40))]
        budget = rng.randint(max(costs), 120)
        windows = split_windows(costs, budget)
        assert [i for w in windows for i in w] == list(range(len(costs)))  # consecutive, in order, all of them
        assert all(len(w) and sum(costs[i] for i in w) <= budget for w in windows)
        greedy, total = 1, 0  # the fewest: filling each window as far as it goes needs as many
        for cost in costs:
            if total + cost > budget:
                greedy, total = greedy + 1, 0
            total += cost
        assert len(windows) == greedy


def test_plan_windows_whole_video_when_it_fits_or_unbounded():
    video = video_of("kitchen", KITCHEN_CAPTIONS)
    assert plan_windows(PROMPTS, video, KINDS, 1, 8192, None) == [Window.whole_video(video)]
    assert plan_windows(PROMPTS, video, KINDS, 1, 8192, 64_000) == [Window.whole_video(video)]


def test_plan_windows_every_prompt_fits_and_windows_cover_the_video():
    video = video_of("long", long_captions(60))
    context = frame_tokens(PROMPTS, video, KINDS, 2, windowed=True) + 1000 + 400
    windows = plan_windows(PROMPTS, video, KINDS, 2, 1000, context)
    assert len(windows) >= 3 and [w.index for w in windows] == list(range(len(windows)))
    assert [c for w in windows for c in w.clips] == list(video.clips)
    for window in windows:
        assert not window.whole
        for category, qtype in KINDS:
            prompt = generation_prompt(PROMPTS, window, category, qtype, 2)
            assert messages_tokens(prompt.messages) + 1000 <= context
            assert prompt.version.startswith("v1-")
    sizes = [len(w.clips) for w in windows]
    assert max(sizes) - min(sizes) <= 2  # evened out


def test_plan_windows_caption_too_long_and_no_room():
    captions = long_captions(8)
    captions[5] = (50.0, 60.0, "The cook recites the recipe: " + "salt pepper cumin paprika " * 200)
    video = video_of("chatty", captions)
    context = frame_tokens(PROMPTS, video, KINDS, 1, windowed=True) + 256 + 300
    with pytest.raises(CaptionTooLong, match=r"clip chatty-00005 \(00:50-01:00\) does not fit .* qa.context_tokens is \d+") as exc:
        plan_windows(PROMPTS, video, KINDS, 1, 256, context)
    assert exc.value.clip == video.clips[5]
    with pytest.raises(NoRoom, match="leaves no room for captions"):
        plan_windows(PROMPTS, video, KINDS, 1, 256, 900)


# -- the stage ------------------------------------------------------------------------------------

_LINE = re.compile(r"^From (\d+:\d\d) to (\d+:\d\d): (.+)$", re.MULTILINE)


def window_responder(info) -> Reply:
    """R1 for the kitchen fixtures; for the long video, a question about the part of it it was shown."""
    if is_refine_request(info) or "figurine" not in info.text:
        return r1_responder(info)
    lines = _LINE.findall(info.text)
    start, end = lines[0][0], lines[-1][1]
    category = re.search(r"^Category:\s*(.+?)\s*$", info.text, re.MULTILINE).group(1)
    item = {
        "question": f"Between {start} and {end}, which figurine does the cook pass first ({category})?",
        "answer": "B" if "multiple-choice" in info.text else "The first figurine of that part",
        "reasoning": f"Step 1: At {lines[0][0]}-{lines[0][1]} the first figurine is seen.\nStep 2: At {lines[-1][0]}-{lines[-1][1]} the last one.",
    }
    if "multiple-choice" in info.text:
        item = {**item, "options": {"A": "The heron", "B": "The first one shown in that part", "C": "The lynx", "D": "None"}}
    return Reply(json.dumps({"questions": [item]}))


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def test_long_video_is_asked_in_windows_that_fit_and_a_short_one_is_unchanged(tmp_path, key):
    long_video = long_captions(40)
    rows = caption_rows("kitchen", KITCHEN_CAPTIONS) + caption_rows("long", long_video)
    max_tokens = 300
    context = frame_tokens(PROMPTS, video_of("long", long_video), KINDS, 1, windowed=True) + max_tokens + 500
    with OpenAITestServer(window_responder, api_key=SECRET) as server:
        ctx = make_ctx(tmp_path / "win", rows, server, **{"qa.max_tokens": max_tokens, "qa.context_tokens": context})
        report = run_stage(QAStage(), ctx)
        received = list(server.requests)
        server.reset_counters()
        plain = make_ctx(tmp_path / "plain", caption_rows("kitchen", KITCHEN_CAPTIONS), server, **{"qa.max_tokens": max_tokens})
        run_stage(QAStage(), plain)
    assert report.status == "done"

    # Every prompt, as the endpoint received it, leaves max_tokens of room in the context.
    assert received and all(messages_tokens(r.messages) + max_tokens <= context for r in received)

    # The long video's generation requests show consecutive parts of it, which together are the whole video.
    generation = [r for r in received if not is_refine_request(r) and "figurine" in r.text]
    parts = sorted({tuple(_LINE.findall(r.text)) for r in generation})
    assert len(parts) >= 3
    assert [line for part in parts for line in part] == [(mmss(a), mmss(b), c) for a, b, c in long_video]
    assert len(generation) == len(parts) * len(KINDS)  # every category x type, in every window
    for r in generation:
        lines = _LINE.findall(r.text)
        assert f"from {lines[0][0]} to {lines[-1][1]} (of {mmss(long_video[-1][1])})" in r.text

    table = qa_table(tmp_path / "win")
    assert table["qa_id"].is_unique
    long_rows = table[table["video_id"] == "long"]
    windows = long_rows.groupby("window_index")[["window_start_s", "window_end_s"]].agg(["min", "max"])
    assert list(windows.index) == list(range(len(parts)))  # one window per part, numbered in order
    assert (windows[("window_start_s", "min")] == windows[("window_start_s", "max")]).all()
    starts, ends = list(windows[("window_start_s", "min")]), list(windows[("window_end_s", "max")])
    assert starts[0] == 0.0 and ends[-1] == long_video[-1][1] and starts[1:] == ends[:-1]  # in order, no gap, no overlap
    assert (long_rows.groupby("window_index").size() == len(KINDS)).all()
    for row in long_rows.itertuples():  # each question records the window it was asked about
        assert row.question.startswith(f"Between {mmss(row.window_start_s)} and {mmss(row.window_end_s)},")
    assert not (failures(tmp_path / "win")["item_id"] == "long").any()

    # The kitchen video fits: one window, and exactly the rows (ids, cache keys) of a run without windows.
    kitchen = table[table["video_id"] == "kitchen"].reset_index(drop=True)
    assert set(kitchen["window_index"]) == {0} and set(kitchen["window_start_s"]) == {0.0} and set(kitchen["window_end_s"]) == {61.5}
    pd.testing.assert_frame_equal(kitchen, qa_table(tmp_path / "plain"))
    assert not any("These lines cover only the part" in r.text for r in received if "figurine" not in r.text)


def test_template_backend_honours_windows_and_a_huge_caption_fails_only_its_video(tmp_path):
    chatty = long_captions(6)
    chatty[2] = (20.0, 30.0, "The cook recites the recipe: " + "salt pepper cumin paprika " * 300)
    rows = caption_rows("long", long_captions(60)) + caption_rows("chatty", chatty)
    context = frame_tokens(PROMPTS, video_of("long", long_captions(60)), KINDS, 1, windowed=True) + 256 + 600
    ctx = make_ctx(tmp_path / "wd", rows, **{"qa.max_tokens": 256, "qa.context_tokens": context})
    run_stage(QAStage(), ctx)
    table = qa_table(tmp_path / "wd")
    assert set(table["video_id"]) == {"long"} and table["qa_id"].is_unique
    assert table["window_index"].nunique() >= 3
    for row in table.itertuples():  # the template quotes only its window's clips
        for a, b in re.findall(r"(\d+:\d\d)-(\d+:\d\d)", row.refined_reasoning):
            assert mmss(row.window_start_s) <= a and b <= mmss(row.window_end_s)
    fails = failures(tmp_path / "wd")
    (chatty_fail,) = fails[fails["item_id"] == "chatty"].itertuples()
    assert chatty_fail.error_kind == "caption_too_long" and chatty_fail.failure_class == "input"
    assert chatty_fail.message.startswith("chatty: the caption of clip chatty-00002 (00:20-00:30) does not fit")

    # Windows change which questions are asked: part of the fingerprint.
    assert QAStage().settings(ctx) != QAStage().settings(make_ctx(tmp_path / "wd", rows, **{"qa.max_tokens": 256}))


def test_context_too_small_for_the_prompt_stops_the_stage(tmp_path):
    ctx = make_ctx(tmp_path / "wd", caption_rows("long", long_captions(60)), **{"qa.max_tokens": 256, "qa.context_tokens": 1000})
    with pytest.raises(StageError, match=r"qa: qa.context_tokens=1000 leaves no room for captions.*raise qa.context_tokens"):
        run_stage(QAStage(), ctx)


def test_qa_files_written_before_windows_read_with_null_windows():
    row = {c: None for c in QA.columns if not c.startswith("window_")}
    row.update(qa_id="q", video_id="v", category="Temporal", question_type="open_ended", question="?", answer="a", reasoning="r",
               refined_reasoning="rr", target="<think>rr</think><answer>a</answer>", generator_model="g", refiner_model="g",
               prompt_version="v1-x", refine_prompt_version="v1-y")
    old = pa.Table.from_pylist([row])
    upgraded = validate_table(old, QA)
    assert upgraded.column_names == QA.columns
    assert upgraded.select(["window_index", "window_start_s", "window_end_s"]).to_pylist() == [
        {"window_index": None, "window_start_s": None, "window_end_s": None}
    ]
