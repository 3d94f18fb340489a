# Two commands on a fresh machine: `make demo` and `make test`. Each builds the venv
# (torch 2.13.0 CPU first, then everything pinned) when it is missing or stale.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DS_ACCELERATOR := cpu
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test test-fast demo assets bench lock clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and exactly: anything else lets pip pull a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e '.[test,onnx]'
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

assets: $(STAMP)
	$(VENV)/bin/distill assets fetch

demo: $(STAMP) assets
	$(VENV)/bin/distill run configs/demo.yaml --cluster local/2proc

bench: $(STAMP)
	for b in bench/*.py; do $(PY) $$b || exit 1; done

lock: $(STAMP)
	{ echo "# Known to install together on a fresh Python 3.11 machine with torch 2.13.0+cpu first."; \
	  echo "# Regenerate: make lock"; \
	  $(PY) -m pip freeze | grep -v -E '^(-e |distill-encoders|torch==)'; \
	  echo "torch==2.13.0"; } > requirements/constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
