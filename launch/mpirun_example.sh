#!/usr/bin/env bash
# Plain mpirun, no DeepSpeed runner: each rank reads its rank from Open MPI's OMPI_COMM_WORLD_* variables; rank 0
# shares its address and a free port through mpi4py (`pip install 'lumina-ds[mpi]'`) unless MASTER_ADDR and
# MASTER_PORT are given. Extra arguments are `lumina-ds train` flags.
#
#   launch/mpirun_example.sh --preset debug --train-data examples/conversations.jsonl        # NP=2 ranks on this host
#   NP=32 HOSTFILE=launch/hostfile.example launch/mpirun_example.sh --preset b300 --train-data data/chats.jsonl
#
# PYTHON picks the interpreter (default: python on PATH, e.g. the activated venv's).
set -euo pipefail
cd "$(dirname "$0")/.."

NP="${NP:-2}"
PYTHON="${PYTHON:-python}"
# GPU ranks run data loading and NCCL threads beside the main one: do not pin each rank to a single core
MPI_ARGS=(-np "$NP" --bind-to none)
if [[ -n "${HOSTFILE:-}" ]]; then
    # rank 0 runs on the hostfile's first host; remote ranks see only the variables named with -x (below)
    MASTER_ADDR="${MASTER_ADDR:-$(awk '!/^#/ && NF { print $1; exit }' "$HOSTFILE")}"
    MASTER_PORT="${MASTER_PORT:-29500}"
    export MASTER_ADDR MASTER_PORT
    MPI_ARGS+=(--hostfile "$HOSTFILE")
else
    MPI_ARGS+=(--oversubscribe) # one host: NP may exceed its cores (CPU runs)
fi
for name in MASTER_ADDR MASTER_PORT DS_ACCELERATOR OMP_NUM_THREADS PATH LD_LIBRARY_PATH; do
    if [[ -n "${!name:-}" ]]; then
        MPI_ARGS+=(-x "$name")
    fi
done
if [[ "$(id -u)" == 0 ]]; then
    MPI_ARGS+=(--allow-run-as-root)
fi
exec mpirun "${MPI_ARGS[@]}" "$PYTHON" -u launch/train.py "$@"
