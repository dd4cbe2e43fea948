"""Experiment tracking end to end: SFT reporting to an MLflow file store and GRPO to TensorBoard,
both through the real engine and torchrun workers, read back with each tool's own reader and
compared with the stage's `metrics.parquet`; GRPO's sampled rollouts in `grpo/_samples/`.

Two short runs on one synthetic workdir (2 SFT steps, then 2 GRPO steps from that SFT model).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from data_schemas import GRPO_SAMPLES
from tasks.config import TrackingConfig, load_config
from tasks.engine.run import run_stage
from tasks.engine.stage import StageContext
from tasks.engine.store import Workdir
from tasks.grpo.data import RLExample, load_rl_examples
from tasks.grpo.stage import GRPOStage
from tasks.grpo.trainer import GRPOJob
from tasks.samples.synth import SynthSpec, write_synth
from tasks.sft.stage import SFTStage
from tasks.training.tracking import TENSORBOARD_DIR, TrackedRun, open_tracker, run_name

SPEC = SynthSpec(videos=6)  # 1 eval, 2 sft and 3 rl videos; 3 questions each
SFT = {
    "sft.max_steps": 2, "sft.sp_degree": 1, "sft.nproc_per_node": 1, "sft.num_frames": SPEC.num_frames, "sft.save_every": 10,
    "sft.learning_rate": 1e-3,
}
GRPO = {
    "grpo.steps": 2, "grpo.prompts_per_step": 2, "grpo.group_size": 2, "grpo.max_new_tokens": 8, "grpo.num_frames": SPEC.num_frames,
    "grpo.micro_batch_size": 4, "grpo.save_every": 10, "grpo.drop_zero_variance": False,
}


def run_key(root: Path, stage: str) -> str:
    return json.loads(next((root / stage / "_work" / "train").glob("*/result.json")).read_text())["run_key"]


def series(metrics: pd.DataFrame) -> dict[str, list[tuple[int, float]]]:
    return {name: sorted(zip(group.step.tolist(), group.value.tolist())) for name, group in metrics.groupby("name")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """The workdir after SFT (mlflow) and GRPO (tensorboard, samples every step); and the MLflow store."""
    root = tmp_path_factory.mktemp("tracking") / "wd"
    mlruns = root.parent / "mlruns"
    write_synth(str(root), SPEC)
    mlflow = {"tracking.backend": "mlflow", "tracking.tracking_uri": f"file://{mlruns}", "tracking.project": "lvr-test"}
    assert run_stage(SFTStage(), StageContext(Workdir(str(root)), load_config("tiny", {**SFT, **mlflow}))).status == "done"
    tensorboard = {"tracking.backend": "tensorboard", "tracking.samples_every": 1}
    assert run_stage(GRPOStage(), StageContext(Workdir(str(root)), load_config("tiny", {**SFT, **GRPO, **tensorboard}))).status == "done"
    return root, mlruns


def test_sft_metrics_in_mlflow_equal_metrics_parquet(trained, monkeypatch):
    from mlflow.tracking import MlflowClient

    root, mlruns = trained
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when asked to
    client = MlflowClient(tracking_uri=f"file://{mlruns}")
    experiment = client.get_experiment_by_name("lvr-test")
    (run,) = client.search_runs([experiment.experiment_id])
    key = run_key(root, "sft")
    assert run.info.run_name == run_name("sft", key) and run.data.tags["lvr.run_key"] == key and run.info.status == "FINISHED"
    assert run.data.params["sp_degree"] == "1" and "save_every" not in run.data.params  # the recipe, not runtime keys

    expected = series(pd.read_parquet(root / "sft" / "metrics.parquet"))
    assert set(expected) == {"loss", "tokens_per_s", "lr", "grad_norm"}
    for name, rows in expected.items():
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"sft/{name}"))
        assert logged == [(step, value) for step, value in rows if math.isfinite(value)], name
    assert len(expected["lr"]) == 2 and all(value > 0 for _, value in expected["lr"])


def test_grpo_metrics_in_tensorboard_equal_metrics_parquet(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _ = trained
    log_dir = root / "grpo" / TENSORBOARD_DIR / run_name("grpo", run_key(root, "grpo"))
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    expected = series(pd.read_parquet(root / "grpo" / "metrics.parquet"))
    assert {"reward", "lr", "step_time_s", "loss", "kl"} <= set(expected)
    assert {f"grpo/{name}" for name in expected} == set(events.Tags()["scalars"])
    for name, rows in expected.items():
        logged = [(e.step, e.value) for e in events.Scalars(f"grpo/{name}")]
        assert [s for s, _ in logged] == [s for s, _ in rows], name
        assert [v for _, v in logged] == pytest.approx([v for _, v in rows], rel=1e-6, nan_ok=True), name  # float32 events

    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors("grpo/samples/text_summary")}
    assert sorted(texts) == [1, 2] and all(text.startswith("| step | qa_id | sample | prompt | response |") for text in texts.values())


def test_grpo_samples_parquet_holds_every_rollout_of_each_sampled_step(trained):
    root, _ = trained
    samples = pd.read_parquet(root / "grpo" / "_samples")
    assert list(samples.columns) == GRPO_SAMPLES.columns
    assert len(samples) == 2 * 2 * 2  # steps x prompts_per_step x group_size (one replica)
    assert samples.groupby("step").qa_id.nunique().to_dict() == {1: 2, 2: 2}
    assert sorted(samples["sample"].unique()) == [0, 1] and samples.kept.all()
    rl = {e.qa_id: e for e in load_rl_examples(Workdir(str(root)))}
    # The prompt each group was put (the tiny profile shuffles multiple-choice options every step).
    seed = load_config("tiny", {**SFT, **GRPO}).grpo.seed
    assert all(rl[q].with_options_shuffled([seed, step - 1]).prompt == p for q, step, p in zip(samples.qa_id, samples.step, samples.prompt))
    assert samples.reward.between(0, 1).all()
    group_sums = samples.groupby(["step", "qa_id"]).advantage.sum()
    assert group_sums.abs().max() < 1e-5  # Eq. 2: advantages are centred within each group

    # In the tracker too: the markdown tables of TensorBoard name each step's questions.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(root / "grpo" / TENSORBOARD_DIR / run_name("grpo", run_key(root, "grpo"))), size_guidance={"tensors": 0})
    events.Reload()
    for event in events.Tensors("grpo/samples/text_summary"):
        text = event.tensor_proto.string_val[0].decode()
        assert all(q in text for q in samples[samples.step == event.step].qa_id)


def test_tracking_settings_never_change_a_training_fingerprint(trained):
    """Tracking is its own section, outside sft/grpo: switching it reuses the trained stages."""
    root, _ = trained
    for stage, overrides in (("sft", SFT), ("grpo", {**SFT, **GRPO})):
        ctx = StageContext(Workdir(str(root)), load_config("tiny", {**overrides, "tracking.backend": "none", "tracking.samples_every": 0}))
        assert run_stage(SFTStage() if stage == "sft" else GRPOStage(), ctx).status == "cached", stage


def test_the_job_file_carries_the_tracking_settings(tmp_path):
    tracking = TrackingConfig(backend="mlflow", tracking_uri="file:///tmp/x", project="p", samples_every=3)
    example = RLExample("q", "v", "file:///v.mp4", "open_ended", "Why?", None, "because", "Why?")
    job = GRPOJob("key", "tiny", (example,), load_config("tiny").grpo, str(tmp_path), str(tmp_path), tracking=tracking)
    job.save(tmp_path / "job.json")
    assert GRPOJob.load(tmp_path / "job.json") == job
    assert GRPOJob.load(tmp_path / "job.json").tracking == tracking


def test_a_resumed_tensorboard_run_drops_what_the_killed_run_logged_past_its_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrackingConfig(backend="tensorboard")
    killed = open_tracker(cfg, TrackedRun("sft", "k", str(tmp_path)))
    for step in (1, 2, 3):
        killed.log_metrics(step, {"sft/loss": float(step)})  # never closed: the process died after step 3
    resumed = open_tracker(cfg, TrackedRun("sft", "k", str(tmp_path), resume_step=2))
    for step in (3, 4):
        resumed.log_metrics(step, {"sft/loss": 10.0 + step})
    resumed.close()
    events = EventAccumulator(str(tmp_path / TENSORBOARD_DIR / "sft-k"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("sft/loss")] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]


def test_a_rerun_of_the_same_run_key_continues_its_mlflow_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    cfg = TrackingConfig(backend="mlflow", tracking_uri=f"file://{tmp_path / 'mlruns'}")
    for attempt in (1, 2):
        tracker = open_tracker(cfg, TrackedRun("grpo", "k", str(tmp_path), resume_step=attempt - 1, params={"steps": 2}))
        tracker.log_metrics(attempt, {"grpo/reward": attempt / 10, "grpo/grad_norm": float("nan")})
        tracker.log_samples(attempt, [{"step": attempt, "qa_id": "q", "response": "<answer>A</answer>", "reward": 1.0}])
        tracker.close()
    client = MlflowClient(cfg.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("lvr").experiment_id])
    assert run.info.run_name == "grpo-k" and run.info.status == "FINISHED" and run.data.params == {"steps": "2"}
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "grpo/reward")] == [(1, 0.1), (2, 0.2)]
    assert client.get_metric_history(run.info.run_id, "grpo/grad_norm") == []  # non-finite values stay in metrics.parquet only
    assert sorted(f.path for f in client.list_artifacts(run.info.run_id, "samples")) == ["samples/step-1.json", "samples/step-2.json"]
