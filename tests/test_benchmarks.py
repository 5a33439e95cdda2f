"""The benchmark harness's own arithmetic and output: FLOP counting of each preset (on meta-device models, so
nothing is allocated), the JSON-lines summary, the charts drawn from two records, and the per-kernel benchmarks'
CPU smoke modes."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_fused_lm_head  # noqa: E402
import bench_short_conv  # noqa: E402
import bench_train_step  # noqa: E402
import plot_results  # noqa: E402


def meta_model(preset: str):
    import transformers

    config = bench_train_step.make_config(bench_train_step.PRESETS[preset])
    with torch.device("meta"):
        return config, transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("preset, total, active", [
    ("lfm2-8b-a1b", 8.34e9, 1.56e9),  # LiquidAI: 8.3B total, 1.5B active
    ("jetmoe-8b", 8.52e9, 2.33e9),  # JetMoe: 8B total, 2.2B active (without the lm_head)
])
def test_presets_have_their_models_sizes(preset, total, active):
    _, model = meta_model(preset)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(total, rel=0.01)
    assert bench_train_step.active_params(model) == pytest.approx(active, rel=0.01)


def test_active_params_count_experts_at_top_k_and_the_head_once():
    config, model = meta_model("afmoe-tiny")
    h, vocab = config.hidden_size, config.vocab_size
    routed = 3 * h * config.moe_intermediate_size * config.num_experts  # gate, up, down of every expert
    dense_layers = config.num_dense_layers
    moe_layers = config.num_hidden_layers - dense_layers
    everything = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    expected = (everything - vocab * h  # the input embedding is a lookup (the untied lm_head stays)
                - moe_layers * routed * (1 - config.num_experts_per_tok / config.num_experts))
    assert bench_train_step.active_params(model) == expected


def test_attention_flops_count_only_pairs_the_masks_keep():
    config = bench_train_step.make_config(bench_train_step.PRESETS["afmoe-tiny"])  # sliding window 16, 3 layers
    seq, window, d, heads = 64, config.sliding_window, config.head_dim, config.num_attention_heads
    full = seq * (seq + 1) / 2
    sliding = window * (window + 1) / 2 + (seq - window) * window
    kinds = config.layer_types
    pairs = sum(full if k == "full_attention" else sliding for k in kinds)
    assert "sliding_attention" in kinds and "full_attention" in kinds
    assert bench_train_step.attention_flops(config, batch=2, seq=seq) == 12 * heads * d * pairs * 2


def test_variants_resolve_per_family():
    assert bench_train_step.resolve_variant("hf", "afmoe") == "hf-grouped_mm"
    assert bench_train_step.resolve_variant("hf", "jetmoe") == "hf-eager"
    assert bench_train_step.resolve_variant("hf-grouped_mm", "cohere") is None
    assert bench_train_step.parse_shapes("1x4096, 4x2048") == [(1, 4096), (4, 2048)]


def records():
    common = dict(date="2026-11-23 14:16 UTC", run="r1", gpu="NVIDIA H100 80GB HBM3", family="afmoe",
                  preset="trinity-mini", layers=8, batch=1, seq=4096, shape="1x4096", routing="random", status="ok")
    return [dict(common, variant="hf-grouped_mm", tokens_per_s=15407, peak_gb=23.6, mfu_pct=9.9, loss=12.58),
            dict(common, variant="fastmoe", tokens_per_s=31793, peak_gb=15.5, mfu_pct=20.5, loss=12.57)]


def test_summary_table_compares_fastmoe_with_transformers():
    table = plot_results.summary_table(records() + [dict(records()[0], run="r2")], run="r1")
    assert table.count("trinity-mini") == 2
    assert "2.06x" in table


def test_charts_are_drawn_from_two_records(tmp_path):
    pytest.importorskip("matplotlib")
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records()))
    quality = tmp_path / "quality.json"
    quality.write_text(json.dumps(dict(model="AFMoE", gpu="CPU", dtype="float32", steps=3, loss_floor=1.0,
                                       losses={"hf-grouped_mm": [6.0, 5.0, 4.0], "fastmoe": [6.0, 5.0, 4.1]},
                                       seconds={"hf-grouped_mm": 1.0, "fastmoe": 1.0})))
    sys.argv = ["plot_results.py", "--results", str(results), "--quality", str(quality), "--out-dir", str(tmp_path)]
    plot_results.main()
    for name in ("train_step_tokens_per_s.png", "train_step_peak_memory.png", "quality_loss.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_short_conv_benchmark_smoke_run_matches_transformers(tmp_path):
    """--cpu: the Triton conv (interpreted) and the patched ShortConv block against transformers, recorded."""
    results = tmp_path / "RESULTS.md"
    sys.argv = ["bench_short_conv.py", "--cpu", "--shapes", "1x32,2x16", "--results", str(results)]
    bench_short_conv.main()
    rows = [line.strip("| ").split(" | ") for line in results.read_text().splitlines()
            if line.startswith(("| conv op", "| ShortConv block"))]
    assert [(case, impl) for case, impl, *_ in rows[:4]] == [
        ("conv op 1x32", "transformers (torch conv1d)"), ("conv op 1x32", "fastmoe (Triton)"),
        ("ShortConv block 1x32", "transformers"), ("ShortConv block 1x32", "fastmoe (Triton)")]
    assert len(rows) == 8
    for row in rows[1::2]:
        out_err, dx_err = map(float, row[-1].split(" / "))
        assert out_err < 1e-5 and dx_err < 1e-5, row


def test_fused_lm_head_benchmark_smoke_run(tmp_path):
    """--cpu: trl's head and fastmoe's (interpreted) on tiny shapes, agreeing, recorded as JSON lines that
    plot_results leaves out of the training-step charts."""
    jsonl = tmp_path / "results.jsonl"
    sys.argv = ["bench_fused_lm_head.py", "--cpu", "--tokens", "37", "--objectives", "sft,full-ft",
                "--jsonl", str(jsonl)]
    bench_fused_lm_head.main()
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(r["objective"], r["implementation"]) for r in lines] == [
        ("sft", "trl"), ("sft", "fastmoe"), ("full-ft", "trl"), ("full-ft", "fastmoe")]
    for record in lines[1::2]:
        assert record["status"] == "ok" and record["benchmark"] == "fused_lm_head"
        assert record["loss_diff_vs_trl"] < 1e-5 and record["grad_hidden_rel_err_vs_trl"] < 1e-5
    with jsonl.open("a") as handle:
        handle.write(json.dumps(records()[0]) + "\n")
    assert plot_results.load_records(jsonl) == records()[:1]
