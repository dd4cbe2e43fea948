#!/usr/bin/env bash
# A Debian bookworm base image built without a container registry, for air-gapped sites and
# machines that reach only a Debian mirror: debootstrap a minimal root filesystem, `docker import` it.
# Python 3.11 is bookworm's own, so the image runs what python:3.11-slim runs.
#
#   deploy/build-base-image.sh [TAG]        (default lvr-base:bookworm; env DEBIAN_MIRROR)
#   docker build -f deploy/Dockerfile.cpu --build-arg BASE_IMAGE=lvr-base:bookworm -t lvr-cpu .
#
# An image already tagged TAG is kept (delete it to rebuild). Needs root, debootstrap and a Docker engine.
set -euo pipefail

tag="${1:-lvr-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
suite=bookworm

if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "base image $tag exists"
    exit 0
fi

rootfs="$(mktemp -d /var/tmp/lvr-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
# minbase: essential packages and apt only. python3-venv brings ensurepip, which the images use
# to make their own virtual environment (bookworm's system Python refuses pip installs, PEP 668).
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$suite" "$rootfs" "$mirror"
# The same sources a public Debian image has, so `apt-get install` in a Dockerfile works.
printf 'deb %s %s main\ndeb %s %s-updates main\ndeb http://deb.debian.org/debian-security %s-security main\n' \
    "$mirror" "$suite" "$mirror" "$suite" "$suite" > "$rootfs/etc/apt/sources.list"
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/tmp/*
tar --numeric-owner -C "$rootfs" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap $suite minbase from $mirror" - "$tag"
echo "built base image $tag ($(docker image inspect --format '{{.Size}}' "$tag") bytes)"
