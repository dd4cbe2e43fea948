"""lvr as a user installs it: the wheel, in a fresh virtual environment, run outside the checkout.

The built-in configs, the QA prompt templates and prefect.yaml are package data read through
importlib.resources, so an installed wheel has everything a checkout has. The fresh environment sees
the dependencies already installed in this one through a `.pth` line naming this environment's
site-packages: a directory added that way is not scanned for `.pth` files of its own, so this
environment's editable install of the checkout stays inactive there (the first test checks it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from tasks.config import load_config
from tests.support.paths import REPO

pytestmark = pytest.mark.slow

# What a build needs besides the packages (pyproject.toml picks those), none of the local state.
NOT_BUILT_FROM = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".cache", "runs", "tests", "benchmarks")


def run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(argv, cwd=cwd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{argv}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh virtual environment with lvr's wheel installed (no checkout on its path); its bin/."""
    root = tmp_path_factory.mktemp("wheel")
    # Built from a copy: a build in the checkout leaves build/, whose stale files later builds would package.
    source = root / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(*NOT_BUILT_FROM))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"), str(source)], cwd=root)
    (wheel,) = (root / "dist").glob("*.whl")

    env_dir = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], cwd=root)
    python = env_dir / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=root).stdout.strip())
    ours = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (site / "dependencies-of-lvr.pth").write_text("".join(f"{path}\n" for path in ours))
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)], cwd=root)
    return env_dir / "bin"


def test_the_packages_and_their_data_come_from_the_installed_wheel(venv, tmp_path):
    probe = (
        "import json, sys, sysconfig, configs, flows, tasks\n"
        "from flows.deploy import PREFECT_YAML\n"
        "from tasks.config import resolve_config_path\n"
        "from tasks.engine.manifest import lvr_version\n"
        "from tasks.qa.prompts import PROMPTS_DIR\n"
        "print(json.dumps({'site': sysconfig.get_path('purelib'),\n"
        "    'packages': [configs.__file__, flows.__file__, tasks.__file__],\n"
        "    'data': [str(resolve_config_path('longvila-r1')), str(PROMPTS_DIR), str(PREFECT_YAML)],\n"
        "    'prefect_yaml': PREFECT_YAML.read_text(), 'version': lvr_version(),\n"
        "    'editable': [m for m in sys.modules if 'editable' in m]}))\n"
    )
    found = json.loads(run([str(venv / "python"), "-c", probe], cwd=tmp_path).stdout)
    for path in found["packages"] + found["data"]:
        assert Path(path).is_relative_to(found["site"]) and not Path(path).resolve().is_relative_to(REPO), path
    assert found["editable"] == []  # this environment's editable finder never ran
    assert found["prefect_yaml"] == (REPO / "prefect.yaml").read_text()
    assert found["version"] == "0.1.0"  # the distribution name lvr_version asks for is the wheel's


def test_lvr_config_prints_the_built_in_production_config(venv, tmp_path):
    shown = run([str(venv / "lvr"), "config", "--config", "longvila-r1"], cwd=tmp_path)
    assert yaml.safe_load(shown.stdout) == load_config("longvila-r1").model_dump(mode="json")
    assert "profile: longvila-r1" in shown.stdout


def test_lvr_run_clips_the_built_in_sample(venv, tmp_path):
    workdir = tmp_path / "work"
    run([str(venv / "lvr"), "run", "--to", "clip", "--engine", "local", "--workdir", str(workdir)], cwd=tmp_path)
    manifest = json.loads((workdir / "clip" / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["rows"] > 0 and manifest["lvr_version"] == "0.1.0"
