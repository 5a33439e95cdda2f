"""The benchmark harness's own arithmetic and output: FLOP counting of each preset (on meta-device models, so
nothing is allocated), LoRA target sets, GPU-activity accounting, the page report.py generates (and that the
committed one is generated), the charts, the CPU smoke runs of bench_sft.py and bench_short_conv.py, and the cases
sweep_expert_configs.py times (in the interpreter, at toy sizes)."""

import importlib
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_decode_ops  # noqa: E402
import bench_fused_lm_head  # noqa: E402
import bench_generate  # noqa: E402
import bench_grpo  # noqa: E402
import bench_sft  # noqa: E402
import bench_short_conv  # noqa: E402
import bench_sliding_window_attention  # noqa: E402
import common  # noqa: E402
import host_gaps  # noqa: E402
import graph_places  # noqa: E402
import memory_peak  # noqa: E402
import ncu_summary  # noqa: E402
import plot_results  # noqa: E402
import triton_compiles  # noqa: E402
import report  # noqa: E402
import sass_report  # noqa: E402
import sweep_expert_configs  # noqa: E402


@pytest.mark.parametrize("script", sorted(path.stem for path in BENCHMARKS.glob("*.py")))
def test_every_benchmark_script_imports(script):
    """Most scripts here need a GPU and run in no CI job: importing them catches a name they import that fastmoe no
    longer has (bench_sliding_window_attention.py imported a removed helper for a day)."""
    importlib.import_module(script)


def test_one_token_sweep_scales_splits_with_gemv_splits_signature():
    """bench_decode_ops' stand-in for gemv_split takes the K step as gemv_split does (one_token passes 128 for its
    tensor-core steps): at scale 1 it is gemv_split, at 2 twice its splits."""
    from fastmoe.kernels.split_k import gemv_split

    for programs, k, block_k in [(112, 2048, 128), (128, 1792, 128), (96, 2048, 64)]:
        assert bench_decode_ops.scaled_gemv_split(1.0)(programs, k, block_k) == gemv_split(programs, k, block_k)
        assert bench_decode_ops.scaled_gemv_split(2.0)(programs, k, block_k) == 2 * gemv_split(programs, k, block_k)
    assert bench_decode_ops.scaled_gemv_split(0.5)(112, 2048) == max(1, gemv_split(112, 2048) // 2)


def test_sass_report_compiles_a_decode_kernel_for_hopper_without_a_gpu(tmp_path):
    """sass_report compiles one-token's NF4 down GEMV for sm_90 with the CPU's Triton (its ptxas and cuobjdump; in a
    process of its own, as the tests' kernels are the interpreter's) and finds its main loop: the tensor-core products
    and the byte-permute decode in it. Every case's constexprs are arguments of its kernel."""
    import os
    import subprocess

    for case in sass_report.one_token_cases() + sass_report.grouped_decode_cases() + sass_report.grouped_train_cases():
        assert set(case.constexprs) <= set(case.kernel.arg_names), case.label
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, str(BENCHMARKS / "sass_report.py"), "one-token", "--only",
                             "down, NF4, no LoRA", "--sass-dir", str(tmp_path)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("one-token down, NF4, no LoRA"))
    registers = int(line.split(": ")[1].split(" registers")[0])
    assert 0 < registers <= 255 and "HMMA:" in line and "PRMT:" in line
    sass = (tmp_path / "one_token_down_NF4_no_LoRA.sass").read_text()
    body = sass_report.loop_body(sass)
    assert body and sum(sass_report.opcode(i) == "HMMA" for i in body) > 0


_NCU_KERNEL = """
  _down_kernel (32, 16, 1)x(128, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Section: Command line profiler metrics
    sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active                  %        46.67
    sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active                  %        11.95
    sm__inst_executed_pipe_fma_type_fp16.avg.pct_of_peak_sustained_active        %            0
    smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio  inst         1.48
    smsp__average_warps_issue_stalled_selected_per_issue_active.ratio         inst            1
    smsp__average_warps_issue_stalled_wait_per_issue_active.ratio             inst         0.92
    Section: GPU Speed Of Light Throughput
    Elapsed Cycles                cycle       25,794
    DRAM Throughput                   %        17.60
    Duration                         us        13.76
    SM Active Cycles              cycle    18,279.08
    Executed Ipc Active   inst/cycle         1.86
    Local Memory Spilling Requests                                0
    Registers Per Thread             register/thread              96
    Achieved Active Warps Per SM           warp        13.45
"""


def test_op_overhead_times_every_op_with_its_kernels_stubbed(tmp_path):
    """bench_op_overhead replaces every kernel launch of fastmoe's kernel modules by a no-op (kernels launched from a
    module it did not name ran in the interpreter, and a schedule left uninitialised indexed out of bounds) and
    records each op's host time on both paths."""
    import subprocess

    jsonl = tmp_path / "overhead.jsonl"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bench_op_overhead.py"), "--calls", "10", "--jsonl",
                             str(jsonl)], env={**os.environ, "PYTHONPATH": str(BENCHMARKS)}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert {(r["op"], r["path"]) for r in records} == {
        (op, path) for op in ("rms_norm", "qk_norm_rope", "attention_gate", "route_sigmoid_topk", "moe_experts")
        for path in ("eager", "custom_op")}
    # With its kernels stubbed an op's host time is tens of microseconds; one kernel left in the interpreter takes
    # milliseconds.
    assert all(0 < r["fwd_us"] < 5000 for r in records), records


def test_ncu_summary_reads_a_kernel_of_a_text_report():
    """One line a kernel from ncu's text report: time, DRAM, the SMs' busy share, pipes, the largest stalls (not
    'selected', which is issuing), registers and warps; kernels split at their headers."""
    report = "==PROF== Disconnected\n" + _NCU_KERNEL + _NCU_KERNEL.replace("_down_kernel", "_gate_up_kernel")
    found = ncu_summary.kernels(report)
    assert [header.split()[0] for header, _ in found] == ["_down_kernel", "_gate_up_kernel"]
    line = ncu_summary.summarise(*found[0])
    assert line.startswith("_down_kernel grid (32, 16, 1) block (128, 1, 1): 13.8 us")
    for part in ("DRAM 18%", "SMs busy 71%", "IPC 1.86", "pipes alu 47% fma 12%",
                 "stalls long_scoreboard 1.48 wait 0.92", "96 registers", "13.4 warps/SM"):
        assert part in line, part
    assert "selected" not in line and "spill" not in line and "fma_type" not in line


def meta_model(preset: str):
    import transformers

    config = common.make_config(common.PRESETS[preset])
    with torch.device("meta"):
        return config, transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("preset, total, active", [
    ("lfm2-8b-a1b", 8.34e9, 1.56e9),  # LiquidAI: 8.3B total, 1.5B active
    ("jetmoe-8b", 8.52e9, 2.33e9),  # JetMoe: 8B total, 2.2B active (without the lm_head)
    ("aya-expanse-8b", 8.03e9, 8.03e9),  # dense; the tied embedding counts once, as the lm_head
    ("qwen3-30b-a3b", 30.5e9, 3.04e9),  # Qwen: 30.5B total, 3.3B active with the 0.31B input embedding
    ("mixtral-8x7b", 46.7e9, 12.75e9),  # Mistral: 46.7B total, 12.9B active with the 0.13B input embedding
    ("qwen1.5-moe-a2.7b", 14.3e9, 2.38e9),  # Qwen: 14.3B total, 2.7B active with the 0.31B input embedding
    ("gpt-oss-20b", 20.91e9, 3.61e9),  # OpenAI's model card: 20.91B total, 3.61B active
])
def test_presets_have_their_models_sizes(preset, total, active):
    _, model = meta_model(preset)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(total, rel=0.01)
    assert common.active_params(model) == pytest.approx(active, rel=0.01)


def test_active_params_count_experts_at_top_k_and_the_head_once():
    config, model = meta_model("afmoe-tiny")
    h, vocab = config.hidden_size, config.vocab_size
    routed = 3 * h * config.moe_intermediate_size * config.num_experts  # gate, up, down of every expert
    dense_layers = config.num_dense_layers
    moe_layers = config.num_hidden_layers - dense_layers
    everything = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    expected = (everything - vocab * h  # the input embedding is a lookup (the untied lm_head stays)
                - moe_layers * routed * (1 - config.num_experts_per_tok / config.num_experts))
    assert common.active_params(model) == expected


def test_attention_flops_count_only_pairs_the_masks_keep():
    config = common.make_config(common.PRESETS["afmoe-tiny"])  # sliding window 16, 3 layers
    seq, window, d, heads = 64, config.sliding_window, config.head_dim, config.num_attention_heads
    full = seq * (seq + 1) / 2
    sliding = window * (window + 1) / 2 + (seq - window) * window
    kinds = config.layer_types
    pairs = sum(full if k == "full_attention" else sliding for k in kinds)
    assert "sliding_attention" in kinds and "full_attention" in kinds
    assert common.attention_flops(config, batch=2, seq=seq) == 12 * heads * d * pairs * 2


def test_variants_resolve_per_family():
    assert common.resolve_variant_name("hf", "afmoe") == "hf-grouped_mm"
    assert common.resolve_variant_name("hf", "jetmoe") == "hf-eager"
    assert common.resolve_variant_name("hf-grouped_mm", "cohere") is None
    with pytest.raises(ValueError, match="unknown variant"):
        common.resolve_variant_name("fastmoe-flexx", "afmoe")
    assert common.parse_shapes("1x4096, 4x2048") == [(1, 4096), (4, 2048)]
    with pytest.raises(ValueError, match="BATCHxSEQ"):
        common.parse_shapes("4096")


def test_variant_labels_name_the_fields_that_differ():
    import dataclasses

    named = common.TRAIN_STEP_VARIANTS["fastmoe-4bit"]
    assert common.variant_label(named) == "fastmoe-4bit"
    assert common.variant_label(dataclasses.replace(named, optimizer="adamw_8bit")) == "fastmoe-4bit-adamw8bit"
    flex = dataclasses.replace(common.TRAIN_STEP_VARIANTS["hf-grouped_mm"], attention="flex_attention")
    assert common.variant_label(flex) == "hf-grouped_mm (attention=flex_attention)"


@pytest.mark.parametrize("preset", ["afmoe-tiny", "lfm2-tiny", "jetmoe-tiny", "cohere-tiny", "qwen3-moe-tiny",
                                    "mixtral-tiny", "qwen2-moe-tiny", "gpt-oss-tiny"])
@pytest.mark.parametrize("which", common.LORA_TARGET_SETS)
def test_lora_target_sets_name_modules_the_family_has(preset, which):
    config, model = meta_model(preset)
    targets = common.lora_targets(config.model_type, which)
    modules = [name for name, _ in model.named_modules()]
    params = [name for name, _ in model.named_parameters()]
    for target in targets["target_modules"]:
        assert any(name == target or name.endswith("." + target) for name in modules), target
    for target in targets["target_parameters"] or []:
        assert any(name.endswith("." + target) for name in params), target
    if which in ("attention", "attention-experts") and config.model_type != "jetmoe":
        assert not any("mlp" in t or t in ("w1", "w2", "w3", "in_proj") for t in targets["target_modules"])
    if which in ("attention", "default-without-experts"):
        assert not targets["target_parameters"]
    if which == "default-without-experts":
        assert targets["target_modules"] == common.lora_targets(config.model_type)["target_modules"]


def test_gpu_activity_counts_kernels_and_overlapping_work_once_over_its_span():
    events = [("kernel", 2, 10), ("kernel", 5, 15), ("gpu_memcpy", 20, 30), ("cuda_runtime", 0, 100),
              ("kernel", 40, 41), ("gpu_memset", 40, 45), ("cpu_op", 0, 1000)]
    # busy: 2-15, 20-30, 40-45; the span runs from the first GPU interval's start to the last one's end, host
    # activities aside
    assert common.gpu_activity(events) == (13 + 10 + 5, 3, 45 - 2)
    assert common.gpu_activity([]) == (0, 0, 0)


def test_top_kernels_rank_names_by_gpu_time_per_step():
    kernels = [("gemm", 4_000_000), ("norm", 1_000_000), ("gemm", 2_000_000), ("rope", 3_000_000)]
    assert common.top_kernels(kernels, steps=2, rows=2) == [("gemm", 3.0, 1.0), ("rope", 1.5, 0.5)]


def trace_span(cat, name, ts, dur, tid=1, correlation=None):
    """One complete ("X") event of a torch.profiler Chrome trace."""
    event = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid}
    if correlation is not None:
        event["args"] = {"correlation": correlation}
    return event


def test_host_gaps_attribute_idle_gpu_time_to_the_python_running_until_the_next_launch():
    kernels = [(0, 10, -5), (20, 10, 15), (30, 10, 16), (100, 10, 90), (200, 10, 105)]  # (start, length, launched)
    events = [trace_span("kernel", f"k{i}", ts, dur, tid=7, correlation=i) for i, (ts, dur, _) in enumerate(kernels)]
    events += [trace_span("cuda_runtime", "cudaLaunchKernel", launched, 1, correlation=i)
               for i, (_, _, launched) in enumerate(kernels)]
    events += [trace_span("cuda_runtime", "cudaStreamSynchronize", 52, 3),
               trace_span("python_function", "step", -10, 230), trace_span("python_function", "forward", 10, 40),
               trace_span("python_function", "slow", 12, 3), trace_span("python_function", "optimizer", 60, 35),
               trace_span("python_function", "other thread", 0, 200, tid=2),
               # autograd's device thread launches too (the backward): its frames count, labelled with the thread
               trace_span("cuda_runtime", "cudaGraphLaunch", 45, 1, tid=3),
               trace_span("python_function", "backward", 42, 6, tid=3)]
    summary = host_gaps.summarize(events)
    # Gaps [10, 20) and [40, 100) wait on launches at 15 and 90; [110, 200) ends with a kernel launched at 105.
    assert summary["gaps"] == 3 and summary["gaps_ms"] == pytest.approx(0.16)
    assert summary["gaps_not_host_ms"] == pytest.approx(0.09) and summary["host_ms"] == pytest.approx(0.055)
    assert summary["exclusive_ms"] == pytest.approx({"optimizer": 0.03, "forward": 0.012, "step": 0.01, "slow": 0.003,
                                                    "[thread 3] backward": 0.006})
    assert summary["inclusive_ms"] == pytest.approx({"step": 0.055, "optimizer": 0.03, "forward": 0.015,
                                                    "slow": 0.003, "[thread 3] backward": 0.006})
    assert summary["blocking_calls"] == {"cudaStreamSynchronize": {"count": 1, "ms": pytest.approx(0.003)}}
    assert summary["blocking_callers"] == {"cudaStreamSynchronize from step": 1}  # the frames running then
    assert "host-bound 0.1 ms" in host_gaps.report(summary)


def test_host_gaps_attribute_each_kernels_gpu_time_to_the_python_that_launched_it():
    """Kernels summed by (name, the innermost frames running at their launch): two launches of one kernel from one
    place add up, the same kernel from another place is its own entry, the autograd thread's launches get its
    frames, a kernel without a launch in the trace (before the window) is left out."""
    launches = [("copy", 12, 1, 5), ("copy", 14, 1, 7), ("copy", 32, 1, 3), ("gemm", 41, 3, 40), ("gemm", 60, 1, 2)]
    events = [trace_span("kernel", name, 100 + i, dur, tid=7, correlation=i)
              for i, (name, _, _, dur) in enumerate(launches)]
    events += [trace_span("cuda_runtime", "cudaLaunchKernel", ts, 1, tid=tid, correlation=i)
               for i, (_, ts, tid, _) in enumerate(launches)]
    events += [trace_span("kernel", "earlier", 90, 4, tid=7, correlation=99),
               trace_span("python_function", "step", 0, 100), trace_span("python_function", "attention", 10, 10),
               trace_span("python_function", "<built-in method copy_>", 11, 5),
               trace_span("python_function", "mlp", 30, 5),
               trace_span("python_function", "backward", 40, 5, tid=3)]
    assert host_gaps.kernel_sources(events) == {
        "gemm from backward": {"ms": pytest.approx(0.04), "count": 1},
        "copy from attention < step": {"ms": pytest.approx(0.012), "count": 2},
        "copy from mlp < step": {"ms": pytest.approx(0.003), "count": 1},
        "gemm from step": {"ms": pytest.approx(0.002), "count": 1}}


def test_memory_peak_groups_the_blocks_live_at_the_peak_by_the_model_code_that_allocated_them():
    def frames(*sites):
        return [{"filename": "/usr/lib/python3/site-packages/torch/autograd/function.py", "line": 1, "name": "apply"}] + [
            {"filename": f"/x/site-packages/{path}", "line": line, "name": name} for path, line, name in sites]

    moe = frames(("fastmoe/kernels/moe/grouped.py", 10, "forward"), ("fastmoe/models/afmoe.py", 5, "moe"))
    loss = frames(("fastmoe/trl_fused_head.py", 7, "loss"))
    events = [{"action": "alloc", "addr": 1, "size": 100, "frames": moe},
              {"action": "alloc", "addr": 2, "size": 50, "frames": moe},
              {"action": "free_requested", "addr": 1, "size": 100},
              {"action": "free_completed", "addr": 1, "size": 100},  # only a completed free gives the bytes back
              {"action": "alloc", "addr": 3, "size": 400, "frames": loss},  # the peak: 50 + 400
              {"action": "free_completed", "addr": 3, "size": 400},
              {"action": "alloc", "addr": 4, "size": 300, "frames": moe},
              {"action": "free_completed", "addr": 9, "size": 999}]  # allocated before recording: not ours to count
    summary = memory_peak.summarize({"device_traces": [events]}, base_bytes=2**30, tokens=10)
    assert summary["above_base_gb"] == pytest.approx(450 / 2**30, abs=1e-3)
    assert summary["sites_mb"] == {"fastmoe/trl_fused_head.py:7 loss": pytest.approx(400 / 2**20, abs=0.01),
                                   "fastmoe/kernels/moe/grouped.py:10 forward": pytest.approx(50 / 2**20, abs=0.01)}
    assert summary["sites_blocks"] == {"fastmoe/trl_fused_head.py:7 loss": 1,
                                       "fastmoe/kernels/moe/grouped.py:10 forward": 1}
    assert summary["peak_stack"][0] == "fastmoe/trl_fused_head.py:7 loss"
    assert summary["above_base_kb_per_token"] == pytest.approx(450 / 1024 / 10, abs=0.01)
    assert "live at the peak" in memory_peak.report(summary)

    short = {"tokens": 1000, "step_peak_gb": 1.0, "sites_mb": {"a": 10.0, "b": 5.0}}
    long = {"tokens": 3000, "step_peak_gb": 1.5, "sites_mb": {"a": 30.0, "c": 1.0}}
    result = memory_peak.compare(short, long)
    assert result["peak_kb_per_token"] == pytest.approx(0.5 * 2**20 / 2000, abs=0.01)
    assert result["sites_kb_per_token"] == {"a": pytest.approx(10.24), "b": pytest.approx(-2.56),
                                            "c": pytest.approx(0.51)}
    assert list(result["sites_kb_per_token"]) == ["a", "b", "c"]  # largest change first


def test_profiler_activities_read_what_the_profiler_recorded():
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(8, 8).sum()
    activities = common.profiler_activities(prof)
    assert activities and all(end >= start for _, start, end in activities)
    assert {kind for kind, _, _ in activities} >= {"cpu_op"}
    assert common.gpu_activity(activities) == (0, 0, 0)

    class OlderTorchEvent:  # a _KinetoEvent without activity_type()
        def __init__(self, device, name):
            self._device, self._name = device, name

        def device_type(self):
            return self._device

        def name(self):
            return self._name

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    assert [common._activity_type(OlderTorchEvent(d, n)) for d, n in (
        (cuda, "Memcpy HtoD (Pageable -> Device)"), (cuda, "Memset (Device)"), (cuda, "_grouped_mm_kernel"),
        (cpu, "aten::mm"))] == ["gpu_memcpy", "gpu_memset", "kernel", "cpu"]


def train_step_records():
    shared = dict(date="2026-11-23 14:16 UTC", run="r1", gpu="NVIDIA H100 80GB HBM3", family="afmoe",
                  preset="trinity-mini", layers=8, batch=1, seq=4096, shape="1x4096", routing="random", status="ok")
    return [dict(shared, variant="hf-grouped_mm", tokens_per_s=15407, peak_gb=23.6, mfu_pct=9.9, loss=12.58),
            dict(shared, variant="fastmoe", tokens_per_s=31793, peak_gb=15.5, mfu_pct=20.5, loss=12.57)]


def test_summary_table_compares_fastmoe_with_transformers():
    table = plot_results.summary_table(train_step_records() + [dict(train_step_records()[0], run="r2")], run="r1")
    assert table.count("trinity-mini") == 2
    assert "2.06x" in table


def sft_record(implementation: str, tokens_per_s: float, date: str, run: str, **changes) -> dict:
    record = dict(question="sft", date=date, run=run, gpu="NVIDIA H200", versions={"torch": "2.11.0+cu130"},
                  command=f"python benchmarks/bench_sft.py --implementations {implementation}", family="afmoe",
                  preset="trinity-mini", layers=32, batch=1, seq=4096, shape="1x4096", implementation=implementation,
                  targets="default", logging_steps=1, quantization=None, load="direct", status="ok",
                  tokens_per_s=tokens_per_s, peak_gb=50.0, gpu_busy_pct=90.0, kernels_per_step=1000, mfu_pct=30.0)
    return dict(record, **changes)


def test_report_shows_the_newest_record_of_each_configuration_with_its_source():
    records = [sft_record("transformers", 3000, "2026-12-01 10:00 UTC", "a"),
               sft_record("fastmoe", 6000, "2026-12-01 10:05 UTC", "a"),
               sft_record("transformers", 3100, "2026-12-02 10:00 UTC", "b"),
               sft_record("fastmoe", 9300, "2026-12-02 10:05 UTC", "b"),
               sft_record("fastmoe", 9999, "2026-12-02 10:06 UTC", "b", gpu="CPU"),  # a smoke run: not shown
               sft_record("fastmoe", 12000, "2026-12-02 11:00 UTC", "b", shape="1x16384", seq=16384)]
    page = report.render(records)
    sft = page.split("## 1.")[1].split("## 2.")[0]
    rows = [line for line in sft.splitlines() if line.startswith("| trinity-mini")]
    assert len(rows) == 2
    assert "| 3,100 | 9,300 | 3.00x |" in rows[0]
    assert "| - | 12,000 | - |" in rows[1]
    assert "2026-12-02 10:05 UTC · NVIDIA H200 · torch 2.11.0+cu130" in sft
    assert "2026-12-01" not in sft and "9,999" not in page
    assert "## 6. Training step in a plain loop" in page and "Not measured yet" in page


def test_report_keeps_runs_timed_from_their_first_step_apart_from_windows_after_warm_up():
    """On data of varied lengths, 60 steps from a run's first step (compiles and captures included) answer what a
    short run costs: a row of their own, which neither replaces the window after warm-up nor pairs with it."""
    examples = dict(data="examples", shape="2x4096", batch=2, step_ms_all=[100.0] * 40)
    records = [sft_record("transformers", 8000, "2026-12-01 10:00 UTC", "a", warmup=30, **examples),
               sft_record("fastmoe", 38000, "2026-12-01 10:05 UTC", "a", warmup=30, **examples),
               sft_record("fastmoe", 21000, "2026-12-02 10:05 UTC", "b", warmup=0,
                          **dict(examples, step_ms_all=[100.0] * 60))]
    sft = report.render(records).split("## 1.")[1].split("## 2.")[0]
    rows = [line for line in sft.splitlines() if line.startswith("| trinity-mini")]
    assert len(rows) == 2
    assert "| 8,000 | 38,000 | 4.75x |" in rows[0] and "timed from the first step" not in rows[0]
    assert "60 steps timed from the first step" in rows[1] and "| - | 21,000 | - |" in rows[1]


def test_report_keeps_triton_base_products_apart_from_the_default():
    """bench_sft.py --fastmoe-base-products triton,torch: a row each beside the default's, all against
    transformers."""
    records = [sft_record("transformers", 3000, "2026-12-05 10:00 UTC", "a"),
               sft_record("fastmoe", 6000, "2026-12-05 10:05 UTC", "a", base_products="auto"),
               sft_record("fastmoe", 5000, "2026-12-05 10:06 UTC", "a", base_products="triton"),
               sft_record("fastmoe", 7500, "2026-12-05 10:07 UTC", "a", base_products="torch")]
    sft = report.render(records).split("## 1.")[1].split("## 2.")[0]
    rows = [line for line in sft.splitlines() if line.startswith("| trinity-mini")]
    assert len(rows) == 3
    assert rows[0].startswith("| trinity-mini, 32 layers | 1x4096 |") and "| 3,000 | 6,000 | 2.00x |" in rows[0]
    assert any("base products in its Triton kernels" in row and "| 3,000 | 5,000 | 1.67x |" in row for row in rows)
    assert any("base products by torch's grouped GEMM" in row and "| 3,000 | 7,500 | 2.50x |" in row for row in rows)


def test_report_compares_runs_on_one_kind_of_gpu_only():
    """A configuration measured on an H200 (both implementations) and later on an H100 (fastmoe only): a row for
    each GPU, the H100 row without a speed-up rather than one against the H200's transformers."""
    h100 = "NVIDIA H100 80GB HBM3"
    records = [sft_record("transformers", 3000, "2026-12-01 10:00 UTC", "a"),
               sft_record("fastmoe", 6000, "2026-12-01 10:05 UTC", "a"),
               sft_record("fastmoe", 5000, "2026-12-05 10:05 UTC", "b", gpu=h100)]
    sft = report.render(records).split("## 1.")[1].split("## 2.")[0]
    rows = [line for line in sft.splitlines() if line.startswith("| trinity-mini")]
    assert len(rows) == 2
    assert any(row.startswith(f"| trinity-mini, 32 layers, {h100} |") and "| - | 5,000 | - |" in row for row in rows)
    assert any(row.startswith("| trinity-mini, 32 layers, NVIDIA H200 |") and "| 3,000 | 6,000 | 2.00x |" in row
               for row in rows)


def test_targets_compare_within_one_run_and_say_where_fastmoe_s_step_goes():
    """A speed-up target from transformers' record of the same run (not a later, faster fastmoe run with no
    transformers beside it), from two runs only where no run has both; a miss says by how much; the profile column
    sorts the step's kernels by kind; memory and logging_steps below the table."""
    profile = dict(profiled_step_ms=100.0, gpu_busy_ms_per_step=90.0,
                   top_kernels=[["_grouped_mm_kernel", 50.0, 9.0], ["void pytorch_flash::flash_fwd_kernel<", 10.0, 2.0],
                                ["nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT", 20.0, 4.0]])
    records = [sft_record("transformers", 3000, "2026-12-01 10:00 UTC", "a", footprint_gb=50.0),
               sft_record("fastmoe", 8400, "2026-12-01 10:05 UTC", "a", footprint_gb=51.0, mfu_pct=20.0, **profile),
               sft_record("fastmoe", 9900, "2026-12-02 10:05 UTC", "b"),
               sft_record("transformers", 2000, "2026-12-01 10:00 UTC", "c", preset="jetmoe-8b", layers=24),
               sft_record("fastmoe", 6000, "2026-12-01 11:00 UTC", "d", preset="jetmoe-8b", layers=24),
               sft_record("fastmoe", 6000, "2026-12-01 11:00 UTC", "e", logging_steps=10)]
    targets = report.render(records).split("## 2.")[1].split("## 3.")[0]
    rows = {line.split(" | ")[0][2:]: line for line in targets.splitlines() if line.startswith("| ")}
    trinity = rows["Trinity-Mini at full depth: speed-up >= 3x (the goal: 4x)"]
    assert "| NVIDIA H200, 2026-12-01 | 2.80x | missed | 7% more tokens/s (fastmoe at 21% MFU; 20% now) |" in trinity
    assert ("| 100 ms: expert GEMMs 50 ms, dense GEMMs 20 ms, attention 10 ms, other kernels 10 ms, GPU idle 10 ms |"
            in trinity)
    # Other figures: the newest record's (run b's, unprofiled).
    assert "| 30.0% | missed | 5.0 points | - |" in rows["Trinity-Mini at full depth: MFU >= 35%"]
    assert "| 3.00x (two runs) | met | - |" in rows["JetMoe-8B: speed-up >= 2.5x"]
    assert "| - | not measured |" in rows["LFM2-8B-A1B: speed-up >= 2.5x"]
    assert "above transformers' in 1 of the 1 configurations" in targets and "(51.00 / 50.00 GB)" in targets
    assert "logging_steps (fastmoe's at 10 over its tokens/s at 1, same run): not measured." in targets
    # Two runs of both logging settings on one GPU: the newer pair.
    records += [sft_record("fastmoe", 6000, "2026-12-02 12:00 UTC", run, logging_steps=steps)
                for run in ("f", "g") for steps in (1, 10)]
    records[-1]["tokens_per_s"] = 5400
    targets = report.render(records).split("## 2.")[1].split("## 3.")[0]
    assert "same run): trinity-mini 32 layers 1x4096, NVIDIA H200: 0.900 [" in targets


def test_generation_rows_set_transformers_beside_fastmoe_with_the_roofline_share():
    def record(implementation, rate, date, cuda_graphs=True, batch=1, gpu="NVIDIA H200"):
        return {"question": "generate", "preset": "trinity-mini", "layers": 8, "batch": batch, "prompt": 512,
                "implementation": implementation, "quantization": None, "cuda_graphs": cuda_graphs,
                "decode_tokens_per_s": rate, "ms_per_step": 1000 / rate, "replay_ms_per_step": None,
                "roofline_tokens_per_s": 2000.0, "roofline_share": rate / 2000.0, "date": date,
                "gpu": gpu, "versions": {"torch": "2.11.0"}, "command": "python benchmarks/bench_generate.py"}

    h100 = "NVIDIA H100 80GB HBM3"
    records = [record("transformers", 10.0, "2026-12-02 10:00 UTC"), record("fastmoe", 200.0, "2026-12-02 10:00 UTC"),
               record("fastmoe", 400.0, "2026-12-02 11:00 UTC"),
               record("fastmoe", 20.0, "2026-12-02 10:00 UTC", cuda_graphs=False),
               record("fastmoe", 1500.0, "2026-12-02 11:00 UTC", batch=8),
               record("fastmoe", 1400.0, "2026-12-03 11:00 UTC", batch=8, gpu=h100),
               record("transformers", 90.0, "2026-12-01 11:00 UTC", batch=8)]
    page = report.render(records)
    generation = page.split("## 4.")[1].split("## 5.")[0]
    rows = [line for line in generation.splitlines() if line.startswith("| trinity-mini")]
    assert rows[0].startswith("| trinity-mini, 8 layers | bf16 | 1 | 512 | 10.0 | 20.0 | 400.0 | 40.00x | 2.50 | - "
                              "| 2,000 | 20.0% |")
    # Measured on two kinds of GPU: a row each, the speed-up only against transformers on the same kind.
    assert rows[1].startswith(f"| trinity-mini, 8 layers, {h100} | bf16 | 8 | 512 | - | - | 1,400.0 | - |")
    assert rows[2].startswith("| trinity-mini, 8 layers, NVIDIA H200 | bf16 | 8 | 512 | 90.0 | - | 1,500.0 | 16.67x |")
    assert len(rows) == 3


def test_long_context_rows_give_the_longest_length_that_trained_and_the_first_out_of_memory():
    def at(implementation, seq, status, **changes):
        return sft_record(implementation, 1000.0 if status == "ok" else None, "2026-12-02 12:00 UTC", "c",
                          seq=seq, shape=f"1x{seq}", status=status, memory_limit_gb=24.0, footprint_gb=seq / 4096,
                          **changes)

    records = [at("transformers", 16384, "ok"), at("transformers", 24576, "oom"), at("transformers", 32768, "oom"),
               at("fastmoe", 32768, "ok"), at("fastmoe", 65536, "ok"), at("fastmoe", 98304, "oom"),
               at("fastmoe", 98304, "ok", alloc_conf="expandable_segments:True"),
               sft_record("fastmoe", 5000, "2026-12-02 12:00 UTC", "c")]  # no budget: the first table's
    page = report.render(records)
    long_context = page.split("## 3.")[1].split("## 4.")[0]
    rows = [line for line in long_context.splitlines() if line.startswith("| trinity-mini")]
    assert rows == [
        "| trinity-mini, 32 layers | bf16 | 24 GB | default | transformers + peft | 1x16384 | 1x24576 | 1,000 | 4.0 | [1] |",
        "| trinity-mini, 32 layers | bf16 | 24 GB | default | fastmoe | 1x65536 | 1x98304 | 1,000 | 16.0 | [2] |",
        "| trinity-mini, 32 layers | bf16 | 24 GB | expandable_segments:True | fastmoe | 1x98304 | - | 1,000 | 24.0 "
        "| [2] |"]
    assert "5,000" in page.split("## 1.")[1].split("## 2.")[0] and "5,000" not in long_context


def test_long_context_counts_a_whole_gpu_that_names_its_memory_and_compares_memory_at_each_length():
    """Long rows run without --memory-limit-gb on a GPU whose name states its memory are that budget's probes (short
    rows and GPUs without the figure are not); lengths both implementations trained get their footprints side by
    side, whole and above the step start."""
    h100 = "NVIDIA H100 80GB HBM3"

    def at(implementation, seq, status, gpu=h100, **changes):
        return sft_record(implementation, 1000.0 if status == "ok" else None, "2026-12-02 12:00 UTC", "c",
                          **dict(dict(gpu=gpu, seq=seq, shape=f"1x{seq}", status=status, footprint_gb=20.0 + seq / 4096,
                                      step_start_gb=20.0), **changes))

    records = [at("transformers", 4096, "ok"), at("transformers", 16384, "ok"), at("transformers", 32768, "oom"),
               at("fastmoe", 16384, "ok", footprint_gb=22.0), at("fastmoe", 131072, "ok"),
               at("fastmoe", 262144, "ok", gpu="NVIDIA H200"),  # no budget in its name: no probe
               at("fastmoe", 65536, "ok", offload=True, cuda_graphs=False)]
    long_context = report.render(records).split("## 3.")[1].split("## 4.")[0]
    rows = [line for line in long_context.splitlines() if line.startswith("| trinity-mini")]
    whole = "| trinity-mini, 32 layers | bf16 | 80 GB (the whole GPU) | default |"
    offloaded = 'fastmoe, use_gradient_checkpointing="fastmoe" (inputs in host memory), cuda_graphs=False'
    assert rows[:3] == [f"{whole} transformers + peft | 1x16384 | 1x32768 | 1,000 | 24.0 | [1] |",
                        f"{whole} fastmoe | 1x131072 | - | 1,000 | 52.0 | [2] |",
                        f"{whole} {offloaded} | 1x65536 | - | 1,000 | 36.0 | [2] |"]
    # The memory table: fastmoe at 16,384 against transformers at 16,384 (24 GB, 4 above the start; 22 and 2).
    assert rows[3:] == ["| trinity-mini, 32 layers | bf16 | 16,384 | fastmoe | 24.0 / 22.0 | 0.92x | 4.0 / 2.0 "
                        "| 0.50x | [1] [2] |"]


def test_committed_page_is_generated_from_the_committed_records():
    """benchmarks/RESULTS.md is report.py's output: regenerate it (python benchmarks/report.py) after adding records."""
    records = report.load_records(BENCHMARKS / "results.jsonl")
    assert (BENCHMARKS / "RESULTS.md").read_text() == report.render(records)


def test_charts_are_drawn_from_two_records(tmp_path):
    pytest.importorskip("matplotlib")
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in train_step_records()))
    quality = tmp_path / "quality.json"
    quality.write_text(json.dumps(dict(model="AFMoE", gpu="CPU", dtype="float32", steps=3, loss_floor=1.0,
                                       losses={"hf-grouped_mm": [6.0, 5.0, 4.0], "fastmoe": [6.0, 5.0, 4.1]},
                                       seconds={"hf-grouped_mm": 1.0, "fastmoe": 1.0})))
    sys.argv = ["plot_results.py", "--results", str(results), "--quality", str(quality), "--out-dir", str(tmp_path)]
    plot_results.main()
    for name in ("train_step_tokens_per_s.png", "train_step_peak_memory.png", "quality_loss.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sft_benchmark_smoke_run_records_both_implementations(tmp_path):
    """bench_sft.py through the user's path on the CPU: a tiny checkpoint written and loaded both ways, trl's
    SFTTrainer for 2 timed steps (and one profiled), one record each, and the page shows them. fastmoe's ops run
    their PyTorch references here (the kernels are tested against those elsewhere): this checks the harness."""
    from fastmoe.kernels.dispatch import reference_only

    jsonl = tmp_path / "results.jsonl"
    sys.argv = ["bench_sft.py", "--preset", "afmoe-tiny", "--shapes", "1x32", "--steps", "2", "--warmup", "0",
                "--profile-steps", "1", "--checkpoint-dir", str(tmp_path / "checkpoints"), "--jsonl", str(jsonl)]
    with reference_only():
        bench_sft.main()
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["implementation"] for r in records] == ["transformers", "fastmoe"]
    for record in records:
        assert record["status"] == "ok" and record["question"] == "sft" and record["load"] == "checkpoint"
        assert record["tokens_per_s"] > 0 and len(record["step_ms_all"]) == 2 and record["timing"] == "clock"
        assert record["versions"]["trl"] and record["command"].startswith("python benchmarks/bench_sft.py")
    # the same weights, adapters and data both ways: the same first loss (fp32, references)
    assert records[0]["loss_first"] == pytest.approx(records[1]["loss_first"], abs=1e-3)
    assert (tmp_path / "checkpoints" / "afmoe-tiny-3layers" / bench_sft.CHECKPOINT_MARK).exists()
    page = report.render(records, include_cpu=True)
    assert "| afmoe-tiny, 3 layers | 1x32 | default | 1 | bf16 | checkpoint |" in page


def _4bit_tensor_layout(model) -> dict:
    """Every parameter and buffer of a 4-bit model by name, as (shape, dtype), after checking that it has NF4 expert
    codes and that they are random (not a constant stand-in)."""
    codes = [b for name, b in model.named_buffers() if name.endswith("_nf4_packed")]
    assert codes and all(len(c.unique()) > 16 for c in codes)
    return {name: (tuple(t.shape), t.dtype) for name, t in [*model.named_parameters(), *model.named_buffers()]}


@pytest.mark.parametrize("preset", ["qwen3-moe-tiny", "jetmoe-tiny"])
def test_sft_benchmark_checkpoint_without_experts_loads_the_same_4bit_model(tmp_path, preset):
    """--load checkpoint-without-experts: the checkpoint holds every weight but the routed experts' stacks (routers
    included), and load_in_4bit of it leaves the model a full checkpoint's load leaves (every parameter and buffer
    of the same name, shape and dtype; experts in NF4, with random codes), and SFTTrainer trains it."""
    import safetensors.torch

    from fastmoe import FastModel, models, unpatch
    from fastmoe.kernels.dispatch import reference_only

    layouts, saved = {}, {}
    for load in ("checkpoint", "checkpoint-without-experts"):
        config_kwargs = bench_sft.common.PRESETS[preset]
        case = bench_sft.Case(preset, config_kwargs["num_hidden_layers"], 1, 32, "fastmoe", quantization="4bit",
                              load=load)
        path = bench_sft.ensure_checkpoint(case, tmp_path / "checkpoints", "cpu", torch.float32, keep_others=True)
        saved[load] = {}
        for shard in path.glob("*.safetensors"):
            saved[load].update({key: tuple(t.shape) for key, t in safetensors.torch.load_file(shard).items()})
        model, _ = FastModel.from_pretrained(str(path), load_in_4bit=True, dtype=torch.float32)
        layouts[load] = _4bit_tensor_layout(model)
        unpatch()
    assert layouts["checkpoint"] == layouts["checkpoint-without-experts"]
    full, without = saved["checkpoint"], saved["checkpoint-without-experts"]
    dropped = set(full) - set(without)
    # the experts alone (saved as 3D stacks or, as transformers writes some families, one tensor an expert), routers
    # kept
    assert set(without) < set(full)
    assert all(len(full[key]) == 3 or re.search(r"\.experts\.\d+\.", key) for key in dropped)
    routers = models.family(bench_sft.common.PRESETS[preset]["model_type"]).routers
    assert any(f"{router}.weight" in key for key in without for router in routers)

    jsonl = tmp_path / "results.jsonl"
    sys.argv = ["bench_sft.py", "--preset", preset, "--shapes", "1x32", "--steps", "1", "--warmup", "0",
                "--profile-steps", "0", "--implementations", "fastmoe", "--quantization", "4bit",
                "--load", "checkpoint-without-experts", "--checkpoint-dir", str(tmp_path / "checkpoints"),
                "--keep-checkpoints", "--jsonl", str(jsonl)]
    with reference_only():
        bench_sft.main()
    (record,) = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert (record["status"], record["load"], record["quantization"]) == ("ok", "checkpoint-without-experts", "4bit")


@pytest.mark.parametrize("preset", ["mixtral-tiny", "jetmoe-tiny", "gpt-oss-tiny", "afmoe-tiny"])
def test_sft_benchmark_direct_4bit_build_is_the_model_load_in_4bit_gives(tmp_path, preset):
    """--load direct --quantization 4bit (common.build_fastmoe_4bit, one decoder layer at a time): the model a full
    checkpoint's load_in_4bit gives, module by module (Linear4bit where it has them, routers 16-bit) and tensor by
    tensor (name, shape, dtype; NF4 codes random, the final norm ones), and SFTTrainer trains it."""
    from fastmoe import FastModel, unpatch
    from fastmoe.kernels.dispatch import reference_only

    config_kwargs = bench_sft.common.PRESETS[preset]
    built, loaded = {}, {}
    for load in ("checkpoint", "direct"):
        case = bench_sft.Case(preset, config_kwargs["num_hidden_layers"], 1, 32, "fastmoe", quantization="4bit",
                              load=load)
        if load == "checkpoint":
            path = bench_sft.ensure_checkpoint(case, tmp_path / "checkpoints", "cpu", torch.float32, True)
            model, _ = FastModel.from_pretrained(str(path), load_in_4bit=True, dtype=torch.float32)
        else:
            model, _ = bench_sft.build_direct(case, "cpu", torch.float32)
        layout = built if load == "direct" else loaded
        layout["modules"] = {name: type(module).__name__ for name, module in model.named_modules()}
        layout["tensors"] = _4bit_tensor_layout(model)
        assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
        unpatch()
    assert built == loaded
    assert "Linear4bit" in built["modules"].values()

    jsonl = tmp_path / "results.jsonl"
    sys.argv = ["bench_sft.py", "--preset", preset, "--shapes", "1x32", "--steps", "1", "--warmup", "0",
                "--profile-steps", "0", "--implementations", "fastmoe", "--quantization", "4bit", "--load", "direct",
                "--jsonl", str(jsonl)]
    with reference_only():
        bench_sft.main()
    (record,) = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert (record["status"], record["load"], record["quantization"]) == ("ok", "direct", "4bit")


def test_sft_benchmark_packed_and_padded_documents_train_alike(tmp_path):
    """--data packed,padded: the same documents fed as one padding-free row and as a padded batch give the same
    losses (the patched model keeps packed documents apart), and each has its row on the page."""
    from fastmoe.kernels.dispatch import reference_only

    lengths = bench_sft.document_lengths(40, 4)
    assert sum(lengths) == 40 and len(set(lengths)) > 1 and min(lengths) >= 2
    jsonl = tmp_path / "results.jsonl"
    sys.argv = ["bench_sft.py", "--preset", "afmoe-tiny", "--shapes", "1x40", "--steps", "2", "--warmup", "0",
                "--profile-steps", "0", "--implementations", "fastmoe", "--data", "packed,padded", "--documents", "4",
                "--checkpoint-dir", str(tmp_path / "checkpoints"), "--jsonl", str(jsonl)]
    with reference_only():
        bench_sft.main()
    packed, padded = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert (packed["data"], padded["data"], packed["documents"]) == ("packed", "padded", 4)
    assert packed["status"] == padded["status"] == "ok"
    for key in ("loss_first", "loss_last"):
        assert packed[key] == pytest.approx(padded[key], abs=1e-4)
    assert packed["flops_per_step"] == padded["flops_per_step"] < bench_sft.common.step_flops(
        bench_sft.common.PRESETS["afmoe-tiny"], 1, 40)  # attention within documents only
    page = report.render([packed, padded], include_cpu=True)
    assert "each row 4 documents packed" in page and "each row 4 documents padded" in page


def test_sft_benchmark_varied_lengths_change_every_row():
    """--varied-lengths: each row's documents have lengths of their own (every step a new layout), still summing to
    the row; without it every row has the same."""
    varied = bench_sft.random_dataset(100, 3, 40, data="packed", documents=4, varied=True)["seq_lengths"]
    assert len({tuple(lengths) for lengths in varied}) == 3 and all(sum(lengths) == 40 for lengths in varied)
    fixed = bench_sft.random_dataset(100, 3, 40, data="packed", documents=4)["seq_lengths"]
    assert len({tuple(lengths) for lengths in fixed}) == 1
    padded = bench_sft.random_dataset(100, 3, 40, data="padded", documents=4, varied=True)["input_ids"]
    assert [len(piece) for piece in padded] == [n for lengths in varied for n in lengths]
    case = bench_sft.Case("afmoe-tiny", 3, 1, 40, "fastmoe", data="padded", documents=4, varied=True)
    assert " 4 varied documents padded " in case.label()


def test_sft_benchmark_examples_of_varied_lengths(tmp_path):
    """--data examples: batches of examples of long-tailed lengths, padded, in order: each timed step's tokens are its
    examples' lengths, tokens/s their sum over the steps' time, the FLOPs those of the mean step (attention within
    each example), and the row says so on the page."""
    from fastmoe.kernels.dispatch import reference_only

    lengths = bench_sft.example_lengths(400, 64)
    assert min(lengths) >= 4 and max(lengths) <= 64 and len(set(lengths)) > 20
    assert sorted(lengths)[200] < 24  # log-uniform: most examples short
    assert [len(ids) for ids in bench_sft.random_dataset(100, 12, 64, data="examples")["input_ids"]] == \
        bench_sft.example_lengths(12, 64)
    jsonl = tmp_path / "results.jsonl"
    sys.argv = ["bench_sft.py", "--preset", "afmoe-tiny", "--shapes", "4x64", "--steps", "3", "--warmup", "1",
                "--profile-steps", "0", "--implementations", "fastmoe", "--data", "examples",
                "--checkpoint-dir", str(tmp_path / "checkpoints"), "--jsonl", str(jsonl)]
    with reference_only():
        bench_sft.main()
    (record,) = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert record["status"] == "ok" and record["data"] == "examples"
    timed = bench_sft.example_lengths(16, 64)[4:]
    assert record["tokens_per_step"] == [sum(timed[i:i + 4]) for i in range(0, 12, 4)]
    assert record["trl_num_tokens"] == sum(bench_sft.example_lengths(16, 64))  # the steps trained what was counted
    assert record["tokens_per_s"] == pytest.approx(sum(record["tokens_per_step"]) / sum(record["step_ms_all"]) * 1e3,
                                                   rel=1e-2)
    assert record["flops_per_step"] < bench_sft.common.step_flops(bench_sft.common.PRESETS["afmoe-tiny"], 4, 64)
    assert "examples of varied lengths padded" in report.render([record], include_cpu=True)
    record.update(replayed_steps=2, tokens_per_s_replayed=1234.5)  # what a GPU run's graphed checkpointing adds
    assert "steps all on graph replays (no capture, no eager layer): 2 of 3, 1,234 tokens/s" in \
        report.render([record], include_cpu=True)


@pytest.mark.parametrize("row_as_longest_max_offsets", [8, 2])
def test_graph_places_simulation_follows_graphed_checkpointing(row_as_longest_max_offsets, monkeypatch):
    """graph_places.py through the real GraphedCheckpoint: with places for every length, each signature (the rounded
    length and the packed row's flash layout: its offsets' count and longest document) runs eagerly at its first
    step, captures at its second and replays after; with one place most steps cannot replay. Two examples a step
    pack into 4 offsets: by default the longest document is the row's length, one signature per length; with fewer
    offsets allowed that, the longest document rounded up varies within a length."""
    from fastmoe import sliding_window_attention
    from fastmoe.graphed_checkpointing import GraphedCheckpoint
    from fastmoe.padding_free import row_length_for_graphs
    from fastmoe.sliding_window_attention import packed_documents

    monkeypatch.setattr(sliding_window_attention, "ROW_AS_LONGEST_MAX_OFFSETS", row_as_longest_max_offsets)
    lengths = bench_sft.example_lengths(2 * 60, 64)
    rounding = GraphedCheckpoint(capture=False, max_shapes=1000)
    signatures, rows = [], []
    for i in range(0, 120, 2):
        examples = lengths[i:i + 2]
        row = row_length_for_graphs(rounding, sum(examples))
        offsets, longest = packed_documents(graph_places._row_positions(examples, row - sum(examples)))
        signatures.append((row, offsets.numel(), longest))
        rows.append(row)
    every = graph_places.simulate(2, 64, 60, places=1000)
    distinct = set(signatures)
    assert (every.eager, every.captured) == (len(distinct), sum(signatures.count(s) > 1 for s in distinct))
    if row_as_longest_max_offsets >= 4:
        assert len(distinct) == len(set(rows))
    else:
        assert len(distinct) > len(set(rows))  # the layouts' part shows: more signatures than lengths
    assert every.replayed == 60 - every.eager - every.captured and every.trained == sum(rows)
    assert len(every.replayed_steps) == every.replayed and every.replayed_steps == sorted(set(every.replayed_steps))
    assert every.tokens == sum(lengths) and every.modeled_ms > every.ideal_ms
    one = graph_places.simulate(2, 64, 60, places=1)
    assert one.replayed + one.captured + one.eager == 60 and one.replayed < every.replayed
    single = graph_places.simulate(1, 64, 30, places=1000)  # one example a step: rows without filler have no layout
    assert single.replayed + single.captured + single.eager == 30 and single.replayed > 0
    # each kind of step its own cost (fixed, a token): per token only, the rows trained; fixed only, the kinds counted
    tokens_only = graph_places.simulate(2, 64, 60, places=1, step_costs=(0, 1, 0, 1, 0, 1))
    assert tokens_only.modeled_ms == tokens_only.trained and tokens_only.ideal_ms == tokens_only.tokens
    fixed = graph_places.simulate(2, 64, 60, places=1, step_costs=(1, 0, 10, 0, 100, 0))
    assert fixed.modeled_ms == one.replayed + 10 * one.eager + 100 * one.captured and fixed.ideal_ms == 60
    # a shift in the data: the same first steps, then as many of the other shape's draw
    shifted = graph_places.simulate(2, 64, 60, places=1000, then=(1, 64))
    assert shifted.steps == 120 and shifted.replayed_steps[:every.replayed] == every.replayed_steps
    assert shifted.tokens == sum(lengths) + sum(bench_sft.example_lengths(60, 64, seed=4))
    share, time_over_ideal = shifted.window(60, 120)
    assert share == sum(step >= 60 for step in shifted.replayed_steps) / 60 and time_over_ideal > 1


def test_packed_attention_rows_are_bench_sfts_examples_rounded_as_graphs_round_them():
    """bench_sliding_window_attention --packed: each row holds its batch's examples in bench_sft's draw, then the
    filler up to the length graphed checkpointing trains the row at; the pairs count causal attention within each
    document, keys at most the window back."""
    from fastmoe.graphed_checkpointing import GraphedCheckpoint
    from fastmoe.padding_free import row_length_for_graphs

    rows = bench_sliding_window_attention.packed_rows(4, 2048, 3)
    lengths = bench_sft.example_lengths(12, 2048)
    rounding = GraphedCheckpoint(capture=False, max_shapes=3)
    for row, documents in enumerate(rows):
        examples = lengths[4 * row:4 * row + 4]
        assert documents[:4] == examples and sum(documents) == row_length_for_graphs(rounding, sum(examples))
        assert len(documents) <= 5
    pairs = bench_sliding_window_attention.causal_pairs_within
    assert pairs([3, 1], None) == 6 + 1 and pairs([3, 1], 2) == 1 + 2 + 2 + 1


def test_replayed_steps_are_those_without_a_capture_or_an_eager_layer():
    """The timed steps (from the warm-up's end) whose layers all replayed graphs: none captured (the graph count
    unchanged over the step) and none took the fallback; their tokens over their time."""
    # counts at each step's start and the end: step 0 warm-up; timed 1 captures, 2 replays, 3 eager, 4 replays
    layer_graphs = [0, 0, 4, 4, 4, 4]
    eager_layers = [0, 2, 2, 2, 3, 3]
    figure = bench_sft.replayed_steps(layer_graphs, eager_layers, 1, [0.5, 0.1, 0.4, 0.3], [100, 200, 300, 400])
    assert figure == {"replayed_steps": 2, "tokens_per_s_replayed": 1500.0}
    assert bench_sft.replayed_steps([0, 1, 2], [0, 0, 0], 0, [0.1, 0.1], [5, 5]) == \
        {"replayed_steps": 0, "tokens_per_s_replayed": None}


@pytest.mark.parametrize("flag, value, module, constant, field, label", [
    ("--fastmoe-graph-shapes", 7, "graphed_checkpointing", "MAX_GRAPH_SHAPES", "graph_shapes",
     "(fastmoe with 7 graph shapes)"),
    ("--fastmoe-coarse-rounding-rows", 0, "padding_free", "COARSE_ROUNDING_ROWS", "coarse_rounding_rows",
     "(fastmoe with 0 rows rounded coarser)"),
])
def test_sft_benchmark_fastmoe_setting_variant(tmp_path, monkeypatch, flag, value, module, constant, field, label):
    """--fastmoe-graph-shapes N (graphed checkpointing following N shapes) and --fastmoe-coarse-rounding-rows N (a
    run's first N rows rounded coarser): a fastmoe case with fastmoe's setting changed for the case only, beside the
    default, each with its row."""
    import importlib

    from fastmoe.kernels.dispatch import reference_only

    owner = importlib.import_module(f"fastmoe.{module}")
    default = getattr(owner, constant)
    seen = []
    original = bench_sft.load

    def load(case, *args):
        seen.append((getattr(case, field), getattr(owner, constant)))
        return original(case, *args)

    jsonl = tmp_path / "results.jsonl"
    sys.argv = ["bench_sft.py", "--preset", "afmoe-tiny", "--shapes", "2x32", "--steps", "1", "--warmup", "0",
                "--profile-steps", "0", "--implementations", "fastmoe", flag, str(value),
                "--checkpoint-dir", str(tmp_path / "checkpoints"), "--jsonl", str(jsonl)]
    monkeypatch.setattr(bench_sft, "load", load)
    with reference_only():
        bench_sft.main()
    assert seen == [(None, default), (value, value)] and getattr(owner, constant) == default
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r[field] for r in records] == [None, value] and all(r["status"] == "ok" for r in records)
    assert label in report.render(records, include_cpu=True)


def test_sft_benchmark_refuses_bad_cases_in_one_line(capsys):
    for argv, message in ((["--implementations", "unsloth"], "unknown implementation"),
                          (["--targets", "everything"], "unknown targets"),
                          (["--load", "direct", "--quantization", "4bit"], "use --load checkpoint"),
                          (["--shapes", "4096"], "BATCHxSEQ"),
                          (["--data", "packed"], "splits each row into --documents"),
                          (["--varied-lengths"], "varies the lengths of --data packed/padded"),
                          (["--data", "examples", "--documents", "2"], "rows and examples take --documents 1"),
                          (["--fastmoe-graph-shapes", "0"], "takes positive counts"),
                          (["--data", "stacked", "--documents", "2"], "unknown data"),
                          (["--trace-steps", "1"], "name one"),
                          (["--fastmoe-variants-only"], "times the variants other --fastmoe-* options ask for"),
                          *([(["--memory-limit-gb", "24"], "needs a CUDA device")]
                            if not torch.cuda.is_available() else [])):
        sys.argv = ["bench_sft.py", "--preset", "afmoe-tiny", *argv]
        with pytest.raises(SystemExit):
            bench_sft.main()
        assert message in capsys.readouterr().err


def test_sft_benchmark_times_only_the_fastmoe_variants_asked_for(monkeypatch):
    """--fastmoe-variants-only: a fastmoe case per variant option (here offloaded, eager), not also the defaults;
    transformers' cases unchanged."""
    timed = []

    def run_case(case, *args):
        timed.append((case.implementation, case.cuda_graphs, case.offload))
        return {"status": "ok"}

    monkeypatch.setattr(bench_sft, "run_case", run_case)
    monkeypatch.setattr(bench_sft, "summary_line", lambda case, record: "")
    # cuda_graphs None: get_peft_model's default, the family's choice.
    for only, expected in ((False, [("transformers", None, False), ("fastmoe", None, False), ("fastmoe", False, True)]),
                           (True, [("transformers", None, False), ("fastmoe", False, True)])):
        timed.clear()
        sys.argv = ["bench_sft.py", "--preset", "afmoe-tiny", "--no-record", "--fastmoe-offloaded-eager",
                    *(["--fastmoe-variants-only"] if only else [])]
        bench_sft.main()
        assert timed == expected


def test_sft_benchmark_times_fastmoe_without_the_ops_named(tmp_path, monkeypatch, capsys):
    """--fastmoe-without-ops: a fastmoe case with those ops switched off while it trains (trl's own compute_loss
    runs), recorded with ops_off and shown on a row of its own; an op the family lacks is refused in one line."""
    import trl

    from fastmoe.kernels.dispatch import reference_only

    trained_with = []
    train = trl.SFTTrainer.train
    monkeypatch.setattr(trl.SFTTrainer, "train", lambda self, *a, **k: trained_with.append(
        type(self).compute_loss.__module__) or train(self, *a, **k))
    jsonl = tmp_path / "results.jsonl"
    sys.argv = ["bench_sft.py", "--preset", "afmoe-tiny", "--shapes", "1x32", "--steps", "1", "--warmup", "0",
                "--profile-steps", "0", "--load", "direct", "--implementations", "transformers,fastmoe",
                "--fastmoe-without-ops", "trainer_step,trl_sft_metrics", "--jsonl", str(jsonl)]
    with reference_only():
        bench_sft.main()
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(r["implementation"], r["ops_off"]) for r in records] == [
        ("transformers", []), ("fastmoe", []), ("fastmoe", ["trainer_step", "trl_sft_metrics"])]
    assert all(r["status"] == "ok" for r in records)
    # what trained: trl's compute_loss for transformers and the case without the ops, fastmoe's for the default
    assert trained_with == ["trl.trainer.sft_trainer", "fastmoe.trl_sft_metrics", "trl.trainer.sft_trainer"]
    rows = [line for line in report.render(records, include_cpu=True).split("## 1.")[1].split("## 2.")[0].splitlines()
            if line.startswith("| afmoe-tiny")]
    assert len(rows) == 2 and "(fastmoe without trainer_step, trl_sft_metrics)" in rows[1]
    sys.argv = ["bench_sft.py", "--preset", "afmoe-tiny", "--no-record", "--fastmoe-without-ops", "short_conv"]
    with pytest.raises(SystemExit):
        bench_sft.main()
    assert "short_conv not among afmoe's ops" in capsys.readouterr().err


def test_sft_benchmark_sets_fastmoes_allocator_in_a_process_of_fastmoe_cases_only(monkeypatch):
    """As `import fastmoe` at the top of a user's script would, before the first CUDA call: a process that times
    fastmoe only asks for expandable segments; one that also times transformers keeps PyTorch's default."""
    monkeypatch.setattr(bench_sft, "run_case", lambda case, *args: {"status": "ok"})
    monkeypatch.setattr(bench_sft, "summary_line", lambda case, record: "")
    for implementations, expected in (("transformers,fastmoe", None), ("fastmoe", "expandable_segments:True")):
        for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
            monkeypatch.delenv(name, raising=False)
        sys.argv = ["bench_sft.py", "--preset", "afmoe-tiny", "--no-record", "--implementations", implementations]
        bench_sft.main()
        assert os.environ.get("PYTORCH_CUDA_ALLOC_CONF") == expected


def test_short_conv_benchmark_smoke_run_matches_transformers(tmp_path):
    """--cpu: the Triton conv (interpreted) and the patched ShortConv block against transformers, recorded."""
    jsonl = tmp_path / "results.jsonl"
    sys.argv = ["bench_short_conv.py", "--cpu", "--shapes", "1x32,2x16", "--jsonl", str(jsonl)]
    bench_short_conv.main()
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(r["case"], r["implementation"]) for r in records[:4]] == [
        ("conv op 1x32", "transformers"), ("conv op 1x32", "fastmoe"),
        ("ShortConv block 1x32", "transformers"), ("ShortConv block 1x32", "fastmoe")]
    assert len(records) == 8 and all(r["question"] == "short-conv" for r in records)
    for record in records[1::2]:
        assert record["detail"] == "Triton"
        assert record["rel_err_out"] < 1e-5 and record["rel_err_dx"] < 1e-5, record


def test_generate_benchmark_smoke_run_records_the_same_tokens_both_ways(tmp_path):
    """bench_generate.py on the CPU: a tiny model built directly, greedy decoding through transformers + peft and
    through fastmoe's decode path (its ops' PyTorch references), the same tokens, one record each, on the page; fastmoe
    also with other decode settings (--gemv-loop-stages, --gemv-mma, --router-gemv-tokens), marked records the page
    leaves out."""
    from fastmoe.kernels.dispatch import reference_only
    from fastmoe.kernels.moe import one_token, routing

    jsonl = tmp_path / "results.jsonl"
    sys.argv = ["bench_generate.py", "--preset", "afmoe-tiny", "--layers", "2", "--batches", "2", "--prompt", "12",
                "--new-tokens", "5", "--repeats", "1", "--gemv-loop-stages", f"{one_token.GEMV_LOOP_STAGES},4",
                "--gemv-mma", f"{int(one_token.GEMV_MMA)},{int(not one_token.GEMV_MMA)}", "--router-gemv-tokens",
                f"{routing.ROUTER_GEMV_TOKENS},0", "--jsonl", str(jsonl)]
    with reference_only(), pytest.raises(SystemExit) as exit_status:
        bench_generate.main()
    assert exit_status.value.code == 0
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    other_mma = not one_token.GEMV_MMA
    assert [(r["implementation"], r.get("gemv_loop_stages"), r.get("gemv_mma"), r.get("router_gemv_tokens"))
            for r in records] == [
        ("fastmoe", None, None, None), ("fastmoe", None, None, 0), ("fastmoe", None, other_mma, None),
        ("fastmoe", None, other_mma, 0), ("fastmoe", 4, None, None), ("fastmoe", 4, None, 0),
        ("fastmoe", 4, other_mma, None), ("fastmoe", 4, other_mma, 0), ("transformers", None, None, None)]
    assert all(r["tokens"] == records[0]["tokens"] for r in records) and len(records[0]["tokens"]) == 5
    assert all(r["question"] == "generate" and r["decode_tokens_per_s"] > 0 for r in records)
    page = report.render(records, include_cpu=True)
    assert "| afmoe-tiny, 2 layers | bf16 | 2 | 12 |" in page
    assert page == report.render([records[0], records[-1]], include_cpu=True)


def test_decode_roofline_counts_4bit_weights_as_they_are_stored(tiny_checkpoint):
    """A 4-bit model's decode bytes count its experts' NF4 codes and absmax (buffers of the experts module) instead of
    the zero-storage placeholders left where the 16-bit stacks were, and bitsandbytes' Linear weights packed, with
    their absmax: against the 16-bit model of the same checkpoint, exactly what the quantization saves."""
    import bitsandbytes

    from fastmoe import FastModel
    from fastmoe.quantize import nf4_weight

    path = str(tiny_checkpoint("lfm2_moe"))
    full, _ = FastModel.from_pretrained(path, max_seq_length=64)
    quantized, _ = FastModel.from_pretrained(path, max_seq_length=64, load_in_4bit=True)
    config = full.config
    read_share = config.num_experts_per_tok / config.num_experts  # the experts one token's decode step reads
    saved = 0.0
    modules = dict(full.named_modules())
    for name, module in quantized.named_modules():
        if hasattr(module, "gate_up_proj_nf4_packed"):
            for stack in ("gate_up_proj", "down_proj"):
                saved += (getattr(modules[name], stack).nbytes - nf4_weight(module, stack).nbytes()) * read_share
        elif isinstance(module, bitsandbytes.nn.Linear4bit):
            state = module.weight.quant_state
            nested = state.state2.absmax.nbytes if state.state2 is not None else 0  # double quantization's scales
            saved += modules[name].weight.nbytes - module.weight.nbytes - state.absmax.nbytes - nested
    assert saved > 0
    expected = bench_generate.decode_bytes(full, config, 1, 16) - saved
    assert bench_generate.decode_bytes(quantized, config, 1, 16) == pytest.approx(expected, rel=1e-9, abs=2)


def test_grpo_benchmark_smoke_run(tmp_path):
    """bench_grpo.py on the CPU (the ops' references): a GRPO step of each implementation, fastmoe's rollouts through
    its decode path, recorded, and on the page."""
    from fastmoe.kernels.dispatch import reference_only

    jsonl = tmp_path / "results.jsonl"
    sys.argv = ["bench_grpo.py", "--preset", "afmoe-tiny", "--layers", "2", "--generations", "2", "--prompt", "10",
                "--new-tokens", "4", "--steps", "1", "--jsonl", str(jsonl), "--output-dir", str(tmp_path / "out")]
    with reference_only(), pytest.raises(SystemExit) as exit_status:
        bench_grpo.main()
    assert exit_status.value.code == 0
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["implementation"] for r in records] == ["fastmoe", "transformers"]
    assert records[0]["decode_path_steps"] == 2 * 3 and records[1]["decode_path_steps"] is None
    assert all(r["question"] == "grpo" and r["generate_tokens_per_s"] > 0 and r["prompt"] == 10 for r in records)
    page = report.render(records, include_cpu=True)
    assert "| afmoe-tiny, 2 layers | bf16 | 2 | 10 | 4 |" in page


def test_fused_lm_head_benchmark_smoke_run(tmp_path):
    """--cpu: trl's head and fastmoe's (interpreted) on tiny shapes, agreeing, recorded, and on the page."""
    jsonl = tmp_path / "results.jsonl"
    sys.argv = ["bench_fused_lm_head.py", "--cpu", "--tokens", "37", "--objectives", "sft,full-ft",
                "--jsonl", str(jsonl)]
    bench_fused_lm_head.main()
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(r["objective"], r["implementation"]) for r in records] == [
        ("sft", "trl"), ("sft", "fastmoe"), ("full-ft", "trl"), ("full-ft", "fastmoe")]
    assert all(r["question"] == "fused-lm-head" for r in records)
    for record in records[1::2]:
        assert record["status"] == "ok"
        assert record["loss_diff_vs_trl"] < 1e-5 and record["grad_hidden_rel_err_vs_trl"] < 1e-5
    page = report.render(records, include_cpu=True)
    assert "| sft, 37 tokens | 48 / 997 |" in page


@pytest.mark.parametrize("interleaved", [False, True])
def test_expert_config_sweep_cases_run_each_kernel_it_names(interleaved):
    """Every case the sweep times launches under the configuration attribute it sweeps, with outputs of the shapes
    its FLOP count assumes (toy sizes, the interpreter's configurations)."""
    cases = sweep_expert_configs.kernel_cases(64, 48, 4, 2, interleaved, 20, device="cpu", dtype=torch.float32)
    assert set(sweep_expert_configs.SWEEP) == set(sweep_expert_configs.ATTRIBUTE)
    assert {kernel for kernel, *_ in cases} == {*sweep_expert_configs.SWEEP, "torch product"}
    rows = 20 * 2
    for kernel, case, flops, fn, check in cases:
        for out in (fn(), *([check()] if check else [])):
            assert torch.isfinite(out).all(), case
            assert flops > 0 and (out.shape[0] == rows or kernel == "wgrad"), case
    # The epilogues given torch's products compute what the fused kernels compute.
    outputs = {case: (check or fn)() for _, case, _, fn, check in cases}
    assert torch.allclose(outputs["SwiGLU bwd epilogue N=48"], outputs["SwiGLU bwd N=48 K=64"], atol=1e-5)
    assert torch.allclose(outputs["d(x) epilogue N=64"], outputs["d(x) N=64 K=96"], atol=1e-5)


def test_sft_step_clock_counts_fastmoes_layer_graphs_at_each_step():
    """bench_sft.py leaves out of the timing question the records whose timed steps captured fastmoe's layer graphs:
    the clock reads the graphed checkpointing's graph count at each step's start and at the end of training, and
    likewise how many layer calls took its fallback (eager layers) so far."""
    from types import SimpleNamespace

    fallback_calls = []
    graphed = SimpleNamespace(graphs={},
                              fallback=lambda function, *args: fallback_calls.append(args) or function(*args))
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0]._fastmoe_graphed_checkpoint = graphed
    clock = bench_sft.make_step_clock("cpu", timed_steps=2, profile_from=3, profile_steps=0)
    clock.on_train_begin(None, None, None, model=model)
    for step in range(3):
        clock.on_step_begin(None, SimpleNamespace(global_step=step), None, model=model)
        graphed.graphs[step] = object()  # one layer graph captured during each step
        for _ in range(step):  # and `step` layers run eagerly, through the (counted) fallback
            assert graphed.fallback(abs, -1) == 1
    clock.on_train_end(None, None, None, model=model)
    assert clock.layer_graphs == [0, 1, 2, 3] and clock.eager_layers == [0, 0, 1, 3] and len(fallback_calls) == 3
    assert bench_sft.graphed_checkpoints(torch.nn.Linear(2, 2)) == [] and bench_sft.graphed_checkpoints(None) == []


def test_report_labels_fastmoe_rows_by_whether_their_layers_ran_as_the_family_default():
    """A record says which cuda_graphs was asked for (None: get_peft_model's default, the family's choice; records
    from before the field ran graphs). Rows that ran as the family's default carry no label, others say how they
    ran: Cohere's records from when its default was graphs read cuda_graphs=True."""
    def label(family, **fields):
        return report.graphs_label({"family": family, "implementation": "fastmoe", **fields})

    assert [label("afmoe"), label("afmoe", cuda_graphs=None), label("afmoe", cuda_graphs=True)] == ["", "", ""]
    assert label("afmoe", cuda_graphs=False) == "cuda_graphs=False"
    assert [label("cohere", cuda_graphs=None), label("cohere", cuda_graphs=False)] == ["", ""]
    assert label("cohere", cuda_graphs=True) == label("cohere") == "cuda_graphs=True"
    assert label("llama", cuda_graphs=None) == "" and label(None) == ""


def test_triton_compiles_names_the_arguments_whose_specialization_made_a_new_compile(capsys):
    """The hooks' calls as Triton makes them (keyword arguments; `compile` with the signature, the constants and the
    arguments' attributes): each compile is printed with what changed from the nearest earlier one, and the summary
    names the arguments that varied."""
    log = triton_compiles.CompileLog()
    kernel = type("JitFunctionInfo", (), {"name": "_grouped_mm_kernel"})()
    signature = {"a": "*bf16", "M": "i32", "BLOCK_M": "constexpr"}
    for key, m_attributes, block in [(1, [], 64), (2, [], 64), (3, [["tt.divisibility", 16]], 64), (4, [], 128)]:
        compile = {"signature": signature, "constants": {(2,): block}, "configs": [{(1,): m_attributes}]}
        assert log.before(key=key, fn=kernel, compile=compile) is False  # Triton goes on compiling
        log.after(key=key, fn=kernel, compile=compile)
    printed = capsys.readouterr().out.splitlines()
    assert "#1" in printed[0] and printed[0].endswith(" s")
    assert printed[2].endswith("(M: i32 -> i32 tt.divisibility=16)")
    assert printed[3].endswith("(BLOCK_M: constexpr=64 -> constexpr=128)")
    summary = log.summary().splitlines()
    assert summary[1].startswith("  _grouped_mm_kernel: 4, ") and summary[1].endswith(", BLOCK_M, M")
    assert summary[-1].startswith("  total: 4 compiles")
