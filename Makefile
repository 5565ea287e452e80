# make demo: install, train the debug preset on the bundled chats, ask it one question
# make test: install dev dependencies and Open MPI, lint, type-check, run the whole suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
DEMO_DIR := runs/demo

.PHONY: install dev system-deps demo test lint typecheck pytest clean

$(VENV)/.installed: setup.py requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: DeepSpeed's build needs it, and an unpinned torch pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q -e .
	touch $@

install: $(VENV)/.installed

dev: system-deps $(VENV)/.installed

# Open MPI for the mpirun and `deepspeed --launcher openmpi` tests (mpi4py's wheel loads it at run time; `make demo`
# does not need it). Debian/Ubuntu packages; sudo only when not root (CI runs as root).
system-deps:
	@if command -v mpirun >/dev/null && command -v ompi_info >/dev/null; then \
		echo "system-deps: $$(mpirun --version | head -n 1)"; \
	else \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get update && \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends openmpi-bin libopenmpi-dev; \
	fi

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

pytest: system-deps $(VENV)/.installed
	$(BIN)/pytest -q

test: lint typecheck pytest

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
