#!/bin/sh
# lvr's Python layer in an image, the same for Dockerfile.cpu and Dockerfile.gpu so the two cannot
# drift: lvr's declared dependencies under the image's constraints, then lvr's own wheel.
#
#   install-lvr.sh requirements PYPROJECT EXTRAS > requirements.txt   # lvr's dependencies (+ extras)
#   install-lvr.sh dependencies CONSTRAINTS [PIP ARGS...]              # installs requirements.txt beside it
#   install-lvr.sh wheel [PIP ARGS...]                                 # installs wheels/*.whl beside it
#
# Separate steps so that the dependency layer changes only when the dependency list or the
# constraints do: a code change rebuilds just the wheel's layer. EXTRAS is comma-separated ("" for
# none). The wheel goes in without dependencies (installed the step before) and `pip check` then
# fails the build if it asks for anything that step did not install.
set -eu

here="$(dirname "$0")"
step="$1"
shift

case "$step" in
requirements)
    python3 - "$1" "$2" <<'PY'
import sys
import tomllib

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
wanted = [name for name in sys.argv[2].split(",") if name]
unknown = set(wanted) - set(project.get("optional-dependencies", {}))
if unknown:
    sys.exit(f"install-lvr.sh: no such extra: {sorted(unknown)}")
for requirement in project["dependencies"] + [r for name in wanted for r in project["optional-dependencies"][name]]:
    print(requirement)
PY
    ;;
dependencies)
    constraints="$1"
    shift
    pip install -c "$constraints" "$@" -r "$here/requirements.txt"
    ;;
wheel)
    pip install --no-deps "$@" "$here"/wheels/*.whl
    pip check
    ;;
*)
    echo "install-lvr.sh: unknown step '$step' (requirements, dependencies or wheel)" >&2
    exit 2
    ;;
esac
