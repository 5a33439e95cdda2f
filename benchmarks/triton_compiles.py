"""Which Triton kernels compile while a script runs, when, for how long, and which specialization made each new one.

Why: a training step on data of varied lengths meets new token counts at every step. A Triton kernel compiles once
per specialization of its arguments (integers equal to 1 or divisible by 16, constexprs, dtypes), and a compile takes
a second or more on a fresh machine, so a kernel whose specialization follows the token count would compile on
steps long after the warm-up. This wraps any benchmark script and prints each compile as it happens (interleaved with
the script's own output, e.g. trl's per-step logs), then a summary per kernel:

    python benchmarks/triton_compiles.py benchmarks/bench_sft.py --preset trinity-mini --layers 8 --data examples ...

Needs a GPU (the interpreter compiles nothing) and Triton's JIT hooks (`triton.knobs.runtime.jit_cache_hook`,
Triton 3.4 and later).
"""

from __future__ import annotations

import collections
import runpy
import sys
import time

START = time.perf_counter()


class CompileLog:
    """Per kernel: the compiles, their seconds, and each compile's argument types (Triton's specialization key) as
    `name: type` strings, to name the arguments whose specialization differs between a kernel's compiles."""

    def __init__(self) -> None:
        self.started: dict[tuple, float] = {}
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.variants: dict[str, list[dict[str, str]]] = collections.defaultdict(list)

    def before(self, *, key, fn, **_) -> bool:
        self.started[(fn.name, str(key))] = time.perf_counter()
        return False  # go on compiling

    def after(self, *, key, fn, compile, **_) -> None:
        now = time.perf_counter()
        seconds = now - self.started.pop((fn.name, str(key)), now)
        arguments = _argument_types(compile)
        earlier = self.variants[fn.name]
        changed = _changed(earlier, arguments)
        self.seconds[fn.name] += seconds
        earlier.append(arguments)
        note = f" ({', '.join(changed)})" if changed else ""
        print(f"[triton compile +{now - START:.1f} s] {fn.name} #{len(earlier)} {seconds:.2f} s{note}", flush=True)

    def summary(self) -> str:
        lines = ["Triton compiles: kernel, compiles, seconds, arguments whose specialization varied"]
        for name in sorted(self.variants, key=lambda n: -self.seconds[n]):
            variants = self.variants[name]
            varied = sorted({arg for later in variants[1:] for arg in _changed(variants[:1], later, names_only=True)})
            lines.append(f"  {name}: {len(variants)}, {self.seconds[name]:.1f} s, {', '.join(varied) or '-'}")
        total = sum(len(v) for v in self.variants.values())
        lines.append(f"  total: {total} compiles, {sum(self.seconds.values()):.1f} s")
        return "\n".join(lines)


def _argument_types(compile: dict) -> dict[str, str]:
    """The specialization Triton compiles for, per argument, from its hooks' `compile` dict: `signature` (name ->
    type, in order), `constants` ((index,) -> value: constexprs and arguments specialized to a value) and
    `configs[0]` ((index,) -> [[attribute, value]]: e.g. tt.divisibility 16) -> {"M": "i32 tt.divisibility=16",
    "BLOCK_M": "constexpr=64", ...}."""
    constants = compile.get("constants") or {}
    attributes = (compile.get("configs") or [{}])[0] or {}
    arguments = {}
    for index, (name, kind) in enumerate((compile.get("signature") or {}).items()):
        text = str(kind)
        for constant in ((index,), name):  # keyed by position (Triton 3.x) or by name
            if constant in constants:
                text += f"={constants[constant]}"
        for attribute, value in attributes.get((index,), []):
            text += f" {attribute}={value}"
        arguments[name] = text
    return arguments


def _changed(earlier: list[dict[str, str]], arguments: dict[str, str], names_only: bool = False) -> list[str]:
    """The arguments whose type differs from the nearest earlier compile's (the one differing in fewest)."""
    if not earlier:
        return []
    differences = [[name for name, kind in arguments.items() if other.get(name) != kind] for other in earlier]
    nearest = min(differences, key=len)
    if names_only:
        return nearest
    closest = earlier[differences.index(nearest)]
    return [f"{name}: {closest.get(name)} -> {arguments[name]}" for name in nearest]


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python benchmarks/triton_compiles.py SCRIPT.py [ARGUMENTS ...]")
    from triton import knobs

    if not hasattr(knobs.runtime, "jit_post_compile_hook"):
        raise SystemExit("this Triton has no JIT compile hooks (triton.knobs.runtime.jit_cache_hook); need 3.4+")
    log = CompileLog()
    knobs.runtime.jit_cache_hook = log.before
    knobs.runtime.jit_post_compile_hook = log.after
    script, sys.argv = sys.argv[1], sys.argv[1:]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        print(log.summary(), flush=True)


if __name__ == "__main__":
    main()
