"""The rewards module: answer extraction over the shapes real models write, grading, rewards, the LLM judge."""

from __future__ import annotations

import asyncio

import pytest

from models.openai_client import ChatClient
from tasks.grading.answers import (
    AnswerKey,
    accuracy_reward,
    extract_answer,
    extract_choice,
    format_reward,
    grade,
    normalize_answer,
    total_reward,
)
from tasks.grading.judge import JudgeError, LLMJudge, judge_grades, parse_verdict
from tests.support.openai_server import OpenAITestServer, Reply

OPTIONS = ["the red car", "the blue car drives away", "a dog jumps", "nobody enters the room"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>x</think><answer>B</answer>", 1.0),
        ("  <think>\nmulti\nline\n</think>\n\n<answer> C </answer>\n", 1.0),
        ("<think></think><answer></answer>", 1.0),
        ("<answer>B</answer>", 0.0),
        ("<think>x</think>", 0.0),
        ("<think>x</think><answer>B</answer> trailing words", 0.0),
        ("preamble <think>x</think><answer>B</answer>", 0.0),
        ("<think>x</think><answer>B", 0.0),
        ("<answer>B</answer><think>x</think>", 0.0),
        ("", 0.0),
    ],
)
def test_format_reward_is_strict(text, expected):
    assert format_reward(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>x</think><answer>B</answer>", "B"),
        ("<answer>  two dogs \n</answer>", "two dogs"),
        ("<answer>A</answer> wait, no: <answer>C</answer>", "C"),
        ("<think>long thinking that ran out of tokens</think><answer>The blue", "The blue"),
        ("<ANSWER>d</ANSWER>", "d"),
        ("no tags at all, the answer is B", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        # Inside <answer>: every way a letter gets written.
        ("<think>...</think><answer>B</answer>", "B"),
        ("<think>...</think><answer>(B)</answer>", "B"),
        ("<answer>[C]</answer>", "C"),
        ("<answer>**D**</answer>", "D"),
        ("<answer>b</answer>", "B"),
        ("<answer>b.</answer>", "B"),
        ("<answer> C. </answer>", "C"),
        ("<answer>B. the blue car drives away</answer>", "B"),
        ("<answer>(A) the red car</answer>", "A"),
        ("<answer>c) a dog jumps</answer>", "C"),
        ("<answer>Option D</answer>", "D"),
        ("<answer>The answer is C.</answer>", "C"),
        ("<answer>the answer is b</answer>", "B"),
        # The option's text instead of its letter (case, punctuation and articles do not matter).
        ("<answer>The blue car drives away.</answer>", "B"),
        ("<answer>A DOG JUMPS</answer>", "C"),
        ("<answer>I think nobody enters the room</answer>", "D"),
        # Several candidates: the one inside <answer> wins, else the last.
        ("<think>A seems right, or maybe D</think><answer>B</answer>", "B"),
        ("<think>C?</think><answer>A</answer> ... <answer>D</answer>", "D"),
        ("A or B? After checking again, the answer is C", "C"),
        ("It looked like the red car at first, but in the end the blue car drives away", "B"),
        ("First I thought B. Then D.", "D"),
        # No tags: what follows the thinking, or the whole text.
        ("<think>Comparing A and B carefully...</think>\nThe answer is (B).", "B"),
        ("<think>it must be D</think>", "D"),
        ("Answer: C", "C"),
        ("B", "B"),
        ("c", "C"),
        # A truncated <answer> block still counts.
        ("<think>thinking</think><answer>D because", "D"),
        # Articles and stray words are not choices.
        ("A man walks into the room and sits down", None),
        ("<answer>a car</answer>", None),
        ("the answer is a car that is red", None),
        ("<answer>E</answer>", None),  # not one of four options
        ("<answer>I don't know</answer>", None),
        ("<answer></answer>", None),
        ("", None),
        ("nothing useful here", None),
    ],
)
def test_extract_choice_shapes(text, expected):
    assert extract_choice(text, OPTIONS) == expected


def test_extract_choice_letters_follow_the_number_of_options():
    assert extract_choice("<answer>E</answer>", ["a", "b", "c", "d", "e"]) == "E"
    assert extract_choice("<answer>C</answer>", ["yes", "no"]) is None


@pytest.mark.parametrize(
    "a, b",
    [
        ("The Blue Car!", "blue car"),
        ("two dogs", "2 dogs"),
        ("2.50 seconds", "2.5 seconds"),
        ("3.0", "3"),
        ("1,000 people", "1000 people"),
        ("  a   kitchen,  then\tthe street. ", "kitchen then street"),
        ("The answer is: the kitchen", "kitchen"),
        ("\u201cquoted\u201d words", "quoted words"),
        ("ten", "10"),
    ],
)
def test_normalize_answer_equivalences(a, b):
    assert normalize_answer(a) == normalize_answer(b)


def test_normalize_answer_keeps_what_matters():
    assert normalize_answer("2.5") != normalize_answer("25")
    assert normalize_answer("red car") != normalize_answer("blue car")


MC = AnswerKey("Which car?", "multiple_choice", "B", tuple(OPTIONS))
OPEN = AnswerKey("Where does it end?", "open_ended", "The kitchen.")


def test_grade_and_rewards():
    good = "<think>The car at the end is blue.</think><answer>B</answer>"
    g = grade(good, MC)
    assert (g.predicted, g.correct, g.format_ok, g.method) == ("B", True, True, "choice")
    assert accuracy_reward(good, MC) == 1.0 and total_reward(good, MC) == pytest.approx(1.0)
    unformatted_right = "The answer is B"
    assert accuracy_reward(unformatted_right, MC) == 1.0 and total_reward(unformatted_right, MC) == pytest.approx(0.9)
    formatted_wrong = "<think>x</think><answer>A</answer>"
    assert total_reward(formatted_wrong, MC) == pytest.approx(0.1)
    assert total_reward(formatted_wrong, MC, accuracy_weight=0.5, format_weight=0.5) == pytest.approx(0.5)
    assert total_reward(formatted_wrong, MC, accuracy=1.0) == pytest.approx(1.0)

    o = grade("<think>...</think><answer>the kitchen</answer>", OPEN)
    assert (o.predicted, o.correct, o.method) == ("the kitchen", True, "match")
    assert grade("<think>the street?</think>Kitchen!", OPEN).correct
    assert not grade("<think>...</think><answer>the street</answer>", OPEN).correct
    assert not grade("<answer></answer>", AnswerKey("q", "open_ended", "")).correct  # empty never matches empty
    with pytest.raises(ValueError, match="unknown question type"):
        grade("x", AnswerKey("q", "true_false", "yes"))


@pytest.mark.parametrize(
    "reply, verdict",
    [("yes", True), ("No.", False), ("YES, it matches", True), ("<think>it says kitchen, so yes</think>No", False),
     ("The candidate is correct: yes", True), ("Verdict: no", False)],
)
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) is verdict


def test_parse_verdict_rejects_non_answers():
    with pytest.raises(JudgeError, match="the judge answered neither yes nor no: 'I cannot tell'"):
        parse_verdict("I cannot tell")


def test_judge_decides_open_ended_misses_once_per_distinct_prediction():
    def responder(info):
        candidate = info.text.split("Candidate answer:", 1)[1].split("\n", 1)[0].strip()
        return Reply("yes" if "cook" in candidate else "no")

    key = AnswerKey("Where does she end up?", "open_ended", "The kitchen")
    texts = [
        "<think>...</think><answer>the kitchen</answer>",  # matched without the judge
        "<think>...</think><answer>in the room where she cooks</answer>",
        "<think>...</think><answer>In the room where she cooks.</answer>",  # same prediction once normalised
        "<think>...</think><answer>the street</answer>",
        "<think>...</think><answer></answer>",  # nothing to judge
    ]
    with OpenAITestServer(responder) as server:

        async def run():
            async with ChatClient(base_url=server.base_url, api_key="EMPTY") as client:
                return await judge_grades(LLMJudge(client, "judge-model"), key, [grade(t, key) for t in texts])

        grades = asyncio.run(run())
        assert server.total_requests == 2
        assert all(r.body["temperature"] == 0.0 and r.body["model"] == "judge-model" for r in server.requests)
    assert [g.correct for g in grades] == [True, True, True, False, False]
    assert [g.method for g in grades] == ["match", "judge", "judge", "judge", "match"]
    assert asyncio.run(judge_grades(LLMJudge(None, "unused"), MC, [grade("B", MC)]))[0].correct  # multiple-choice never asks
