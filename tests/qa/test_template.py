"""The offline template generator: every answer is checked against the captions' order and time ranges.

The checker below knows only the question wording and the captions, not how the generator picked
its clips: it finds the clip each quoted snippet comes from and recomputes the answer.
"""

from __future__ import annotations

import random
import re

import pytest

from tasks.grading.answers import FORMAT_PATTERN
from tasks.grading.prompts import CATEGORIES, QUESTION_TYPES
from tasks.media.timecode import mmss
from tasks.qa.captions import Clip, VideoCaptions, caption_lines
from tasks.qa.parser import parse_generation, parse_refinement
from tasks.qa.prompts import LETTERS
from tasks.qa.refine import build_target
from tasks.qa.template import (
    distinctive_snippets,
    draft_questions,
    render_answer,
    rewrite_reasoning,
    segments,
)
from tests.support.openai_server import KITCHEN_CAPTIONS

QUOTE = re.compile(r"\u201c(.*?)\u201d")


def video(video_id: str, captions: list[str], seconds: float = 10.0) -> VideoCaptions:
    return VideoCaptions(video_id, tuple(Clip(f"{video_id}-{i:05d}", i * seconds, (i + 1) * seconds, c) for i, c in enumerate(captions)))


def gibberish_video(video_id: str, n: int, seed: int) -> VideoCaptions:
    """Like the tiny random captioner's output: token soup, tags and the word 'caption' included."""
    vocab = ["the", "bowl", "red", "ly", "ing", "<think>", "</answer>", "caption", "Ġx", "##", ".", ",", "sl", "ow", "a", "of",
             "green", "tom", "ato", "es", "she", "pan", "table", "steam", "zz", "qu", "ick", "1", "2", "!"]
    rng = random.Random(seed)
    return video(video_id, [" ".join(rng.choice(vocab) for _ in range(rng.randint(6, 24))) for _ in range(n)])


KITCHEN = VideoCaptions("kitchen", tuple(Clip(f"kitchen-{i}", a, b, c) for i, (a, b, c) in enumerate(KITCHEN_CAPTIONS)))
DUPLICATES = video("dups", ["a man walks a dog in the park", "a man walks a dog in the park", "rain falls on a red car",
                            "a man walks a dog in the park", "children play football near a fountain", "the sun sets behind hills",
                            "rain falls on a red car now"])
LONG = video("long", [f"scene {i} shows object number {i} on shelf {i % 7}" for i in range(420)], seconds=10.0)
VIDEOS = [KITCHEN, DUPLICATES, LONG, gibberish_video("gib1", 8, 1), gibberish_video("gib2", 5, 2), gibberish_video("gib3", 12, 3),
          video("three", ["a cat sleeps on a sofa", "a cat eats from a bowl", "a cat jumps onto a window sill"])]


def locate(v: VideoCaptions, snippet: str) -> int:
    norm = " ".join(snippet.casefold().split())
    hits = [i for i, c in enumerate(v.clips) if norm in " ".join(c.caption.casefold().split())]
    assert len(hits) == 1, f"{snippet!r} occurs in clips {hits}: it must single out one moment"
    return hits[0]


def said_by(v: VideoCaptions, answer: str, i: int) -> bool:
    """An open-ended answer names a moment without pointing at it: it is said by moment `i`'s caption
    (other captions may say it too)."""
    return " ".join(answer.casefold().split()) in " ".join(v.clips[i].caption.casefold().split())


def moments(v: VideoCaptions) -> VideoCaptions:
    """Consecutive clips with one caption are one moment, spanning them all."""
    merged: list[Clip] = []
    for c in v.clips:
        if merged and merged[-1].caption.casefold() == c.caption.casefold():
            merged[-1] = Clip(merged[-1].clip_id, merged[-1].start_s, c.end_s, c.caption)
        else:
            merged.append(c)
    return VideoCaptions(v.video_id, tuple(merged))


RAW_SHOT = re.compile(r"The caption of shot (\d+) \((\d+:\d\d-\d+:\d\d)\) describes")
CLAIM = re.compile(r"^\d+\. (\(\d\)|The first|The second|The quote|The start|Option [A-D]) is shot (\d+)\.$")


def check_claims(v: VideoCaptions, question: str, options: tuple[str, ...] | None, refined: str) -> None:
    """Every "X is shot N" step of the refined reasoning names the shot (1-based, a run of equal
    captions being one shot) where X, a quote of the question or an option, really is."""
    v = moments(v)
    quotes = QUOTE.findall(question)
    claims = [CLAIM.match(line).groups() for line in refined.splitlines() if CLAIM.match(line)]
    assert claims
    for who, shot in claims:
        if who.startswith("("):
            text = quotes[int(who[1]) - 1]
        elif who.startswith("Option"):
            text = options[LETTERS.index(who[-1])]
        else:
            text = quotes[1] if who == "The second" else quotes[0]
        assert locate(v, text) == int(shot) - 1, (who, shot, question)


def check(v: VideoCaptions, category: str, qtype: str, question: str, options: tuple[str, ...] | None, answer: str) -> None:
    """Recompute the answer from the captions alone (a run of equal captions being one moment) and compare."""
    v = moments(v)
    quotes = QUOTE.findall(question)
    picked = options[LETTERS.index(answer)] if options else answer
    spans = [c.span for c in v.clips]
    if category == "Temporal" and qtype == "multiple_choice":
        labelled = [locate(v, q) for q in quotes]
        assert len(labelled) == 3 and len(set(labelled)) == 3
        order = [int(x) - 1 for x in re.findall(r"\((\d)\)", picked)]
        assert [labelled[k] for k in order] == sorted(labelled)
    elif category == "Temporal":
        a, b = (locate(v, q) for q in quotes)
        assert locate(v, picked) == min(a, b)
    elif category == "Goal and Purpose" and qtype == "multiple_choice":
        start = locate(v, quotes[0])
        indices = [locate(v, o) for o in options]
        assert locate(v, picked) == max(indices) and start <= min(indices)
    elif category == "Goal and Purpose":
        assert said_by(v, picked, len(v.clips) - 1) and locate(v, quotes[0]) < len(v.clips) - 1
    elif category == "Spatial":
        assert picked == spans[locate(v, quotes[0])]
        if options:
            assert set(options) <= set(spans)
    elif category == "Plot and Narrative" and qtype == "multiple_choice":
        a, c = (locate(v, q) for q in quotes)
        assert c == a + 2 and locate(v, picked) == a + 1
        assert all(locate(v, o) != a + 1 for o in options if o != picked)
    else:
        (a,) = (locate(v, q) for q in quotes)
        assert said_by(v, picked, a + 1)


@pytest.mark.parametrize("v", VIDEOS, ids=lambda v: v.video_id)
def test_every_answer_matches_the_captions(v):
    produced = 0
    formed = set()
    for category in CATEGORIES:
        for qtype in QUESTION_TYPES:
            drafts = draft_questions(v, category, qtype, 3)
            result = parse_generation(render_answer(drafts), qtype) if drafts else None
            if result is None:
                continue
            assert not result.failures, result.failures  # the template's JSON passes the LLM validator
            assert len({i.question for i in result.items}) == len(result.items)
            for item in result.items:
                check(v, category, qtype, item.question, item.options, item.answer)
                # The raw reasoning cites each shot with its real time range.
                cited = RAW_SHOT.findall(item.reasoning)
                assert cited and all(moments(v).clips[int(n) - 1].span == span for n, span in cited)
                refined = parse_refinement(rewrite_reasoning(item.reasoning))
                assert "caption" not in refined.lower() and refined.startswith("1. ")
                check_claims(v, item.question, item.options, refined)
                assert FORMAT_PATTERN.match(build_target(refined, item.answer))
                produced += 1
                formed.add((category, qtype))
    assert produced >= 8  # every category and type is formed on these videos, several questions each
    # Every category on every video; every type too, except the multiple-choice kinds that need more
    # distinct clips than the three-clip video and the duplicate-ridden one have.
    assert {(c, "open_ended") for c in CATEGORIES} <= formed
    if v.video_id not in ("three", "dups"):
        assert formed == {(c, t) for c in CATEGORIES for t in QUESTION_TYPES}


def test_answer_letters_are_spread_across_options():
    letters = [d.answer for v in VIDEOS for c in CATEGORIES for d in draft_questions(v, c, "multiple_choice", 3)]
    assert set(letters) == set(LETTERS)


def test_short_videos_skip_what_they_cannot_support():
    one = video("one", ["a cat sleeps"])
    two = video("two", ["a cat sleeps on a sofa", "a dog barks at the door"])
    assert all(not draft_questions(one, c, t, 1) for c in CATEGORIES for t in QUESTION_TYPES)
    formed = {(c, t) for c in CATEGORIES for t in QUESTION_TYPES if draft_questions(two, c, t, 1)}
    assert formed == {("Temporal", "open_ended"), ("Goal and Purpose", "open_ended"), ("Spatial", "open_ended"), ("Plot and Narrative", "open_ended")}
    for c, t in formed:
        (d,) = draft_questions(two, c, t, 1)
        check(two, c, t, d.question, d.options, d.answer)


def test_duplicate_captions_never_make_ambiguous_quotes():
    snippets = distinctive_snippets(DUPLICATES)
    # Clips 0, 1, 3 share a caption; clip 2's whole caption recurs inside clip 6's, so only clip 6,
    # through its own word "now", can be quoted.
    assert set(snippets) == {4, 5, 6}
    assert "now" in snippets[6]
    all_same = video("same", ["the same view"] * 5)
    assert distinctive_snippets(all_same) == {}
    assert all(not draft_questions(all_same, c, t, 1) for c in CATEGORIES for t in QUESTION_TYPES)


def test_quotes_avoid_tags_and_the_word_caption():
    for v in VIDEOS:
        for snippet in distinctive_snippets(v).values():
            assert "caption" not in snippet.lower() and "<" not in snippet


def test_deterministic_and_seeded_by_video():
    a = [render_answer(draft_questions(KITCHEN, c, t, 2)) for c in CATEGORIES for t in QUESTION_TYPES]
    b = [render_answer(draft_questions(KITCHEN, c, t, 2)) for c in CATEGORIES for t in QUESTION_TYPES]
    renamed = VideoCaptions("kitchen-2", KITCHEN.clips)
    c = [render_answer(draft_questions(renamed, c, t, 2)) for c in CATEGORIES for t in QUESTION_TYPES]
    assert a == b and a != c


def test_times_are_mm_ss_past_an_hour():
    assert mmss(0) == "00:00" and mmss(61.5) == "01:02" and mmss(4510) == "75:10"
    assert caption_lines(LONG).splitlines()[-1].startswith("From 69:50 to 70:00: scene 419")


def test_a_scene_over_several_clips_is_one_moment_quoted_whole():
    # Captions as the tiny profile's captioner writes them: one grammar, scenes longer than a clip.
    v = video("scenes", ["The video shows color bars.", "The video shows color bars.", "The video shows color bars, then a solid red screen.",
                         "The video shows a solid red screen.", "The video shows the game of life.", "The video shows the game of life."])
    merged = segments(v.clips)
    assert [c.span for c in merged] == ["00:00-00:20", "00:20-00:30", "00:30-00:40", "00:40-01:00"]
    # Quoted whole after the opening every caption shares; a scene whose words recur in a transition
    # ("a solid red screen" in "color bars, then a solid red screen") cannot single out one moment.
    assert distinctive_snippets(VideoCaptions("scenes", merged)) == {1: "color bars, then a solid red screen", 3: "the game of life"}
    where = {d.answer: d.question for d in draft_questions(v, "Spatial", "open_ended", 5)}
    assert where.keys() == {"00:20-00:30", "00:40-01:00"} and "\u201cthe game of life\u201d" in where["00:40-01:00"]
    firsts = draft_questions(v, "Temporal", "open_ended", 5)  # asked both ways round
    assert len(firsts) == 2 and {d.answer for d in firsts} == {"color bars, then a solid red screen"}


def test_a_window_numbers_its_shots_as_the_whole_video_does():
    # Clips 0-1 are one shot, so clip 4 starts shot 4 of the video however the window is cut.
    v = video("win", ["a red car parks", "a red car parks", "a dog runs", "a bird sings on a wire", "rain falls on the road",
                      "a boy kicks a ball", "the sun sets behind hills"])
    window = range(4, 7)
    drafts = [d for c in CATEGORIES for t in QUESTION_TYPES for d in draft_questions(v, c, t, 3, window)]
    assert drafts
    for d in drafts:
        refined = rewrite_reasoning("\n".join(f"Step {k}: {s}" for k, s in enumerate(d.steps, 1)))
        check_claims(v, d.question, d.options, refined)
        assert all(int(n) >= 4 for n in re.findall(r"shot (\d+)", refined)), refined


def test_a_moment_said_again_by_a_scene_change_is_still_an_answer():
    # The sample's captions: a clip that spans a cut says both scenes, so the last scene's own caption
    # is said twice and cannot be quoted; it can still be the answer to "what is at the end" and "what
    # happens right after" (version 3 asked neither on any of the sample's three videos).
    cut = video("cut", ["The video shows a moving test pattern.", "The video shows color bars.",
                        "The video shows color bars, then a solid red screen.", "The video shows a solid red screen."])
    assert 3 not in distinctive_snippets(cut)
    (end,) = draft_questions(cut, "Goal and Purpose", "open_ended", 1)
    assert end.answer == "a solid red screen" and end.steps[-1] == "The last shot, 4, shows \u201ca solid red screen\u201d."
    after = {d.question: d.answer for d in draft_questions(cut, "Plot and Narrative", "open_ended", 5)}
    assert after["What happens right after \u201ccolor bars, then a solid red screen\u201d in the video?"] == "a solid red screen"
    # A long caption said again is not cut down to an answer: a fragment may say something else.
    long = video("long-end", ["a cat sleeps on a sofa", "the dog runs in, then a dog runs into the garden and barks at the gate",
                              "a dog runs into the garden and barks at the gate"])
    assert not draft_questions(long, "Goal and Purpose", "open_ended", 1)
    for d in [end, *draft_questions(cut, "Plot and Narrative", "open_ended", 5)]:
        category = "Goal and Purpose" if d is end else "Plot and Narrative"
        check(cut, category, "open_ended", d.question, d.options, d.answer)
