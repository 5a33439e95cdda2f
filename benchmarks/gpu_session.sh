#!/usr/bin/env bash
# Everything fastmoe checks and times on a GPU, in one call (the lent GPU machines have no package index and
# limited device time). Run from the repository root:
#
#     bash benchmarks/gpu_session.sh [OUT_DIR [STEP ...]]
#
# STEPs (default: all, in this order): gpu-tests moe-block nf4-experts train-step-8 train-step profile.
# multi-gpu (never by default: it needs 2 GPUs, e.g. the nvidia-h200-x2 machine) runs benchmarks/bench_multi_gpu.py
# five times: multi-gpu-ddp, multi-gpu-fsdp2 (LoRA), multi-gpu-fsdp2-full, multi-gpu-ddp-nf4 on 2 GPUs, and multi-gpu-one,
# 1 GPU with the same global batch; each can also be named alone (a few minutes each, most of it start-up).
#
# 1. installs fastmoe by copying (fastmoe/ plus kernels/ as fastmoe/kernels) into a private site folder, and any
#    wheels carried in .whl/ (trl, datasets, bitsandbytes are not on those machines);
# 2. runs every `gpu`-marked test (bf16 kernels against their references);
# 3. runs the benchmarks; each appends its table to OUT_DIR/RESULTS.md (copy it into benchmarks/RESULTS.md).
# pytest is started with -P so the checkout's root (which has fastmoe/ without kernels/) is not on sys.path; a
# benchmark script's own folder (benchmarks/) is first on its path instead, which is what its sibling imports need.
set -uo pipefail
out="${1:-${OUT:-/tmp/fastmoe-gpu}}"
shift || true
steps=" ${*:-gpu-tests moe-block nf4-experts train-step-8 train-step profile} "
mkdir -p "$out"
site=/tmp/fastmoe-site
rm -rf "$site" && mkdir -p "$site"
cp -r fastmoe "$site/fastmoe" && cp -r kernels "$site/fastmoe/kernels"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
fi
export PYTHONPATH="$site" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
cp benchmarks/RESULTS.md "$out/RESULTS.md"
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
step moe-block 150 python3 benchmarks/bench_moe_block.py --results "$out/RESULTS.md"
step nf4-experts 120 python3 benchmarks/bench_nf4_experts.py --results "$out/RESULTS.md"
step train-step-8 150 python3 benchmarks/bench_train_step.py --preset trinity-mini --layers 8 --steps 4 \
    --variants "${TRAIN_VARIANTS_8:-hf-grouped_mm,fastmoe,fastmoe-no-ckpt}" --results "$out/RESULTS.md"
step train-step 240 python3 benchmarks/bench_train_step.py --preset trinity-mini --layers 32 --steps 3 \
    --variants "${TRAIN_VARIANTS:-hf-grouped_mm,fastmoe}" --results "$out/RESULTS.md"
step profile 150 python3 benchmarks/bench_train_step.py --preset trinity-mini --layers 8 --steps 2 \
    --variants fastmoe --profile --no-record
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
exit $status
