#!/usr/bin/env bash
# The GPU paths that a CPU cannot run, in one pass on one CUDA machine: NCCL start-up, mixed and pure bf16 through
# DeepSpeed at ZeRO 2 and 3, the flex/flash attention path `auto` picks on CUDA, checkpoint + chat on the GPU, and
# host syncs and step time of the MoE experts' grouped and loop paths, and training throughput against HF Mixtral in
# bf16. Each step reports FAILED and the next one still runs.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]       # OUT_DIR gets log.txt and each run's metrics (default: gpu_check)
#
# Wheels in .whl/ (deepspeed and what it needs) are installed into /tmp/site first, for a machine without a registry.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_check}}
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/log.txt") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
RUNS=$(mktemp -d)
DATA=(--train-data examples/conversations.jsonl --eval-data examples/conversations_eval.jsonl)
COMMON=(--output-dir "$RUNS" --no-progress-bar --log-every-n-batches 20 --save-every-n-batches 1000)

step() {  # step NAME COMMAND...: time it, keep going on failure
    local name=$1
    shift
    echo "=== $name: $*"
    local start=$SECONDS
    if "$@"; then echo "=== $name: ok in $((SECONDS - start)) s"; else echo "=== $name: FAILED (exit $?) after $((SECONDS - start)) s"; fi
}

keep() {  # keep RUN: its metrics and resolved configs into OUT_DIR
    for f in metrics.jsonl ds_config.json; do
        [ -f "$RUNS/$1/$f" ] && cp "$RUNS/$1/$f" "$OUT_DIR/$1.$f"
    done
    return 0
}

step environment nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step versions python3 -c "import torch, deepspeed; print(torch.__version__, torch.version.cuda, deepspeed.__version__, \
torch.cuda.get_device_name(), 'flash_attn' if __import__('importlib').util.find_spec('flash_attn') else 'no flash_attn')"
step check-environment python3 -m lumina_ds check-environment --preset b1
step debug-auto python3 -m lumina_ds train --preset debug "${DATA[@]}" "${COMMON[@]}" --max-steps 100 \
    --experiment-name debug_auto --eval-every-n-batches 50
keep debug_auto
step chat python3 -m lumina_ds chat --checkpoint "$RUNS/debug_auto" --prompt "Explain RoPE briefly." --max-tokens 48 \
    --temperature 0.2 --seed 0
step zero3-bf16-recompute python3 -m lumina_ds train --preset debug "${DATA[@]}" "${COMMON[@]}" --max-steps 40 \
    --experiment-name z3_bf16 --zero-stage 3 --precision bf16 --gradient-checkpointing --eval-every-n-batches 40
keep z3_bf16
step zero3-offload-accum python3 -m lumina_ds train --preset debug "${DATA[@]}" "${COMMON[@]}" --max-steps 20 \
    --experiment-name z3_offload --zero-stage 3 --offload optimizer --grad-accum 4 --eval-every-n-batches 20
keep z3_offload
step m70-mixed-bf16 python3 -m lumina_ds train --preset m70_memory "${DATA[@]}" "${COMMON[@]}" --max-steps 40 \
    --experiment-name m70 --seq-len 1024 --eval-every-n-batches 40
keep m70
step moe-paths python3 benchmarks/moe_paths.py
step throughput-bf16 python3 benchmarks/throughput.py --hidden 1024 --layers 8 --heads 16 --kv-heads 4 --experts 8 \
    --top-k 2 --expert-ffn 2048 --vocab 32768 --no-tie --batch-size 8 --seq-len 2048 --precision bf16 --steps 10 \
    --output "$OUT_DIR/throughput.jsonl"
echo "=== done"
