"""Production orchestration end to end: a real `prefect server`, prefect.yaml's deployments
registered by `lvr deploy` (`prefect deploy` on one process work pool running this checkout), a
worker, and runs started and retried through the REST API as the UI does.

The only stand-in is the LLM endpoint (an OpenAI-protocol server on 127.0.0.1 we can take down).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from flows.deploy import single_machine_spec
from tests.support.openai_server import Fault, OpenAITestServer, r1_responder
from tests.support.paths import REPO, run_cli
from tests.support.prefect_server import PrefectServer
from tests.support.videos import make_video

pytestmark = pytest.mark.slow

POOL = "lvr-test"
KEY_ENV = "LVR_TEST_DEPLOY_LLM_KEY"
STAGES = ("clip", "caption", "qa", "filter", "sft", "grpo", "eval")


class Endpoint:
    """The LLM server's availability, switched by the test."""

    def __init__(self) -> None:
        self.down = False

    def faults(self, info) -> Fault | None:
        return Fault(status=503, message="model server restarting") if self.down else None


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Server, pool, deployments and worker; the source holds 3 videos, the workdir starts empty."""
    root = tmp_path_factory.mktemp("deployments")
    source, workdir = root / "videos", root / "work"
    for i in range(3):
        add_video(source, i)
    endpoint = Endpoint()
    with OpenAITestServer(r1_responder, faults=endpoint.faults, api_key="sk-deploy", models=("deepseek-r1",)) as llm:
        overrides = [
            "qa.backend=openai", f"qa.base_url={llm.base_url}", f"qa.api_key_env={KEY_ENV}", "qa.model=deepseek-r1",
            "qa.max_retries=0", "qa.backoff_s=0.01", "execution.shard_retries=0", "execution.deployment_poll_s=1", "filter.runs=4",
            "qa.questions_per_request=1",
        ]
        env = {KEY_ENV: "sk-deploy", "OMP_NUM_THREADS": "1"}
        with PrefectServer(root / "prefect", env=env) as server:
            argv = [sys.executable, "-m", "flows.cli", "deploy", "--pool", POOL, "--workdir", str(workdir), "--source", str(source)]
            for override in overrides:
                argv += ["--set", override]
            deployed = subprocess.run(argv, cwd=root, env=server.env, capture_output=True, text=True, timeout=300)
            assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
            assert f"prefect worker start --pool {POOL}" in deployed.stdout
            with server.worker(POOL, cwd=root):
                yield {"server": server, "llm": llm, "endpoint": endpoint, "source": source, "workdir": workdir}
        assert not server.alive(), "a Prefect process outlived the test"


def add_video(source: Path, i: int) -> Path:
    # Lengths differ so contents (and content-derived video ids) differ.
    return make_video(source / f"v{i}.mp4", 11 + i, fps=10, gop=10)


def manifest(workdir: Path, stage: str) -> dict | None:
    path = workdir / stage / "_manifest.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_deployment(server: PrefectServer, name: str, parameters: dict | None = None, timeout_s: float = 400) -> dict:
    deployment = server.deployments()[name]
    run = server.create_flow_run(deployment["id"], parameters)
    return server.wait(run["id"], timeout_s)


def test_single_machine_spec_moves_every_deployment_to_the_pool_and_keeps_the_rest():
    shipped = yaml.safe_load((REPO / "prefect.yaml").read_text())
    spec = single_machine_spec(shipped, "here", {"workdir": "/w", "source": "/videos", "overrides": ["a.b=1"]}, project_dir=Path("/src/lvr"))
    assert spec["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "/src/lvr"}}]
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert set(by_name) == {d["name"] for d in shipped["deployments"]}
    assert all(d["work_pool"] == {"name": "here", "job_variables": {}} for d in spec["deployments"])
    assert by_name["lvr-clip"]["parameters"]["source"] == "/videos" and "source" not in by_name["lvr-caption"]["parameters"]
    assert by_name["lvr-caption"]["parameters"]["workdir"] == "/w" and by_name["lvr-qa"]["parameters"]["overrides"] == ["a.b=1"]
    refresh = {d["name"]: d for d in shipped["deployments"]}["lvr-dataset-refresh"]
    assert by_name["lvr-dataset-refresh"]["schedules"] == refresh["schedules"]
    assert by_name["lvr-dataset-refresh"]["parameters"]["to_stage"] == "filter"
    with pytest.raises(ValueError, match="from_stage"):
        single_machine_spec(shipped, "here", {"from_stage": "qa"}, project_dir=Path("/src"))


def test_single_machine_spec_for_a_docker_pool_runs_every_deployment_in_the_image():
    shipped = yaml.safe_load((REPO / "prefect.yaml").read_text())
    spec = single_machine_spec(shipped, "dock", {"workdir": "/srv/w"}, image="lvr-cpu:0.1.0")
    # Flow runs start where the image's WORKDIR is (prefect.yaml's pull step), not in a checkout.
    assert spec["pull"] == shipped["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/lvr"}}]
    # The GPU stages' `gpus` request goes: the one pool's template decides.
    assert all(d["work_pool"] == {"name": "dock", "job_variables": {"image": "lvr-cpu:0.1.0"}} for d in spec["deployments"])
    assert {d["parameters"]["workdir"] for d in spec["deployments"]} == {"/srv/w"}
    for both_or_neither in ({"project_dir": Path("/src"), "image": "x"}, {}):
        with pytest.raises(ValueError, match="exactly one"):
            single_machine_spec(shipped, "dock", {}, **both_or_neither)


def test_prefect_yaml_deploys_every_flow_with_its_form_and_schedule(site):
    server = site["server"]
    deployments = server.deployments()
    expected = {"lvr-pipeline/lvr-pipeline", "lvr-pipeline/lvr-dataset-refresh", *(f"lvr-{s}/lvr-{s}" for s in STAGES)}
    assert set(deployments) == expected
    assert all(d["work_pool_name"] == POOL for d in deployments.values())

    refresh = deployments["lvr-pipeline/lvr-dataset-refresh"]
    schedules = [s["schedule"] for s in refresh["schedules"]]
    assert [(s["cron"], s["timezone"]) for s in schedules] == [("0 2 * * *", "UTC")]
    assert refresh["parameters"]["to_stage"] == "filter" and refresh["parameters"]["execution"] == "deployments"

    # The run form: stages and execution modes are drop-downs, not free text.
    schema = deployments["lvr-pipeline/lvr-pipeline"]["parameter_openapi_schema"]
    definitions = schema["definitions"]
    stage_enum = definitions[schema["properties"]["from_stage"]["$ref"].rsplit("/", 1)[-1]]["enum"]
    mode_enum = definitions[schema["properties"]["execution"]["$ref"].rsplit("/", 1)[-1]]["enum"]
    assert stage_enum == list(STAGES) and mode_enum == ["local", "deployments"]
    assert deployments["lvr-pipeline/lvr-pipeline"]["enforce_parameter_schema"]

    # The server's scheduler turns the cron into scheduled runs (it did not with SQLAlchemy 2.1:
    # constraints.txt). Then the schedule is paused, so no 02:00 run can start during the tests.
    scheduled = server.wait_for_scheduled_runs(refresh["id"])
    assert scheduled and all(t.endswith("T02:00:00Z") for t in scheduled)
    server.pause_schedules(refresh["id"])

    ui = server.http.get(server.url + "/")
    assert ui.status_code == 200 and "<html" in ui.text.lower()

    # Onto a Docker pool (`--image`) the pool must exist: a site makes it from its template.
    refused = run_cli("deploy", "--pool", "no-such-docker-pool", "--image", "lvr-cpu:0.1.0", env=server.env, timeout=120)
    assert refused.returncode == 1
    assert "no work pool 'no-such-docker-pool': create it first" in refused.stderr
    assert "--base-job-template deploy/work-pools/docker-cpu.json" in refused.stderr


def test_partial_run_fails_at_qa_and_retry_keeps_finished_stages(site, request):
    server, workdir, endpoint, llm = site["server"], site["workdir"], site["endpoint"], site["llm"]
    endpoint.down = True
    request.addfinalizer(lambda: setattr(endpoint, "down", False))  # the module's other tests need it up, pass or fail
    deployment = server.deployments()["lvr-pipeline/lvr-pipeline"]
    run = server.create_flow_run(deployment["id"], {"from_stage": "clip", "to_stage": "qa", "execution": "local"})
    failed = server.wait(run["id"])
    assert failed["state_type"] == "FAILED", server.worker_logs()
    assert "qa" in failed["state"]["message"]
    done = {s: manifest(workdir, s) for s in ("clip", "caption")}
    assert all(done.values()) and manifest(workdir, "qa") is None
    record = json.loads((workdir / "_runs" / f"{run['id']}.json").read_text())
    assert record["status"] == "failed" and record["results"]["qa"]["status"] == "failed"
    assert llm.total_requests > 0

    endpoint.down = False
    requests_before = llm.total_requests
    server.retry(run["id"])
    retried = server.wait(run["id"], after_run_count=failed["run_count"])
    assert retried["state_type"] == "COMPLETED", server.logs_of(run["id"])[-4000:]

    # Finished stages were not redone: same manifests, and the run record says cached.
    assert {s: manifest(workdir, s) for s in ("clip", "caption")} == done
    record = json.loads((workdir / "_runs" / f"{run['id']}.json").read_text())
    assert record["status"] == "completed"
    assert [record["results"][s]["status"] for s in ("clip", "caption", "qa")] == ["cached", "cached", "done"]
    qa = manifest(workdir, "qa")
    assert qa["items"] == 3 and llm.total_requests > requests_before
    questions = pd.read_parquet(workdir / "qa")
    assert len(questions) == qa["rows"] > 0 and set(questions["video_id"]) <= set(pd.read_parquet(workdir / "clip" / "_videos")["video_id"])
    assert manifest(workdir, "filter") is None  # a partial run stops where it was told

    # The run's artifacts as the UI shows them: one summary per stage subflow, from the retry too.
    children = server.subflow_runs(run["id"])
    keys = {a["key"] for a in server.artifacts([c["id"] for c in children])}
    assert {"lvr-clip", "lvr-caption", "lvr-qa"} <= keys


def test_refresh_deployment_twice_does_work_only_for_new_videos(site):
    server, workdir, source = site["server"], site["workdir"], site["source"]
    first = run_deployment(server, "lvr-pipeline/lvr-dataset-refresh")
    assert first["state_type"] == "COMPLETED", server.logs_of(first["id"])[-4000:]
    # execution: deployments (as prefect.yaml ships it): every stage ran as its own deployment's run.
    children = {c["name"]: c for c in server.subflow_runs(first["id"])}
    stage_runs = [c for c in children.values() if c["deployment_id"]]
    assert len(stage_runs) == 4 and all(c["state_type"] == "COMPLETED" for c in stage_runs)
    before = {s: manifest(workdir, s) for s in ("clip", "caption", "qa", "filter")}
    assert all(before.values())

    for i in (3, 4):
        add_video(source, i)
    # The second run in-process (`execution: local`, a custom run's parameter): what is reused
    # does not depend on where stages run, and it saves four flow-run start-ups.
    second = run_deployment(server, "lvr-pipeline/lvr-dataset-refresh", {"execution": "local"})
    assert second["state_type"] == "COMPLETED", server.logs_of(second["id"])[-4000:]
    after = {s: manifest(workdir, s) for s in ("clip", "caption", "qa", "filter")}

    videos = pd.read_parquet(workdir / "clip" / "_videos")
    new_videos = set(videos.loc[videos["uri"].str.contains(r"/v[34]\.mp4$"), "video_id"])
    clips = pd.read_parquet(workdir / "clip")
    questions = pd.read_parquet(workdir / "qa")
    assert len(new_videos) == 2
    assert after["clip"]["items"] == 5 and after["clip"]["items_computed"] == 2
    assert after["caption"]["items_computed"] == int(clips["video_id"].isin(new_videos).sum())
    assert after["qa"]["items"] == 5 and after["qa"]["items_computed"] == 2
    assert after["filter"]["items_computed"] == int(questions["video_id"].isin(new_videos).sum()) > 0
    # The outputs are the union: every earlier row is still there.
    assert after["clip"]["rows"] == before["clip"]["rows"] + int(clips["video_id"].isin(new_videos).sum())
    assert after["filter"]["items"] == after["qa"]["rows"]
