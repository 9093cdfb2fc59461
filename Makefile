# The README's two commands: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install bench

$(BIN)/ctrltok: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e ".[test,bench]"
	touch $(BIN)/ctrltok

install: $(BIN)/ctrltok

demo: install
	$(BIN)/ctrltok demo

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python bench/encode.py
