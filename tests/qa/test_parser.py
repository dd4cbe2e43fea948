"""The QA parser over the answer shapes a reasoning LLM really writes, good and bad."""

from __future__ import annotations

import json

import pytest

from tasks.qa import parser as P
from tasks.qa.parser import (
    ParseFailure,
    parse_generation,
    parse_refinement,
    resolve_choice,
)
from tests.support.openai_server import R1_ANSWERS

OPTIONS = {"A": "The man opens the door", "B": "The dog runs to the garden", "C": "A car drives past", "D": "Rain starts falling"}
MC = {
    "question": "What happens after the bell rings in the video?",
    "options": OPTIONS,
    "answer": "B",
    "reasoning": "Step 1: 00:10-00:20 the bell rings. Step 2: 00:20-00:30 the dog runs.",
}
OPEN = {"question": "Where does the dog go after the bell rings?", "answer": "To the garden", "reasoning": "00:10-00:20 bell; 00:20-00:30 garden."}


def mc(**over):
    return {**MC, **over}


def one(content: str, qtype: str = "multiple_choice", **kw) -> P.ParsedItem:
    result = parse_generation(content, qtype, **kw)
    assert not result.failures, result.failures
    assert len(result.items) == 1
    return result.items[0]


def failure(content: str, qtype: str = "multiple_choice", **kw) -> P.ItemFailure:
    result = parse_generation(content, qtype, **kw)
    assert not result.items and len(result.failures) == 1, result
    return result.failures[0]


@pytest.mark.parametrize("reply_key", list(R1_ANSWERS))
def test_realistic_r1_transcripts(reply_key):
    reply = R1_ANSWERS[reply_key]
    result = parse_generation(reply.content, reply_key[1])
    if reply_key == ("Plot and Narrative", "open_ended"):  # written to speak of captions
        assert [f.kind for f in result.failures] == [P.MENTIONS_CAPTIONS] and result.failures[0].question
        return
    assert len(result.items) == 1 and not result.failures
    item = result.items[0]
    assert item.question.endswith("?") and item.reasoning and "<think>" not in item.reasoning
    if reply_key[1] == "multiple_choice":
        assert item.answer in "ABCD" and len(item.options) == 4
        assert not any(o[:2] in ("A.", "B.", "C.", "D.") for o in item.options)  # letter prefixes removed
    else:
        assert item.options is None and len(item.answer) > 1


def test_expected_answers_of_transcripts():
    answers = {k: parse_generation(r.content, k[1]).items for k, r in R1_ANSWERS.items()}
    assert answers[("Temporal", "multiple_choice")][0].answer == "B"
    assert answers[("Goal and Purpose", "multiple_choice")][0].answer == "C"  # written "(C)", trailing commas
    assert answers[("Spatial", "multiple_choice")][0].answer == "B"  # written "B. <text>" in the layout
    assert answers[("Plot and Narrative", "multiple_choice")][0].answer == "B"  # written as the option text
    assert answers[("Goal and Purpose", "open_ended")][0].answer.startswith("To hold the four eggs")


@pytest.mark.parametrize(
    "content",
    [
        json.dumps(MC),
        json.dumps({"questions": [MC]}),
        json.dumps([MC]),
        json.dumps({"result": {"items": [MC]}}),
        "```json\n" + json.dumps(MC, indent=2) + "\n```",
        "Sure! Here it is:\n```\n" + json.dumps({"questions": [MC]}) + "\n```\nLet me know.",
        "<think>\nLet me think {about} this [carefully].\n</think>\n" + json.dumps(MC),
        "The model's thinking without an opening tag...\n</think>\n\n" + json.dumps(MC),
        json.dumps(MC, indent=2).replace('"\n}', '",\n}').replace('"\n  }', '",\n  }'),  # trailing commas
        json.dumps(MC).replace("Step 2", "\nStep 2"),  # JSON escapes the newline: fine
        json.dumps(MC).replace("\\n", "").replace("Step 2", "Step\n2"),  # a literal newline inside a string
        json.dumps({"Question": MC["question"], "Choices": OPTIONS, "Correct_Answer": "B", "Explanation": MC["reasoning"]}),
        json.dumps(mc(options=[f"{k}. {v}" for k, v in OPTIONS.items()])),
        json.dumps(mc(options=[f"({k}) {v}" for k, v in OPTIONS.items()])),
        json.dumps(mc(options=list(OPTIONS.values()))),
        json.dumps(mc(options="\n".join(f"{k}) {v}" for k, v in OPTIONS.items()))),
        json.dumps(mc(options=" ".join(f"{k}. {v}" for k, v in OPTIONS.items()))),
        json.dumps(mc(options={f"option_{k.lower()}": v for k, v in OPTIONS.items()})),
        json.dumps(mc(reasoning=["Step 1: 00:10-00:20 the bell rings.", "Step 2: 00:20-00:30 the dog runs."])),
        "{\u201cquestion\u201d: \u201cWhat happens after the bell rings in the video?\u201d, \u201coptions\u201d: "
        + json.dumps(OPTIONS)
        + ", \u201canswer\u201d: \u201cB\u201d, \u201creasoning\u201d: \u201c00:10-00:20 bell, 00:20-00:30 dog.\u201d}",
    ],
)
def test_json_shapes(content):
    item = one(content)
    assert item.answer == "B" and item.options == tuple(OPTIONS.values())
    assert item.question == MC["question"]


@pytest.mark.parametrize(
    "answer",
    ["B", "b", "(B)", "(b)", "B.", "B)", "b)", "B. The dog runs to the garden", "B) The dog runs to the garden",
     "(B) The dog runs to the garden", "B: the dog runs", "B - The dog runs to the garden", "Option B", "The answer is B",
     "The correct answer is (B).", "Answer: B", "**B**", "The dog runs to the garden", "the dog runs to the garden.",
     " The dog runs to the garden ", "B The dog runs to the garden"],
)
def test_answer_shapes(answer):
    assert resolve_choice(answer, list(OPTIONS.values())) == "B"


def test_option_text_that_starts_like_a_letter():
    options = ["A man opens the door", "B-movie posters", "Cats", "Dogs"]
    assert resolve_choice("A man opens the door", options) == "A"
    assert resolve_choice("B-movie posters", options) == "B"


@pytest.mark.parametrize(
    "answer, kind",
    [("E", P.ANSWER_NOT_IN_OPTIONS), ("A cat sleeps", P.ANSWER_NOT_IN_OPTIONS), ("", P.MISSING_ANSWER),
     ("B. A car drives past", P.ANSWER_MISMATCH), ("The garden", P.ANSWER_NOT_IN_OPTIONS)],
)
def test_bad_answers(answer, kind):
    with pytest.raises(ParseFailure) as exc:
        resolve_choice(answer, list(OPTIONS.values()))
    assert exc.value.kind == kind


@pytest.mark.parametrize(
    "record, kind",
    [
        (mc(options=dict(list(OPTIONS.items())[:3])), P.BAD_OPTIONS),
        (mc(options={**OPTIONS, "E": "Snow"}), P.BAD_OPTIONS),
        (mc(options={**OPTIONS, "D": "the man opens the door."}), P.BAD_OPTIONS),  # duplicate after normalising
        (mc(options={**OPTIONS, "C": "  "}), P.BAD_OPTIONS),
        (mc(options=None), P.BAD_OPTIONS),
        (mc(options={"1": "a", "2": "b", "3": "c", "4": "d"}), P.BAD_OPTIONS),
        (mc(answer="E"), P.ANSWER_NOT_IN_OPTIONS),
        (mc(answer=None), P.MISSING_ANSWER),
        (mc(reasoning=""), P.EMPTY_REASONING),
        (mc(reasoning="   "), P.EMPTY_REASONING),
        ({k: v for k, v in MC.items() if k != "reasoning"}, P.EMPTY_REASONING),
        (mc(question=""), P.MISSING_QUESTION),
        (mc(question="According to the captions, what happens after the bell?"), P.MENTIONS_CAPTIONS),
        (mc(options={**OPTIONS, "C": "The Captions show a car"}), P.MENTIONS_CAPTIONS),
        (mc(question="What happens <answer>B</answer>?"), P.REASONING_TAGS),
        (mc(answer={"letter": "B"}), P.MALFORMED),
    ],
)
def test_invalid_multiple_choice_items(record, kind):
    assert failure(json.dumps(record)).kind == kind


def test_caption_words_in_raw_reasoning_are_left_for_refinement():
    item = one(json.dumps(mc(reasoning="The caption of 00:10-00:20 says the bell rings; the captioned dog runs at 00:20-00:30.")))
    assert "caption" in item.reasoning


def test_open_ended():
    item = one(json.dumps(OPEN), "open_ended")
    assert item.options is None and item.answer == "To the garden"
    assert one(json.dumps({**OPEN, "answer": 3}), "open_ended").answer == "3"
    assert failure(json.dumps(MC), "open_ended").kind == P.WRONG_QUESTION_TYPE
    assert failure(json.dumps({**OPEN, "answer": "(B)"}), "open_ended").kind == P.WRONG_QUESTION_TYPE
    assert failure(json.dumps({**OPEN, "question": "What do the captions say?"}), "open_ended").kind == P.MENTIONS_CAPTIONS


def test_several_items_are_validated_one_by_one():
    content = json.dumps({"questions": [MC, mc(question="Second question about the video?", answer="Z"), mc(question="Third?", answer="(D)")]})
    result = parse_generation(content, "multiple_choice")
    assert [i.answer for i in result.items] == ["B", "D"]
    assert [(f.kind, f.question) for f in result.failures] == [(P.ANSWER_NOT_IN_OPTIONS, "Second question about the video?")]


LAYOUT = """<think>
Hmm. QUESTION: is this inside thinking? It must be ignored.
</think>

QUESTION: What happens after the bell rings in the video?
OPTIONS:
A. The man opens the door
B. The dog runs to the garden
C. A car drives past
D. Rain starts falling
ANSWER: (B)
REASONS: Step 1: the bell rings at 00:10-00:20.
Step 2: at 00:20-00:30 the dog runs to the garden.
"""


def test_paper_layout():
    item = one(LAYOUT)
    assert item.answer == "B" and item.options == tuple(OPTIONS.values())
    assert item.reasoning.splitlines() == ["Step 1: the bell rings at 00:10-00:20.", "Step 2: at 00:20-00:30 the dog runs to the garden."]


def test_paper_layout_variants():
    markdown = LAYOUT
    for plain, fancy in (("QUESTION:", "### **Question 1:**"), ("OPTIONS:", "**Options:**"), ("ANSWER:", "**Answer:**"), ("REASONS:", "**Reasoning:**")):
        markdown = markdown.replace(plain, fancy)
    assert one(markdown).answer == "B"
    two = LAYOUT + "\n" + LAYOUT.split("</think>")[1].replace("ANSWER: (B)", "ANSWER: D. Rain starts falling").replace("after the bell", "before the bell")
    result = parse_generation(two, "multiple_choice")
    assert [i.answer for i in result.items] == ["B", "D"] and not result.failures
    inline = (
        "QUESTION: What happens after the bell rings?\n"
        "OPTIONS: A. The man opens the door B. The dog runs to the garden C. A car drives past D. Rain starts falling\n"
        "ANSWER: B\nREASONS: 00:20-00:30 the dog runs."
    )
    assert one(inline).options == tuple(OPTIONS.values())
    open_layout = "QUESTION: Where does the dog go?\nANSWER: To the garden\nREASONS: 00:20-00:30 the dog runs to the garden."
    assert one(open_layout, "open_ended").answer == "To the garden"
    no_reasons = LAYOUT.split("REASONS:")[0] + "REASONS:\n"
    assert failure(no_reasons).kind == P.EMPTY_REASONING
    assert failure(LAYOUT.replace("D. Rain starts falling\n", "")).kind == P.BAD_OPTIONS


def test_only_the_answer_after_thinking_is_parsed():
    thinking = 'Let me think. QUESTION: not this one? {"question": "nor this?", "answer": "A"}'
    assert one(f"<think>{thinking}</think>" + json.dumps(MC)).question == MC["question"]
    assert one(f"{thinking}</think>" + json.dumps(MC)).question == MC["question"]


@pytest.mark.parametrize(
    "content, kwargs, kind",
    [
        ('<think>\nOkay, the captions say that at 00:10 the bell rings. Let me write the JSON:\n{"question": "What', {}, P.NO_ANSWER),
        (json.dumps(MC), {"finish_reason": "length"}, P.TRUNCATED),
        ('```json\n{"questions": [{"question": "What happens after the bell", "options": {"A": "The man', {}, P.MALFORMED),
        ("I'm sorry, I cannot help with that request.", {}, P.MALFORMED),
        ("", {}, P.NO_ANSWER),
        ("<think>only thinking</think>   ", {}, P.NO_ANSWER),
        ('{"note": "no questions here", "list": [1, 2]}', {}, P.MALFORMED),
    ],
)
def test_truncated_and_malformed(content, kwargs, kind):
    assert failure(content, **kwargs).kind == kind


def test_refinement_shapes():
    steps = "1. Checking the video at 00:10-00:20, the bell rings.\n2. In the next scene the dog runs to the garden."
    assert parse_refinement(steps) == steps
    assert parse_refinement("<think>The user wants a rewrite.</think>\n\n" + steps) == steps
    assert parse_refinement("<think>Thinking about captions is fine here.</think>" + steps) == steps
    assert parse_refinement("**Refined reasoning:**\n" + steps) == steps
    assert parse_refinement("```\n" + steps + "\n```") == steps
    assert parse_refinement(json.dumps({"reasoning": steps})) == steps
    for content, kwargs, kind in [
        (steps, {"finish_reason": "length"}, P.REFINE_TRUNCATED),
        ("<think>never finished", {}, P.REFINE_EMPTY),
        ("   ", {}, P.REFINE_EMPTY),
        ("1. The captions show the bell at 00:10-00:20.", {}, P.REFINE_MENTIONS_CAPTIONS),
        ("1. As captioned, the bell rings.", {}, P.REFINE_MENTIONS_CAPTIONS),
        (steps + "\n</think><answer>B</answer>", {}, P.REFINE_MALFORMED),
    ]:
        with pytest.raises(ParseFailure) as exc:
            parse_refinement(content, **kwargs)
        assert exc.value.kind == kind, content
