# Two commands on a fresh machine: `make demo` and `make test`. Each builds the venv
# (torch 2.13.0 CPU first, then everything pinned) when it is missing or stale.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# TEST_WORKERS=2 runs the suite on 2 xdist workers (a test file per worker, see
# tests/conftest.py): most tests wait on processes they start, so two overlap well on
# 2 cores (about 12 instead of 21 minutes). An early run lost a worker mid-file, cause not
# found, and xdist then waited forever; two workers are also more sensitive to other load
# on the machine: CI runs the suite in one process.
TEST_WORKERS ?= 0
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

# GPUs this machine shows: `nvidia-smi -L` prints a "GPU i: ..." line for each (nothing
# without a driver). Without one, DeepSpeed runs on the CPU and the demo on 2 CPU ranks;
# with GPUs DeepSpeed finds CUDA itself and the demo uses all of them (cluster/local/gpu).
GPUS := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
ifeq ($(GPUS),0)
export DS_ACCELERATOR := cpu
endif
DEMO_CLUSTER ?= $(if $(filter 0,$(GPUS)),local/2proc,local/gpu)

.PHONY: venv test test-fast demo assets bench lock clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and exactly: anything else lets pip pull a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e '.[test,onnx]'
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	# Check the machine and compile DeepSpeed's CPU collective and our kernel now, not
	# silently inside the first run.
	$(VENV)/bin/distill doctor
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/pytest $(XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(VENV)/bin/pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

assets: $(STAMP)
	$(VENV)/bin/distill assets fetch

demo: $(STAMP) assets
	$(VENV)/bin/distill run configs/demo.yaml --cluster $(DEMO_CLUSTER)

bench: $(STAMP)
	for b in bench/*.py; do $(PY) $$b || exit 1; done

lock: $(STAMP)
	{ echo "# Known to install together on a fresh Python 3.11 machine with torch 2.13.0+cpu first."; \
	  echo "# Regenerate: make lock"; \
	  $(PY) -m pip freeze | grep -v -E '^(-e |distill-encoders|torch==)'; \
	  echo "torch==2.13.0"; } > requirements/constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
