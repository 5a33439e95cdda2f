"""One line per kernel of an Nsight Compute report printed as text (ncu's default details page, with the sections and
metrics that gpu_session.sh's ncu steps ask for): time, DRAM and SM busy shares, issue rate, the busiest instruction
pipes, the largest stall reasons, registers and resident warps, spills. The full report runs to hundreds of lines a
kernel; this is what a device call's output has room for.

    python benchmarks/ncu_summary.py OUT/ncu-decode.log
"""

from __future__ import annotations

import re
import sys

_PIPE = re.compile(r"sm__inst_executed_pipe_(\w+?)\.avg\.pct_of_peak_sustained_active\s+%\s+([\d.,]+)")
_STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio\s+inst\s+([\d.,]+)")
# Pipes worth a column (the others are sub-counts of these or rarely busy).
_PIPES = ("alu", "fma", "lsu", "tensor", "uniform", "xu")
_FIELDS = {
    "duration_us": r"Duration\s+us\s+([\d.,]+)",
    "duration_ms": r"Duration\s+ms\s+([\d.,]+)",
    "dram": r"DRAM Throughput\s+%\s+([\d.,]+)",
    "elapsed": r"Elapsed Cycles\s+cycle\s+([\d.,]+)",
    "active": r"SM Active Cycles\s+cycle\s+([\d.,]+)",
    "ipc": r"Executed Ipc Active\s+inst/cycle\s+([\d.,]+)",
    "registers": r"Registers Per Thread\s+register/thread\s+([\d.,]+)",
    "warps": r"Achieved Active Warps Per SM\s+warp\s+([\d.,]+)",
    "spills": r"Local Memory Spilling Requests\s+([\d.,]+)",
}


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def kernels(report: str) -> list[tuple[str, str]]:
    """(header line, body) of each kernel of the report: a header is the indented '<name> (grid)x(block), Context'
    line ncu prints before a kernel's sections."""
    headers = list(re.finditer(r"^  (\S+) \(([\d, ]+)\)x\(([\d, ]+)\), Context", report, re.MULTILINE))
    return [(f"{h.group(1)} grid ({h.group(2)}) block ({h.group(3)})",
             report[h.end():headers[i + 1].start() if i + 1 < len(headers) else len(report)])
            for i, h in enumerate(headers)]


def summarise(header: str, body: str) -> str:
    found = {}
    for name, pattern in _FIELDS.items():
        match = re.search(pattern, body)
        if match:
            found[name] = _number(match.group(1))
    pipes = {name: _number(value) for name, value in _PIPE.findall(body)}
    stalls = sorted(((_number(value), name) for name, value in _STALL.findall(body) if name != "selected"),
                    reverse=True)
    duration = found.get("duration_us", found.get("duration_ms", 0.0) * 1e3)
    parts = [f"{header}: {duration:.1f} us"]
    if "dram" in found:
        parts.append(f"DRAM {found['dram']:.0f}%")
    if "elapsed" in found and "active" in found and found["elapsed"]:
        parts.append(f"SMs busy {100 * found['active'] / found['elapsed']:.0f}%")
    if "ipc" in found:
        parts.append(f"IPC {found['ipc']:.2f}")
    if pipes:
        parts.append("pipes " + " ".join(f"{name} {pipes[name]:.0f}%" for name in _PIPES if name in pipes))
    if stalls:
        parts.append("stalls " + " ".join(f"{name} {value:.2f}" for value, name in stalls[:3]))
    if "registers" in found:
        parts.append(f"{found['registers']:.0f} registers")
    if "warps" in found:
        parts.append(f"{found['warps']:.1f} warps/SM")
    if found.get("spills"):
        parts.append(f"{found['spills']:,.0f} spill requests")
    return ", ".join(parts)


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/ncu_summary.py NCU_TEXT_REPORT")
    with open(sys.argv[1]) as f:
        report = f.read()
    found = kernels(report)
    if not found:
        raise SystemExit(f"{sys.argv[1]}: no kernel sections (is it ncu's text output?)")
    for header, body in found:
        print(summarise(header, body))


if __name__ == "__main__":
    main()
