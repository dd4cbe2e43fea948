"""GRPO's rewards are the filter stage's (`tasks.grading.answers`) with the configured weights."""

from __future__ import annotations

import torch

from tasks.config import GRPOConfig
from tasks.grading.answers import AnswerKey
from tasks.grpo.rollout import Rollout
from tasks.grpo.trainer import score_rollouts


def rollouts(*texts: str) -> list[Rollout]:
    return [Rollout((1,), t, True) for t in texts]


def test_weights_format_and_accuracy():
    mc = AnswerKey("Which colour is first?", "multiple_choice", "B", ("red", "green", "blue", "yellow"))
    open_ended = AnswerKey("Where is the box?", "open_ended", "in the centre", None)
    groups = [
        rollouts(
            "<think>green first</think><answer>B</answer>",  # right, strict format: 0.9 + 0.1
            "<think>green first</think> <answer>B</answer> trailing",  # right, format broken: 0.9
            "<think>red</think><answer>A</answer>",  # wrong, well formed: 0.1
            "the answer is green",  # right by option text, no format: 0.9
        ),
        rollouts("<think>it sits in the middle</think><answer>In the centre.</answer>", "<answer>left</answer>"),
    ]
    scores = score_rollouts([mc, open_ended], [groups[0], groups[1] + groups[1]], GRPOConfig(), judge=None)
    assert torch.allclose(scores.reward[0], torch.tensor([1.0, 0.9, 0.1, 0.9]))
    assert scores.accuracy[0].tolist() == [1.0, 1.0, 0.0, 1.0] and scores.format[0].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert torch.allclose(scores.reward[1], torch.tensor([1.0, 0.0, 1.0, 0.0]))  # normalised match; no think block: format 0

    weighted = score_rollouts([mc], [groups[0]], GRPOConfig(accuracy_weight=1.0, format_weight=0.5), judge=None)
    assert torch.allclose(weighted.reward[0], torch.tensor([1.5, 1.0, 0.5, 1.0]))


def test_a_failed_judge_leaves_the_group_out_instead_of_falling_back_to_exact_match(monkeypatch):
    from tasks.config import JudgeConfig
    from tests.support.openai_server import Fault, OpenAITestServer, Reply

    monkeypatch.setenv("LVR_TEST_GRPO_JUDGE_KEY", "sk-judge")
    mc = AnswerKey("Which colour is first?", "multiple_choice", "B", ("red", "green", "blue", "yellow"))
    open_ended = AnswerKey("Where is the box?", "open_ended", "in the centre", None)
    groups = [rollouts("<answer>B</answer>", "<answer>A</answer>"), rollouts("<answer>in the middle</answer>", "<answer>left</answer>")]
    state = {"down": False}

    def faults(info):
        return Fault.server_error(503) if state["down"] else None

    def responder(info):
        return Reply("yes" if "in the middle" in info.text else "no")

    with OpenAITestServer(responder, faults=faults, api_key="sk-judge") as server:
        judge = JudgeConfig(model="judge", base_url=server.base_url, api_key_env="LVR_TEST_GRPO_JUDGE_KEY", max_retries=1)
        answered = score_rollouts([mc, open_ended], groups, GRPOConfig(), judge)
        assert answered.judged.tolist() == [True, True]
        assert answered.accuracy[1].tolist() == [1.0, 0.0]  # the judge accepted the paraphrase
        state["down"] = True
        down = score_rollouts([mc, open_ended], groups, GRPOConfig(), judge)
    assert down.judged.tolist() == [True, False]  # multiple choice needs no judge
    assert down.accuracy[0].tolist() == [1.0, 0.0]


def test_the_judge_model_keys_grpo_and_reaches_the_workers_but_its_endpoint_does_not(tmp_path):
    from tasks.config import JudgeConfig, load_config
    from tasks.engine.stage import StageContext
    from tasks.engine.store import Workdir
    from tasks.grpo.stage import GRPOStage
    from tasks.grpo.trainer import GRPOJob

    def settings(**overrides):
        return GRPOStage().settings(StageContext(Workdir(str(tmp_path / "wd")), load_config("tiny", {"grpo.model": "base", **overrides})))

    assert "judge" not in settings()
    judged = settings(**{"judge.model": "judge", "judge.base_url": "http://127.0.0.1:1/v1"})
    assert judged["judge"]["model"] == "judge"
    assert settings(**{"judge.model": "judge", "judge.base_url": "http://127.0.0.1:2/v1", "judge.concurrency": 2}) == judged
    assert settings(**{"judge.model": "judge-2"}) != judged

    judge = JudgeConfig(model="judge", base_url="http://127.0.0.1:1/v1", api_key_env="LVR_TEST_GRPO_JUDGE_KEY", max_retries=1)
    job = GRPOJob("key", "tiny", (), load_config("tiny").grpo, str(tmp_path), str(tmp_path), judge=judge)
    job.save(tmp_path / "job.json")
    assert GRPOJob.load(tmp_path / "job.json").judge == judge  # what the workers' score_rollouts is given
