"""lvr's CPU image, built here without a registry (`make images`: a debootstrap base, a wheelhouse,
deploy/Dockerfile.cpu), running stages the way a Docker site runs them.

`make test-images` runs this module (`-m images`); `make test` deselects it. Everything is real: the
Docker engine, a `prefect server` on 127.0.0.1, a Docker work pool made from
deploy/work-pools/docker-cpu.json, a prefect-docker worker, containers of the image writing to a
mounted folder as the image's own user (uid 1000), as a site's volume would be.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path

import pytest

from data_schemas import CAPTIONS, CLIPS
from flows.deploy import with_defaults
from tasks.engine.stage import read_stage_table
from tasks.engine.store import Workdir
from tasks.stages import STAGES
from tests.support.paths import REPO, run_cli
from tests.support.prefect_server import PrefectServer
from tests.support.videos import make_video

pytestmark = [pytest.mark.images, pytest.mark.slow]

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
IMAGE = os.environ.get("LVR_CPU_IMAGE") or f"lvr-cpu:{VERSION}"
IMAGE_USER = 1000  # the image's `lvr` user (Dockerfile.cpu)
POOL = "lvr-docker-test"


def docker(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def in_image(*argv: str, mounts: tuple[Path, ...] = (), env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A command in a fresh container of the image, without network; `mounts` at the same path inside."""
    options = ["--rm", "--network", "none"]
    for path in mounts:
        options += ["-v", f"{path}:{path}"]
    for name, value in (env or {}).items():
        options += ["-e", f"{name}={value}"]
    return docker("run", *options, IMAGE, *argv)


@pytest.fixture(scope="module")
def image() -> str:
    if docker("info").returncode != 0:
        pytest.fail("no Docker engine answers (make test-images starts one)")
    if docker("image", "inspect", IMAGE).returncode != 0:
        pytest.fail(f"{IMAGE} is not built: make images")
    return IMAGE


@pytest.fixture(scope="module")
def shared():
    """A folder the image's user can write, mounted at the same path in every container so that
    workdir and source paths mean the same inside and out (what a site's shared volume does)."""
    root = Path(tempfile.mkdtemp(prefix="lvr-images-", dir="/tmp"))
    root.chmod(0o777)
    for i in range(2):
        # Lengths differ so contents (and content-derived video ids) differ.
        make_video(root / "videos" / f"v{i}.mp4", 12 + i, fps=10, gop=10)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_the_image_runs_lvr_with_its_configs_and_everything_a_stage_imports(image):
    shown = in_image("lvr", "--help")
    assert shown.returncode == 0 and "deploy" in shown.stdout, shown.stderr
    # Package data: the built-in configs and the architecture files `lvr check` reads offline.
    production = in_image("lvr", "config", "--config", "longvila-r1")
    assert production.returncode == 0, production.stderr
    assert "Qwen/Qwen2.5-VL-7B-Instruct" in production.stdout
    checked = in_image("lvr", "check", "--config", "tiny")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    checked = in_image("lvr", "check", "--config", "longvila-r1", env={"DEEPSEEK_API_KEY": "not-a-real-key"})
    assert checked.returncode == 0 and "0 error(s)" in checked.stdout, checked.stdout + checked.stderr
    assert "not-a-real-key" not in checked.stdout + checked.stderr
    modules = sorted({spec.class_path.partition(":")[0] for spec in STAGES})
    script = (
        "import importlib, json, shutil\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "import av, decord, deepspeed, prefect, torch\n"
        "print(json.dumps({'torch': torch.__version__, 'cuda': torch.cuda.is_available(),"
        " 'ffmpeg': shutil.which('ffmpeg'), 'ffprobe': shutil.which('ffprobe')}))\n"
    )
    imported = in_image("python", "-c", script)
    assert imported.returncode == 0, imported.stderr[-3000:]
    facts = json.loads(imported.stdout.strip().splitlines()[-1])
    assert facts["torch"].endswith("+cpu") and facts["cuda"] is False  # the CPU wheel, not GBs of CUDA
    assert facts["ffmpeg"] and facts["ffprobe"]


def _clip_rows(workdir: Path) -> list[dict]:
    rows = read_stage_table(Workdir(str(workdir)), "clip", CLIPS).to_pylist()
    for row in rows:
        clip = Path(row.pop("clip_uri"))
        row["clip_file"] = str(clip.relative_to(workdir))
        row["clip_sha256"] = hashlib.sha256(clip.read_bytes()).hexdigest()
    return sorted(rows, key=lambda r: r["clip_id"])


def test_clip_in_a_container_writes_the_rows_and_files_it_writes_in_process(image, shared):
    videos = shared / "videos"
    argv = ["run", "--to", "clip", "--engine", "local", "--source", str(videos)]
    contained = in_image("lvr", *argv, "--workdir", str(shared / "clip-in-container"), mounts=(shared,))
    assert contained.returncode == 0, contained.stdout[-3000:] + contained.stderr[-3000:]
    local = run_cli(*argv, "--workdir", str(shared / "clip-in-process"), timeout=300)
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]

    in_container, in_process = _clip_rows(shared / "clip-in-container"), _clip_rows(shared / "clip-in-process")
    assert len({r["video_id"] for r in in_container}) == 2 and len(in_container) >= 3  # 12 s and 13 s, ~10 s clips
    assert in_container == in_process  # same rows, same clip files byte for byte
    assert (shared / "clip-in-container" / "clip" / "_manifest.json").stat().st_uid == IMAGE_USER


def _containers_of(flow_run_id: str) -> list[dict]:
    listed = docker("ps", "-a", "--filter", f"label=io.prefect.flow-run-id={flow_run_id}", "--format", "{{json .}}")
    return [json.loads(line) for line in listed.stdout.splitlines() if line.strip()]


def test_a_pipeline_run_goes_clip_then_caption_across_containers_of_a_docker_pool(image, shared):
    workdir = shared / "pipeline"
    template = with_defaults(json.loads((REPO / "deploy" / "work-pools" / "docker-cpu.json").read_text()), {
        "image": image,
        "image_pull_policy": "Never",  # built here; there is no registry to pull from
        # The worker gives containers its own PREFECT_API_URL (127.0.0.1): the host's network reaches it.
        "network_mode": "host",
        "volumes": [f"{shared}:{shared}"],
        "auto_remove": False,  # kept until the end of the test, to check where each run ran
    })
    (shared / "docker-pool.json").write_text(json.dumps(template))
    run_ids: list[str] = []
    with PrefectServer(shared / "prefect", env={"OMP_NUM_THREADS": "1"}) as server:
        try:
            server.cli("work-pool", "create", POOL, "--type", "docker", "--base-job-template", str(shared / "docker-pool.json"))
            deployed = run_cli("deploy", "--pool", POOL, "--image", image, "--workdir", str(workdir), "--source", str(shared / "videos"),
                               "--set", "caption.model=tiny", env=server.env, cwd=shared, timeout=300)
            assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
            assert f"prefect worker start --pool {POOL} --type docker" in deployed.stdout

            with server.worker(POOL, cwd=shared, kind="docker"):
                pipeline = server.deployments()["lvr-pipeline/lvr-pipeline"]
                created = server.create_flow_run(pipeline["id"], {"from_stage": "clip", "to_stage": "caption", "execution": "deployments"})
                run_ids.append(created["id"])
                finished = server.wait(created["id"], timeout_s=900)
                stages = server.subflow_runs(created["id"])
                run_ids += [r["id"] for r in stages]
                assert finished["state_type"] == "COMPLETED", server.logs_of(created["id"])[-4000:] + server.worker_logs()[-4000:]

            # Each stage was its own deployment's flow run, in its own container of the image, as uid 1000.
            by_flow = {server.request("GET", f"/flows/{r['flow_id']}")["name"]: r for r in stages}
            assert {"lvr-clip", "lvr-caption"} <= set(by_flow)
            assert all(by_flow[name]["state_type"] == "COMPLETED" for name in ("lvr-clip", "lvr-caption"))
            for flow_run_id in [created["id"], by_flow["lvr-clip"]["id"], by_flow["lvr-caption"]["id"]]:
                containers = _containers_of(flow_run_id)
                assert len(containers) == 1 and containers[0]["Image"] == image, containers
                assert "Exited (0)" in containers[0]["Status"]
            for stage in ("clip", "caption"):
                assert (workdir / stage / "_manifest.json").stat().st_uid == IMAGE_USER

            # caption read what clip's container wrote: every clip has a caption or a failure row.
            clips = {r["clip_id"] for r in read_stage_table(Workdir(str(workdir)), "clip", CLIPS).to_pylist()}
            captions = {r["clip_id"] for r in read_stage_table(Workdir(str(workdir)), "caption", CAPTIONS).to_pylist()}
            caption_manifest = json.loads((workdir / "caption" / "_manifest.json").read_text())
            assert len(clips) >= 3 and captions <= clips
            assert caption_manifest["items"] == len(clips)
        finally:
            for flow_run_id in run_ids:
                for container in _containers_of(flow_run_id):
                    docker("rm", "-f", container["ID"])
    assert not server.alive(), "a Prefect process outlived the test"
