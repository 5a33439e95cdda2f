"""Charts and a summary from the recorded benchmark numbers; runs on any machine with matplotlib, no GPU.

* benchmarks/results.jsonl (bench_train_step.py, one line per measurement) -> bar charts of tokens/s and peak
  memory per variant, one panel per family, bars grouped by preset, layers and batch x sequence shape; for each
  group and variant the latest record counts. CPU smoke-run records are left out.
* benchmarks/quality_run.json (quality_run.py) -> the loss curves of its variants on one chart.
* `--summary` prints a table of the records instead (one session's with `--run`), and needs no matplotlib:
  gpu_session.sh ends with it.

    pip install matplotlib      # or: pip install -e ".[bench]"
    python benchmarks/plot_results.py                        # writes benchmarks/plots/*.png
    python benchmarks/plot_results.py --summary --run 20261123T1416
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).parent
VARIANT_COLOURS = {"hf-eager": "#9e9e9e", "hf-grouped_mm": "#4c72b0", "fastmoe": "#dd8452", "fastmoe-4bit": "#55a868"}
VARIANT_LABELS = {"hf-eager": "transformers eager + peft", "hf-grouped_mm": "transformers grouped_mm + peft"}
FAMILY_NAMES = {"afmoe": "AFMoE", "lfm2_moe": "LFM2-MoE", "jetmoe": "JetMoe", "cohere": "Cohere"}


def load_records(path: str | Path) -> list[dict]:
    """The training-step records (bench_train_step.py); other benchmarks' lines name themselves in "benchmark"."""
    with open(path) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return [r for r in records if r.get("benchmark", "train_step") == "train_step"]


def group_label(record: dict) -> str:
    label = f"{record['preset']}\n{record['layers']} layers, {record['shape']}"
    return label + (", skewed" if record.get("routing") == "skewed" else "")


def latest_by_group(records: list[dict]) -> dict[str, dict[str, dict[str, dict]]]:
    """family -> group label -> variant -> the latest record (dates are 'YYYY-MM-DD HH:MM UTC', so they sort)."""
    table: dict[str, dict[str, dict[str, dict]]] = {}
    for record in sorted(records, key=lambda r: r["date"]):
        if record.get("gpu") == "CPU" or record.get("status") == "error":
            continue
        table.setdefault(record["family"], {}).setdefault(group_label(record), {})[record["variant"]] = record
    return table


def plot_bars(records: list[dict], metric: str, ylabel: str, path: Path) -> bool:
    """One panel per family; in each, one cluster of bars per group, one bar per variant; OOM marked.
    False when no GPU record is there to draw."""
    table = latest_by_group(records)
    families = sorted(table)
    if not families:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(families), figsize=(max(6.5, 4.5 * len(families)), 4.5), squeeze=False)
    for ax, family in zip(axes[0], families):
        groups = table[family]
        variants = sorted({v for per_group in groups.values() for v in per_group},
                          key=lambda v: list(VARIANT_COLOURS).index(v) if v in VARIANT_COLOURS else 99)
        width = 0.8 / len(variants)
        for i, variant in enumerate(variants):
            for j, label in enumerate(groups):
                record = groups[label].get(variant)
                if record is None:
                    continue
                x = j - 0.4 + width * (i + 0.5)
                value = record.get(metric) if record.get("status") == "ok" else None
                if value is None:
                    ax.text(x, 0, "OOM" if record.get("status") == "oom" else "n/a", ha="center", va="bottom",
                            rotation=90, fontsize=8)
                    continue
                ax.bar(x, value, width, color=VARIANT_COLOURS.get(variant), label=VARIANT_LABELS.get(variant, variant))
                ax.text(x, value, f"{value:,.0f}" if value >= 100 else f"{value:.1f}", ha="center", va="bottom",
                        fontsize=7)
        ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
        ax.set_title(FAMILY_NAMES.get(family, family))
        ax.set_ylabel(ylabel)
        handles, labels = ax.get_legend_handles_labels()
        by_label = dict(zip(labels, handles))
        ax.legend(by_label.values(), by_label.keys(), fontsize=8)
    gpus = sorted({r["gpu"] for r in records if r.get("gpu") != "CPU"})
    fig.suptitle(f"LoRA training step, {ylabel} ({', '.join(gpus)})", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_quality(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = result["losses"]
    # Two curves: a second panel shows their difference, which is too small to see on the first.
    rows = 2 if len(curves) == 2 else 1
    fig, axes = plt.subplots(rows, 1, figsize=(7, 5.5 if rows == 2 else 4.2), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1][:rows]})
    ax = axes[0][0]
    for variant, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=VARIANT_LABELS.get(variant, variant),
                color=VARIANT_COLOURS.get(variant), linewidth=1.2)
    if result.get("loss_floor") is not None:
        ax.axhline(result["loss_floor"], color="black", linestyle="--", linewidth=0.8, label="loss floor (entropy)")
    ax.set_ylabel("training loss")
    ax.set_title(f"LoRA SFT, {result['model']} ({result['gpu']}, {result['dtype']})", fontsize=10)
    ax.legend()
    if rows == 2:
        (first, a), (second, b) = curves.items()
        axes[1][0].plot(range(1, len(a) + 1), [y - x for x, y in zip(a, b)], color="black", linewidth=0.8)
        axes[1][0].axhline(0.0, color="grey", linewidth=0.5)
        axes[1][0].set_ylabel(f"{second} - {first}", fontsize=8)
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_table(records: list[dict], run: str | None = None) -> str:
    """Markdown table of the records (of one run), with fastmoe's tokens/s over the best transformers variant."""
    if run is not None:
        records = [r for r in records if r.get("run") == run]
    best_hf: dict[tuple, float] = {}
    for r in records:
        if r.get("status") == "ok" and r["variant"].startswith("hf"):
            key = (r["preset"], r["layers"], r["shape"], r.get("routing"))
            best_hf[key] = max(best_hf.get(key, 0.0), r["tokens_per_s"])
    lines = ["| preset | layers | shape | variant | tokens/s | peak GB | MFU % | loss | vs transformers |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        key = (r["preset"], r["layers"], r["shape"], r.get("routing"))
        first = f"| {r['preset']} | {r['layers']} | {r['shape']}{' skewed' if r.get('routing') == 'skewed' else ''} "
        if r.get("status") != "ok":
            lines.append(first + f"| {r['variant']} | {r.get('status')} | - | - | - | - |")
            continue
        ratio = "-"
        if not r["variant"].startswith("hf") and best_hf.get(key):
            ratio = f"{r['tokens_per_s'] / best_hf[key]:.2f}x"

        def fmt(value, spec):
            return "-" if value is None else format(value, spec)

        lines.append(first + f"| {r['variant']} | {r['tokens_per_s']:,.0f} | "
                     f"{fmt(r.get('peak_gb'), '.1f')} | {fmt(r.get('mfu_pct'), '.1f')} | {fmt(r.get('loss'), '.4f')} "
                     f"| {ratio} |")
    return "\n".join(lines)


def quality_summary(result: dict) -> str:
    lines = [f"quality run: {result['model']}, {result['steps']} steps ({result['gpu']}, {result['dtype']})"]
    for variant, losses in result["losses"].items():
        tail = losses[-10:]
        lines.append(f"  {variant}: first loss {losses[0]:.4f}, mean of last 10 {sum(tail) / len(tail):.4f}, "
                     f"{result['seconds'][variant]:.1f} s")
    if "max_abs_diff" in result:
        lines.append(f"  largest per-step loss difference {result['max_abs_diff']:.4f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(HERE / "results.jsonl"))
    parser.add_argument("--quality", default=str(HERE / "quality_run.json"))
    parser.add_argument("--out-dir", default=str(HERE / "plots"))
    parser.add_argument("--summary", action="store_true", help="print a table instead of plotting")
    parser.add_argument("--run", default=None, help="with --summary: only this run id's records")
    args = parser.parse_args()

    results, quality = Path(args.results), Path(args.quality)
    if args.summary:
        if results.exists():
            print(summary_table(load_records(results), args.run))
        if quality.exists():
            print(quality_summary(json.loads(quality.read_text())))
        return
    out = Path(args.out_dir)
    if results.exists():
        records = load_records(results)
        if plot_bars(records, "tokens_per_s", "tokens/s", out / "train_step_tokens_per_s.png"):
            plot_bars(records, "peak_gb", "peak memory (GiB)", out / "train_step_peak_memory.png")
            print(f"wrote {out / 'train_step_tokens_per_s.png'} and {out / 'train_step_peak_memory.png'}")
        else:
            print(f"no GPU records in {results}: no training-step charts")
    if quality.exists():
        plot_quality(json.loads(quality.read_text()), out / "quality_loss.png")
        print(f"wrote {out / 'quality_loss.png'}")


if __name__ == "__main__":
    main()
