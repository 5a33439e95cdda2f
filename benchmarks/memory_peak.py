"""What holds the memory at a training step's peak, and what of it grows with the tokens.

Input: a CUDA allocator snapshot with its allocation trace (`torch.cuda.memory._record_memory_history(...,
stacks="python")` before the step, `torch.cuda.memory._snapshot()` after it). The trace is replayed from the bytes
allocated when recording started (the `base`: weights, adapters, optimizer state, anything kept across steps):
each `alloc` adds its size, each `free_completed` takes it away. Output:

* the step's peak (base + the most the replay reached) and where it happened: the allocating call's Python stack,
  which says in which phase (a layer's recomputed forward, its backward, the loss);
* the blocks live at that moment, allocated during the step, grouped by the innermost frame outside torch
  (`file:line function` of fastmoe, transformers, peft, trl, ...): what each piece of the model holds at the peak.

Two summaries of the same model at different sequence lengths give each group's bytes per token (`compare`):

    python benchmarks/memory_peak.py SNAPSHOT.pickle [--top 20]
    python benchmarks/memory_peak.py --compare SHORT.memory.json LONG.memory.json

bench_sft.py --memory-profile writes a snapshot per case after its other steps and prints this summary. A CUDA graph's
replay allocates nothing (its memory was taken from the graph's pool when it was captured), so profile fastmoe with
--fastmoe-without-graphs: its eager layers allocate what the captured ones keep in their pool.
"""

from __future__ import annotations

import argparse
import collections
import json
import pickle
from pathlib import Path

# Frames from these folders are the machinery (autograd, the checkpoint wrapper's plumbing is kept: see _site).
_MACHINERY = ("/torch/", "/triton/", "<frozen", "/contextlib.py", "/functools.py", "/threading.py")


def _site(frames: list[dict]) -> str:
    """The innermost frame outside torch and triton: the model code that asked for the block."""
    for frame in frames:
        name = frame.get("filename", "")
        if not any(part in name for part in _MACHINERY):
            return f"{_short(name)}:{frame.get('line', 0)} {frame.get('name', '?')}"
    return "torch internals" if frames else "no stack recorded"


def _short(filename: str) -> str:
    for root in ("/site-packages/", "/fastmoe-site/", "/benchmarks/"):
        if root in filename:
            return filename.split(root, 1)[1]
    return filename.rsplit("/", 2)[-1] if "/" in filename else filename


def _stack(frames: list[dict], depth: int = 12) -> list[str]:
    kept = [f for f in frames if not any(part in f.get("filename", "") for part in _MACHINERY)]
    return [f"{_short(f.get('filename', ''))}:{f.get('line', 0)} {f.get('name', '?')}" for f in kept[:depth]]


def summarize(snapshot: dict, base_bytes: int, tokens: int | None = None, device: int = 0, top: int = 20) -> dict:
    """The peak of the recorded trace above base_bytes and the blocks live there, grouped by allocating site."""
    traces = snapshot.get("device_traces", [])
    events = traces[device] if device < len(traces) else []
    live: dict[int, tuple[int, str]] = {}  # address -> (bytes, site)
    current = peak = 0
    peak_live: dict[int, tuple[int, str]] = {}
    peak_frames: list[dict] = []
    for event in events:
        action = event.get("action")
        if action == "alloc":
            live[event["addr"]] = (event["size"], _site(event.get("frames", [])))
            current += event["size"]
            if current > peak:
                peak = current
                peak_live = dict(live)
                peak_frames = event.get("frames", [])
        elif action == "free_completed" and event["addr"] in live:
            current -= live.pop(event["addr"])[0]
    groups: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    for size, site in peak_live.values():
        groups[site] += size
        counts[site] += 1
    summary = {
        "events": len(events),
        "base_gb": round(base_bytes / 2**30, 3),
        "step_peak_gb": round((base_bytes + peak) / 2**30, 3),
        "above_base_gb": round(peak / 2**30, 3),
        "tokens": tokens,
        "peak_stack": _stack(peak_frames),
        "sites_mb": {site: round(size / 2**20, 2) for site, size in groups.most_common(top)},
        "sites_blocks": {site: counts[site] for site, _ in groups.most_common(top)},
        "other_sites_mb": round(sum(size for _, size in groups.most_common()[top:]) / 2**20, 2),
    }
    if tokens:
        summary["above_base_kb_per_token"] = round(peak / 1024 / tokens, 2)
    return summary


def report(summary: dict) -> str:
    lines = [f"step peak {summary['step_peak_gb']:.2f} GB = base {summary['base_gb']:.2f} GB + "
             f"{summary['above_base_gb']:.2f} GB allocated during the step"
             + (f" ({summary['above_base_kb_per_token']:.1f} KB per token)" if summary.get("tokens") else "")]
    lines.append("  peak reached in: " + " <- ".join(summary["peak_stack"][:6]))
    lines.append("  live at the peak, by allocating site (MB, blocks):")
    for site, mb in summary["sites_mb"].items():
        lines.append(f"    {mb:10.1f}  {summary['sites_blocks'][site]:5d}  {site}")
    if summary["other_sites_mb"]:
        lines.append(f"    {summary['other_sites_mb']:10.1f}         (other sites)")
    return "\n".join(lines)


def compare(short: dict, long: dict) -> dict:
    """Bytes per token of the step's peak and of each site, between two summaries at different token counts."""
    extra = long["tokens"] - short["tokens"]
    if extra <= 0:
        raise ValueError("the second summary must have more tokens than the first")
    sites = set(short["sites_mb"]) | set(long["sites_mb"])
    per_token = {site: round((long["sites_mb"].get(site, 0.0) - short["sites_mb"].get(site, 0.0)) * 1024 / extra, 2)
                 for site in sites}
    return {"tokens": [short["tokens"], long["tokens"]],
            "peak_kb_per_token": round((long["step_peak_gb"] - short["step_peak_gb"]) * 2**20 / extra, 2),
            "sites_kb_per_token": dict(sorted(per_token.items(), key=lambda item: -abs(item[1])))}


def compare_report(result: dict) -> str:
    lines = [f"from {result['tokens'][0]:,} to {result['tokens'][1]:,} tokens: the step's peak grows "
             f"{result['peak_kb_per_token']:.1f} KB per token; by site (KB per token):"]
    lines += [f"    {kb:10.2f}  {site}" for site, kb in result["sites_kb_per_token"].items() if abs(kb) >= 0.05]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("snapshot", nargs="?", help="a pickled torch.cuda.memory._snapshot() with its trace")
    parser.add_argument("--base-gb", type=float, default=0.0, help="bytes allocated when recording started")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--compare", nargs=2, metavar=("SHORT", "LONG"), help="two summaries (.memory.json)")
    args = parser.parse_args()
    if args.compare:
        short, long = (json.loads(Path(p).read_text()) for p in args.compare)
        print(compare_report(compare(short, long)))
        return
    if not args.snapshot:
        parser.error("name a snapshot, or --compare two summaries")
    with open(args.snapshot, "rb") as handle:
        snapshot = pickle.load(handle)
    print(report(summarize(snapshot, int(args.base_gb * 2**30), args.tokens, top=args.top)))


if __name__ == "__main__":
    main()
