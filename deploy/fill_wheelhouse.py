"""Fill a wheelhouse with every wheel an image's Python needs to install lvr offline.

    python deploy/fill_wheelhouse.py WHEELHOUSE --image lvr-base:bookworm [--constraints constraints.txt] [--extras a,b]

This machine's pip builds the wheels (`pip wheel`: its indexes, its find-links, sdists such as
deepspeed built once). pip resolves environment markers for the Python it runs on, though, and the
image's may differ: bookworm's Python is 3.11.2, where `redis` also needs `async-timeout`
(`python_full_version < "3.11.3"`). So the markers of every wheel's requirements are evaluated again
for the image's own environment (read from a container of the image) and whatever is missing is
added, until nothing is.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

# PEP 508's marker variables, as the image's interpreter sees them (run there with no third-party package).
ENVIRONMENT_PROBE = """
import json, os, platform, sys
impl = sys.implementation
version = "{0.major}.{0.minor}.{0.micro}".format(impl.version)
print(json.dumps({
    "implementation_name": impl.name, "implementation_version": version, "os_name": os.name,
    "platform_machine": platform.machine(), "platform_release": platform.release(),
    "platform_system": platform.system(), "platform_version": platform.version(),
    "python_full_version": platform.python_version(), "platform_python_implementation": platform.python_implementation(),
    "python_version": ".".join(platform.python_version_tuple()[:2]), "sys_platform": sys.platform,
}))
"""


def image_environment(image: str) -> dict[str, str]:
    out = subprocess.run(["docker", "run", "--rm", "--network", "none", image, "python3", "-c", ENVIRONMENT_PROBE],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def project_requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = set(extras) - set(optional)
    if unknown:
        raise SystemExit(f"fill_wheelhouse: no such extra: {sorted(unknown)}")
    return project["dependencies"] + [r for name in extras for r in optional[name]]


def wheel_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        message = Parser().parsestr(archive.read(metadata).decode())
    return [Requirement(line) for line in message.get_all("Requires-Dist") or []]


def applies(requirement: Requirement, environment: dict[str, str], extra: str) -> bool:
    return requirement.marker is None or requirement.marker.evaluate({**environment, "extra": extra})


def missing_requirements(wheelhouse: Path, roots: list[str], environment: dict[str, str]) -> list[str]:
    """Requirements reachable from `roots` under `environment` that no wheel in `wheelhouse` provides."""
    wheels = {canonicalize_name(parse_wheel_filename(p.name)[0]): p for p in wheelhouse.glob("*.whl")}
    missing: dict[str, Requirement] = {}
    seen: set[tuple[str, str]] = set()
    todo = [(Requirement(r), "") for r in roots]
    while todo:
        requirement, extra = todo.pop()
        if not applies(requirement, environment, extra):
            continue
        name = canonicalize_name(requirement.name)
        if name not in wheels:
            missing[name] = requirement
            continue
        for wanted in ["", *sorted(requirement.extras)]:
            if (name, wanted) in seen:
                continue
            seen.add((name, wanted))
            todo += [(r, wanted) for r in wheel_requirements(wheels[name])]
    return [str(_without_marker(r)) for r in missing.values()]


def _without_marker(requirement: Requirement) -> Requirement:
    # Evaluated already, for the image: this machine's pip must not skip it for its own Python.
    plain = Requirement(str(requirement))
    plain.marker = None
    return plain


def pip_wheel(python: str, wheelhouse: Path, constraints: Path, requirements: list[str]) -> None:
    subprocess.run([python, "-m", "pip", "wheel", "-q", "-c", str(constraints), "-w", str(wheelhouse), *requirements], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheelhouse", type=Path)
    parser.add_argument("--image", required=True, help="the image whose Python will install from the wheelhouse")
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    parser.add_argument("--constraints", type=Path, default=Path("constraints.txt"))
    parser.add_argument("--extras", default="", help="lvr extras to include, comma-separated")
    args = parser.parse_args()

    args.wheelhouse.mkdir(parents=True, exist_ok=True)
    roots = project_requirements(args.pyproject, [e for e in args.extras.split(",") if e])
    environment = image_environment(args.image)
    pip_wheel(sys.executable, args.wheelhouse, args.constraints, roots)
    # The backend that builds lvr's own wheel in the image (pyproject's build-system).
    backend = tomllib.loads(args.pyproject.read_text())["build-system"]["requires"]
    pip_wheel(sys.executable, args.wheelhouse, args.constraints, backend)
    for _ in range(10):
        missing = missing_requirements(args.wheelhouse, roots + backend, environment)
        if not missing:
            print(f"fill_wheelhouse: {len(list(args.wheelhouse.glob('*.whl')))} wheels for Python "
                  f"{environment['python_full_version']} in {args.wheelhouse}")
            return 0
        print(f"fill_wheelhouse: for the image's Python {environment['python_full_version']}: {', '.join(missing)}")
        pip_wheel(sys.executable, args.wheelhouse, args.constraints, missing)
    raise SystemExit(f"fill_wheelhouse: still missing after 10 rounds: {missing}")


if __name__ == "__main__":
    sys.exit(main())
