"""The pipeline as Prefect flows on Prefect's ephemeral API (no server set up)."""

from __future__ import annotations

import pandas as pd
import pytest
from prefect.client.orchestration import get_client

from flows.pipeline import STAGE_FLOWS, lvr_pipeline
from tasks.stages import STAGE_NAMES
from tests.support.videos import make_video

pytestmark = pytest.mark.slow


def test_parameters_render_as_a_typed_form():
    schema = lvr_pipeline.parameters.model_dump()
    props = schema["properties"]
    assert set(props) == {"source", "workdir", "config", "overrides", "from_stage", "to_stage", "execution", "stage_deployment",
                          "retry_failures", "allow_shrink"}
    assert props["allow_shrink"]["type"] == "boolean" and props["allow_shrink"]["default"] is False
    stage_enum = schema["definitions"]["StageName"]["enum"]
    assert stage_enum == list(STAGE_NAMES)
    assert schema["definitions"]["ExecutionMode"]["enum"] == ["local", "deployments"] and props["execution"]["default"] == "local"
    assert props["from_stage"]["default"] == "clip" and props["to_stage"]["default"] == "eval"
    assert "Dotted-key overrides" in props["overrides"]["description"]
    assert {f.name for f in STAGE_FLOWS.values()} == {f"lvr-{s}" for s in STAGE_NAMES}


def test_pipeline_flow_runs_clip_as_subflow_with_shard_tasks(tmp_path):
    src = tmp_path / "src"
    make_video(src / "a.mp4", 14, fps=25, gop=25)
    make_video(src / "b.mp4", 12, fps=25, gop=25, source="smptebars")
    (src / "bad.mp4").write_text("garbage")
    wd = tmp_path / "wd"
    result = lvr_pipeline(source=str(src), workdir=str(wd), to_stage="clip", overrides=["clip.shard_size=2"])
    assert result["results"]["clip"]["status"] == "done" and result["results"]["clip"]["failures"] == 1
    assert len(pd.read_parquet(wd / "clip")) == result["results"]["clip"]["rows"] > 0

    async def runs():
        # Plain REST bodies, as the UI sends them.
        async with get_client() as client:
            http = client._client
            flow_run = await client.read_flow_run(result["run_id"])
            all_runs = (await http.post("/flow_runs/filter", json={"limit": 200})).json()
            task_runs = (await http.post("/task_runs/filter", json={"limit": 200})).json()
            flows = {f["id"]: f["name"] for f in (await http.post("/flows/filter", json={"limit": 200})).json()}
            # The Prefect database is shared with other tests: keep only this pipeline run's children.
            parent_tasks = {t["id"] for t in task_runs if t["flow_run_id"] == result["run_id"]}
            subflows = [r for r in all_runs if r["parent_task_run_id"] in parent_tasks]
            sub_ids = {r["id"] for r in subflows}
            task_runs = [t for t in task_runs if t["flow_run_id"] in sub_ids]
            progress = (await http.post("/artifacts/filter", json={"artifacts": {"type": {"any_": ["progress"]}}, "limit": 200})).json()
            progress = [a for a in progress if a["flow_run_id"] in sub_ids]
            return flow_run, subflows, task_runs, flows, progress

    import asyncio

    flow_run, subflows, task_runs, flows, progress = asyncio.run(runs())
    assert flow_run.state.is_completed()
    assert "lvr-clip" in {flows[r["flow_id"]] for r in subflows}
    # The progress bar, sent from a thread of its own, is still the clip subflow's, and full.
    assert [(a["key"], float(a["data"])) for a in progress] == [("lvr-clip-progress", 100.0)]
    shard_names = sorted(t["name"] for t in task_runs)
    assert shard_names == ["clip-shard-0", "clip-shard-1"]  # 3 videos, 2 per shard

    again = lvr_pipeline(source=str(src), workdir=str(wd), to_stage="clip", overrides=["clip.shard_size=2"])
    assert again["results"]["clip"]["status"] == "cached"


def test_shards_in_worker_processes_give_the_same_rows(tmp_path):
    """`execution.task_runner=processes`: shard work is pickled as data and rebuilt in another process.
    Through caption, whose worker keeps its captioner's frame prefetcher open for the next shard (the
    worker never exited once its prefetcher had started: `models.prefetch.Prefetcher`)."""
    src = tmp_path / "src"
    make_video(src / "a.mp4", 12, fps=25, gop=25)
    make_video(src / "b.mp4", 11, fps=25, gop=25, source="smptebars")
    common = ["clip.shard_size=1", "caption.shard_size=2", "caption.prefetch_workers=1"]
    threads = lvr_pipeline(source=str(src), workdir=str(tmp_path / "threads"), to_stage="caption", overrides=common)
    procs = lvr_pipeline(
        source=str(src), workdir=str(tmp_path / "procs"), to_stage="caption",
        overrides=[*common, "execution.task_runner=processes", "execution.shard_workers=2"],
    )
    assert procs["results"]["clip"]["rows"] == threads["results"]["clip"]["rows"] > 0
    cols = ["clip_id", "start_s", "end_s", "n_frames"]
    assert pd.read_parquet(tmp_path / "procs" / "clip")[cols].equals(pd.read_parquet(tmp_path / "threads" / "clip")[cols])
    captions = [pd.read_parquet(tmp_path / run / "caption").sort_values("clip_id")[["clip_id", "caption"]].reset_index(drop=True)
                for run in ("procs", "threads")]
    assert len(captions[0]) == procs["results"]["clip"]["rows"] and captions[0].equals(captions[1])
