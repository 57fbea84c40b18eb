# Each target bootstraps .venv by itself; `make venv` does only that.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch for the PyTorch side of the benchmarks (a plain `torch` pulls a CUDA build).
TORCH ?= torch==2.13.0
PYTEST_WORKERS ?= 2

.PHONY: venv run test reproduce bench clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m pathways_jax.main --config=experiments/quickstart.py --workdir=runs/quickstart
	$(PY) -m pathways_jax.main --config=experiments/quickstart_llada.py --workdir=runs/quickstart_llada

test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

reproduce: $(STAMP)
	$(PY) -m pytest -q -m slow -s tests

bench: $(STAMP)
	$(PY) -m pip install -q '$(TORCH)' || echo "torch not installed: benchmarks run without the PyTorch column"
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs
