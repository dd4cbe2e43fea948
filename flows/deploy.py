"""`lvr deploy`: prefect.yaml's deployments on one machine: a process pool, or one Docker pool.

Production registers prefect.yaml as shipped (`prefect deploy --all`: Docker or Kubernetes pools,
images with lvr installed and flow runs starting in /opt/lvr). A single machine gets the same
deployments, schedules and forms with every deployment on one work pool, so one worker serves them
all: a `process` pool whose flow runs start in the directory `lvr deploy` ran in, or (`--image`) a
Docker pool whose flow runs are containers of lvr's CPU image. Entrypoints are module paths
(`flows.pipeline.clip_flow`): flow runs import the installed lvr, checkout or not.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

# The repository root's prefect.yaml, shipped in the wheel through the link flows/prefect.yaml.
PREFECT_YAML = files("flows") / "prefect.yaml"
RUN_PARAMETERS = ("workdir", "source", "config", "overrides")


class DeployError(RuntimeError):
    """What `lvr deploy` needs is missing (say, the Docker pool); the message says how to make it."""


def single_machine_spec(
    spec: dict[str, Any], pool: str, parameters: dict[str, Any], project_dir: Path | None = None, image: str | None = None,
) -> dict[str, Any]:
    """prefect.yaml's content for one machine's pool: every deployment on `pool`, and `parameters`
    (workdir, source, config, overrides) as the defaults of every deployment that takes them (a
    stage deployment has no `source` but clip's).

    A process pool (`project_dir`): flow runs start in `project_dir` and import the lvr installed
    there. A Docker pool (`image`): every flow run is a container of `image` (lvr's CPU image on a
    machine without GPUs), starting in the image's working directory as prefect.yaml's pull step says."""
    if (project_dir is None) == (image is None):
        raise ValueError("give exactly one of project_dir (a process pool) or image (a Docker pool)")
    unknown = set(parameters) - set(RUN_PARAMETERS)
    if unknown:
        raise ValueError(f"not deployment parameters: {sorted(unknown)}; expected some of {list(RUN_PARAMETERS)}")
    out = dict(spec)
    if project_dir is not None:
        out["pull"] = [{"prefect.deployments.steps.set_working_directory": {"directory": str(project_dir)}}]
    deployments = []
    for deployment in spec.get("deployments", []):
        own = deployment.get("parameters", {})
        deployments.append({
            **deployment,
            # The pool's template decides everything else (network, volumes, env); a GPU request of
            # the shipped spec has no meaning on a one-machine pool.
            "work_pool": {"name": pool, "job_variables": {"image": image} if image else {}},
            "parameters": {**own, **{k: v for k, v in parameters.items() if k in own}},
        })
    out["deployments"] = deployments
    return out


def deploy_single_machine(
    pool: str, parameters: dict[str, Any], prefect_yaml: Path | Traversable = PREFECT_YAML, project_dir: Path | None = None,
    env: dict[str, str] | None = None, image: str | None = None,
) -> list[str]:
    """Register every deployment on the server at PREFECT_API_URL, all on `pool`; returns their names.

    Without `image`: the process pool is created (or updated) and flow runs start in `project_dir`
    (default: the current directory). With `image`: `pool` must be a Docker pool that exists (a
    site's template: network, volumes) and flow runs are containers of `image`."""
    prefect = [sys.executable, "-m", "prefect"]
    if image is None:
        project_dir = (project_dir or Path.cwd()).resolve()
        subprocess.run([*prefect, "work-pool", "create", pool, "--type", "process", "--overwrite"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
    else:
        project_dir = None
        found = subprocess.run([*prefect, "work-pool", "inspect", pool], env=env, capture_output=True, text=True)
        if found.returncode != 0:
            raise DeployError(
                f"no work pool {pool!r}: create it first, e.g. prefect work-pool create {pool} --type docker "
                "--base-job-template deploy/work-pools/docker-cpu.json"
            )
    spec = single_machine_spec(yaml.safe_load(prefect_yaml.read_text()), pool, parameters, project_dir=project_dir, image=image)
    with tempfile.TemporaryDirectory(prefix="lvr-deploy-") as tmp:
        path = Path(tmp) / "prefect.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        subprocess.run([*prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(path)], check=True,
                       cwd=project_dir or tmp, env=env)
    return [d["name"] for d in spec["deployments"]]


def with_defaults(base_job_template: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A work pool's base job template with new defaults for some of its variables: what a site
    sets once for every flow run of the pool (its network, its object-storage endpoint)."""
    properties = base_job_template.get("variables", {}).get("properties", {})
    unknown = set(defaults) - set(properties)
    if unknown:
        raise ValueError(f"the template has no variable {sorted(unknown)}; it has {sorted(properties)}")
    out = json.loads(json.dumps(base_job_template))
    for name, value in defaults.items():
        out["variables"]["properties"][name]["default"] = value
    return out
