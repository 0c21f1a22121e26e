# `make test` and `make demo` bootstrap a local virtual environment from a bare python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: test demo clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[hf,test]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --durations=15 tests

demo: $(VENV)/.installed
	$(PY) experiments/demo.py

clean:
	rm -rf $(VENV) .pytest_cache
