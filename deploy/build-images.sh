#!/usr/bin/env bash
# Build the CPU image without a registry or PyPI in the build (what `make images` runs):
#   1. the base image from Debian's mirror (deploy/build-base-image.sh),
#   2. a wheelhouse of lvr's dependencies for the base image's Python, from this machine's pip
#      (deploy/fill_wheelhouse.py into deploy/wheelhouse/),
#   3. deploy/Dockerfile.cpu on that base, installing from the wheelhouse only.
# Each step is skipped when its result is current (base image present; wheelhouse made for the
# same dependency list, constraints and base image; Docker's layer cache for the build).
#
#   deploy/build-images.sh [PYTHON]    (PYTHON: the interpreter whose pip fills the wheelhouse;
#                                       default python3; env LVR_BASE_IMAGE, LVR_CPU_IMAGE)
set -euo pipefail
cd "$(dirname "$0")/.."

python="${1:-python3}"
base="${LVR_BASE_IMAGE:-lvr-base:bookworm}"
version="$("$python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
image="${LVR_CPU_IMAGE:-lvr-cpu:$version}"

deploy/build-base-image.sh "$base"

wheelhouse=deploy/wheelhouse
# Current while the dependency list, the constraints and the base image are what it was made for.
key="$("$python" -c 'import tomllib, json; print(json.dumps(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
    | cat - constraints.txt <(docker image inspect --format '{{.Id}}' "$base") | sha256sum | cut -c1-16)"
if [ ! -f "$wheelhouse/.made-for-$key" ]; then
    echo "filling $wheelhouse"
    find "$wheelhouse" -mindepth 1 ! -name README.md -delete
    "$python" deploy/fill_wheelhouse.py "$wheelhouse" --image "$base"
    touch "$wheelhouse/.made-for-$key"
fi

docker build --force-rm -f deploy/Dockerfile.cpu \
    --build-arg BASE_IMAGE="$base" \
    --build-arg PIP_INSTALL_ARGS="--no-index --find-links /tmp/wheelhouse" \
    -t "$image" .
echo "built $image: $(docker image inspect --format '{{.Size}}' "$image" | awk '{printf "%.2f GB", $1 / 1e9}')"
