#!/usr/bin/env bash
# Everything fastmoe checks and times on a GPU, in one call (the lent GPU machines have no package index and
# limited device time). Run from the repository root:
#
#     bash benchmarks/gpu_session.sh [OUT_DIR [STEP ...]]
#
# STEPs (default: all but multi-gpu, in this order): gpu-tests sft generate grpo decode-ops moe-block lora-linear fused-lm-head short-conv sliding-attention
# nf4-experts loss norm-rope train-step-8 train-step profile train-families quality. Together they take longer than
# one 10-minute call: name a few per call, e.g.
#
#     bash benchmarks/gpu_session.sh "$OUT" sft                                    # Trinity-Mini, 1x4096, ~4 min
#     SFT_PRESETS="lfm2-8b-a1b jetmoe-8b aya-expanse-8b" bash benchmarks/gpu_session.sh "$OUT" sft   # ~8 min
#     SFT_PRESETS="qwen3-30b-a3b mixtral-8x7b qwen1.5-moe-a2.7b" SFT_ARGS="--layers 8 --load direct" bash benchmarks/gpu_session.sh "$OUT" sft
#     # QLoRA (transformers' 4-bit loading needs a checkpoint; fastmoe's also builds directly, layer by layer):
#     # JetMoe-8B at full depth, Qwen3-30B-A3B's attention-only memory, Mixtral-8x7B's 32 layers
#     SFT_PRESETS=jetmoe-8b SFT_ARGS="--quantization 4bit --load checkpoint" bash benchmarks/gpu_session.sh "$OUT" sft
#     # the NF4 stacks dequantized for torch's products (the default where rows pay) against fastmoe's NF4 kernels alone
#     SFT_ONE_PROCESS=1 SFT_PRESETS=jetmoe-8b SFT_ARGS="--quantization 4bit --load checkpoint --fastmoe-base-products
#         triton" bash benchmarks/gpu_session.sh "$OUT" sft
#     SFT_PRESETS=qwen3-30b-a3b SFT_IMPLEMENTATIONS=fastmoe SFT_ARGS="--layers 16 --quantization 4bit --load checkpoint
#         --targets attention" bash benchmarks/gpu_session.sh "$OUT" sft
#     SFT_PRESETS=mixtral-8x7b SFT_IMPLEMENTATIONS=fastmoe SFT_ARGS="--quantization 4bit --load direct"
#         bash benchmarks/gpu_session.sh "$OUT" sft
#     # an SFT data set as users have it: 8 examples of long-tailed lengths a step, padded by trl's collator (fastmoe
#     # packs them: every step another number of tokens, so whether the layer graphs' shapes cover the steps shows)
#     # (--fastmoe-graph-shapes 12: also with graphs for 12 lengths; the records' replayed_steps and
#     # tokens_per_s_replayed give the steps that replayed graphs only, what a long run approaches)
#     SFT_ONE_PROCESS=1 SFT_SHAPES="8x1024 2x4096" SFT_ARGS="--layers 8 --load direct --data examples --warmup 30
#         --steps 40 --profile-steps 1 --fastmoe-graph-shapes 12" bash benchmarks/gpu_session.sh "$OUT" sft
#     # a short run from its first step (as the notebooks' 60 steps): the first rows rounded coarser while the graphs'
#     # places fill (the default) against a quarter octave from the first row (0), same process
#     SFT_ONE_PROCESS=1 SFT_IMPLEMENTATIONS=fastmoe SFT_SHAPES="2x2048 8x1024" SFT_ARGS="--layers 8 --load direct
#         --data examples --warmup 0 --steps 60 --profile-steps 0 --fastmoe-coarse-rounding-rows 0" bash benchmarks/gpu_session.sh "$OUT" sft
#     # long context (issue #17): the longest sequence within 24 GB, one or two steps per length
#     SFT_SHAPES="1x65536 1x98304 1x131072" SFT_IMPLEMENTATIONS=fastmoe SFT_ARGS="--layers 8 --load direct
#         --memory-limit-gb 24 --warmup 1 --steps 1 --profile-steps 0 --fastmoe-offloaded" bash benchmarks/gpu_session.sh "$OUT" sft
#     # the 4-bit decode step with a decode setting each way (--gemv-mma 0,1, --gemv-loop-stages 1,3,
#     # --router-gemv-tokens 16,0) and without the experts' LoRA (--targets default-without-experts)   (PYTHONPATH below)
#     python3 -P benchmarks/bench_generate.py --preset lfm2-8b-a1b --layers 24 --batches 1,8 --new-tokens 128
#         --quantization 4bit --load checkpoint --implementations fastmoe --gemv-mma 0,1
#     # what bounds the NF4 GEMVs of one token's experts block: tensor cores or not, K splits, fp32 against
#     # double-quantized absmax, without LoRA (each variant printed as timed; the compiles take minutes)
#     python3 -P benchmarks/bench_decode_ops.py one-token-mma
#     # the Trainer's and trl's per-step host work as fastmoe ships it, against those ops off, in one run
#     SFT_ONE_PROCESS=1 SFT_IMPLEMENTATIONS=fastmoe SFT_ARGS="--layers 8 --load direct --logging-steps 1,10
#         --fastmoe-without-ops trainer_step,trl_sft_metrics" bash benchmarks/gpu_session.sh "$OUT" sft
#     # what is live at a step's peak (benchmarks/memory_peak.py), eager layers
#     SFT_ARGS="--layers 8 --load direct --memory-profile 1 --trace-dir $OUT/traces --fastmoe-without-graphs" ...
#
# sft (issue #16) is the user's training step, benchmarks/bench_sft.py: one process per (preset, shape,
# implementation), each under its own limit, so that a hang or a crash costs that case only. Variables:
# SFT_PRESETS (default trinity-mini), SFT_SHAPES (default 1x4096; e.g. "4x2048 1x16384"), SFT_IMPLEMENTATIONS
# (default "transformers fastmoe"), SFT_CASE_LIMIT (seconds per case, default 240; the step stops at 590 s, so name
# at most 590 / SFT_CASE_LIMIT cases per call), SFT_ARGS (more bench_sft.py arguments, e.g. "--logging-steps 10",
# "--layers 8 --quantization 4bit", "--load direct", "--trace-steps 1 --trace-dir /tmp/traces": where the GPU waits
# on the host, benchmarks/host_gaps.py's summary printed per case, with each kernel's GPU time by the Python that
# launched it: one by one with "--fastmoe-without-graphs --fastmoe-variants-only"). SFT_ONE_PROCESS=1 runs all the cases in one bench_sft.py
# process instead (imports and Triton compilation paid once; memory freed between cases; cases that would end after
# SFT_BUDGET seconds, default 560, are skipped), at the price of one crash costing the cases after it; there
# SFT_WRAPPER=benchmarks/triton_compiles.py prints every Triton compile as it happens and a summary per kernel.
#
# generate (issue #18) is bench_generate.py: decode tokens/s with the adapter attached, fastmoe against transformers
# + peft, Trinity-Mini at 8 layers (batches 1, 8, 64) and LFM2-8B-A1B (batches 1, 8), prompt 512 (~4 min);
# grpo is bench_grpo.py: one trl GRPO step's generation phase without vLLM (8 completions of 256 tokens after a 512-token
# prompt), fastmoe's rollouts on its decode path against transformers + peft (~4 min);
# decode-ops prints bench_decode_ops.py's launch-configuration sweep of the decode step's ops (~2 min).
# decode-ablations (never by default) times LFM2-8B-A1B's 4-bit decode step (batches 1 and 8) with each switch of the
# one-token experts block not yet on by default both ways (--gemv-predecoded-absmax, --down-xa-in-gate-up), then
# without the experts' LoRA, then prints the one-token block's variants (bench_decode_ops.py one-token-mma): ~9 min.
#
# generate-ab (never by default; ~6 min) times the 4-bit decode step with an earlier revision's kernels against the
# checkout's (see the step).
#
# ncu-decode and ncu-train-moe (never by default) read Nsight Compute's counters of the 4-bit decode kernels and of
# one training experts block's kernels (~2-4 min each).
#
# fused-lm-head (issue #16) times trl's fused LM head against fastmoe's at Trinity-Mini's head, 4k and 16k tokens
# (120-second limit).
#
# multi-gpu (never by default: it needs 2 GPUs, e.g. the nvidia-h200-x2 machine) runs benchmarks/bench_multi_gpu.py
# five times: multi-gpu-ddp, multi-gpu-fsdp2 (LoRA), multi-gpu-fsdp2-full, multi-gpu-ddp-nf4 on 2 GPUs, and multi-gpu-one,
# 1 GPU with the same global batch; each can also be named alone (a few minutes each, most of it start-up).
#
# 1. installs fastmoe by copying (fastmoe/ plus kernels/ as fastmoe/kernels) into a private site folder, and any
#    wheels carried in .whl/ (trl, datasets, bitsandbytes are not on those machines);
# 2. runs every `gpu`-marked test (bf16 kernels against their references);
# 3. runs the benchmarks; each appends its records to OUT_DIR/results.jsonl (a copy of benchmarks/results.jsonl made
#    by the first call into OUT_DIR) and the quality run its losses to OUT_DIR/quality_run.json;
# 4. writes OUT_DIR/RESULTS.md (benchmarks/report.py over OUT_DIR/results.jsonl) and prints this session's tables.
# Then copy OUT_DIR/results.jsonl (and quality_run.json) over benchmarks/' and run python benchmarks/report.py;
# charts: python benchmarks/plot_results.py on any machine with matplotlib.
# Other variables: TRAIN_STEP_LIMIT (seconds, default 240), TRAIN_VARIANTS (train-step, 32 layers) and TRAIN_VARIANTS_8
# (train-step-8) list bench_train_step.py variants, e.g. "fastmoe-4bit,fastmoe-4bit-adamw8bit"; NF4_CONFIGS sweeps the
# NF4 GEMMs' launch configuration in nf4-experts ("128:64:4:3,128:128:8:3": BLOCK_N:BLOCK_K:warps:stages, printed
# only); MOE_BLOCK_ARGS adds bench_moe_block.py arguments in moe-block ("--tokens 4096,16384 --shapes
# Mixtral-8x7B,JetMoe-8B"), MOE_BLOCK_LIMIT its seconds (default 150); GPU_TEST_ARGS replaces gpu-tests' pytest
# arguments ("tests"; e.g. "-n 4 -rfE tests/kernels/moe": four processes, with pytest-xdist among the carried wheels,
# compile the kernels in parallel), GPU_TESTS_LIMIT its seconds (default 240); FAMILY_* and QUALITY_ARGS below.
# FASTMOE_BENCH_RUN names the session (default: the start time), so that several calls can share one id.
# Python is started with -P so the checkout's root (which has fastmoe/ without kernels/) is not on sys.path; -P also
# keeps a script's own folder off it, so benchmarks/ is put on PYTHONPATH for the scripts' `import common`.
set -uo pipefail
out="${1:-${OUT:-/tmp/fastmoe-gpu}}"
shift || true
steps=" ${*:-gpu-tests sft generate grpo decode-ops moe-block lora-linear fused-lm-head short-conv sliding-attention nf4-experts loss norm-rope train-step-8 train-step profile train-families quality} "
mkdir -p "$out"
site=${FASTMOE_SITE:-/tmp/fastmoe-site}
site_dir=$site
rm -rf "$site" && mkdir -p "$site"
[ -L fastmoe/kernels ] && rm fastmoe/kernels  # the link below, from an earlier call on this machine
cp -r fastmoe "$site/fastmoe" && cp -r kernels "$site/fastmoe/kernels"
# Tests that start a Python subprocess (without -P) in the checkout import its fastmoe/, which lacks the kernels
# subpackage that `pip install -e .` maps from kernels/: a link there makes that copy whole too.
ln -s ../kernels fastmoe/kernels
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
fi
export PYTHONPATH="$site:$PWD/benchmarks" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
# One id for every record of this session, so the summary at the end shows this session's numbers only.
export FASTMOE_BENCH_RUN="${FASTMOE_BENCH_RUN:-$(date -u +%Y%m%dT%H%M%S)}" out site_dir
# A second invocation with the same OUT_DIR (other steps, same device call) appends to what the first wrote.
[ -e "$out/results.jsonl" ] || cp benchmarks/results.jsonl "$out/results.jsonl"
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

# sft: one process per case, each under SFT_CASE_LIMIT; its one-line summary is printed as it ends.
sft_cases() {
    local rc=0 preset shape impl
    if [ -n "${SFT_ONE_PROCESS:-}" ]; then
        # shellcheck disable=SC2086  # SFT_ARGS is a list of arguments
        python3 -P ${SFT_WRAPPER:-} benchmarks/bench_sft.py --preset "$(echo ${SFT_PRESETS:-trinity-mini} | tr ' ' ,)" \
            --shapes "$(echo ${SFT_SHAPES:-1x4096} | tr ' ' ,)" \
            --implementations "$(echo ${SFT_IMPLEMENTATIONS:-transformers fastmoe} | tr ' ' ,)" \
            --budget-s "${SFT_BUDGET:-560}" --jsonl "$out/results.jsonl" ${SFT_ARGS:-}
        return $?
    fi
    for preset in ${SFT_PRESETS:-trinity-mini}; do
        for shape in ${SFT_SHAPES:-1x4096}; do
            for impl in ${SFT_IMPLEMENTATIONS:-transformers fastmoe}; do
                # shellcheck disable=SC2086  # SFT_ARGS is a list of arguments
                timeout "${SFT_CASE_LIMIT:-240}" python3 -P benchmarks/bench_sft.py --preset "$preset" --shapes "$shape" \
                    --implementations "$impl" --jsonl "$out/results.jsonl" ${SFT_ARGS:-} \
                    || { echo "--- sft $preset $shape $impl failed (exit $?)"; rc=1; }
            done
        done
    done
    return $rc
}
export -f sft_cases

jsonl=(--jsonl "$out/results.jsonl")
# shellcheck disable=SC2086  # GPU_TEST_ARGS is a list of arguments
step gpu-tests "${GPU_TESTS_LIMIT:-240}" python3 -P -m pytest -m gpu -q -p no:cacheprovider ${GPU_TEST_ARGS:-tests}
step sft 590 bash -c sft_cases
[[ "$steps" == *" sft "* ]] && grep -E "^(sft |--- sft)" "$out/sft.log"
# shellcheck disable=SC2086  # MOE_BLOCK_ARGS is a list of arguments
step moe-block "${MOE_BLOCK_LIMIT:-150}" python3 -P benchmarks/bench_moe_block.py "${jsonl[@]}" ${MOE_BLOCK_ARGS:-}
step lora-linear 90 python3 -P benchmarks/bench_lora_linear.py "${jsonl[@]}"
step generate 150 python3 -P benchmarks/bench_generate.py "${jsonl[@]}" --preset trinity-mini --layers 8 --batches 1,8,64 --implementations fastmoe
step generate 120 python3 -P benchmarks/bench_generate.py "${jsonl[@]}" --preset trinity-mini --layers 8 --batches 1,8,64 --new-tokens 32 --repeats 2 --implementations transformers
step generate 120 python3 -P benchmarks/bench_generate.py "${jsonl[@]}" --preset lfm2-8b-a1b --layers 24 --batches 1,8 --implementations fastmoe
step generate 120 python3 -P benchmarks/bench_generate.py "${jsonl[@]}" --preset lfm2-8b-a1b --layers 24 --batches 1,8 --new-tokens 32 --repeats 2 --implementations transformers
step grpo 300 python3 -P benchmarks/bench_grpo.py "${jsonl[@]}" --preset trinity-mini --layers 8 --generations 8 --prompt 512 --new-tokens 256
step decode-ops 300 python3 -P benchmarks/bench_decode_ops.py
# generate-ab: the 4-bit decode step with an earlier revision's kernels against the checkout's, in one call (timings
# compare only on one machine). The earlier revision travels as .ab-base/ (git-ignored: `rm -rf .ab-base && mkdir
# .ab-base && git archive REV fastmoe kernels | tar -x -C .ab-base`, then pass it in the device call's carry). Each
# case runs base, checkout, base, checkout (Trinity-Mini's once each); the records go to OUT/ab-base.jsonl and
# OUT/ab-checkout.jsonl, not to results.jsonl (the base's are not the code's).
ab_generate() {
    [ -d .ab-base/kernels ] || { echo "generate-ab: no .ab-base/ (see gpu_session.sh)"; return 1; }
    local base_site=/tmp/fastmoe-ab-base rc=0 model tree site
    rm -rf "$base_site" && mkdir -p "$base_site" && cp -r .ab-base/fastmoe "$base_site/fastmoe" \
        && cp -r .ab-base/kernels "$base_site/fastmoe/kernels"
    for model in "lfm2-8b-a1b --layers 24 --batches 1,8" "trinity-mini --layers 8 --batches 1"; do
        local order="base checkout base checkout"
        [[ $model == trinity* ]] && order="base checkout"
        for tree in $order; do
            site=$site_dir; [ $tree = base ] && site=$base_site:$site_dir
            echo "--- $tree $model"
            # shellcheck disable=SC2086  # model is a list of arguments
            PYTHONPATH=$site:$PWD/benchmarks timeout 150 python3 -P benchmarks/bench_generate.py --preset $model \
                --new-tokens 128 --quantization 4bit --load checkpoint --implementations fastmoe --keep-checkpoints \
                --jsonl "$out/ab-$tree.jsonl" 2>&1 | grep -E "tok/s|Error" || rc=1
        done
    done
    return $rc
}
export -f ab_generate
step generate-ab 580 bash -c ab_generate
[[ "$steps" == *" generate-ab "* ]] && grep -E "^(--- |.*tok/s)" "$out/generate-ab.log"
lfm2_4bit=(--preset lfm2-8b-a1b --layers 24 --batches 1,8 --new-tokens 128 --quantization 4bit --load checkpoint
           --implementations fastmoe --keep-checkpoints)
step decode-ablations 220 python3 -P benchmarks/bench_generate.py "${jsonl[@]}" "${lfm2_4bit[@]}" \
    --gemv-predecoded-absmax 0,1 --down-xa-in-gate-up 0,1
step decode-ablations 90 python3 -P benchmarks/bench_generate.py "${jsonl[@]}" "${lfm2_4bit[@]}" \
    --targets default-without-experts
step decode-ablations 220 python3 -P benchmarks/bench_decode_ops.py one-token-mma
# ncu-decode / ncu-train-moe: Nsight Compute's counters of the 4-bit decode kernels and of one training experts block's
# kernels (benchmarks/ncu_kernels.py's cases, in order); the whole report in OUT/ncu-decode.log / ncu-train-moe.log,
# one line a kernel printed
ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -n 1)
ncu_args=(--clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy
          --section LaunchStats --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis
          --section MemoryWorkloadAnalysis --section InstructionStats
          --metrics 'regex:(smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio|sm__inst_executed_pipe_.*\.avg\.pct_of_peak_sustained_active)$')
step ncu-decode 240 "${ncu_bin:-ncu}" "${ncu_args[@]}" -k 'regex:gate_up_kernel|down_kernel|few_rows|grouped_mm' \
    python3 -P benchmarks/ncu_kernels.py decode
step ncu-train-moe 300 "${ncu_bin:-ncu}" "${ncu_args[@]}" -k 'regex:_grouped|_schedule' \
    python3 -P benchmarks/ncu_kernels.py train-moe
for report in ncu-decode ncu-train-moe; do  # one line a kernel (benchmarks/ncu_summary.py)
    [[ "$steps" == *" $report "* && -s "$out/$report.log" ]] && python3 -P benchmarks/ncu_summary.py "$out/$report.log"
done
step fused-lm-head 120 python3 -P benchmarks/bench_fused_lm_head.py "${jsonl[@]}"
step short-conv 90 python3 -P benchmarks/bench_short_conv.py "${jsonl[@]}"
step sliding-attention 60 python3 -P benchmarks/bench_sliding_window_attention.py "${jsonl[@]}"
step nf4-experts 150 python3 -P benchmarks/bench_nf4_experts.py "${jsonl[@]}" ${NF4_CONFIGS:+--nf4-configs "$NF4_CONFIGS"}
step loss 90 python3 -P benchmarks/bench_linear_cross_entropy.py "${jsonl[@]}"
step norm-rope 90 python3 -P benchmarks/bench_norm_rope.py "${jsonl[@]}"
step train-step-8 150 python3 -P benchmarks/bench_train_step.py --preset trinity-mini --layers 8 --steps 4 \
    --variants "${TRAIN_VARIANTS_8:-hf-grouped_mm,fastmoe,fastmoe-no-ckpt}" "${jsonl[@]}"
step train-step "${TRAIN_STEP_LIMIT:-240}" python3 -P benchmarks/bench_train_step.py --preset trinity-mini --layers 32 \
    --steps 3 --variants "${TRAIN_VARIANTS:-hf-grouped_mm,fastmoe}" "${jsonl[@]}"
step profile 150 python3 -P benchmarks/bench_train_step.py --preset trinity-mini --layers 8 --steps 2 \
    --variants fastmoe --profile --trace "$out/trace" --no-record

# train-families: the plain-loop step, one process per family preset, each under its own limit in seconds (a hang or a
# crash costs that family only). FAMILY_PRESETS, FAMILY_SHAPES, FAMILY_VARIANTS and QUALITY_ARGS override the
# defaults (a CPU smoke run of this script: FAMILY_PRESETS="cohere-tiny:300" FAMILY_SHAPES=1x16 QUALITY_ARGS="--tiny
# --steps 2").
train_families() {
    local rc=0 spec preset limit
    for spec in ${FAMILY_PRESETS:-trinity-mini:150 lfm2-8b-a1b:75 jetmoe-8b:75 command-r-layers:75}; do
        preset=${spec%:*} limit=${spec#*:}
        echo "--- $preset"
        timeout "$limit" python3 -P benchmarks/bench_train_step.py --preset "$preset" --steps 3 \
            --shapes "${FAMILY_SHAPES:-1x4096,4x2048}" --variants "${FAMILY_VARIANTS:-hf,fastmoe}" \
            --jsonl "$out/results.jsonl" || { echo "--- $preset failed (exit $?)"; rc=1; }
    done
    return $rc
}
export -f train_families
step train-families 390 bash -c train_families
# shellcheck disable=SC2086  # QUALITY_ARGS is a list of arguments
step quality 150 python3 -P benchmarks/quality_run.py --out "$out/quality_run.json" "${jsonl[@]}" ${QUALITY_ARGS:-}

# Children of torchrun run `python benchmarks/bench_multi_gpu.py`: sys.path[0] is benchmarks/, so they import common.py
# from there and the fastmoe copied into $site.
multi_gpu() {  # multi_gpu NAME GPUS ARGS...
    local name=$1 gpus=$2; shift 2
    step "$name" 300 python3 -m torch.distributed.run --standalone --nproc-per-node "$gpus" \
        benchmarks/bench_multi_gpu.py "${jsonl[@]}" "$@"
}
[[ "$steps" == *" multi-gpu "* ]] && steps="$steps multi-gpu-ddp multi-gpu-fsdp2 multi-gpu-fsdp2-full multi-gpu-ddp-nf4 multi-gpu-one "
multi_gpu multi-gpu-ddp 2 --strategy ddp
multi_gpu multi-gpu-fsdp2 2 --strategy fsdp2
multi_gpu multi-gpu-fsdp2-full 2 --strategy fsdp2 --full-finetuning
multi_gpu multi-gpu-ddp-nf4 2 --strategy ddp --nf4-experts
multi_gpu multi-gpu-one 1 --strategy ddp --batch 4

python3 -P benchmarks/report.py --results "$out/results.jsonl" --out "$out/RESULTS.md"
echo "=== this session's tables ($FASTMOE_BENCH_RUN)"
python3 -P benchmarks/report.py --results "$out/results.jsonl" --run "$FASTMOE_BENCH_RUN" --measured-only --out -
exit $status
