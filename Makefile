# `make test` and `make demo` bootstrap a local virtual environment from a bare python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: test lint demo clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[hf,test]"
	# T5's preprocessors, the reference the span-corruption tests compare with; its own
	# dependencies (Mesh TensorFlow, nightly seqio and TFDS) are not needed for that one file.
	$(PY) -m pip install -q --no-deps t5==0.9.4
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q -rs -n 2 --durations=15 tests

lint: $(VENV)/.installed  # config in pyproject.toml; `ruff format . && ruff check --fix .` repairs most
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

demo: $(VENV)/.installed  # a fresh run each time: demo_run/ is the demo's own output
	rm -rf demo_run
	$(PY) experiments/demo.py --model_dir=demo_run

clean:
	rm -rf $(VENV) .pytest_cache demo_run
