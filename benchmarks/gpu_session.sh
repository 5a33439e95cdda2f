#!/usr/bin/env bash
# Everything fastmoe checks and times on a GPU, in one call (the lent GPU machines have no package index and
# limited device time). Run from the repository root:
#
#     bash benchmarks/gpu_session.sh [OUT_DIR [STEP ...]]
#
# STEPs (default: all, in this order): gpu-tests moe-block lora-linear fused-lm-head short-conv sliding-attention
# nf4-experts train-step-8 train-step profile train-families quality. All of them take longer than one 10-minute call; the benchmark harness (issue #6) is
#
#     bash benchmarks/gpu_session.sh "$OUT" train-families quality      # about 5 minutes, at most 9
#
# fused-lm-head (issue #16) times trl's fused LM head against fastmoe's at Trinity-Mini's head, 4k and 16k tokens
# (120-second limit; JSON lines to OUT_DIR/results.jsonl):
#
#     bash benchmarks/gpu_session.sh "$OUT" fused-lm-head
#
# short-conv (issue #5) times LFM2's gated short conv and ShortConv block against transformers (90-second limit):
#
#     bash benchmarks/gpu_session.sh "$OUT" short-conv
#
# sliding-attention (issue #5) times AFMoE's sliding-window layer: transformers' SDPA over the dense mask against the
# flash kernel given the window (60-second limit).
#
# multi-gpu (never by default: it needs 2 GPUs, e.g. the nvidia-h200-x2 machine) runs benchmarks/bench_multi_gpu.py
# five times: multi-gpu-ddp, multi-gpu-fsdp2 (LoRA), multi-gpu-fsdp2-full, multi-gpu-ddp-nf4 on 2 GPUs, and multi-gpu-one,
# 1 GPU with the same global batch; each can also be named alone (a few minutes each, most of it start-up).
#
# 1. installs fastmoe by copying (fastmoe/ plus kernels/ as fastmoe/kernels) into a private site folder, and any
#    wheels carried in .whl/ (trl, datasets, bitsandbytes are not on those machines);
# 2. runs every `gpu`-marked test (bf16 kernels against their references);
# 3. runs the benchmarks; each appends its table to OUT_DIR/RESULTS.md, the training-step benchmark also its JSON
#    lines to OUT_DIR/results.jsonl and the quality run its losses to OUT_DIR/quality_run.json: copy those three
#    over benchmarks/RESULTS.md, benchmarks/results.jsonl and benchmarks/quality_run.json, then draw the charts on
#    any machine with matplotlib: python benchmarks/plot_results.py
# 4. prints a summary table of this session's training-step and quality numbers.
# Variables: TRAIN_STEP_LIMIT (seconds, default 240), TRAIN_VARIANTS (train-step, 32 layers) and TRAIN_VARIANTS_8 (train-step-8) list bench_train_step.py
# variants, e.g. "fastmoe-4bit,fastmoe-4bit-adamw8bit"; NF4_CONFIGS sweeps the NF4 GEMMs' launch configuration in
# nf4-experts ("128:64:4:3,128:128:8:3": BLOCK_N:BLOCK_K:warps:stages); FAMILY_* and QUALITY_ARGS below.
# Python is started with -P so the checkout's root (which has fastmoe/ without kernels/) is not on sys.path;
# benchmarks/ is put on it instead, for the scripts that import each other.
set -uo pipefail
out="${1:-${OUT:-/tmp/fastmoe-gpu}}"
shift || true
steps=" ${*:-gpu-tests moe-block lora-linear fused-lm-head short-conv sliding-attention nf4-experts train-step-8 train-step profile train-families quality} "
mkdir -p "$out"
site=${FASTMOE_SITE:-/tmp/fastmoe-site}
rm -rf "$site" && mkdir -p "$site"
cp -r fastmoe "$site/fastmoe" && cp -r kernels "$site/fastmoe/kernels"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
fi
export PYTHONPATH="$site:$PWD/benchmarks" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
# One id for every record of this session, so the summary at the end shows this session's numbers only.
export FASTMOE_BENCH_RUN="${FASTMOE_BENCH_RUN:-$(date -u +%Y%m%dT%H%M%S)}" out
# A second invocation with the same OUT_DIR (other steps, same device call) appends to what the first wrote.
[ -e "$out/RESULTS.md" ] || cp benchmarks/RESULTS.md "$out/RESULTS.md"
[ -e "$out/results.jsonl" ] || cp benchmarks/results.jsonl "$out/results.jsonl" 2>/dev/null || true
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT, keep going on failure
    local name=$1 limit=$2; shift 2
    [[ "$steps" == *" $name "* ]] || return 0
    echo "=== $name"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 12 "$out/$name.log"
    [ $rc -eq 0 ] || { echo "=== $name failed (exit $rc)"; status=1; }
}

step gpu-tests 240 python3 -P -m pytest -m gpu tests -q -p no:cacheprovider
step moe-block 150 python3 -P benchmarks/bench_moe_block.py --results "$out/RESULTS.md"
step lora-linear 90 python3 -P benchmarks/bench_lora_linear.py --results "$out/RESULTS.md"
step fused-lm-head 120 python3 -P benchmarks/bench_fused_lm_head.py --jsonl "$out/results.jsonl"
step short-conv 90 python3 -P benchmarks/bench_short_conv.py --results "$out/RESULTS.md"
step sliding-attention 60 python3 -P benchmarks/bench_sliding_window_attention.py --results "$out/RESULTS.md"
step nf4-experts 150 python3 -P benchmarks/bench_nf4_experts.py --results "$out/RESULTS.md" ${NF4_CONFIGS:+--nf4-configs "$NF4_CONFIGS"}
step train-step-8 150 python3 -P benchmarks/bench_train_step.py --preset trinity-mini --layers 8 --steps 4 \
    --variants "${TRAIN_VARIANTS_8:-hf-grouped_mm,fastmoe,fastmoe-no-ckpt}" --results "$out/RESULTS.md" \
    --jsonl "$out/results.jsonl"
step train-step "${TRAIN_STEP_LIMIT:-240}" python3 -P benchmarks/bench_train_step.py --preset trinity-mini --layers 32 --steps 3 \
    --variants "${TRAIN_VARIANTS:-hf-grouped_mm,fastmoe}" --results "$out/RESULTS.md" --jsonl "$out/results.jsonl"
step profile 150 python3 -P benchmarks/bench_train_step.py --preset trinity-mini --layers 8 --steps 2 \
    --variants fastmoe --profile --trace "$out/trace" --no-record

# train-families: one process per family preset, each under its own limit in seconds (a hang or a crash costs that
# family only). FAMILY_PRESETS, FAMILY_SHAPES, FAMILY_VARIANTS and QUALITY_ARGS override the defaults (a CPU smoke
# run of this script: FAMILY_PRESETS="cohere-tiny:300" FAMILY_SHAPES=1x16 QUALITY_ARGS="--tiny --steps 2").
train_families() {
    local rc=0 spec preset limit
    for spec in ${FAMILY_PRESETS:-trinity-mini:150 lfm2-8b-a1b:75 jetmoe-8b:75 command-r-layers:75}; do
        preset=${spec%:*} limit=${spec#*:}
        echo "--- $preset"
        timeout "$limit" python3 -P benchmarks/bench_train_step.py --preset "$preset" --steps 3 \
            --shapes "${FAMILY_SHAPES:-1x4096,4x2048}" --variants "${FAMILY_VARIANTS:-hf,fastmoe}" \
            --results "$out/RESULTS.md" --jsonl "$out/results.jsonl" || { echo "--- $preset failed (exit $?)"; rc=1; }
    done
    return $rc
}
export -f train_families
step train-families 390 bash -c train_families
# shellcheck disable=SC2086  # QUALITY_ARGS is a list of arguments
step quality 150 python3 -P benchmarks/quality_run.py --out "$out/quality_run.json" \
    --plot "$out/quality_loss.png" --results "$out/RESULTS.md" ${QUALITY_ARGS:-}

# Children of torchrun run `python benchmarks/bench_multi_gpu.py`: sys.path[0] is benchmarks/, so they too import
# the fastmoe copied into $site.
multi_gpu() {  # multi_gpu NAME GPUS ARGS...
    local name=$1 gpus=$2; shift 2
    step "$name" 300 python3 -m torch.distributed.run --standalone --nproc-per-node "$gpus" \
        benchmarks/bench_multi_gpu.py --results "$out/RESULTS.md" "$@"
}
[[ "$steps" == *" multi-gpu "* ]] && steps="$steps multi-gpu-ddp multi-gpu-fsdp2 multi-gpu-fsdp2-full multi-gpu-ddp-nf4 multi-gpu-one "
multi_gpu multi-gpu-ddp 2 --strategy ddp
multi_gpu multi-gpu-fsdp2 2 --strategy fsdp2
multi_gpu multi-gpu-fsdp2-full 2 --strategy fsdp2 --full-finetuning
multi_gpu multi-gpu-ddp-nf4 2 --strategy ddp --nf4-experts
multi_gpu multi-gpu-one 1 --strategy ddp --batch 4

if [[ "$steps" == *" train-step "* || "$steps" == *" train-families "* || "$steps" == *" quality "* ]]; then
    echo "=== summary of this session ($FASTMOE_BENCH_RUN)"
    python3 -P benchmarks/plot_results.py --summary --run "$FASTMOE_BENCH_RUN" --results "$out/results.jsonl" \
        --quality "$out/quality_run.json"
fi
exit $status
