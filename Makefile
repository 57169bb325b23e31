# The two commands of the README: `make demo` and `make test`. Both run `make setup` first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint clean device-check

setup: $(STAMP)

# Idempotent: re-runs only when the pinned requirements or the package metadata change.
$(STAMP): requirements.lock requirements-dev.txt requirements-extras.txt setup.cfg pyproject.toml
	@command -v apt-get >/dev/null && [ -x tools/apt-packages.sh ] && tools/apt-packages.sh || true
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock -r requirements-dev.txt
	@# The optional loaders (data.backend: dali | ffcv). ffcv compiles against the apt packages
	@# above; without them the pipeline still works with torchvision and their tests skip.
	$(PY) -m pip install -q -c requirements.lock -r requirements-extras.txt \
	  || echo "WARNING: DALI/FFCV not installed (see requirements-extras.txt); their tests skip"
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# SEEDS=3: every student over seeds 0, 1, 2 (mean ± std in the table and the figure).
SEEDS ?= 1
demo: setup
	$(PY) tools/demo.py --seeds $(SEEDS)

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

# On a GPU machine, from the source tree, without `make setup` (it needs only torch, torchvision,
# accelerate, numpy, pyyaml, pillow; pytest for its gpu_tests stage): one JSON per stage in OUT.
# ARGS=--quick runs the toy CPU mode.
OUT ?= runs/device-check
device-check:
	$(PYTHON) tools/device_check.py --out $(OUT) $(ARGS)

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf runs data/demo mlruns.db mlruns.db.lock mlartifacts .pytest_cache
