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
	plugins/kv_cupy/pyproject.toml plugins/kv_jax/pyproject.toml conformance/pyproject.toml requirements-dev.txt Makefile

.PHONY: setup test demo bench backends conformance clean

setup: $(STAMP)

$(STAMP): $(INSTALL_DEPS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_PIN)"
	$(PIP) install -e ".[transformers,plot]" -e plugins/kv_numpy -e plugins/kv_torch \
		-e "plugins/kv_cupy[cuda12]" -e plugins/kv_jax -e conformance -r requirements-dev.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(VENV)/bin/kvcore demo

bench: $(STAMP)
	$(VENV)/bin/kvcore bench

backends: $(STAMP)
	$(VENV)/bin/kvcore backends

conformance: $(STAMP)
	$(VENV)/bin/kvcore conformance numpy torch jax

clean:
	rm -rf $(VENV) build dist *.egg-info */*.egg-info plugins/*/*.egg-info .pytest_cache .hypothesis
