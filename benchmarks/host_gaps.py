"""Where a training step leaves the GPU waiting: the host-side Python that runs while no kernel does.

Input: a Chrome trace written by torch.profiler with CPU and CUDA activities and `with_stack=True` (the Python
tracer's `python_function` events). Output, for the traced window:

* the GPU's idle gaps (the complement of the union of kernel, memcpy and memset intervals), with their total;
* for each gap, the host interval that made it: from the gap's start to the launch (runtime call) of the kernel that
  ends it. A gap whose ending kernel was launched before the gap began was not the host's doing (the GPU waited on
  an event or a copy) and is counted apart;
* the host time inside those intervals by Python function, exclusive (the innermost frame running, which is where
  the time goes) and inclusive (every frame on the stack, which says in which phase: forward, backward, optimizer,
  logging, data);
* the CUDA runtime calls that block the host (synchronize, blocking copies), with count and time: after each one
  the GPU is empty and the host must launch the next kernel before anything runs again;
* the GPU time of each kernel by the Python functions that launched it (its launch's innermost frames): which line
  of the model issues the copies and elementwise kernels a profile's top list names only by their CUDA names. Kernels
  replayed from a CUDA graph are all the graph launch's: trace an eager step (bench_sft.py --fastmoe-without-graphs)
  to see them one by one.

    python benchmarks/host_gaps.py TRACE.json[.gz] [--top 25]

bench_sft.py --trace-steps N writes such a trace per case and prints this summary.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
from pathlib import Path

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
BLOCKING_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
                  "cudaMemcpyAsync", "cudaStreamWaitEvent")
MIN_GAP_US = 5.0  # shorter gaps are launch latency between back-to-back kernels


def load_trace(path: str | Path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as handle:
        trace = json.load(handle)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and "ts" in e]


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _overlap(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Length of [start, end) covered by sorted, disjoint intervals."""
    total = 0.0
    i = max(0, bisect.bisect_right(intervals, (start, float("inf"))) - 1)
    while i < len(intervals) and intervals[i][0] < end:
        a, b = intervals[i]
        total += max(0.0, min(b, end) - max(a, start))
        i += 1
    return total


def _innermost_segments(frames: list[dict]) -> list[tuple[float, float, str]]:
    """(start, end, name) pieces of time, each attributed to the innermost Python frame running then."""
    frames = sorted(frames, key=lambda e: (e["ts"], -e["dur"]))
    segments: list[tuple[float, float, str]] = []
    stack: list[tuple[float, str]] = []  # (end, name)
    cursor = frames[0]["ts"] if frames else 0.0

    def emit_until(time: float) -> None:
        nonlocal cursor
        while stack and stack[-1][0] <= time:
            end, name = stack.pop()
            if end > cursor:
                segments.append((cursor, end, name))
                cursor = end
        if stack and time > cursor:
            segments.append((cursor, time, stack[-1][1]))
        cursor = max(cursor, time)

    for frame in frames:
        start, end = frame["ts"], frame["ts"] + frame["dur"]
        emit_until(start)
        stack.append((end, frame["name"]))
    emit_until(float("inf"))
    return segments


def _stacks_at(frames: list[dict], times: list[float], depth: int = 4) -> list[str]:
    """For each time, the innermost `depth` Python functions (builtins left out) of one thread's nested frames running
    then, innermost first ("?" where none): one sweep over the frames and the sorted times."""
    frames = sorted(frames, key=lambda e: (e["ts"], -e["dur"]))
    stacks: list[str] = [""] * len(times)
    stack: list[dict] = []
    i = 0
    for k in sorted(range(len(times)), key=times.__getitem__):
        time = times[k]
        while i < len(frames) and frames[i]["ts"] <= time:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= frames[i]["ts"]:
                stack.pop()
            stack.append(frames[i])
            i += 1
        while stack and stack[-1]["ts"] + stack[-1]["dur"] <= time:
            stack.pop()
        names = [f["name"] for f in stack if not f["name"].startswith("<built-in")]
        stacks[k] = " < ".join(reversed(names[-depth:])) or "?"
    return stacks


def kernel_sources(events: list[dict], depth: int = 4) -> dict[str, dict]:
    """'kernel name from innermost < ... frames' -> {"ms": GPU time, "count": launches}, largest first: each kernel
    by the Python running where its launch (runtime call of the same correlation id) was made."""
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    frames_of: dict = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "python_function":
            frames_of[e.get("tid")].append(e)
    kernels_of: dict = collections.defaultdict(list)  # launching thread -> [(kernel, launch time)]
    for e in events:
        launch = launches.get(e.get("args", {}).get("correlation")) if e.get("cat") == "kernel" else None
        if launch is not None:
            kernels_of[launch.get("tid")].append((e, launch["ts"]))
    totals: dict = collections.defaultdict(lambda: [0.0, 0])
    for tid, kernels in kernels_of.items():
        for (kernel, _), callers in zip(kernels, _stacks_at(frames_of.get(tid, []), [t for _, t in kernels], depth)):
            entry = totals[f"{kernel['name'][:70]} from {callers}"]
            entry[0] += kernel["dur"]
            entry[1] += 1
    return {key: {"ms": us / 1e3, "count": count}
            for key, (us, count) in sorted(totals.items(), key=lambda item: -item[1][0])}


def summarize(events: list[dict], min_gap_us: float = MIN_GAP_US) -> dict:
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    if not gpu:
        return {"error": "the trace has no GPU activity"}
    busy = _union([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
    window = (busy[0][0], busy[-1][1])
    runtime = [e for e in events if e.get("cat") == "cuda_runtime"]
    launch_at = {e["args"]["correlation"]: e["ts"] for e in runtime if "correlation" in e.get("args", {})}
    starts = {}
    for e in gpu:  # the earliest GPU event starting at each busy interval's start ends the gap before it
        starts.setdefault(e["ts"], e)

    host_intervals, gaps_us, not_host_us = [], [], 0.0
    for (_, gap_start), (gap_end, _) in zip(busy, busy[1:]):
        if gap_end - gap_start < min_gap_us:
            continue
        gaps_us.append(gap_end - gap_start)
        ender = starts.get(gap_end)
        launched = launch_at.get(ender.get("args", {}).get("correlation")) if ender else None
        if launched is not None and launched <= gap_start:
            not_host_us += gap_end - gap_start
            continue
        host_intervals.append((gap_start, gap_end if launched is None else min(gap_end, launched)))
    host_intervals = _union(host_intervals)

    # The threads that launch kernels: the main one, and autograd's device thread, which runs the backward (and
    # the Python of custom autograd Functions). Each thread's frames are attributed on their own; frames of threads
    # other than the busiest Python thread are labelled with the thread.
    python = [e for e in events if e.get("cat") == "python_function"]
    python_threads = collections.Counter(e.get("tid") for e in python)
    main_tid = python_threads.most_common(1)[0][0] if python_threads else None
    launching = {e.get("tid") for e in runtime} & set(python_threads) or {main_tid}
    exclusive: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    frames_of: dict = {}
    for tid in launching:
        frames = frames_of[tid] = [e for e in python if e.get("tid") == tid]
        label = "" if tid == main_tid else f"[thread {tid}] "
        for start, end, name in _innermost_segments(frames):
            covered = _overlap(host_intervals, start, end)
            if covered:
                exclusive[label + name] += covered
        by_name: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
        for frame in frames:
            by_name[frame["name"]].append((frame["ts"], frame["ts"] + frame["dur"]))
        for name, intervals in by_name.items():
            covered = sum(_overlap(host_intervals, a, b) for a, b in _union(intervals))
            if covered:
                inclusive[label + name] = covered

    blocking = collections.defaultdict(lambda: [0, 0.0])
    blocking_callers: collections.Counter = collections.Counter()  # the Python frame that made each blocking call
    calls_of: dict = collections.defaultdict(list)
    for e in runtime:
        if e["name"] in BLOCKING_CALLS:
            blocking[e["name"]][0] += 1
            blocking[e["name"]][1] += e["dur"]
            calls_of[e.get("tid")].append(e)
    for tid, calls in calls_of.items():
        for e, callers in zip(calls, _stacks_at(frames_of.get(tid, []), [e["ts"] for e in calls], depth=3)):
            blocking_callers[f"{e['name']} from {callers}"] += 1
    wall = window[1] - window[0]
    return {
        "window_ms": wall / 1e3,
        "gpu_busy_ms": sum(b - a for a, b in busy) / 1e3,
        "gaps": len(gaps_us),
        "gaps_ms": sum(gaps_us) / 1e3,
        "gaps_not_host_ms": not_host_us / 1e3,
        "host_ms": sum(b - a for a, b in host_intervals) / 1e3,
        "exclusive_ms": {k: v / 1e3 for k, v in exclusive.most_common()},
        "inclusive_ms": {k: v / 1e3 for k, v in inclusive.most_common()},
        "blocking_calls": {k: {"count": c, "ms": t / 1e3} for k, (c, t) in blocking.items()},
        "blocking_callers": dict(blocking_callers.most_common()),
        "kernel_sources": kernel_sources(events),
    }


def report(summary: dict, top: int = 25) -> str:
    if "error" in summary:
        return summary["error"]
    lines = [f"traced {summary['window_ms']:.1f} ms: GPU busy {summary['gpu_busy_ms']:.1f} ms, {summary['gaps']} gaps "
             f"of {summary['gaps_ms']:.1f} ms ({summary['gaps_not_host_ms']:.1f} ms not waiting on the host), "
             f"host-bound {summary['host_ms']:.1f} ms"]
    for title, key in (("exclusive (innermost frame)", "exclusive_ms"), ("inclusive (any frame)", "inclusive_ms")):
        lines.append(f"host-bound time by Python function, {title}:")
        lines += [f"  {ms:8.2f} ms  {name}" for name, ms in list(summary[key].items())[:top]]
    calls = ", ".join(f"{name} x{v['count']} ({v['ms']:.1f} ms)" for name, v in summary["blocking_calls"].items())
    lines.append(f"blocking runtime calls: {calls or 'none'}")
    lines += [f"  {count:5d} x {caller}" for caller, count in list(summary["blocking_callers"].items())[:top]]
    lines.append("GPU time by kernel and the Python that launched it:")
    lines += [f"  {v['ms']:8.2f} ms {v['count']:5d} x {source}"
              for source, v in list(summary.get("kernel_sources", {}).items())[:top]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(report(summarize(load_trace(args.trace)), args.top))


if __name__ == "__main__":
    main()
