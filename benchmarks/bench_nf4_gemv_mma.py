"""Probe (not wired into fastmoe): an NF4 GEMV whose products run on the tensor cores, against fastmoe's GEMV.

fastmoe's NF4 GEMVs (kernels/moe/one_token.py, lora_linear.py's few-rows GEMV form) are bound by instructions, not by
HBM: about 9-11 a weight in the K loop (ptxas, sm_90), of which the PTX register decode is about 4, and converting
each decoded bf16 weight to fp32, converting x, and the fp32 FMA are about 2.5 more. Here the decoded bf16 pairs go
straight into `mma.sync.m16n8k16` as its A operand, x (the same pairs for every output column) as its B operand:

* a warp's lanes are (g, t) = (lane // 4, lane % 4); lane (g, t) holds 16 packed bytes (32 weights) of two weight
  rows, lo_g and hi_g, at columns [32 t, 32 t + 32) of the 128-column K step (the layout Triton gives a (32, 64)
  uint8 tile with 4 warps: threadsPerWarp [8, 4], sizePerThread [1, 16]; checked on the compiled kernel);
* mma i (0..7) takes the lane's weights 4i..4i+3 of each row as its k-slots 2t, 2t+1, 2t+8, 2t+9 (A rows g and g+8 =
  lo_g and hi_g) and x at the same columns as B; every B column is x, so D[g][n] is row lo_g's dot product over the
  quad's 128 columns for every n, and D[g + 8][n] row hi_g's;
* the asm is elementwise (16 bytes a call), so its sums come out in an fp32 tensor shaped like the bytes: element 0
  of each 16 holds lo's, element 1 hi's, the rest 0; the quad's four lanes hold the same sums, so a step's sum over
  the row is divided by 4 (exactly).

Run on a GPU: `python benchmarks/probe_mma_gemv.py` (prints times and errors; records nothing).
"""

from __future__ import annotations

import re
import sys

import torch
import triton
import triton.language as tl

import common
from fastmoe.kernels import lora_linear as lora_module
from fastmoe.kernels.moe import nf4 as nf4_module
from fastmoe.kernels.moe import quantize_nf4, reference_dequantize_nf4


def _mma_asm(pair_type: str, mma_type: str) -> str:
    """PTX: decode two 16-byte runs (rows lo and hi) with nf4's register decode, then 8 mma.sync over them and x.
    Operands: $0-$15 the sums (fp32; $0 lo's, $1 hi's, the rest 0), $16-$19 lo's bytes, $20-$35 lo's absmax (the
    first read), $36-$39 hi's bytes, $40-$55 hi's absmax, $56-$71 x as 16-bit pairs."""
    decode = nf4_module._register_decode_asm(pair_type)

    def renamed(outputs: str, first_byte_reg: int, absmax_reg: int) -> str:
        def operand(match: re.Match) -> str:
            n = int(match.group(1))
            if n < 16:
                return f"{outputs}{n}"
            if n < 20:
                return f"${first_byte_reg + n - 16}"
            return f"${absmax_reg}"
        return re.sub(r"\$(\d+)", operand, decode)

    lines = ["{", ".reg .b32 wl<16>, wh<16>;", ".reg .f32 c<4>;",
             renamed("wl", 16, 20), renamed("wh", 36, 40),
             "mov.b32 c0, 0;", "mov.b32 c1, 0;", "mov.b32 c2, 0;", "mov.b32 c3, 0;"]
    for i in range(8):
        lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{mma_type}.{mma_type}.f32 {{c0, c1, c2, c3}}, "
                     f"{{wl{2 * i}, wh{2 * i}, wl{2 * i + 1}, wh{2 * i + 1}}}, {{${56 + 2 * i}, ${57 + 2 * i}}}, "
                     "{c0, c1, c2, c3};")
    lines += ["mov.b32 $0, c0;", "mov.b32 $1, c2;"] + [f"mov.b32 ${n}, 0;" for n in range(2, 16)] + ["}"]
    return "\n".join(lines)


_MMA_ASM_BF16 = tl.constexpr(_mma_asm("bf16x2", "bf16"))
_MMA_CONSTRAINTS = tl.constexpr(",".join(["=r"] * 16 + ["r"] * 56))


@triton.jit
def _mma_gemv_kernel(q_ptr, absmax_ptr, x_ptr, y_ptr, N, K, STEPS_PER_SPLIT, LOOP_STAGES: tl.constexpr):
    """y (N,) float32 += W x over one K split, W NF4 (N, K) (K % 128 == 0, fp32 absmax), x (K,) bf16; program
    (64-row block, split); y accumulated with atomics (a probe: fastmoe's kernels sum splits in order)."""
    HALF: tl.constexpr = 32
    BYTES: tl.constexpr = 64  # 128 columns a K step
    block, split = tl.program_id(0), tl.program_id(1)
    rows_lo = block * 2 * HALF + tl.arange(0, HALF)
    rows_hi = rows_lo + HALF
    lo_mask, hi_mask = rows_lo < N, rows_hi < N
    byte_cols = tl.arange(0, BYTES)
    y_lo = tl.zeros((HALF,), dtype=tl.float32)
    y_hi = tl.zeros((HALF,), dtype=tl.float32)
    # Element 0 of a lane's 16 holds lo's sum, element 1 hi's: known per register, so the selects fold away.
    lane_first = (byte_cols % 16 == 0)[None, :]
    lane_second = (byte_cols % 16 == 1)[None, :]
    x_pairs_ptr = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    k_start = split * STEPS_PER_SPLIT * 2 * BYTES
    for k0 in tl.range(k_start, tl.minimum(k_start + STEPS_PER_SPLIT * 2 * BYTES, K), 2 * BYTES,
                       num_stages=LOOP_STAGES):
        # The tiles as fastmoe's GEMVs load them (nf4.aligned_nf4_tile), which gives the bytes 16 a lane.
        packed_lo, absmax_lo = nf4_module.aligned_nf4_tile(q_ptr, absmax_ptr, rows_lo, lo_mask, k0, K, True, 2 * BYTES)
        packed_hi, absmax_hi = nf4_module.aligned_nf4_tile(q_ptr, absmax_ptr, rows_hi, hi_mask, k0, K, True, 2 * BYTES)
        absmax_lo = nf4_module.absmax_per_byte(absmax_lo, 2 * BYTES)
        absmax_hi = nf4_module.absmax_per_byte(absmax_hi, 2 * BYTES)
        x_pairs = tl.broadcast_to(tl.load(x_pairs_ptr + k0 // 2 + byte_cols)[None, :], (HALF, BYTES))
        sums = tl.inline_asm_elementwise(_MMA_ASM_BF16, _MMA_CONSTRAINTS,
                                         [packed_lo, absmax_lo, packed_hi, absmax_hi, x_pairs],
                                         dtype=tl.float32, is_pure=True, pack=16)
        y_lo += tl.sum(tl.where(lane_first, sums, 0.0), axis=1) * 0.25  # the quad's four lanes hold the same sums
        y_hi += tl.sum(tl.where(lane_second, sums, 0.0), axis=1) * 0.25
    tl.atomic_add(y_ptr + rows_lo, y_lo, mask=lo_mask)
    tl.atomic_add(y_ptr + rows_hi, y_hi, mask=hi_mask)


def check_mma_layout(compiled) -> None:
    """Raise unless the asm's operands have the lane layout the fragments assume (see the module docstring)."""
    ttgir = compiled.asm["ttgir"]
    for line in ttgir.splitlines():
        if "elementwise_inline_asm" not in line or "mma.sync" not in line:
            continue
        match = re.search(r"tensor<32x64xi8, (#\w+)>", line)
        definition = match and re.search(rf"^{match.group(1)} = .*$", ttgir, re.MULTILINE)
        text = definition.group(0) if definition else ""
        if not all(part in text for part in ("sizePerThread = [1, 16]", "threadsPerWarp = [8, 4]",
                                             "warpsPerCTA = [4, 1]", "order = [1, 0]")):
            raise RuntimeError(f"mma GEMV: unexpected layout {text or line[:300]}")
        return
    raise RuntimeError("mma GEMV: the asm was not found in the TTGIR")


def mma_gemv(weight: nf4_module.Nf4Weight, x: torch.Tensor, split: int, loop_stages: int = 3) -> torch.Tensor:
    _, n, k = weight.shape
    if k % 128 or weight.double_quant or x.dtype != torch.bfloat16:
        raise ValueError("the probe takes K % 128 == 0, an fp32 absmax and bf16 x")
    y = torch.zeros(n, dtype=torch.float32, device=x.device)
    steps = triton.cdiv(k, 128)
    compiled = _mma_gemv_kernel[(triton.cdiv(n, 64), split)](
        weight.packed, weight.absmax, x, y, n, k, triton.cdiv(steps, split), LOOP_STAGES=loop_stages,
        num_warps=4, num_stages=3)
    check_mma_layout(compiled)
    return y


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("probe_mma_gemv.py needs a CUDA GPU")
    torch.manual_seed(0)
    shapes = [("LFM2 conv in_proj", 6144, 2048), ("LFM2 out_proj", 2048, 2048), ("LFM2 expert gate_up", 3584, 2048),
              ("LFM2 expert down", 2048, 1792),
              ("Trinity q_proj", 4096, 2048), ("dense down", 2048, 7168)]
    for name, n, k in shapes:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
        nf4 = quantize_nf4(w[None])
        x = torch.randn(k, device="cuda", dtype=torch.bfloat16)
        exact = reference_dequantize_nf4(nf4)[0].double() @ x.double()
        layer = [lora_module.Projection(nf4, None, None, None, 1.0)]
        config = lora_module._few_rows_config(1, n, k, nf4=True)
        fastmoe_ms = common.bench_graph_ms(lambda: lora_module._launch_few_rows(x[None], layer, config))
        fastmoe_err = common.rel_err(lora_module._launch_few_rows(x[None], layer, config)[0][0].double(), exact)
        results = []
        for split in (1, 2, 4, 8):
            if k // 128 < split:
                continue
            for stages in (1, 3):
                ms = common.bench_graph_ms(lambda: mma_gemv(nf4, x, split, stages))
                err = common.rel_err(mma_gemv(nf4, x, split, stages).double(), exact)
                results.append((ms, split, stages, err))
        best = min(results)
        weights = n * k
        print(f"{name} ({n}x{k}): fastmoe GEMV {fastmoe_ms * 1e3:.1f} us ({weights / fastmoe_ms / 1e9:.2f}e12 "
              f"weights/s, err {fastmoe_err:.1e}); mma GEMV best {best[0] * 1e3:.1f} us (split {best[1]}, stages "
              f"{best[2]}, {weights / best[0] / 1e9:.2f}e12 weights/s, err {best[3]:.1e}); all: "
              + ", ".join(f"s{s}/st{st} {ms * 1e3:.1f}" for ms, s, st, _ in results), flush=True)


if __name__ == "__main__":
    main()
