"""fastmoe's Triton kernels compiled for an NVIDIA GPU on a machine without one (Triton ships ptxas and cuobjdump), and
what the compiled code says: registers a thread, bytes spilled to local memory, static shared memory, and the
instructions of the kernel's main loop grouped by the pipe that issues them.

What a kernel is bound by is read on a GPU (benchmarks/ncu_kernels.py under Nsight Compute); this answers the questions
that come before and after, without device time: does a change spill, how many registers (hence programs an SM) does
it take, how many integer-pipe instructions (the NF4 decode's bound: prmt, lop3, shifts, address arithmetic issue at
half the rate of the floating-point pipe on Hopper) does a loop iteration cost. Use the Triton the GPU machine has
(e.g. a venv with the same triton version) to see what that machine compiles.

Each case is a kernel with the constexprs and argument types its launcher passes at one model's shapes (integer
arguments assumed multiples of 16 where real shapes make them so, as Triton's specialisation does):

* one-token: the one-token experts block's NF4 GEMVs at LFM2-8B-A1B's shapes (kernels/moe/one_token.py), with and
  without LoRA;
* grouped-decode: the NF4 grouped GEMMs of a decode step of a few tokens (batch 8), 16-row tiles;
* grouped-train: the 16-bit grouped GEMMs of a training step at their GPU configurations (kernels/moe/grouped_gemm.py).

    python benchmarks/sass_report.py [one-token] [grouped-decode] [grouped-train] [--sm 90] [--only TEXT]
        [--sass-dir DIR]

Not under TRITON_INTERPRET=1: the interpreter's kernels do not compile.

Printed only.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import inspect
import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastmoe.kernels.moe import grouped_gemm, one_token
from fastmoe.kernels.moe.nf4 import check_register_decode_layout

# SASS opcodes by the pipe that issues them on Hopper (sm_90), as Nsight Compute's sm__inst_executed_pipe_* metrics
# count them: the integer ALU pipe issues at half the rate of the FMA pipe.
PIPES = {
    "alu": {"PRMT", "LOP3", "SHF", "LEA", "IADD3", "ISETP", "SEL", "PLOP3", "FSEL", "FSETP", "FMNMX", "IMNMX", "BMSK",
            "SGXT", "LOP", "F2FP", "VIADD"},
    "fma": {"FFMA", "FMUL", "FADD", "IMAD", "HFMA2", "HMUL2", "HADD2", "IMUL"},
    "tensor": {"HMMA", "HGMMA", "IMMA", "WARPGROUP"},
    "memory": {"LDG", "LDGSTS", "LDS", "STS", "STG", "LDSM", "LDL", "STL", "ATOMG", "RED", "SHFL", "UTMALDG"},
}


@dataclasses.dataclass
class Case:
    label: str
    kernel: object  # a @triton.jit function
    types: dict[str, str]  # argument name -> Triton type ("*bf16", "fp32", ...); unnamed ones are i32
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int


@dataclasses.dataclass
class Report:
    label: str
    registers: int
    spilled_bytes: int
    shared_bytes: int  # dynamic shared memory a program takes (pipeline stages, layout conversions)
    loop_instructions: int
    loop_pipes: dict[str, int]
    loop_opcodes: collections.Counter
    sass: str


def _one_token_types() -> dict[str, str]:
    types = {name: "*bf16" for name in one_token._gate_up_kernel.arg_names + one_token._down_kernel.arg_names
             if name.endswith("_ptr")}
    types.update({"w_ptr": "*u8", "absmax_ptr": "*u8", "code_ptr": "*fp32", "absmax_code_ptr": "*fp32",
                  "scale_ptr": "*fp32", "offset_ptr": "*fp32", "index_ptr": "*i64", "partials_ptr": "*fp32",
                  "arrivals_ptr": "*i32", "down_xa_ptr": "*fp32", "xa_given_ptr": "*fp32", "weights_ptr": "*fp32",
                  "scaling": "fp32"})
    return types


def one_token_cases() -> list[Case]:
    """LFM2-8B-A1B's experts (hidden 2048, intermediate 1792, top-4) in NF4 with a double-quantized absmax, through
    the tensor-core GEMV (128-column K steps, 64-row blocks, K split in 4 as gemv_split picks), LoRA r=16."""
    shared = dict(NF4=True, DOUBLE_QUANT=True, ROWS_ALIGNED=True, REGISTER_DECODE=True, WHOLE_K=True,
                  W_DTYPE=tl.bfloat16, TOP_K=4, BLOCK_N=64, BLOCK_K=one_token.GEMV_MMA_BLOCK_K, BLOCK_R=16, SPLIT_K=4,
                  LOOP_STAGES=one_token.GEMV_LOOP_STAGES, MMA=True, stride_wn=0, stride_wk=0, stride_ak=1,
                  stride_br=1)
    cases = []
    for lora in (True, False):
        name = "LoRA" if lora else "no LoRA"
        cases.append(Case(f"one-token gate/up, NF4, {name}", one_token._gate_up_kernel, _one_token_types(),
                          dict(shared, HAS_LORA=lora, DOWN_XA=False, stride_dak=1), 4, 3))
        cases.append(Case(f"one-token down, NF4, {name}", one_token._down_kernel, _one_token_types(),
                          dict(shared, HAS_LORA=lora, XA_GIVEN=False, XA_PARTS_BLOCK=32), 4, 3))
    return cases


def _grouped_types(kernel) -> dict[str, str]:
    types = {name: "*bf16" for name in kernel.arg_names if name.endswith("_ptr")}
    types.update({"a_rows_ptr": "*i32", "out_rows_ptr": "*i32", "tile_expert_ptr": "*i32", "tile_row_start_ptr": "*i32",
                  "expert_offsets_ptr": "*i32", "row_scale_ptr": "*fp32", "dscale_ptr": "*fp32", "absmax_ptr": "*fp32",
                  "code_ptr": "*fp32", "alpha": "fp32", "limit": "fp32", "out_scale": "fp32"})
    return types


def grouped_train_cases() -> list[Case]:
    """The 16-bit grouped GEMMs of a training step with LoRA r=16, 128-row tiles, at their GPU configurations
    (grouped_gemm._GPU_*: BLOCK_N cap, BLOCK_K cap, warps, stages)."""
    dense = dict(NF4=False, TRANSPOSED=False, ROWS_ALIGNED=False, REGISTER_DECODE=False, WHOLE_TILES=False,
                 W_DTYPE=None, DOT_PRECISION="tf32", PRODUCT_GIVEN=False, HAS_LORA=True, BLOCK_M=128, BLOCK_R=16,
                 stride_ak=1, stride_wk=1)

    def case(label, kernel, config, **constexprs):
        block_n, block_k, options = config
        return Case(label, kernel, _grouped_types(kernel),
                    dict(dense, BLOCK_N=block_n, BLOCK_K=block_k, **constexprs), options["num_warps"],
                    options["num_stages"])

    swiglu = dict(INTERLEAVED=False, CLAMPED=False)
    return [
        case("SwiGLU forward", grouped_gemm._grouped_mm_swiglu_kernel, grouped_gemm._GPU_SWIGLU, STORE_GATE_UP=True,
             HAS_BIAS=False, **swiglu),
        case("row GEMM (down)", grouped_gemm._grouped_mm_kernel, grouped_gemm._GPU_ROW_GEMM, HAS_ROW_SCALE=True,
             HAS_BIAS=False, ROW_SPLIT=1),
        case("SwiGLU backward", grouped_gemm._grouped_mm_swiglu_bwd_kernel, grouped_gemm._GPU_SWIGLU_BWD, **swiglu),
    ]


def grouped_decode_cases() -> list[Case]:
    """The NF4 grouped GEMMs of a decode step of a few tokens (16-row tiles, grouped_gemm._GPU_NF4_DECODE_ROW_GEMM):
    the SwiGLU forward and the down projection, fp32 absmax (decoded for the touched experts first), LoRA r=16,
    rows on 64-weight blocks (every real model)."""
    block_n, block_k, options = grouped_gemm._GPU_NF4_DECODE_ROW_GEMM
    nf4 = dict(NF4=True, TRANSPOSED=False, ROWS_ALIGNED=True, REGISTER_DECODE=True, WHOLE_TILES=True,
               W_DTYPE=tl.bfloat16, DOT_PRECISION="tf32", PRODUCT_GIVEN=False, HAS_LORA=True, HAS_BIAS=False,
               BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=16, stride_ak=1, stride_wn=0, stride_wk=0)

    def types(kernel) -> dict[str, str]:
        return {**_grouped_types(kernel), "w_ptr": "*u8"}

    return [
        Case("grouped SwiGLU forward, NF4, 16-row tiles", grouped_gemm._grouped_mm_swiglu_kernel,
             types(grouped_gemm._grouped_mm_swiglu_kernel),
             dict(nf4, STORE_GATE_UP=False, INTERLEAVED=False, CLAMPED=False), options["num_warps"],
             options["num_stages"]),
        Case("grouped row GEMM (down), NF4, 16-row tiles", grouped_gemm._grouped_mm_kernel,
             types(grouped_gemm._grouped_mm_kernel), dict(nf4, HAS_ROW_SCALE=True, ROW_SPLIT=1), options["num_warps"],
             options["num_stages"]),
    ]


CASES = {"one-token": one_token_cases, "grouped-decode": grouped_decode_cases, "grouped-train": grouped_train_cases}


def _bin(tool: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def loop_body(sass: str) -> list[str]:
    """The instructions of the longest loop in a cuobjdump -sass listing: from the target of its longest backward
    branch to that branch."""
    instructions = [(int(m.group(1), 16), m.group(2).strip())
                    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;/]*?)\s*;", sass)]
    longest = None
    for address, text in instructions:
        branch = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < address:
            start = int(branch.group(1), 16)
            if longest is None or address - start > longest[1] - longest[0]:
                longest = (start, address)
    if longest is None:
        return []
    return [text for address, text in instructions if longest[0] <= address <= longest[1]]


def opcode(instruction: str) -> str:
    """'@!P0 LDGSTS.E.BYPASS.128 [R1], ...' -> 'LDGSTS'."""
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0].split(".")[0]


def pipe(op: str) -> str:
    if op.startswith("U"):
        return "uniform"
    return next((name for name, ops in PIPES.items() if op in ops), "other")


def compile_case(case: Case, sm: int) -> Report:
    names = case.kernel.arg_names
    missing = set(case.constexprs) - set(names)
    if missing:
        raise ValueError(f"{case.label}: {sorted(missing)} are not arguments of {case.kernel.__name__}")
    # Constexpr parameters the case leaves out take their defaults, as a launch that does not pass them does.
    constexprs = {param.name: param.default for param in case.kernel.params
                  if param.is_constexpr and param.default is not inspect.Parameter.empty}
    constexprs.update(case.constexprs)
    signature = {name: "constexpr" if name in constexprs else case.types.get(name, "i32") for name in names}
    # Pointers 16-byte aligned and integer arguments multiples of 16, as Triton specialises them at real shapes.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
             if signature[name].startswith("*") or signature[name] == "i32"}
    source = ASTSource(fn=case.kernel, signature=signature,
                       constexprs={(names.index(name),): value for name, value in constexprs.items()},
                       attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", sm, 32),
                              options={"num_warps": case.num_warps, "num_stages": case.num_stages})
    # The layout the NF4 register decode needs (16 bytes a thread; four lanes a row for the tensor-core GEMV), as the
    # launchers check it on a GPU: raises otherwise.
    check_register_decode_layout(compiled)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        usage = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_bin("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)

    def resource(name: str) -> int:
        found = re.search(rf"{name}:(\d+)", usage)
        return int(found.group(1)) if found else 0

    body = loop_body(sass)
    opcodes = collections.Counter(opcode(instruction) for instruction in body)
    pipes = collections.Counter()
    for op, count in opcodes.items():
        pipes[pipe(op)] += count
    return Report(case.label, resource("REG"), resource("STACK"), compiled.metadata.shared, len(body), dict(pipes),
                  opcodes, sass)


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("sass_report compiles kernels: run it without TRITON_INTERPRET=1")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sets", nargs="*", metavar="SET", help=f"one of {', '.join(CASES)} (default: all)")
    parser.add_argument("--sm", type=int, default=90, help="compute capability to compile for, e.g. 90 (H100/H200)")
    parser.add_argument("--sass-dir", help="also write each kernel's SASS listing here")
    parser.add_argument("--only", help="only the cases whose label contains this text")
    args = parser.parse_args()
    unknown = set(args.sets) - set(CASES)
    if unknown:
        parser.error(f"unknown set {', '.join(sorted(unknown))}: choose from {', '.join(CASES)}")
    print(f"triton {triton.__version__}, sm_{args.sm}")
    for name in args.sets or CASES:
        for case in CASES[name]():
            if args.only and args.only not in case.label:
                continue
            report = compile_case(case, args.sm)
            pipes = ", ".join(f"{p} {n}" for p, n in sorted(report.loop_pipes.items(), key=lambda item: -item[1]))
            top = " ".join(f"{op}:{n}" for op, n in report.loop_opcodes.most_common(8))
            print(f"{report.label}: {report.registers} registers, {report.spilled_bytes} bytes spilled, "
                  f"{report.shared_bytes} bytes of shared memory; main loop {report.loop_instructions} instructions "
                  f"({pipes}; {top})", flush=True)
            if args.sass_dir:
                os.makedirs(args.sass_dir, exist_ok=True)
                path = os.path.join(args.sass_dir, re.sub(r"\W+", "_", report.label).strip("_") + ".sass")
                with open(path, "w") as out:
                    out.write(report.sass)


if __name__ == "__main__":
    main()
