# make demo: install, train the debug preset on the bundled chats, ask it one question
# make test: install dev dependencies and Open MPI, lint, type-check, run the whole suite (what CI runs)
# make test-fast: the suite without its `slow` tests (fresh-interpreter launches, benchmark smoke tests)
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
DEMO_DIR := runs/demo
UV_VERSION := 0.13.10

.PHONY: install dev system-deps demo test test-fast lint typecheck pytest ops clean

$(VENV)/.installed: setup.py requirements-dev.txt
	python3 -m venv $(VENV)
	# torch first, pinned, with pip: pip takes the CPU wheel where one lies on disk, and an unpinned torch pulls a
	# multi-GB CUDA build. uv then resolves and installs the rest in parallel (about 40 s less than pip here)
	$(PY) -m pip install -q torch==2.13.0 uv==$(UV_VERSION)
	$(BIN)/uv pip install -q --python $(PY) --compile-bytecode -r requirements-dev.txt -e .
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

# DeepSpeed JIT-builds its CPU Adam op (ZeRO-Offload's optimizer, C++) at first use: `make ops`
# builds it ahead into torch's extension cache
BUILD_OPS := from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()
ops: $(VENV)/.installed
	DS_ACCELERATOR=cpu $(PY) -c "$(BUILD_OPS)"

# one worker per core; a test file's tests run together on one worker (its module and session fixtures built once)
pytest: system-deps $(VENV)/.installed
	$(BIN)/pytest -q -n auto --dist loadfile

test-fast: system-deps $(VENV)/.installed
	$(BIN)/pytest -q -n auto --dist loadfile -m "not slow"

# the op builds on one core while lint and mypy keep the other busy; the suite starts once all three are done
test: system-deps $(VENV)/.installed
	@DS_ACCELERATOR=cpu $(PY) -c "$(BUILD_OPS)" > .ops-build.log 2>&1 & ops=$$!; \
	$(MAKE) --no-print-directory lint typecheck; checks=$$?; \
	wait $$ops || { echo "building DeepSpeed's CPU Adam op failed:"; tail -n 30 .ops-build.log; exit 1; }; \
	[ $$checks -eq 0 ] && $(MAKE) --no-print-directory pytest

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
