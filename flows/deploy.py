"""`lvr deploy`: prefect.yaml's deployments on one machine, without Docker or Kubernetes.

Production registers prefect.yaml as shipped (`prefect deploy --all`: Docker or Kubernetes pools,
images with lvr installed and flow runs starting in /opt/lvr). A single machine gets the same
deployments, schedules and forms with every deployment on one `process` work pool whose flow runs
start in the directory `lvr deploy` ran in, so a worker started here serves them all. Entrypoints
are module paths (`flows.pipeline.clip_flow`): flow runs import the installed lvr, checkout or not.
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


def single_machine_spec(spec: dict[str, Any], pool: str, project_dir: Path, parameters: dict[str, Any]) -> dict[str, Any]:
    """prefect.yaml's content for a process pool: every deployment on `pool`, flow runs started in
    `project_dir`, and `parameters` (workdir, source, config, overrides) as the defaults of every
    deployment that takes them (a stage deployment has no `source` but clip's)."""
    unknown = set(parameters) - set(RUN_PARAMETERS)
    if unknown:
        raise ValueError(f"not deployment parameters: {sorted(unknown)}; expected some of {list(RUN_PARAMETERS)}")
    out = {**spec, "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": str(project_dir)}}]}
    deployments = []
    for deployment in spec.get("deployments", []):
        own = deployment.get("parameters", {})
        deployments.append({
            **deployment,
            "work_pool": {"name": pool, "job_variables": {}},
            "parameters": {**own, **{k: v for k, v in parameters.items() if k in own}},
        })
    out["deployments"] = deployments
    return out


def deploy_single_machine(
    pool: str, parameters: dict[str, Any], prefect_yaml: Path | Traversable = PREFECT_YAML, project_dir: Path | None = None,
    env: dict[str, str] | None = None,
) -> list[str]:
    """Create (or update) the process pool and register every deployment on the server at
    PREFECT_API_URL; flow runs start in `project_dir` (default: the current directory). Returns the
    deployment names."""
    project_dir = (project_dir or Path.cwd()).resolve()
    spec = single_machine_spec(yaml.safe_load(prefect_yaml.read_text()), pool, project_dir, parameters)
    prefect = [sys.executable, "-m", "prefect"]
    subprocess.run([*prefect, "work-pool", "create", pool, "--type", "process", "--overwrite"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory(prefix="lvr-deploy-") as tmp:
        path = Path(tmp) / "prefect.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        subprocess.run([*prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(path)], check=True, cwd=project_dir, env=env)
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
