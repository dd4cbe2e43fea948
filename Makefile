# One-command set-up and run. Every target is idempotent: a second `make setup` takes seconds.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
LVR := $(VENV)/bin/lvr
# Re-install only when the dependency declarations change.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/lvr/torch_extensions
# One intra-op thread per process: on a small shared machine (2 cores, ffmpeg and Prefect's server
# beside the model, 2 training ranks) OpenMP's spinning threads made the tiny model up to 60x slower
# (benchmarks/caption.py: 42 s of model time with 2 threads under load, 0.64 s with 1).
export OMP_NUM_THREADS ?= 1
# DeepSpeed compiles its CPU shared-memory collective op on the first training launch and caches it in
# TORCH_EXTENSIONS_DIR: ~30 s on 2 cores before the first `make run`'s or `make test`'s first SFT step on
# a fresh machine. Compiled here instead, once.
SHM_OP := $(TORCH_EXTENSIONS_DIR)/deepspeed_shm_comm/deepspeed_shm_comm.so
PYTEST_ARGS ?=
# Test files run in parallel, each file in one worker (module fixtures such as the Prefect server
# and the S3 run are built once). 2 suits the 2-core CI machine: 6 min instead of 11.
PYTEST_WORKERS ?= 2

.PHONY: setup run test bench clean system-deps docker-deps images test-images

setup: system-deps $(STAMP) $(SHM_OP)

# Debian's ffmpeg (ffprobe too), the font the sample videos burn labels with, and chromium
# (the report test renders the HTML report headless).
system-deps:
	@if ! command -v ffprobe >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1 \
		|| [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then \
		echo "installing ffmpeg, fonts-dejavu-core and chromium from Debian"; \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq ffmpeg fonts-dejavu-core chromium >/dev/null; \
	fi

$(SHM_OP): $(STAMP)
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	@test ! -f $@ || touch $@  # an op already up to date is not rewritten: newer than a reinstall's stamp

$(STAMP):
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e '.[dev,ray,docker]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

# Docker's engine and debootstrap from Debian (the images are built without a registry), and a
# running daemon: started here when none answers.
docker-deps:
	@SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	if ! command -v dockerd >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then \
		echo "installing docker.io and debootstrap from Debian"; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq docker.io debootstrap >/dev/null; \
	fi; \
	if ! $$SUDO docker info >/dev/null 2>&1; then \
		echo "starting dockerd (log: /var/log/lvr-dockerd.log)"; \
		$$SUDO nohup dockerd >/var/log/lvr-dockerd.log 2>&1 & \
		for _ in $$(seq 60); do $$SUDO docker info >/dev/null 2>&1 && break; sleep 1; done; \
		$$SUDO docker info >/dev/null 2>&1 || { echo "dockerd did not start: /var/log/lvr-dockerd.log"; exit 1; }; \
	fi

# The base image (debootstrap), a wheelhouse and the CPU image; each step cached (deploy/build-images.sh).
images: setup docker-deps
	deploy/build-images.sh $(PY)

# The images' tests (tests/images/): a stage in a container, a pipeline across containers of a
# Docker work pool. They stop every container, worker and server they start.
test-images: images
	$(PY) -m pytest -q -m images tests/images $(PYTEST_ARGS)

run: setup
	$(LVR) run

test: setup
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/clip.py
	$(PY) benchmarks/caption.py
	$(PY) benchmarks/qa.py
	$(PY) benchmarks/filter.py
	$(PY) benchmarks/sp.py
	$(PY) benchmarks/grpo.py
	$(PY) benchmarks/learning.py

clean:
	rm -rf $(VENV) runs .pytest_cache
