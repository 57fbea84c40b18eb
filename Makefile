# Each target bootstraps .venv by itself; `make venv` does only that.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Exact versions (with hashes) of every dependency, for every platform and Python >= 3.11: what
# CI tested. `make lock` regenerates it from setup.cfg's ranges (the newest versions they allow).
LOCK := requirements.lock
PIP_VERSION := 26.3
UV_VERSION := 0.13.9
# The CPU build of torch for the PyTorch side of the benchmarks (a plain `torch` pulls a CUDA build).
TORCH ?= torch==2.13.0
PYTEST_WORKERS ?= 2

.PHONY: venv lock run test test-variants reproduce bench bench-trl bench-preference bench-rl golden-hf check-export-hf clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q 'pip==$(PIP_VERSION)'
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# uv resolves one set of versions for every platform and Python the package supports
# (--universal --fork-strategy fewest), so a laptop gets the versions CI ran. `make lock` keeps
# the pins already in the lock and adds what setup.cfg gained; `make lock UPGRADE=1` moves every
# package to the newest version setup.cfg's ranges allow.
lock:
	$(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/python -m pip install -q 'uv==$(UV_VERSION)'
	$(VENV)-lock/bin/uv pip compile setup.cfg --extra test --extra eval --extra qlora \
	  --extra retrieval --universal --fork-strategy fewest --python-version 3.11 \
	  --generate-hashes $(if $(UPGRADE),--upgrade,) \
	  --custom-compile-command 'make lock' -o $(LOCK)

run: $(STAMP)
	$(PY) -m pathways_jax.main --config=experiments/quickstart.py --workdir=runs/quickstart
	$(PY) -m pathways_jax.main --config=experiments/quickstart_llada.py --workdir=runs/quickstart_llada
	$(PY) -m pathways_jax.demo --ar=runs/quickstart --llada=runs/quickstart_llada

test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

# The fast suite four ways, to catch float tolerances that hold on one machine only
# (docs/testing.md): as `make test` (XLA:CPU at -O0), with XLA's default code generation, and
# with XLA's CPU thread pool (which the CPU attention kernel shares) at 1 and at 8 threads
# (XLA reads NPROC). Every variant runs; the target fails if any did.
TEST_VARIANTS := "" "PATHWAYS_TEST_XLA_OPT_LEVEL=default" "NPROC=1" "NPROC=8"
test-variants: $(STAMP)
	@failed=""; for v in $(TEST_VARIANTS); do \
	  echo "== make test with: $${v:-(as make test)}"; \
	  env $$v $(PY) -m pytest -q -n $(PYTEST_WORKERS) tests || failed="$$failed [$${v:-as make test}]"; \
	done; \
	if [ -n "$$failed" ]; then echo "failed:$$failed"; exit 1; fi; echo "all variants passed"

reproduce: $(STAMP)
	$(PY) -m pytest -q -m slow -s tests

bench: $(STAMP)
	$(PY) -m pip install -q '$(TORCH)' || echo "torch not installed: benchmarks run without the PyTorch column"
	$(PY) benchmarks/train_throughput.py

# SFT step tokens/s against TRL's SFTTrainer on the same HF model and chat data, and the LoRA vs
# full step's compiled memory (benchmarks/sft_vs_trl.py, benchmarks/RESULTS.md). The TRL side runs
# in .venv-golden (`make golden-hf` installs trl there, as it keeps torch out of .venv); without
# it the script reports pathways_jax and the memory table alone.
bench-trl: $(STAMP)
	$(PY) benchmarks/sft_vs_trl.py

# DPO and reward-model step tokens/s against TRL's DPOTrainer and RewardTrainer on the same HF
# model and pairs, and the DPO step's compiled memory with a frozen vs a precomputed reference
# (benchmarks/preference_vs_trl.py, benchmarks/RESULTS.md; the TRL side in .venv-golden, as above).
bench-preference: $(STAMP)
	$(PY) benchmarks/preference_vs_trl.py

# A GRPO step, rollouts included, samples/s and its time split against TRL's GRPOTrainer (no
# vLLM) on the same HF model, prompts, G and lengths (benchmarks/rl_step.py,
# benchmarks/RESULTS.md; the TRL side in .venv-golden, as above).
bench-rl: $(STAMP)
	$(PY) benchmarks/rl_step.py

# tests/golden/hf: tiny random Llama/Qwen2/Qwen3 checkpoints and the logits and greedy tokens
# transformers computes for them, for the torch-free tests of pathways_jax.interop.hf. Run it only
# to regenerate them (then commit tests/golden/hf); its own venv keeps torch out of .venv. $(TORCH)
# is the CPU build where a +cpu wheel of that version is on pip's find-links (as on this project's
# machines); elsewhere pass TORCH_INDEX=<PyTorch's CPU wheel index> to avoid the CUDA build.
# The llada case needs LLaDA-8B's own remote code, which is not committed here: LLADA_CODE=<a dir
# with its modeling_llada.py and configuration_llada.py> (tests/golden/hf/README.md); unset, it is
# skipped and the committed tests/golden/hf/llada is kept.
GOLDEN_VENV := .venv-golden
TRANSFORMERS ?= transformers==5.25.0
LLADA_CODE ?=
golden-hf:
	$(PYTHON) -m venv $(GOLDEN_VENV)
	$(GOLDEN_VENV)/bin/python -m pip install -q '$(TORCH)' $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
	$(GOLDEN_VENV)/bin/python -m pip install -q '$(TORCH)' '$(TRANSFORMERS)' 'peft==0.21.2' 'trl==1.16.0' safetensors numpy
	$(GOLDEN_VENV)/bin/python tests/golden/hf/make_golden.py $(if $(LLADA_CODE),--llada_code='$(LLADA_CODE)',)

# The export half of the round trip, judged by transformers: the golden checkpoints imported and
# exported by pathways_jax, then loaded by transformers (golden venv) against the golden logits;
# then our PEFT adapter exports, loaded by peft on our exported bases.
check-export-hf: $(STAMP)
	rm -rf .hf-export-check
	$(PY) -c "from pathways_jax.interop import hf; [hf.save_pretrained(*hf.load_pretrained('tests/golden/hf/' + c)[:2], '.hf-export-check/' + c, model_type=hf.read_config('tests/golden/hf/' + c)['model_type'], pad_token_id=hf.read_config('tests/golden/hf/' + c).get('pad_token_id')) for c in ('llama', 'llama3_tied', 'qwen2', 'qwen3', 'llama_rm', 'qwen2_rm')]"
	$(GOLDEN_VENV)/bin/python tests/golden/hf/check_export.py .hf-export-check
	rm -rf .hf-export-check
	$(PY) tests/golden/hf/check_peft_export.py export .hf-export-check/peft
	$(GOLDEN_VENV)/bin/python tests/golden/hf/check_peft_export.py check .hf-export-check/peft
	rm -rf .hf-export-check

clean:
	rm -rf $(VENV) $(VENV)-lock runs
