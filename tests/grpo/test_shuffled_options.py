"""`grpo.shuffle_options`: a multiple-choice question put with its options in a new order, the answer
letter following the answer's text, so a favourite letter earns nothing."""

from __future__ import annotations

from collections import Counter

from tasks.grading.answers import grade
from tasks.grading.prompts import user_prompt
from tasks.grpo.data import RLExample

OPTIONS = ("red", "green", "blue", "yellow")


def example(qa_id: str = "q1", question_type: str = "multiple_choice") -> RLExample:
    options = OPTIONS if question_type == "multiple_choice" else None
    answer = "C" if options else "blue"
    return RLExample(qa_id, "v", "file:///v.mp4", question_type, "Which colour is last?", options, answer,
                     user_prompt("Which colour is last?", question_type, options))


def test_the_answer_letter_follows_its_option_and_the_prompt_is_the_training_format():
    for step in range(20):
        shuffled = example().with_options_shuffled([0, step])
        assert sorted(shuffled.options) == sorted(OPTIONS)
        assert shuffled.options["ABCD".index(shuffled.answer)] == "blue"
        assert shuffled.prompt == user_prompt(shuffled.question, "multiple_choice", shuffled.options)
        key = shuffled.answer_key()
        assert grade(f"<think>.</think><answer>{shuffled.answer}</answer>", key).correct
        assert grade("<think>.</think><answer>blue</answer>", key).correct  # the option's text, wherever it went
        assert (shuffled.qa_id, shuffled.video_id, shuffled.question) == ("q1", "v", "Which colour is last?")


def test_orders_are_seeded_per_step_and_question_and_cover_every_letter():
    letters = Counter(example().with_options_shuffled([0, step]).answer for step in range(200))
    assert set(letters) == set("ABCD") and min(letters.values()) > 25  # about 50 each
    assert example().with_options_shuffled([0, 3]) == example().with_options_shuffled([0, 3])  # a resumed run draws the same
    orders = {example(f"q{k}").with_options_shuffled([0, 3]).options for k in range(8)}
    assert len(orders) > 1  # the questions of one step are not all put the same way


def test_open_ended_questions_are_left_as_they_are():
    assert example(question_type="open_ended").with_options_shuffled([0, 1]) == example(question_type="open_ended")
