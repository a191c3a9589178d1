# Two commands: `make demo` (main job) and `make test` (whole suite). Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.isvit-installed
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test lab lint clean-venv

$(STAMP): pyproject.toml Makefile config/jupyterlab-overrides.json
	@if ! $(PY) -c "import ensurepip" 2>/dev/null; then \
	  echo "python3-venv missing: installing it with apt"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv) || \
	  (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv); fi
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[test,export,browser,sweep]"
	mkdir -p $(VENV)/share/jupyter/lab/settings
	cp config/jupyterlab-overrides.json $(VENV)/share/jupyter/lab/settings/overrides.json
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	OMP_NUM_THREADS=2 $(BIN)/isvit-viz demo

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 \
	  --nbmake --nbmake-timeout=900 tests notebooks

lab: setup
	$(BIN)/jupyter lab --notebook-dir=notebooks

lint: setup
	$(BIN)/ruff check isvit_viz tests scripts benchmarks notebooks
	$(BIN)/ruff format --check isvit_viz tests scripts benchmarks

clean-venv:
	rm -rf $(VENV)
