# make demo: install, train the debug preset on the bundled chats, ask it one question
# make test: install dev dependencies, lint, type-check, run the whole suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
DEMO_DIR := runs/demo

.PHONY: install dev demo test lint typecheck pytest clean

$(VENV)/.installed: setup.py requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: DeepSpeed's build needs it, and an unpinned torch pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q -e .
	touch $@

install dev: $(VENV)/.installed

demo: $(VENV)/.installed
	rm -rf $(DEMO_DIR)
	$(BIN)/lumina-ds train --preset debug --train-data examples/conversations.jsonl \
		--eval-data examples/conversations_eval.jsonl --max-steps 200 --experiment-name demo --output-dir runs
	$(BIN)/lumina-ds chat --checkpoint $(DEMO_DIR) --prompt "Explain RoPE briefly." \
		--max-tokens 64 --temperature 0.2 --seed 0

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed
	$(BIN)/mypy lumina_ds

pytest: $(VENV)/.installed
	$(BIN)/pytest -q

test: lint typecheck pytest

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
