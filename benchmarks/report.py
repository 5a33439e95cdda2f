"""Writes benchmarks/RESULTS.md from benchmarks/results.jsonl: the current answer to each question the benchmarks ask.

Every record (one measurement, one JSON line) names its `question`; each question is one section of the page, in
the order of SECTIONS, with one table that shows the newest record of each configuration (older ones stay in the
JSON lines and in git). Each row ends with [n], a source listed under its table: date, GPU, library versions and
the command that measured it. Standard library only: it runs anywhere.

    python benchmarks/report.py                                  # rewrites benchmarks/RESULTS.md
    python benchmarks/report.py --results OUT/results.jsonl --run RUN_ID --out -    # one session's tables, printed
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAMILY_ORDER = ("afmoe", "lfm2_moe", "jetmoe", "cohere")
VERSION_ORDER = ("torch", "transformers", "peft", "trl", "triton", "bitsandbytes")


# --------------------------------------------------------------------------------------------------------------------
# Building blocks


class Sources:
    """Numbered footnotes, one per distinct (date, GPU, versions, command, provenance) among a table's rows."""

    def __init__(self) -> None:
        self.notes: dict[str, int] = {}

    def ref(self, *records: dict | None) -> str:
        refs = []
        for record in records:
            if record is None:
                continue
            text = describe_source(record)
            number = self.notes.setdefault(text, len(self.notes) + 1)
            if f"[{number}]" not in refs:
                refs.append(f"[{number}]")
        return " ".join(refs)

    def lines(self) -> list[str]:
        return [f"- [{number}] {text}" for text, number in self.notes.items()]


def describe_source(record: dict) -> str:
    versions = record.get("versions") or {}
    named = ", ".join(f"{name} {versions[name]}" for name in VERSION_ORDER if name in versions)
    parts = [record.get("date", "date unknown"), record.get("gpu", "device unknown")]
    if named:
        parts.append(named)
    parts.append(f"`{record.get('command', 'command unknown')}`")
    if record.get("source"):
        parts.append(record["source"])
    if record.get("note"):
        parts.append(record["note"])
    return " · ".join(parts)


def newest(records: list[dict], key: Callable[[dict], tuple]) -> dict[tuple, dict]:
    """key -> the newest record with that key (dates sort as text; a later line wins a tie), keys in the order they
    first appear."""
    found: dict[tuple, dict] = {}
    for record in records:
        k = key(record)
        if k not in found or record.get("date", "") >= found[k].get("date", ""):
            found[k] = record
    return found


def by_case(records: list[dict], extra: tuple[str, ...] = ()) -> list[tuple[tuple, dict[str, dict]]]:
    """[(case key, {implementation: newest record})] for tables that set implementations side by side."""
    latest = newest(records, lambda r: (r.get("case"), *(r.get(f) for f in extra), r.get("implementation")))
    rows: dict[tuple, dict[str, dict]] = {}
    for (case, *rest), record in latest.items():
        *extras, implementation = rest
        rows.setdefault((case, *extras), {})[implementation] = record
    return list(rows.items())


def value(record: dict | None, field: str, spec: str = "") -> str:
    if record is None:
        return "-"
    if record.get("status", "ok") == "oom":
        return "OOM"
    if record.get("status", "ok") == "error":
        return "error"
    figure = record.get(field)
    return "-" if figure is None else format(figure, spec)


def ratio(slow: dict | None, fast: dict | None, field: str) -> str:
    """slow[field] / fast[field] as "2.05x" (times: the speed-up of `fast`; rates: pass them the other way)."""
    if not slow or not fast or slow.get(field) in (None, 0) or fast.get(field) in (None, 0):
        return "-"
    if slow.get("status", "ok") != "ok" or fast.get("status", "ok") != "ok":
        return "-"
    return f"{slow[field] / fast[field]:.2f}x"


def pair(first: str, second: str) -> str:
    return first if first == second == "-" else f"{first} / {second}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def family_rank(record: dict) -> int:
    family = record.get("family")
    return FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER)


# --------------------------------------------------------------------------------------------------------------------
# Sections


def sft_section(records: list[dict], sources: Sources) -> list[str]:
    """One row per configuration: fastmoe's newest record beside transformers' of the same run (its newest
    otherwise)."""
    config = ("preset", "layers", "batch", "seq", "targets", "logging_steps", "quantization", "load", "data",
              "documents", "varied", "memory_limit_gb", "window")
    # records from before bench_sft.py had --data and --varied-lengths
    defaults = {"data": "rows", "documents": 1, "varied": False}

    def field(r: dict, name: str):
        if name == "window":
            # On data of varied lengths, steps timed from a run's first step (no warm-up) answer another question
            # than a window after warm-up: what a short run costs, every kernel compile and graph capture included.
            return "from the first step" if r.get("data") == "examples" and r.get("warmup") == 0 else ""
        value = r.get(name)
        return defaults.get(name) if value is None else value

    def checkpointing(r: dict) -> str:
        # How fastmoe checkpoints: its family's default (graphs_label), CUDA graphs or eager layers where that is
        # not the default, and either with the layer inputs in host memory (use_gradient_checkpointing="fastmoe").
        if r["implementation"] != "fastmoe":
            return ""
        # Records from before the field computed every expert product in fastmoe's Triton kernels; they stay under
        # the default's label, which the newer records replace.
        products = {"auto": "", "triton": " (fastmoe with the expert GEMMs' base products in its Triton kernels)",
                    "torch": " (fastmoe with the expert GEMMs' base products by torch's grouped GEMM)"}[
                        r.get("base_products", "auto")]
        graphs = graphs_label(r)
        others = f" (fastmoe without {', '.join(r['ops_off'])})" if r.get("ops_off") else ""
        others += f" (fastmoe with {r['graph_shapes']} graph shapes)" if r.get("graph_shapes") else ""
        others += (f" (fastmoe with {r['coarse_rounding_rows']} rows rounded coarser)"
                   if r.get("coarse_rounding_rows") is not None else "")
        if r.get("offload"):
            return (" (fastmoe with offloaded checkpointing" + (f", {graphs}" if graphs else "") + ")" + products
                    + others)
        return products + (f" (fastmoe with {graphs})" if graphs else "") + others

    def memory(r: dict | None) -> str:
        # The footprint (graph pools included) where the record has it; earlier records have the allocated peak only.
        return value(r, "footprint_gb" if r and r.get("footprint_gb") is not None else "peak_gb", ".1f")

    records = [r for r in records if not r.get("memory_limit_gb")]  # those answer long_context_section's question
    # A record whose timed steps include fastmoe's graph captures (too few warm-up steps) times the captures; on data
    # of varied lengths (--data examples) captures of lengths that come later are part of what a run costs.
    records = [r for r in records if not r.get("graphs_captured_while_timed") or r.get("data") == "examples"]
    # Speed-ups compare runs on one kind of GPU only: a configuration measured on two kinds gets a row for each.
    config += ("gpu",)
    latest = newest(records, lambda r: (*(field(r, f) for f in config), checkpointing(r), r["implementation"]))
    same_run = newest(records, lambda r: (*(field(r, f) for f in config), r["implementation"], r.get("run")))
    rows: dict[tuple, dict[str, dict]] = {}
    for key, record in latest.items():
        rows.setdefault(key[:-1], {})[key[-1]] = record
    transformers_rows = {key[:-1]: impls["transformers"] for key, impls in rows.items() if "transformers" in impls}
    gpus_per_config: dict[tuple, set] = {}
    for key in rows:
        gpus_per_config.setdefault(key[:-2], set()).add(key[-2])
    order = sorted((k for k in rows if "fastmoe" in rows[k] or not k[-1]),
                   key=lambda k: (family_rank(next(iter(rows[k].values()))), k[0], -k[1], k[2] * k[3], k[2],
                                  k[4], k[5], str(k[6]), k[7], k[8], k[9], k[10], k[11] or 0, k[12], k[14],
                                  k[13]))
    out = []
    for key in order:
        ours = rows[key].get("fastmoe")
        hf = same_run.get((*key[:-1], "transformers", ours.get("run"))) if ours else None
        hf = hf or transformers_rows.get(key[:-1])
        (preset, layers, batch, seq, targets, logging_steps, quantization, load, data, documents, varied,
         memory_limit, window, gpu, how_checkpointed) = key
        model = f"{preset}, {layers} layers{how_checkpointed}"
        if len(gpus_per_config[key[:-2]]) > 1:
            model += f", {gpu}"
        if data == "examples":
            model += ", examples of varied lengths padded (an SFT data set)"
            if window:
                model += f", {len(ours['step_ms_all']) if ours else '-'} steps timed {window}"
            if ours and ours.get("replayed_steps") is not None:
                model += (f"; fastmoe's steps all on graph replays (no capture, no eager layer): "
                          f"{ours['replayed_steps']} of {len(ours['step_ms_all'])}, "
                          f"{value(ours, 'tokens_per_s_replayed', ',.0f')} tokens/s")
        elif data != "rows":
            model += f", each row {documents}{' varied' if varied else ''} documents {data}"
        if memory_limit:
            model += f", GPU limited to {memory_limit:g} GB"
        out.append([model, f"{batch}x{seq}", targets, str(logging_steps),
                    quantization or "bf16", load, value(hf, "tokens_per_s", ",.0f"),
                    value(ours, "tokens_per_s", ",.0f"),
                    ratio(ours, hf, "tokens_per_s"), pair(memory(hf), memory(ours)),
                    pair(value(hf, "gpu_busy_pct", ".0f"), value(ours, "gpu_busy_pct", ".0f")),
                    pair(value(hf, "kernels_per_step", ","), value(ours, "kernels_per_step", ",")),
                    pair(value(hf, "mfu_pct", ".1f"), value(ours, "mfu_pct", ".1f")), sources.ref(hf, ours)])
    return table(["model", "batch x seq", "LoRA targets", "logging steps", "weights", "loaded", "transformers + peft "
                  "tokens/s", "fastmoe tokens/s", "speed-up", "peak GB (tf / fm)", "GPU busy % (tf / fm)",
                  "kernels per step (tf / fm)", "MFU % (tf / fm)", "source"], out)


@dataclasses.dataclass(frozen=True)
class Target:
    """One of the user's training step's targets: a figure of fastmoe's SFTTrainer record at one configuration
    (bf16 or 4-bit, 1x4096 unless said, the family's default LoRA targets), or its tokens/s over transformers' of the
    same run ("speed-up"), and the least value that meets it."""

    what: str
    preset: str
    layers: int
    least: float
    figure: str = "speed-up"  # or a field of the record: "mfu_pct", "gpu_busy_pct"
    quantization: str | None = None
    shape: str = "1x4096"


TRAINING_TARGETS = (
    Target("Trinity-Mini at full depth: speed-up >= 3x (the goal: 4x)", "trinity-mini", 32, 3.0),
    Target("Trinity-Mini at full depth: MFU >= 35%", "trinity-mini", 32, 35.0, "mfu_pct"),
    Target("LFM2-8B-A1B: speed-up >= 2.5x", "lfm2-8b-a1b", 24, 2.5),
    Target("JetMoe-8B: speed-up >= 2.5x", "jetmoe-8b", 24, 2.5),
    Target("Command-R layers: speed-up >= 2x", "command-r-layers", 8, 2.0),
    *(Target(f"load_in_4bit, {preset} {layers} layers: speed-up >= 2x over transformers' 4-bit + peft", preset,
             layers, 2.0, quantization="4bit")
      for preset, layers in (("trinity-mini", 8), ("lfm2-8b-a1b", 24), ("jetmoe-8b", 24))),
    *(Target(f"GPU busy >= 90% of the step, {preset} {layers} layers", preset, layers, 90.0, "gpu_busy_pct")
      for preset, layers in (("trinity-mini", 32), ("trinity-mini", 8), ("lfm2-8b-a1b", 24), ("jetmoe-8b", 24),
                             ("aya-expanse-8b", 32), ("command-r-layers", 8))),
)


def kernel_kind(name: str) -> str:
    """What a kernel of a profiled step computes, by its name (cut to 90 characters): torch's grouped GEMM is
    CUTLASS's sm90 kernel, cuBLAS's dense GEMMs are nvjet's."""
    if "grouped" in name or "enable_3x_kernel_for_sm9x" in name or "nf4" in name.lower():
        return "expert GEMMs"
    if any(word in name for word in ("flash", "fmha", "sdpa", "attention")):
        return "attention"
    if any(word in name for word in ("nvjet", "gemm", "xmma")):
        return "dense GEMMs"
    return "other kernels"


def where_the_step_goes(record: dict | None) -> str:
    """A profiled record's step by what its GPU does: the largest kernels by kind, the rest of the kernels, and the
    time the GPU waits (on the host or a sync)."""
    if not record or not record.get("top_kernels") or not record.get("profiled_step_ms"):
        return "-"
    step, busy = record["profiled_step_ms"], record.get("gpu_busy_ms_per_step") or 0.0
    kinds: dict[str, float] = {}
    for name, ms, _ in record["top_kernels"]:
        kind = kernel_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + ms
    kinds["other kernels"] = kinds.get("other kernels", 0.0) + max(busy - sum(kinds.values()), 0.0)
    kinds["GPU idle"] = max(step - busy, 0.0)
    parts = [f"{kind} {ms:.0f} ms" for kind, ms in sorted(kinds.items(), key=lambda item: -item[1]) if ms >= 0.5]
    return f"{step:.0f} ms: " + ", ".join(parts)


def targets_section(records: list[dict], sources: Sources) -> list[str]:
    """One row per (target, GPU kind): the newest measurement of it, met or by how much not, and where fastmoe's
    profiled step spends its time. A speed-up comes from one run of both implementations where there is one, else
    from the newest transformers record on that kind of GPU (said in the row). Then peak memory against
    transformers' at every configuration measured both ways in one run, and tokens/s at logging_steps 10 against 1."""
    usable = [r for r in records if r.get("status") == "ok" and not r.get("graphs_captured_while_timed")
              and not r.get("memory_limit_gb") and not r.get("ops_off") and not r.get("offload")
              and r.get("base_products", "auto") == "auto" and r.get("data", "rows") == "rows"
              and r.get("targets", "default") == "default" and r.get("coarse_rounding_rows") is None
              and (r["implementation"] != "fastmoe" or not graphs_label(r))]

    def config(r: dict) -> tuple:
        return r["preset"], r["layers"], r.get("shape"), r.get("quantization"), r.get("logging_steps", 1), r.get("gpu")

    transformers_run = newest([r for r in usable if r["implementation"] == "transformers"],
                              lambda r: (r.get("run"), *config(r)))
    transformers_newest = newest([r for r in usable if r["implementation"] == "transformers"], config)
    out = []
    for target in TRAINING_TARGETS:
        found: dict[str, tuple[float, dict, dict | None, bool]] = {}
        for ours in sorted((r for r in usable if r["implementation"] == "fastmoe"
                            and config(r)[:5] == (target.preset, target.layers, target.shape, target.quantization, 1)),
                           key=lambda r: r.get("date", "")):
            theirs, one_run, figure = None, True, ours.get(target.figure)
            if target.figure == "speed-up":
                theirs = transformers_run.get((ours.get("run"), *config(ours)))
                # A later fastmoe record of another run does not displace one compared within its own run.
                if theirs is None and ours.get("gpu") in found and found[ours.get("gpu")][3]:
                    continue
                theirs, one_run = theirs or transformers_newest.get(config(ours)), theirs is not None
                figure = ours["tokens_per_s"] / theirs["tokens_per_s"] if theirs else None
            if figure is not None:
                found[ours.get("gpu", "")] = (figure, ours, theirs, one_run)
        if not found:
            out.append([target.what, "-", "not measured", "-", "-", "-", "-"])
        for gpu, (figure, ours, theirs, one_run) in sorted(found.items()):
            speed_up = target.figure == "speed-up"
            shown = f"{figure:.2f}x" + ("" if one_run else " (two runs)") if speed_up else f"{figure:.1f}%"
            short = "-" if figure >= target.least else (
                f"{target.least / figure - 1:.0%} more tokens/s" if speed_up else f"{target.least - figure:.1f} points")
            if speed_up and figure < target.least and ours.get("mfu_pct"):
                # A speed-up is met only at this model-FLOPs utilisation: where it is out of reach, that shows it.
                short += f" (fastmoe at {ours['mfu_pct'] * target.least / figure:.0f}% MFU; {ours['mfu_pct']:.0f}% now)"
            # The day beside the GPU: a target's newest record on a kind of GPU may predate much of the code.
            out.append([target.what, f"{gpu}, {ours.get('date', '')[:10]}", shown,
                        "met" if figure >= target.least else "missed", short, where_the_step_goes(ours),
                        sources.ref(theirs, ours)])
    return table(["target", "GPU, day", "measured", "", "short by", "fastmoe's profiled step: where its time goes",
                  "source"], out) + ["", *memory_and_logging_targets(usable, config, transformers_run, sources)]


def memory_and_logging_targets(usable: list[dict], config: Callable[[dict], tuple],
                               transformers_run: dict[tuple, dict], sources: Sources) -> list[str]:
    """Peak memory (footprints) against transformers' at each configuration's newest run of both, and fastmoe's
    tokens/s at logging_steps=10 over logging_steps=1 of the same run."""
    compared = newest([r for r in usable if r["implementation"] == "fastmoe" and r.get("footprint_gb") is not None
                       and (transformers_run.get((r.get("run"), *config(r))) or {}).get("footprint_gb") is not None],
                      config)
    above = []
    for ours in compared.values():
        theirs = transformers_run[(ours.get("run"), *config(ours))]
        if ours["footprint_gb"] > theirs["footprint_gb"]:
            weights = ours.get("quantization") or "bf16"
            above.append(f"{ours['preset']} {ours['layers']} layers {ours['shape']} {weights} "
                         f"({ours['footprint_gb']:.2f} / {theirs['footprint_gb']:.2f} GB) " + sources.ref(theirs, ours))
    fastmoe_run = newest([r for r in usable if r["implementation"] == "fastmoe"], lambda r: (r.get("run"), *config(r)))

    def at_one_logging_step(r: dict) -> dict | None:
        preset, layers, shape, quantization, _, gpu = config(r)
        return fastmoe_run.get((r.get("run"), preset, layers, shape, quantization, 1, gpu))

    tens = newest([r for r in fastmoe_run.values() if r.get("logging_steps") == 10 and at_one_logging_step(r)], config)
    logging = [(r, at_one_logging_step(r)) for r in tens.values()]
    return [f"Peak memory never above transformers': fastmoe's footprint above transformers' in {len(above)} of the "
            f"{len(compared)} configurations measured both ways in one run (each its newest)"
            + (": " + "; ".join(above) if above else "") + ".", "",
            "tokens/s independent of logging_steps (fastmoe's at 10 over its tokens/s at 1, same run): "
            + ("; ".join(f"{tens['preset']} {tens['layers']} layers {tens['shape']}, {tens.get('gpu')}: "
                         f"{tens['tokens_per_s'] / ones['tokens_per_s']:.3f} {sources.ref(ones, tens)}"
                         for tens, ones in logging) or "not measured") + "."]


LONG_SEQUENCE = 16384  # tokens per row from which an unlimited run on a whole GPU counts as a long-context probe


def probe_budget(record: dict) -> str | None:
    """The GPU budget a long-context probe ran within: its --memory-limit-gb, or, without one, the memory its GPU's
    name states ("NVIDIA H100 80GB HBM3": "80 GB (the whole GPU)") for a long row or one that ran out of memory;
    None for a record that is no such probe."""
    if record.get("memory_limit_gb"):
        return f"{record['memory_limit_gb']:g} GB"
    found = re.search(r"(\d+)GB", record.get("gpu") or "")
    if not found or record.get("batch") != 1:
        return None
    if record.get("seq", 0) < LONG_SEQUENCE and record.get("status") != "oom":
        return None
    return f"{found.group(1)} GB (the whole GPU)"


@functools.cache
def graphed_by_default(model_type: str | None) -> bool:
    """Whether get_peft_model graphs the layers of this family by default (fastmoe's Family.graphed_layers)."""
    from fastmoe.models import family

    described = family(model_type) if model_type else None
    return described is None or described.graphed_layers


def graphs_label(r: dict) -> str:
    """'' where a fastmoe record's layers ran as its family's default does, else the cuda_graphs setting they ran
    with. Records say what was asked: None is the default; records from before the field ran graphs, and those from
    before eager Cohere said True for the default of the time."""
    default = graphed_by_default(r.get("family"))
    asked = r.get("cuda_graphs", True)
    graphed = default if asked is None else asked
    return "" if graphed == default else f"cuda_graphs={graphed}"


def long_context_variant(r: dict) -> str:
    if r["implementation"] != "fastmoe":
        return "transformers + peft"
    graphs = graphs_label(r)
    eager = f", {graphs}" if graphs else ""
    if r.get("offload"):
        return f'fastmoe, use_gradient_checkpointing="fastmoe" (inputs in host memory){eager}'
    return f"fastmoe{eager}"


def long_context_section(records: list[dict], sources: Sources) -> list[str]:
    """One row per (model, GPU budget, allocator setting, implementation and checkpointing): the longest sequence
    that trained, the shortest that ran out of memory above it, and the speed and footprint at the longest. Then
    the memory of both implementations at each long length measured both ways."""
    probes = [r for r in records if r.get("status") in ("ok", "oom") and probe_budget(r)]

    def key(r: dict) -> tuple:
        return (r["preset"], r["layers"], r.get("quantization") or "bf16", probe_budget(r),
                r.get("alloc_conf") or "default", long_context_variant(r))

    latest = newest(probes, lambda r: (*key(r), r["batch"], r["seq"]))
    groups: dict[tuple, list[dict]] = {}
    for record in latest.values():
        groups.setdefault(key(record), []).append(record)
    out = []
    for group_key in sorted(groups, key=lambda k: (k[0], -k[1], k[2], k[3], k[4], k[5] != "transformers + peft",
                                                  k[5])):
        preset, layers, weights, limit, alloc, name = group_key
        trained = [r for r in groups[group_key] if r["status"] == "ok"]
        longest = max(trained, key=lambda r: r["batch"] * r["seq"], default=None)
        reach = longest["batch"] * longest["seq"] if longest else 0
        failed = [r for r in groups[group_key] if r["status"] == "oom" and r["batch"] * r["seq"] > reach]
        first_oom = min(failed, key=lambda r: r["batch"] * r["seq"], default=None)
        out.append([f"{preset}, {layers} layers", weights, limit, alloc, name,
                    f"{longest['batch']}x{longest['seq']}" if longest else "none measured",
                    f"{first_oom['batch']}x{first_oom['seq']}" if first_oom else "-",
                    value(longest, "tokens_per_s", ",.0f"), value(longest, "footprint_gb", ".1f"),
                    sources.ref(longest, first_oom)])
    return table(["model", "weights", "GPU budget", "PYTORCH_CUDA_ALLOC_CONF", "implementation",
                  "longest trained", "out of memory at", "tokens/s at the longest", "peak GB at the longest",
                  "source"], out) + ["", *long_context_memory(records, sources)]


def long_context_memory(records: list[dict], sources: Sources) -> list[str]:
    """Each long length (batch 1) that both implementations trained in one model: the footprint, and the part of it
    above what stays allocated between steps (weights, adapters, optimizer state: both implementations hold the
    same), each fastmoe variant against transformers' newest record of that length."""
    trained = [r for r in records if r.get("question") == "sft" and r.get("status") == "ok" and r.get("batch") == 1
               and r.get("seq", 0) >= LONG_SEQUENCE and r.get("data", "rows") == "rows"
               and r.get("footprint_gb") is not None and r.get("step_start_gb") is not None]

    def length(r: dict) -> tuple:
        return r["preset"], r["layers"], r.get("quantization") or "bf16", r["seq"], r.get("targets", "default")

    theirs = newest([r for r in trained if r["implementation"] == "transformers"], length)
    ours = newest([r for r in trained if r["implementation"] == "fastmoe"], lambda r: (*length(r),
                                                                                      long_context_variant(r)))
    out = []
    for key in sorted(ours, key=lambda k: (k[0], -k[1], k[2], k[3], k[5])):
        hf, fm = theirs.get(key[:-1]), ours[key]
        if hf is None:
            continue
        above = [r["footprint_gb"] - r["step_start_gb"] for r in (hf, fm)]
        preset, layers, weights, seq, _, variant = key
        out.append([f"{preset}, {layers} layers", weights, f"{seq:,}", variant,
                    pair(value(hf, "footprint_gb", ".1f"), value(fm, "footprint_gb", ".1f")),
                    f"{fm['footprint_gb'] / hf['footprint_gb']:.2f}x",
                    f"{above[0]:.1f} / {above[1]:.1f}", f"{above[1] / above[0]:.2f}x", sources.ref(hf, fm)])
    return ["Memory at each long length both trained (footprints, any budget; \"above the step start\": the footprint "
            "less what stays allocated between steps, the weights, adapters and optimizer state both hold):", "",
            *table(["model", "weights", "tokens", "fastmoe", "peak GB (tf / fm)", "fm / tf",
                    "above the step start GB (tf / fm)", "fm / tf above the step start", "source"], out)]


def train_step_rows(records: list[dict], sources: Sources, quantized: bool) -> list[list[str]]:
    """Newest record per (configuration, variant), with two same-process yardsticks: transformers' run and
    fastmoe's default variant (an ablation's effect is read against the latter). 4-bit rows (quantized=True) come
    with the transformers rows they are compared with."""

    def config(r: dict) -> tuple:
        return r.get("preset"), r.get("layers"), r.get("shape"), r.get("routing")

    def is_4bit(r: dict) -> bool:
        return bool(r["options"].get("quantization"))

    latest = newest(records, lambda r: (*config(r), r["variant"], r.get("condition")))
    plain = [r for r in records if r.get("status") == "ok" and not r.get("condition") and not is_4bit(r)]
    transformers_run = newest([r for r in plain if r["options"]["implementation"] == "transformers"],
                              lambda r: (*config(r), r.get("run")))
    fastmoe_run = newest([r for r in plain if r["variant"] == "fastmoe"], lambda r: (*config(r), r.get("run")))
    shown = [r for r in latest.values() if is_4bit(r) == quantized]
    if quantized:
        yardsticks = [transformers_run.get((*config(r), r.get("run"))) for r in shown]
        shown += [r for r in {id(y): y for y in yardsticks if y is not None}.values() if r not in shown]
    shown.sort(key=lambda r: (family_rank(r), r["preset"], r["layers"], r["batch"] * r["seq"], r["batch"],
                              r.get("routing", ""), r["options"]["implementation"] != "transformers", is_4bit(r),
                              r["variant"] != "fastmoe", r["variant"], r.get("condition") or ""))
    out = []
    for r in shown:
        run = (*config(r), r.get("run"))
        vs_transformers = "-" if r["options"]["implementation"] == "transformers" else ratio(
            r, transformers_run.get(run), "tokens_per_s")
        vs_fastmoe = "-" if r["variant"] == "fastmoe" or r["options"]["implementation"] == "transformers" else ratio(
            r, fastmoe_run.get(run), "tokens_per_s")
        variant = r["variant"] + (f" ({r['condition']})" if r.get("condition") else "")
        shape = r["shape"] + (" skewed" if r.get("routing") == "skewed" else "")
        out.append([r["preset"], str(r["layers"]), shape, variant, value(r, "tokens_per_s", ",.0f"), vs_transformers,
                    vs_fastmoe, value(r, "peak_gb", ".1f"), value(r, "tflops", ".1f"), value(r, "mfu_pct", ".1f"),
                    value(r, "loss", ".4f"), sources.ref(r)])
    return out


TRAIN_STEP_HEADER = ["preset", "layers", "shape", "variant", "tokens/s", "vs transformers (same run)",
                     "vs fastmoe (same run)", "peak GB", "TFLOP/s", "MFU %", "loss", "source"]


def train_step_section(records: list[dict], sources: Sources) -> list[str]:
    return table(TRAIN_STEP_HEADER, train_step_rows(records, sources, quantized=False))


def four_bit_section(records: list[dict], sources: Sources) -> list[str]:
    return table(TRAIN_STEP_HEADER, train_step_rows(records, sources, quantized=True))


def quality_section(records: list[dict], sources: Sources) -> list[str]:
    out = []
    for (case,), impls in by_case(records):
        for implementation, r in impls.items():
            out.append([case, implementation, value(r, "first_loss", ".4f"), value(r, "last10_mean", ".4f"),
                        value(r, "max_abs_diff", ".4f"), value(r, "loss_floor", ".4f"), value(r, "seconds", ".1f"),
                        sources.ref(r)])
    return table(["model and run", "implementation", "first loss", "mean of last 10", "largest per-step difference",
                  "loss floor (entropy)", "seconds", "source"], out)


def moe_block_section(records: list[dict], sources: Sources) -> list[str]:
    hf, ours, torch_products = "transformers grouped_mm + peft", "fastmoe", "fastmoe, base products by torch"
    blocks = []
    for (case, tokens), impls in by_case([r for r in records if r.get("kind") == "block"], extra=("tokens",)):
        a, b, c = impls.get(hf), impls.get(ours), impls.get(torch_products)
        blocks.append([case, f"{tokens:,}", value(b or a, "max_expert_load", ".1%"),
                       pair(value(a, "fwd_ms", ".3f"), value(b, "fwd_ms", ".3f")), ratio(a, b, "fwd_ms"),
                       pair(value(a, "fwd_bwd_ms", ".3f"), value(b, "fwd_bwd_ms", ".3f")), ratio(a, b, "fwd_bwd_ms"),
                       pair(value(c, "fwd_ms", ".3f"), value(c, "fwd_bwd_ms", ".3f")),
                       " / ".join(value(r, "fwd_bwd_kernel_ms", ".3f") for r in (a, b, c)),
                       pair(value(a, "fwd_bwd_peak_mib", ",.0f"), value(b, "fwd_bwd_peak_mib", ",.0f")),
                       value(b, "fwd_bwd_tflops", ".0f"), value(b, "rel_err", ".1e"), sources.ref(a, b, c)])
    gemms = []
    for (case, tokens), impls in by_case([r for r in records if r.get("kind") == "gemm"], extra=("tokens",)):
        a, b = impls.get("torch grouped_mm"), impls.get("fastmoe grouped_mm")
        gemms.append([case, f"{tokens:,}", pair(value(a, "ms", ".3f"), value(b, "ms", ".3f")), ratio(a, b, "ms"),
                      pair(value(a, "tflops", ".0f"), value(b, "tflops", ".0f")), value(b, "rel_err", ".1e"),
                      sources.ref(a, b)])
    return (table(["experts block, router", "tokens", "max expert load", "fwd ms (tf / fm)", "fwd speed-up",
                   "fwd+bwd ms (tf / fm)", "fwd+bwd speed-up", "fm with torch's base products, fwd / fwd+bwd ms",
                   "fwd+bwd GPU kernel ms (tf / fm / fm with torch's products)",
                   "fwd+bwd peak MiB (tf / fm)", "fastmoe fwd+bwd TFLOP/s", "rel err", "source"], blocks)
            + ["", "The bare grouped GEMMs (no LoRA, rows sorted by expert), torch's `grouped_mm` against "
               "fastmoe's:", ""]
            + table(["GEMM", "tokens", "ms (torch / fastmoe)", "fastmoe speed-up", "TFLOP/s (torch / fastmoe)",
                     "rel err", "source"], gemms))


def nf4_section(records: list[dict], sources: Sources) -> list[str]:
    out = []
    for (case,), impls in by_case(records):
        bf16, nf4, dq = impls.get("bf16"), impls.get("NF4"), impls.get("NF4 double-quant")
        field = "fwd_bwd_ms" if (bf16 or nf4 or {}).get("kind") == "block" else "ms"
        label = case + (" (fwd+bwd)" if field == "fwd_bwd_ms" else "")
        out.append([label, value(bf16, field, ".3f"), value(nf4, field, ".3f"), speed_share(bf16, nf4, field),
                    value(dq, field, ".3f"), speed_share(bf16, dq, field),
                    " / ".join(value(r, "weights_mib", ",.0f") for r in (bf16, nf4, dq))
                    if field == "fwd_bwd_ms" else "", value(dq, "rel_err", ".1e"), sources.ref(bf16, nf4, dq)])
    return table(["kernel", "bf16 ms", "NF4 ms", "NF4 speed, % of bf16", "NF4 double-quant ms",
                  "double-quant, % of bf16", "expert weights MiB (bf16 / NF4 / dq)", "rel err (dq)", "source"], out)


def speed_share(reference: dict | None, other: dict | None, field: str) -> str:
    if not reference or not other or not reference.get(field) or not other.get(field):
        return "-"
    return f"{100 * reference[field] / other[field]:.0f}%"


def loss_section(records: list[dict], sources: Sources) -> list[str]:
    out = []
    for (case,), impls in by_case(records):
        a, b = impls.get("transformers"), impls.get("fastmoe")
        out.append([case, f"{(a or b)['hidden']} / {(a or b)['vocab']:,} / {(a or b)['logit_scale']:g}",
                    pair(value(a, "ms", ".2f"), value(b, "ms", ".2f")), ratio(a, b, "ms"),
                    pair(value(a, "peak_mib", ",.0f"), value(b, "peak_mib", ",.0f")), ratio(a, b, "peak_mib"),
                    value(b, "abs_loss_diff", ".1e"), sources.ref(a, b)])
    return table(["case", "hidden / vocab / logit_scale", "ms (tf / fm)", "speed-up", "peak MiB (tf / fm)",
                  "memory saved", "abs loss diff", "source"], out)


def fused_lm_head_section(records: list[dict], sources: Sources) -> list[str]:
    out = []
    for (case,), impls in by_case(records):
        a, b = impls.get("trl"), impls.get("fastmoe")
        out.append([case, f"{(a or b)['hidden']} / {(a or b)['vocab']:,}",
                    pair(value(a, "ms", ".2f"), value(b, "ms", ".2f")), ratio(a, b, "ms"),
                    pair(value(a, "peak_mib", ",.0f"), value(b, "peak_mib", ",.0f")), ratio(a, b, "peak_mib"),
                    value(b, "grad_hidden_rel_err_vs_trl", ".1e"), sources.ref(a, b)])
    return table(["objective, scored tokens", "hidden / vocab", "ms (trl / fm)", "speed-up", "peak MiB (trl / fm)",
                  "memory saved", "grad_hidden rel err vs trl", "source"], out)


def lora_linear_section(records: list[dict], sources: Sources) -> list[str]:
    out = []
    for (case,), impls in by_case(records):
        a, b = impls.get("peft"), impls.get("fastmoe")
        out.append([case, pair(value(a, "fwd_bwd_ms", ".3f"), value(b, "fwd_bwd_ms", ".3f")),
                    ratio(a, b, "fwd_bwd_ms"), pair(value(a, "peak_mib", ",.0f"), value(b, "peak_mib", ",.0f")),
                    sources.ref(a, b)])
    return table(["projection (in->out), peft layer replaced", "fwd+bwd ms (peft / fastmoe)", "speed-up",
                  "peak MiB (peft / fastmoe)", "source"], out)


def norm_rope_section(records: list[dict], sources: Sources) -> list[str]:
    out = []
    for (case,), impls in by_case(records):
        a, b = impls.get("transformers"), impls.get("fastmoe")
        out.append([case, pair(value(a, "fwd_ms", ".3f"), value(b, "fwd_ms", ".3f")), ratio(a, b, "fwd_ms"),
                    pair(value(a, "fwd_bwd_ms", ".3f"), value(b, "fwd_bwd_ms", ".3f")), ratio(a, b, "fwd_bwd_ms"),
                    pair(value(a, "fwd_bwd_gbs", ".0f"), value(b, "fwd_bwd_gbs", ".0f")),
                    pair(value(a, "fwd_bwd_eager_ms", ".3f"), value(b, "fwd_bwd_eager_ms", ".3f")),
                    sources.ref(a, b)])
    return table(["op", "fwd ms (tf / fm)", "fwd speed-up", "fwd+bwd ms (tf / fm)", "fwd+bwd speed-up",
                  "fwd+bwd GB/s (tf / fm)", "fwd+bwd eager ms (tf / fm)", "source"], out)


def short_conv_section(records: list[dict], sources: Sources) -> list[str]:
    out = []
    for (case,), impls in by_case(records):
        a, b = impls.get("transformers"), impls.get("fastmoe")
        out.append([case, (a or {}).get("detail") or "-", pair(value(a, "fwd_ms", ".3f"), value(b, "fwd_ms", ".3f")),
                    ratio(a, b, "fwd_ms"), pair(value(a, "fwd_bwd_ms", ".3f"), value(b, "fwd_bwd_ms", ".3f")),
                    ratio(a, b, "fwd_bwd_ms"), pair(value(b, "fwd_gbs", ".0f"), value(b, "fwd_bwd_gbs", ".0f")),
                    pair(value(a, "peak_mib", ",.0f"), value(b, "peak_mib", ",.0f")),
                    pair(value(b, "rel_err_out", ".1e"), value(b, "rel_err_dx", ".1e")), sources.ref(a, b)])
    return table(["case", "transformers' conv", "fwd ms (tf / fm)", "fwd speed-up", "fwd+bwd ms (tf / fm)",
                  "fwd+bwd speed-up", "fastmoe GB/s (fwd / fwd+bwd)", "peak MiB (tf / fm)", "rel err (out / dx)",
                  "source"], out)


def sliding_window_section(records: list[dict], sources: Sources) -> list[str]:
    out = []
    latest = newest(records, lambda r: (r.get("seq"), r.get("case"), r.get("implementation"), r.get("detail")))
    for (seq, case, implementation, detail), r in sorted(latest.items(), key=lambda item: item[0][0] or 0):
        out.append([f"{seq:,}", case, f"{implementation}: {detail or ''}", value(r, "fwd_ms", ".3f"),
                    value(r, "fwd_bwd_ms", ".3f"), value(r, "fwd_bwd_tflops", ".0f"), value(r, "mfu_pct", ".0f"),
                    value(r, "peak_mib", ",.0f"), sources.ref(r)])
    return table(["tokens", "layer", "path", "fwd ms", "fwd+bwd ms", "fwd+bwd TFLOP/s", "% of matmul peak",
                  "peak MiB", "source"], out)


def multi_gpu_section(records: list[dict], sources: Sources) -> list[str]:
    out = []
    for (case, _), impls in by_case(records, extra=("batch",)):
        for r in impls.values():
            out.append([case, f"{r['batch']} x {r['seq']}", value(r, "step_s", ".3f"),
                        value(r, "tokens_per_s_per_gpu", ",.0f"), value(r, "tokens_per_s", ",.0f"),
                        value(r, "peak_gb", ".1f"),
                        f"{value(r, 'loss_first', '.4f')} -> {value(r, 'loss_last', '.4f')}",
                        sources.ref(r)])
    return table(["strategy, training, GPUs", "per GPU batch x seq", "step s (median)", "tokens/s per GPU",
                  "tokens/s total", "peak GB per GPU", "loss first -> last", "source"], out)


@dataclasses.dataclass(frozen=True)
class Section:
    question: str
    title: str
    about: str  # what is measured and how: method, never figures (those come from the records)
    command: str  # how to measure it
    render: Callable[[list[dict], Sources], list[str]]


def generate_section(records: list[dict], sources: Sources) -> list[str]:
    """One row per (model, weights, batch, prompt): transformers + peft beside fastmoe (graphed decode, and eager
    where measured), decode tokens/s and the share of the HBM roofline."""
    def variant(r: dict) -> str:
        if r["implementation"] != "fastmoe":
            return "transformers"
        return "fastmoe" if r.get("cuda_graphs", True) else "fastmoe-eager"

    # Ablations of the decode path (bench_generate.py's --gemv-* and --router-gemv-tokens settings, LoRA targets other
    # than the default) stay out of the table.
    ablations = ("gemv_loop_stages", "gemv_mma", "router_gemv_tokens", "gemv_predecoded_absmax", "down_xa_in_gate_up")
    records = [r for r in records if not any(key in r for key in ablations)
               and r.get("targets", "default") == "default"]
    # Speed-ups compare runs on one kind of GPU only (as in the training table): a case measured on two kinds gets a
    # row for each, named with its GPU.
    latest = newest(records, lambda r: (r["preset"], r["layers"], r.get("quantization") or "bf16", r["batch"],
                                        r["prompt"], r.get("gpu"), variant(r)))
    rows: dict[tuple, dict[str, dict]] = {}
    for (*case, name), record in latest.items():
        rows.setdefault(tuple(case), {})[name] = record
    gpus_per_case: dict[tuple, set] = {}
    for case in rows:
        gpus_per_case.setdefault(case[:-1], set()).add(case[-1])
    out = []
    for case, found in sorted(rows.items(), key=lambda item: (*item[0][:-1], item[0][-1] or "")):
        preset, layers, weights, batch, prompt, gpu = case
        hf, fm, eager = found.get("transformers"), found.get("fastmoe"), found.get("fastmoe-eager")
        model = f"{preset}, {layers} layers" + (f", {gpu}" if len(gpus_per_case[case[:-1]]) > 1 else "")
        out.append([model, weights, str(batch), str(prompt),
                    value(hf, "decode_tokens_per_s", ",.1f"), value(eager, "decode_tokens_per_s", ",.1f"),
                    value(fm, "decode_tokens_per_s", ",.1f"), ratio(fm, hf, "decode_tokens_per_s"),
                    value(fm, "ms_per_step", ".2f"), value(fm, "replay_ms_per_step", ".2f"),
                    value(fm, "roofline_tokens_per_s", ",.0f"),
                    "-" if not fm or fm.get("roofline_share") is None else f"{100 * fm['roofline_share']:.1f}%",
                    sources.ref(hf, eager, fm)])
    return table(["model", "weights", "batch", "prompt", "transformers + peft decode tok/s",
                  "fastmoe eager decode tok/s", "fastmoe decode tok/s", "speed-up", "fastmoe ms per token step",
                  "graph replay alone (ms)", "HBM roofline tok/s", "fastmoe share of roofline", "source"], out)


def grpo_section(records: list[dict], sources: Sources) -> list[str]:
    """One row per (model, weights, group, prompt, new tokens): the generation phase of a GRPO step, transformers +
    peft beside fastmoe."""
    latest = newest(records, lambda r: (r["preset"], r["layers"], r.get("quantization") or "bf16", r["batch"],
                                        r["prompt"], r["new_tokens"], r["implementation"]))
    rows: dict[tuple, dict[str, dict]] = {}
    for (*case, name), record in latest.items():
        rows.setdefault(tuple(case), {})[name] = record
    out = []
    for (preset, layers, weights, batch, prompt, new_tokens), found in sorted(rows.items(), key=lambda item: item[0]):
        hf, fm = found.get("transformers"), found.get("fastmoe")
        out.append([f"{preset}, {layers} layers", weights, str(batch), str(prompt), str(new_tokens),
                    value(hf, "generation_s", ".2f"), value(fm, "generation_s", ".2f"),
                    value(hf, "generate_tokens_per_s", ",.0f"), value(fm, "generate_tokens_per_s", ",.0f"),
                    ratio(fm, hf, "generate_tokens_per_s"), value(hf, "step_s", ".2f"), value(fm, "step_s", ".2f"),
                    sources.ref(hf, fm)])
    return table(["model", "weights", "completions", "prompt", "new tokens", "generation s (tf)",
                  "generation s (fastmoe)", "transformers + peft tok/s", "fastmoe tok/s", "speed-up",
                  "step s (tf)", "step s (fastmoe)", "source"], out)


SECTIONS = [
    Section("sft", "The user's training step: trl's SFTTrainer, fastmoe vs transformers + peft",
            "What users run: a random-weight checkpoint at real shapes loaded with `FastModel.from_pretrained` + "
            "`FastModel.get_peft_model` against `AutoModelForCausalLM.from_pretrained(..., "
            "experts_implementation=\"grouped_mm\")` + `peft.get_peft_model` (same LoRA r=16 targets, experts via "
            "`target_parameters`), trained by `trl.SFTTrainer` at trl's defaults (fused LM head with entropy and "
            "token-accuracy metrics, bf16, gradient checkpointing as get_peft_model sets it) on fixed-length random "
            "tokens. tokens/s: median step after warm-up, steps timed by CUDA events on the GPU's stream with no "
            "sync between them, as a user's run goes (records before 2026-12-07: the clock read after a sync at "
            "every step's start, which drained the GPU at every step; records whose timed steps include fastmoe's "
            "graph captures are left out; rows on examples of varied lengths give the timed steps' tokens over their "
            "time, captures of lengths that come later included, as a run goes); peak GB: the footprint, the "
            "allocated peak plus the free part of CUDA graphs' private pools (a replayed graph allocates nothing, so "
            "the memory its kernels work in is never counted as allocated; rows without it give the allocated "
            "peak); GPU busy: kernel time over "
            "the profiled steps' span of GPU work (before 2026-12-07: over their wall time from a drained GPU); "
            "MFU: model FLOPs (4 x active parameters x tokens + attention) over the bf16 matmul peak measured in the "
            "same process. `loaded`: `checkpoint` is the user's path, `direct` the same random model built on the "
            "GPU (what differs: bench_sft.py's docstring). This table is README's headline.",
            "python benchmarks/bench_sft.py --preset trinity-mini --shapes 1x4096", sft_section),
    Section("sft", "The user's training step against its targets",
            "Each target of the training step (the user's path as in table 1, one row per kind of GPU measured): "
            "the newest measurement, a speed-up only from one run of both implementations, met or by how much not "
            "(a row dated before another GPU's measured the code of its day: lent GPUs come unevenly, and a target "
            "is not re-measured on every kind). Where the time goes: fastmoe's step from its profiled steps "
            "(torch.profiler, one or more steps after the timed ones), kernel time by kind for the twelve longest "
            "kernels (expert GEMMs: fastmoe's Triton grouped GEMMs and torch's; attention: flash, cuDNN and SDPA "
            "kernels; dense GEMMs: cuBLAS), the rest of the kernels, and the time the GPU waits on the host. The "
            "step counts recomputation (gradient "
            "checkpointing) where MFU does not: model FLOPs are 4 x active parameters x tokens, the GPU runs about "
            "6 x.",
            "python benchmarks/bench_sft.py --preset trinity-mini --shapes 1x4096 --profile-steps 2", targets_section),
    Section("sft", "Long context: the longest sequence that trains within a GPU budget",
            "bench_sft.py --memory-limit-gb N --shapes 1xS,...: the same SFTTrainer step as above, batch 1, with the "
            "process limited to N GiB (torch.cuda.set_per_process_memory_fraction, which caps reserved memory, so "
            "the allocator's fragmentation counts); one or two steps per length. A row gives the longest length "
            "that trained and the shortest that then ran out of memory. Runs without a limit on a GPU whose name "
            "states its memory (an H100 80GB) are that budget's rows, \"the whole GPU\" (rows of 16,384 tokens or "
            "more, or out of memory). The allocator setting is part of the row: expandable segments (what `import "
            "fastmoe` sets unless the user chose a setting) waste less to fragmentation. Below it, the memory of "
            "both implementations at each long length both trained.",
            "python benchmarks/bench_sft.py --preset trinity-mini --layers 8 --memory-limit-gb 24 "
            "--shapes 1x16384,1x32768,1x65536", long_context_section),
    Section("generate", "Generation with an adapter attached: decode tokens/s",
            "bench_generate.py: the model loaded as for table 1 with its LoRA adapter (r=16, default targets) "
            "attached and unmerged; greedy `model.generate` of N new tokens (min_new_tokens=N) after a random "
            "prompt without padding. fastmoe: `FastModel.for_inference` (static cache, each decode step replayed "
            "from a CUDA graph; eager: `use_cuda_graphs=False`); transformers: eval with its cache (it switches its "
            "experts to `batched_mm` for decoding). Decode tokens/s = batch x (N - 1 - S) / (whole call - a call "
            "of S = min(8, N // 2) decode steps), medians of 3 calls (before 2026-12-06: batch x (N - 1) / (whole "
            "call - prefill alone)). Graph replay alone: the captured step replayed back to back (the device time; "
            "the rest of a step is generate's host work; before 2026-12-06 with L2 flushed between replays). "
            "Roofline: the bytes a step must read (weights, the experts a batch of that size selects on average, "
            "adapters, LM head, KV cache) over the measured copy "
            "bandwidth, weights counted as stored (4-bit: NF4 experts' codes and scales, bitsandbytes' packed "
            "Linear weights with their absmax). The 4-bit fastmoe records before 2026-12-06 counted the NF4 experts "
            "at their 16-bit size: their bytes and shares were recomputed from the same model shapes "
            "(`step_bytes_corrected` in the record).",
            "python benchmarks/bench_generate.py --preset trinity-mini --layers 8 --batches 1,8,64", generate_section),
    Section("grpo", "RL rollouts: a trl GRPO step's generation phase without vLLM",
            "bench_grpo.py: the model loaded as for table 1, trained by `trl.GRPOTrainer(use_vllm=False)` at bf16; "
            "each step samples a group of completions (the batch) of exactly N new tokens for one prompt. fastmoe's "
            "rollouts take its decode path with nothing to call (fastmoe.trl_generation); transformers + peft "
            "decode with its cache. Generation s: trl's generation phase of a step (prompt and decoding), median "
            "after a warm-up step; tok/s: the completions' tokens over it; step s: the whole training step.",
            "python benchmarks/bench_grpo.py --preset trinity-mini --layers 8 --generations 8 --prompt 512 "
            "--new-tokens 256", grpo_section),
    Section("train-step", "Training step in a plain loop (ablations)",
            "bench_train_step.py: forward with labels, backward and AdamW on the adapters in a Python loop (no "
            "Trainer), random weights built on the GPU, LoRA r=16 on the family's default targets, gradient "
            "checkpointing unless the variant says otherwise. For switching one thing at a time; the user's numbers "
            "are the table above. The \"same run\" columns compare with transformers' run and with fastmoe's default "
            "variant in the same process (lent machines of one model differ by up to 20% for host-bound steps).",
            "python benchmarks/bench_train_step.py --preset trinity-mini --variants hf,fastmoe", train_step_section),
    Section("quality", "Quality: the same LoRA run, transformers + peft vs fastmoe",
            "quality_run.py: 200 LoRA steps of a 4-layer AFMoE at Trinity-Mini's layer shapes on a synthetic Markov "
            "language, both ways from the same weights, adapters and batches; per-step losses in "
            "benchmarks/quality_run.json (chart: plot_results.py).",
            "python benchmarks/quality_run.py", quality_section),
    Section("moe-block", "MoE experts block with expert LoRA",
            "bench_moe_block.py: one experts block, bf16, LoRA r=16 on both expert weights, base frozen: fastmoe's "
            "grouped-GEMM kernels against transformers' `grouped_mm` experts wrapped by peft, and fastmoe again with "
            "the base products by torch's grouped GEMM and its kernels as their epilogue (`base_products(\"torch\")`; "
            "where its GPU kernel time is shorter sets where fastmoe takes it by default). Times are do_bench medians "
            "(wall time, launches included); GPU kernel ms is the sum of the block's kernels (torch.profiler), what "
            "a CUDA graph replay of it costs, as the training step runs it. TFLOP/s count "
            "the base GEMMs only; rel err is fastmoe's forward output against the baseline.",
            "python benchmarks/bench_moe_block.py --tokens 4096,16384", moe_block_section),
    Section("nf4-experts", "NF4 (4-bit) experts against bf16 experts",
            "bench_nf4_experts.py: Trinity-Mini's experts, 4,096 tokens; the bf16 weights are the NF4 weights "
            "dequantized, so both sides compute the same function (double-quant: the absmax re-quantized). Speed as a "
            "share of bf16's: 100% is as fast as bf16.",
            "python benchmarks/bench_nf4_experts.py", nf4_section),
    Section("4bit", "4-bit (QLoRA) training step",
            "The plain-loop training step of the 4-bit variants (NF4 Linear layers and experts, double-quantized "
            "absmax, as `load_in_4bit=True` leaves the model), beside transformers' bf16 run of the same process. "
            "Through the user's path (against transformers' own 4-bit + peft): table 1, weights `4bit`.",
            "python benchmarks/bench_train_step.py --preset trinity-mini --layers 32 "
            "--variants hf-grouped_mm,fastmoe-4bit,fastmoe-4bit-adamw8bit", four_bit_section),
    Section("loss", "The loss: lm_head + cross-entropy without full logits",
            "bench_linear_cross_entropy.py: 8,192 bf16 tokens (1/8 masked), forward + backward: transformers' full "
            "logits and ForCausalLMLoss against fastmoe's chunked linear cross-entropy; peak is the memory above "
            "the inputs.",
            "python benchmarks/bench_linear_cross_entropy.py", loss_section),
    Section("fused-lm-head", "trl's fused LM head: per-token log-probs, entropy and top-1",
            "bench_fused_lm_head.py: the head trl's trainers call with `fused_lm_head=True` (SFT: log-probs, entropy "
            "and top-1 logged; GRPO: an entropy gradient too, temperature 0.7; full-ft: a trainable lm_head), bf16 "
            "at Trinity-Mini's head: trl's chunked `ChunkedLogProbFunction` against fastmoe's `linear_log_probs` "
            "(what a fastmoe model computes under trl), forward + backward of the head alone (do_bench median); "
            "peak is the memory above the inputs.",
            "python benchmarks/bench_fused_lm_head.py", fused_lm_head_section),
    Section("lora-linear", "LoRA linear layers",
            "bench_lora_linear.py: Trinity-Mini's projections, 4,096 bf16 tokens, float32 r=16 adapters, forward + "
            "backward: peft's `lora.Linear` and `ParamWrapper` against the fused op fastmoe runs in their place.",
            "python benchmarks/bench_lora_linear.py", lora_linear_section),
    Section("norm-rope", "Norms, RoPE and the attention gate",
            "bench_norm_rope.py: 4,096 bf16 tokens at Trinity-Mini's widths; CUDA-graph replays (GPU time) except the "
            "eager column; GB/s counts the bytes each op must move, the same count for both sides.",
            "python benchmarks/bench_norm_rope.py", norm_rope_section),
    Section("short-conv", "LFM2's gated short convolution",
            "bench_short_conv.py: LFM2-8B-A1B's width, the conv op alone and the whole ShortConv block, weights frozen "
            "(input gradients only), launched eagerly; GB/s counts the bytes the conv must move.",
            "python benchmarks/bench_short_conv.py", short_conv_section),
    Section("sliding-window-attention", "Sliding-window attention",
            "bench_sliding_window_attention.py: one AFMoE attention layer at Trinity-Mini's shapes (window 2,048), "
            "one row of the given tokens: transformers' SDPA over its dense sliding-window mask against the flash "
            "kernel given the window (fastmoe's path) and cuDNN's causal attention with the window as an additive "
            "bias; the causal full-attention layer, transformers' SDPA against cuDNN (fastmoe's path on Hopper), is "
            "the yardstick. CUDA-graph replays; TFLOP/s over the (query, key) pairs each mask keeps. Rows named "
            "\"packed rows of B examples\" (`--packed BxS`): trl-style batches of bench_sft's example lengths packed "
            "into one row as fastmoe trains them (tokens: the rows' mean), flash given the row's length as the longest "
            "document (fastmoe's layouts of at most 8 offsets) or that document rounded up to a power of two (more "
            "offsets); the two are one computation where the rounding reaches the row's length.",
            "python benchmarks/bench_sliding_window_attention.py", sliding_window_section),
    Section("multi-gpu", "Several GPUs: DDP and FSDP2",
            "bench_multi_gpu.py: an LFM2-8B-A1B-shaped model, transformers' Trainer (accelerate) with fastmoe's "
            "forwards, 20 steps on random tokens, gradient checkpointing; tokens/s from the median step after 3.",
            "torchrun --standalone --nproc-per-node 2 benchmarks/bench_multi_gpu.py --strategy ddp", multi_gpu_section),
]


def question_of(record: dict) -> str:
    return record.get("question", "train-step")


def select(question: str, records: list[dict], include_cpu: bool = False) -> list[dict]:
    """The records a section shows: its question's, GPU measurements only unless include_cpu (CPU smoke runs time
    nothing worth showing); the 4-bit section reads the training-step records."""
    wanted = "train-step" if question == "4bit" else question
    return [r for r in records if question_of(r) == wanted and (include_cpu or r.get("gpu", "CPU") != "CPU")]


def render(records: list[dict], heading: str | None = None, measured_only: bool = False,
           include_cpu: bool = False) -> str:
    lines = [heading or "# fastmoe benchmark results", "",
             "Generated by `python benchmarks/report.py` from `benchmarks/results.jsonl` (one JSON line per "
             "measurement: what was measured, the figures, the date, GPU, library versions and command); do not edit "
             "by hand. Each table shows the newest measurement of every configuration; older ones stay in "
             "results.jsonl and in git. [n] after a row is its source, listed under the table. Sources marked "
             "\"transcribed\" were copied from the earlier hand-written page, with the command and date it gave.", ""]
    for number, section in enumerate(SECTIONS, 1):
        chosen = select(section.question, records, include_cpu)
        if measured_only and not chosen:
            continue
        lines += [f"## {number}. {section.title}", "", section.about, ""]
        if not chosen:
            lines += [f"Not measured yet: `{section.command}`", ""]
            continue
        sources = Sources()
        lines += section.render(chosen, sources) + [""] + sources.lines() + [""]
    return "\n".join(lines).rstrip() + "\n"


def load_records(path: Path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(HERE / "results.jsonl"), help="the JSON lines to read")
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"), help="the page to write; - prints it")
    parser.add_argument("--run", default=None, help="only the records of this run id (one gpu_session.sh call)")
    parser.add_argument("--measured-only", action="store_true", help="leave out the sections without records")
    parser.add_argument("--include-cpu", action="store_true", help="show CPU smoke-run records too")
    args = parser.parse_args()
    records = load_records(Path(args.results))
    if args.run is not None:
        records = [r for r in records if r.get("run") == args.run]
    page = render(records, heading=f"# Benchmark run {args.run}" if args.run else None,
                  measured_only=args.measured_only, include_cpu=args.include_cpu)
    if args.out == "-":
        print(page, end="")
    else:
        Path(args.out).write_text(page)
        print(f"wrote {args.out}: {len(page.splitlines())} lines from {len(records)} records")


if __name__ == "__main__":
    main()
