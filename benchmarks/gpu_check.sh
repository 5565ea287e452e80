#!/usr/bin/env bash
# The GPU paths that a CPU cannot run, in one pass of at most 10 minutes on one H100/H200 (each step has a time limit;
# the limits add up to 595 s): training throughput and MFU against HF Mixtral in bf16 at a ~1B MoE and a ~1B dense
# configuration; flash-attn varlen against SDPA on document-masked packed rows; fp16 with loss scaling (50 steps, all
# finite); the grouped-GEMM expert path against the loop (equality and speed); the memory model against
# torch.cuda.max_memory_allocated for four ZeRO/recompute layouts; NCCL start-up, training + chat from its checkpoint,
# ZeRO-3 with optimizer offload; the launch gate refusing b100 on the real GPU memory (E202, nothing written);
# ZeRO-3 with optimizer and parameters on NVMe (ZeRO-Infinity). Each step reports FAILED and the next one still runs. At the end
# gpu_check.json and gpu_check.md (benchmarks/gpu_check_steps.py report) summarise every step.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]             # OUT_DIR gets log.txt, the JSON, the table and each step's data
#   bash benchmarks/gpu_check.sh --dry-run [OUT_DIR]   # CPU, tiny sizes: every step that a CPU can run runs; the
#                                                      # CUDA-only ones (lumina-ds train/chat) are parsed and validated
#
# Wheels in .whl/ (deepspeed and what it needs) are installed into /tmp/site first, for a machine without a registry.
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_check}}
mkdir -p "$OUT_DIR"
: >"$OUT_DIR/steps.jsonl"
exec > >(tee "$OUT_DIR/log.txt") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
if [ $DRY = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
RUNS=$(mktemp -d)
DATA=(--train-data examples/conversations.jsonl --eval-data examples/conversations_eval.jsonl)
COMMON=(--output-dir "$RUNS" --no-progress-bar --log-every-n-steps 10 --save-every-n-steps 1000)
TOOLS=benchmarks/gpu_check_steps.py

if [ $DRY = 1 ]; then  # the same command lines at sizes a CPU runs in seconds
    export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1
    MOE_1B=(--hidden 32 --layers 1 --heads 2 --kv-heads 1 --experts 4 --top-k 2 --expert-ffn 32 --vocab 128)
    DENSE_1B=(--hidden 32 --layers 1 --heads 2 --kv-heads 1 --experts 1 --top-k 1 --expert-ffn 64 --vocab 128)
    TP_SIZE=(--batch-size 1 --seq-len 32 --steps 1 --warmup 0 --threads 1)
    ATTN_SIZE=(--seq-lens 64 --batch-size 1 --heads 2 --kv-heads 1 --head-dim 16 --steps 1 --warmup 0 --threads 1)
    MOE_SIZE=(--hidden 32 --layers 1 --experts 4 --expert-ffn 32 --vocab 128 --batch-size 1 --seq-len 32 --steps 1)
else
    # ~0.93B parameters (0.3B active): 12 layers of 8 experts (ffn 2816) top-2, GQA 16/4, untied 32k vocab
    MOE_1B=(--hidden 1024 --layers 12 --heads 16 --kv-heads 4 --experts 8 --top-k 2 --expert-ffn 2816 --vocab 32768)
    # ~0.89B dense: one expert, top-1 (Mixtral has no dense form; both models then run one SwiGLU per token)
    DENSE_1B=(--hidden 2048 --layers 16 --heads 16 --kv-heads 8 --experts 1 --top-k 1 --expert-ffn 5632 --vocab 32768)
    TP_SIZE=(--batch-size 4 --seq-len 2048 --steps 8 --warmup 2)
    ATTN_SIZE=(--seq-lens 2048,4096 --batch-size 8 --steps 5 --warmup 2)
    MOE_SIZE=(--hidden 1024 --layers 8 --experts 8 --expert-ffn 2048 --vocab 32768 --batch-size 8 --seq-len 2048 \
        --steps 5)
fi

record() {  # record NAME STATUS SECONDS: one line of steps.jsonl, read by the report
    printf '{"name": "%s", "status": "%s", "seconds": %s}\n' "$1" "$2" "$3" >>"$OUT_DIR/steps.jsonl"
}

step() {  # step NAME LIMIT_S COMMAND...: run it under a time limit (none in a dry run), keep going on failure
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*"
    local start=$SECONDS status=ok code=0
    if [ $DRY = 1 ]; then "$@" || code=$?; else timeout "$limit" "$@" || code=$?; fi
    [ $code = 0 ] || status="FAILED (exit $code)"
    echo "=== $name: $status in $((SECONDS - start)) s"
    record "$name" "$status" $((SECONDS - start))
}

CUDA_ONLY=()  # a dry run's GPU-only commands, validated together at the end (one process, not one per step)
cuda_step() {  # cuda_step NAME LIMIT_S python3 -m lumina_ds ARGS...: runs on a GPU; a dry run validates ARGS only
    if [ $DRY = 1 ]; then
        echo "=== $1: validated below (a GPU runs it)"
        shift 5  # NAME LIMIT_S python3 -m lumina_ds
        CUDA_ONLY+=("$@" ---)
    else
        step "$@"
    fi
}

keep() {  # keep RUN: its metrics and resolved configs into OUT_DIR
    for f in metrics.jsonl ds_config.json; do
        [ -f "$RUNS/$1/$f" ] && cp "$RUNS/$1/$f" "$OUT_DIR/$1.$f"
    done
    return 0
}

if [ $DRY = 0 ]; then
    step environment 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
step versions 15 $PY -c "import torch, deepspeed; print(torch.__version__, torch.version.cuda, deepspeed.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA', \
'flash_attn' if __import__('importlib').util.find_spec('flash_attn') else 'no flash_attn')"
step throughput-moe-1b 75 $PY benchmarks/throughput.py "${MOE_1B[@]}" --no-tie "${TP_SIZE[@]}" --precision bf16 \
    --output "$OUT_DIR/throughput_moe.jsonl"
step throughput-dense-1b 65 $PY benchmarks/throughput.py "${DENSE_1B[@]}" --no-tie "${TP_SIZE[@]}" --precision bf16 \
    --output "$OUT_DIR/throughput_dense.jsonl"
step attention-varlen 25 $PY benchmarks/attention_check.py "${ATTN_SIZE[@]}" --precisions bf16 --docs 4 \
    --paths sdpa+mask,flash-varlen --output "$OUT_DIR/attention.jsonl"
step moe-paths 40 $PY $TOOLS moe "${MOE_SIZE[@]}" --output "$OUT_DIR/moe_paths.json"
if [ $DRY = 1 ]; then  # the four predictions at full size; one layout (the ZeRO-3 + recompute one) also runs, tiny
    step memory-layouts 0 $PY $TOOLS memory --layout z1 --layout z2-recompute --layout z3 --layout z3-recompute-bf16 \
        --validate-only --output "$OUT_DIR/memory_predicted.jsonl"
    step memory-z3-recompute-bf16 0 $PY $TOOLS memory --layout z3-recompute-bf16 --tiny --output "$OUT_DIR/memory.jsonl"
else
    for layout in z1 z2-recompute z3 z3-recompute-bf16; do  # one process each: a fresh allocator peak per layout
        step "memory-$layout" 25 $PY $TOOLS memory --layout $layout --output "$OUT_DIR/memory.jsonl"
    done
fi
cuda_step fp16-loss-scale 45 $PY -m lumina_ds train --preset debug "${DATA[@]}" "${COMMON[@]}" --max-steps 50 \
    --experiment-name fp16 --precision fp16 --eval-every-n-steps 50
keep fp16
cuda_step train-debug 40 $PY -m lumina_ds train --preset debug "${DATA[@]}" "${COMMON[@]}" --max-steps 40 \
    --experiment-name debug_auto --eval-every-n-steps 40
keep debug_auto
cuda_step chat 20 $PY -m lumina_ds chat --checkpoint "$RUNS/debug_auto" --prompt "Explain RoPE briefly." \
    --max-tokens 48 --temperature 0.2 --seed 0
# the launch-time plan on this machine's real memory: b100 refused (E202) in seconds, before any tokenizer or data
step launch-gate 30 $PY $TOOLS refuses --limit-s 30 --output-dir "$RUNS/b100" E202 -- $PY -m lumina_ds train \
    --preset b100 "${DATA[@]}" --output-dir "$RUNS" --experiment-name b100
cuda_step zero3-offload-accum 40 $PY -m lumina_ds train --preset debug "${DATA[@]}" "${COMMON[@]}" --max-steps 12 \
    --experiment-name z3_offload --zero-stage 3 --offload optimizer --grad-accum 4 --eval-every-n-steps 12
keep z3_offload
# ZeRO-Infinity: optimizer states and parameters swapped to NVMe (here a directory) through DeepSpeed's AsyncIO op
cuda_step zero3-nvme 90 $PY -m lumina_ds train --preset debug "${DATA[@]}" "${COMMON[@]}" --max-steps 12 \
    --experiment-name z3_nvme --zero-stage 3 --offload optimizer+params --offload-device nvme \
    --nvme-path "$OUT_DIR/nvme" --eval-every-n-steps 12
keep z3_nvme
if [ $DRY = 1 ]; then
    step validate-gpu-commands 0 $PY $TOOLS validate -- "${CUDA_ONLY[@]}"
fi
$PY $TOOLS report "$OUT_DIR" $([ $DRY = 1 ] && echo --dry-run)
echo "=== done"
