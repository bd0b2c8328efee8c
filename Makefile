# Two commands do all the set-up on a fresh machine (see README):
#   make demo   — create/reuse .venv, install, run the main job (jobs/demo.py, its stages in pipeline/demo/:
#                 data → adapt → horizon head → evaluate → serve → summary) on the embedded defaults; DEMO_ARGS=… passes overrides
#   make test   — create/reuse .venv, install, run the test suite
# Set-up is idempotent: it re-installs only when pyproject.toml changed (stamp file in the venv).
VENV ?= .venv
PYTHON ?= python3
# torch is installed first, pinned: a CPU build of 2.13.0 lies on disk on our CI/dev machines and
# installs in seconds; an unpinned torch pulls a multi-GB CUDA build. On a GPU machine the same pin
# gets the regular CUDA wheel. Override e.g. with `make test TORCH_SPEC=torch==2.14.1`.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fluid-setup-$(shell sha256sum pyproject.toml | cut -c1-12)
PIP_QUIET := -q --disable-pip-version-check

.PHONY: setup demo test lint clean-venv drafter
setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required (set PYTHON=python3.11)")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || { echo "installing $(TORCH_SPEC) …"; $(PY) -m pip install $(PIP_QUIET) "$(TORCH_SPEC)" 2>&1 | grep -v "is ignored" || true; }
	@$(PY) -c "import torch" || { echo "torch install failed"; exit 1; }
	@echo "installing fluid-on-ray and its dependencies …"
	@$(PY) -m pip install $(PIP_QUIET) -e ".[dev]" 2>&1 | grep -v "is ignored" || true
	@$(PY) -c "import pipeline, ray, transformers, gguf" || { echo "install failed"; exit 1; }
	@rm -f $(VENV)/.fluid-setup-* && touch $@

demo: setup
	$(PY) -m jobs.demo $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -q

# The default drafter recipe (README, "Drafts that verify accepts") for MINUTES of training, then the
# standing benchmark of its export (BENCHMARKS.md quotes what 60 minutes reach): `make drafter MINUTES=60`.
# Distilling is resumable by shard; a re-run with the same settings resumes training from its checkpoint.
MINUTES ?= 60
DRAFTER_DTYPE ?= $(shell grep -qo 'amx_bf16\|avx512_bf16' /proc/cpuinfo 2>/dev/null && echo bfloat16 || echo auto)
drafter: setup
	$(PY) -m jobs.distill --distill.output=runs/distilled --distill.prompt_len=32 --distill.new_tokens=96 \
	    --distill.count=1024 --distill.shard_size=64 --distill.batch_size=64
	$(PY) -m jobs.adapt --data.seq_len=128 --train.global_batch_size=4 --noise.k_max=6 --noise.draft_ratio=2 \
	    --data.distilled=runs/distilled --data.distill_mix=1 --train.drafter=adapter --train.lora_rank=32 \
	    --train.lora_alpha=64 '--train.lora_targets=[q_proj,o_proj,gate_proj,down_proj]' --noise.rho=0 \
	    --train.lr=1e-3 --model.dtype=$(DRAFTER_DTYPE) --train.max_steps=100000 \
	    --train.time_budget_s=$$(( $(MINUTES) * 60 )) --train.storage_path=runs --train.run_name=drafter
	$(PY) -m jobs.bench sampler --model-dir runs/drafter/export --no-each-layout --record runs/drafter/bench_sampler.json

lint: setup
	$(VENV)/bin/ruff check pipeline jobs tests

clean-venv:
	rm -rf $(VENV)
