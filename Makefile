# make demo: install, train the debug preset on the bundled chats, ask it one question
# make test: install dev dependencies and Open MPI, lint, type-check, run the whole suite (what CI runs)
# make test-fast: the suite without its `slow` tests (fresh-interpreter launches, benchmark smoke tests)
# make test-nvme: the ZeRO-Infinity (NVMe offload) tests, after building DeepSpeed's AsyncIO op (CI runs it too)
# make test-cluster: multi-host launches (torchrun, SLURM, deepspeed/mpirun --hostfile over ssh) on hosts made of Linux
#   namespaces, as root (CI runs it too)
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
DEMO_DIR := runs/demo
UV_VERSION := 0.13.10

.PHONY: install dev system-deps demo test test-fast test-nvme test-cluster lint typecheck pytest ops clean

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
# does not need it), and libaio's header and library, which DeepSpeed's AsyncIO op (NVMe offload,
# --offload-device nvme) is compiled against; for `make test-cluster`: iproute2 and util-linux (the hosts), SLURM and
# munge, and sshd, ssh and pdsh (`deepspeed --hostfile` and `mpirun --hostfile` between the hosts). Debian/Ubuntu
# packages; sudo only when not root (CI runs as root).
system-deps:
	@missing=""; \
	if command -v mpirun >/dev/null && command -v ompi_info >/dev/null; then \
		echo "system-deps: $$(mpirun --version | head -n 1)"; \
	else \
		missing="openmpi-bin libopenmpi-dev"; \
	fi; \
	if dpkg -s libaio-dev >/dev/null 2>&1 || [ -f /usr/include/libaio.h ]; then \
		echo "system-deps: libaio-dev"; \
	else \
		missing="$$missing libaio-dev"; \
	fi; \
	if command -v ip >/dev/null && command -v unshare >/dev/null; then \
		echo "system-deps: iproute2, util-linux"; \
	else \
		missing="$$missing iproute2 util-linux"; \
	fi; \
	if command -v slurmctld >/dev/null && command -v munged >/dev/null; then \
		echo "system-deps: $$(slurmctld -V), munge"; \
	else \
		missing="$$missing slurm-wlm munge"; \
	fi; \
	if command -v sshd >/dev/null && command -v ssh >/dev/null && command -v pdsh >/dev/null; then \
		echo "system-deps: $$(ssh -V 2>&1), pdsh"; \
	else \
		missing="$$missing openssh-server openssh-client pdsh"; \
	fi; \
	if [ -n "$$missing" ]; then \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get update && \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
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

# DeepSpeed JIT-builds its CPU Adam op (ZeRO-Offload's optimizer, C++) and its AsyncIO op (NVMe offload, against
# libaio; it loads the pin_memory op first) at first use: `make ops` builds both ahead into torch's extension cache.
# `make test` builds CPU Adam only: the AsyncIO build alone takes 4-7 CPU minutes here, so the NVMe tests have their
# own target (`make test-nvme`, which .ci/run also runs)
BUILD_OPS := from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()
BUILD_AIO := from deepspeed.ops.op_builder import AsyncIOBuilder; AsyncIOBuilder().load()
ops: $(VENV)/.installed
	DS_ACCELERATOR=cpu $(PY) -c "$(BUILD_OPS); $(BUILD_AIO)"

# ds_configs/<preset>.json: every preset's DeepSpeed JSON on its reference cluster, rewritten from the planner after a
# planner or preset change (tests/planning/test_ds_configs.py fails when one has drifted); not part of `make test`
.PHONY: ds-configs
ds-configs: $(VENV)/.installed
	for preset in $$($(PY) -c "from lumina_ds.config.presets import PRESETS; print(*PRESETS)"); do \
		$(BIN)/lumina-ds ds-config --preset $$preset --format deepspeed --output ds_configs/$$preset.json || exit 1; \
	done

# one worker per core; a test file's tests run together on one worker (its module and session fixtures built once)
pytest: system-deps $(VENV)/.installed
	$(BIN)/pytest -q -n auto --dist loadfile -m "not nvme and not cluster"

test-fast: system-deps $(VENV)/.installed
	$(BIN)/pytest -q -n auto --dist loadfile -m "not slow and not nvme and not cluster"

# ZeRO-Infinity on the CPU accelerator: DeepSpeed's AsyncIO op (built here on first use), then the NVMe tests
# hosts as network, UTS and mount namespaces (tests/cluster/harness.py); four ranks at a time: one worker
test-cluster: system-deps $(VENV)/.installed
	$(BIN)/pytest -q -m cluster tests/cluster

test-nvme: system-deps $(VENV)/.installed
	DS_ACCELERATOR=cpu $(PY) -c "$(BUILD_AIO)"
	$(BIN)/pytest -q -m nvme

# the op builds on one core while lint and mypy keep the other busy; the suite starts once all three are done
test: system-deps $(VENV)/.installed
	@DS_ACCELERATOR=cpu $(PY) -c "$(BUILD_OPS)" > .ops-build.log 2>&1 & ops=$$!; \
	$(MAKE) --no-print-directory lint typecheck; checks=$$?; \
	wait $$ops || { echo "building DeepSpeed's CPU Adam op failed:"; tail -n 30 .ops-build.log; exit 1; }; \
	[ $$checks -eq 0 ] && $(MAKE) --no-print-directory pytest

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
