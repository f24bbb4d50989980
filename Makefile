# Two entry points: `make demo` and `make test`. Both create .venv and are idempotent.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CPU_TORCH := 2.13.0
QUICK ?= 0
ABLATIONS ?= 0
# pytest-xdist workers for make test: one per core of the 2-core machines it is timed on
TEST_WORKERS ?= 2
DEMO_FLAGS := $(if $(filter 1,$(QUICK)),--quick,) $(if $(filter 1,$(ABLATIONS)),--ablations,)

.PHONY: install check browser test demo clean

$(VENV)/.installed: pyproject.toml lab/pyproject.toml Makefile
	@# On a CUDA machine whose Python already has torch, the venv sees that torch and keeps it.
	@if [ ! -x $(PY) ]; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && $(PYTHON) -c "import torch" 2>/dev/null; then \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; \
	fi
	@# Without a torch: a CUDA build where there is a GPU, else the local CPU wheel.
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	  else $(PY) -m pip install -q torch==$(CPU_TORCH); fi; \
	fi
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[test,fed]" -e lab
	touch $@

install: $(VENV)/.installed

# transformers 4.57 beside the venv's 5.x, for the test that loads our checkpoints with it
# (tests/test_compat.py); used only through PYTHONPATH, so the venv itself is untouched.
COMPAT := $(VENV)/compat/transformers-4.57
$(COMPAT)/.installed: $(VENV)/.installed
	$(PY) -m pip install -q --target $(COMPAT) --no-deps --upgrade \
	  "transformers==4.57.6" "huggingface-hub>=0.34,<1" "tokenizers>=0.22,<0.23"
	touch $@

check: install
	$(VENV)/bin/ruff check src lab tests benchmarks docs/examples
	$(VENV)/bin/ruff format --check src lab tests benchmarks docs/examples
	$(VENV)/bin/mypy src lab/src
	@# The formatter decides layout in the library: no line may opt out of it.
	@if grep -rn "fmt: skip" src lab; then echo "src, lab: remove the '# fmt: skip' above"; exit 1; fi

# Headless Chromium from Debian's packages for the page's browser tests (tests/test_ui_browser.py),
# installed with apt-get (as root, else through sudo). Where that fails, those tests fail and say so.
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    chromium chromium-driver >/dev/null; } \
	  || echo "could not install chromium and chromium-driver with apt-get: the browser tests will fail"; \
	fi

test: check $(COMPAT)/.installed browser
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --durations=15

demo: install
	$(VENV)/bin/flexmoe-lab demo --out demo-output $(DEMO_FLAGS)

clean:
	rm -rf $(VENV) demo-output .cache
