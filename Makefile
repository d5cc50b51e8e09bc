# One-command set-up: `make test` and `make demo` create .venv, install everything
# editable, and run.  The install step is skipped while nothing it depends on changed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.kvcore-installed
# torch 2.13.0 is a local CPU wheel on this machine; a bare `pip install torch` would
# pull a multi-GB CUDA build, so pin it before anything can ask for torch.
TORCH_PIN ?= torch==2.13.0
INSTALL_DEPS := pyproject.toml plugins/kv_numpy/pyproject.toml plugins/kv_torch/pyproject.toml \
	plugins/kv_cupy/pyproject.toml plugins/kv_redis/pyproject.toml plugins/kv_jax/pyproject.toml \
	conformance/pyproject.toml requirements-dev.txt Makefile

.PHONY: setup test demo bench backends conformance gpu-check clean redis-server

setup: redis-server $(STAMP)

# The store tests start real redis-server processes (and make TLS certificates with
# openssl).  Install them when missing (as root, with apt), else stop with the command.
redis-server:
	@if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1 \
		|| ! command -v openssl >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing redis-server and openssl: apt-get install -y redis-server openssl"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q redis-server openssl >/dev/null 2>&1 \
	      || { apt-get update -q >/dev/null && apt-get install -y -q redis-server openssl >/dev/null; } \
	      || { echo "apt-get failed; run: sudo apt-get install -y redis-server openssl" >&2; exit 1; }; \
	  else \
	    echo "redis-server, redis-cli or openssl is missing; run: sudo apt-get install -y redis-server openssl" >&2; \
	    exit 1; \
	  fi; \
	fi

$(STAMP): $(INSTALL_DEPS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_PIN)"
	$(PIP) install -e ".[transformers,plot,metrics]" -e plugins/kv_numpy -e plugins/kv_torch \
		-e "plugins/kv_cupy[cuda12-sysctk]" -e plugins/kv_redis -e plugins/kv_jax -e conformance \
		-r requirements-dev.txt
	touch $(STAMP)

test: redis-server $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(VENV)/bin/kvcore demo

bench: $(STAMP)
	$(VENV)/bin/kvcore bench

backends: $(STAMP)
	$(VENV)/bin/kvcore backends

conformance: $(STAMP)
	$(VENV)/bin/kvcore conformance numpy torch jax

# On a machine with an NVIDIA GPU: its own venv (.venv-gpu) with torch's CUDA build and
# CuPy, `pytest -m gpu` with KVCORE_REQUIRE_GPU=1, the conformance suite on cuda, and a
# bandwidth bench, then a summary (scripts/gpu_check.py --help; docs/backends.md).
gpu-check:
	$(PYTHON) scripts/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info */*.egg-info plugins/*/*.egg-info .pytest_cache .hypothesis
