"""NF4 storage of 3D expert weights (QLoRA's 4-bit NormalFloat), bitsandbytes-compatible, and its dequantization.

Format, per expert weight W_e (N, K) of a stack (E, N, K), exactly bitsandbytes' ``quantize_4bit(quant_type="nf4",
blocksize=64)`` of W_e flattened row-major:

* blocks of 64 consecutive elements of the flattened W_e, each with its absmax (fp32);
* each element becomes the index of the nearest of bitsandbytes' 16 NF4 values to ``w / absmax``;
* two codes per byte, element 2j in the high nibble and 2j+1 in the low one.

So ``packed`` (E, N*K/2) uint8 and ``absmax`` (E, N*K/64) fp32, and element (n, k) of expert e is
``NF4[code] * absmax[e, (n*K + k) // 64]`` computed in fp32 and rounded to the weight's dtype, as
``bitsandbytes.functional.dequantize_4bit`` does.

fp32 absmax costs 0.5 bit per weight on top of 4 (1.5 GB for 24B expert weights). Optional double quantization
(``quantize_nf4(w, double_quant=True)``, bitsandbytes' ``compress_statistics=True`` per expert) cuts it to ~0.127 bit:

* ``absmax_offset`` (E,) fp32: the mean of the expert's absmax;
* ``absmax`` (E, N*K/64) uint8: indices into bitsandbytes' signed 8-bit dynamic code (``dynamic_code``) of
  (absmax - offset) / absmax_scale, blockwise over 256 consecutive absmax;
* ``absmax_scale`` (E, ceil(N*K/64/256)) fp32: the absmax of each such block of (absmax - offset).

The absmax of element block b is then ``dynamic_code[absmax[e, b]] * absmax_scale[e, b // 256] + absmax_offset[e]``
in fp32 (``dequantize_absmax``), as bitsandbytes' dequantize_blockwise plus offset computes it. A GEMM decodes the
whole stack's absmax to fp32 first (``absmax_fp32``: 4 bytes per 64 weights, for the length of that GEMM).

The grouped GEMMs of ``moe_experts_nf4`` (``grouped_gemm``) dequantize weight tiles in registers with
``dequantize_nf4_tile``; this file holds the quantizer, that tile decode and the PTX decode of packed codes it uses on
NVIDIA GPUs (``nf4_decode_runs``), the whole-tensor dequantization (for merging LoRA, a dense fallback, and the
products that torch's grouped GEMM computes where each expert has rows enough) and its reference.
"""

from __future__ import annotations

import functools
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..custom_op import GraphOp
from ..dispatch import use_triton
from ..grid import cdiv

BLOCKSIZE = 64
# Absmax per block of double quantization (bitsandbytes' quantize_4bit uses 256 for its compressed statistics).
ABSMAX_BLOCKSIZE = 256

# bitsandbytes' NF4 code (bitsandbytes/functional.py get_4bit_type("nf4")), in code order.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

_code_cache: dict[torch.device, torch.Tensor] = {}
_dynamic_code_cache: dict[torch.device, torch.Tensor] = {}


def nf4_code(device: torch.device | str) -> torch.Tensor:
    """The 16 NF4 values as an fp32 tensor on `device` (cached: kernels read it as a lookup table)."""
    device = torch.device(device)
    if device not in _code_cache:
        _code_cache[device] = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    return _code_cache[device]


def _signed_dynamic_map() -> torch.Tensor:
    """bitsandbytes' create_dynamic_map(signed=True) (8 bits, up to 7 exponent bits), computed the same way: for each
    decade 10^-6 .. 1, the midpoints of 2^i equal steps of [0.1, 1] scaled to it, both signs, plus 0 and 1; sorted.
    Small deviations of an absmax from its mean keep their relative precision instead of rounding to 0."""
    values = [0.0, 1.0]
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        values += ((10 ** (-6 + i)) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_code(device: torch.device | str) -> torch.Tensor:
    """The 256 sorted values of bitsandbytes' signed dynamic code, fp32 on `device` (cached lookup table): what the
    uint8 absmax of a double-quantized Nf4Weight index."""
    device = torch.device(device)
    if device not in _dynamic_code_cache:
        _dynamic_code_cache[device] = _signed_dynamic_map().to(device)
    return _dynamic_code_cache[device]


@dataclass
class Nf4Weight:
    """An (E, N, K) weight stack in NF4: packed (E, N*K/2) uint8, absmax (E, N*K/64), and the shape and dtype it
    dequantizes to. absmax is fp32, or uint8 with absmax_scale (E, ceil(N*K/64/256)) fp32 and absmax_offset (E,)
    fp32 when double-quantized (see the module docstring and ``dequantize_absmax``)."""

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int, int]
    dtype: torch.dtype
    absmax_scale: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Its storage: packed and absmax, then absmax_scale and absmax_offset when double-quantized."""
        if self.double_quant:
            return self.packed, self.absmax, self.absmax_scale, self.absmax_offset
        return self.packed, self.absmax

    def rebuilder(self) -> Callable[..., Nf4Weight]:
        """tensors() -> an Nf4Weight like this one; holds no tensor itself (for autograd's saved tensors)."""
        shape, dtype = self.shape, self.dtype

        def rebuild(packed, absmax, absmax_scale=None, absmax_offset=None):
            return Nf4Weight(packed, absmax, shape, dtype, absmax_scale, absmax_offset)
        return rebuild

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


@dataclass
class TransposedNf4Weight:
    """The transpose (E, K, N) of an Nf4Weight stack stored (E, N, K), with no copy: how the grouped GEMMs take a stack
    stored (E, in, out) (gpt-oss's experts, quantized along their stored rows) as the (E, out, in) weight they
    multiply by. The GEMMs decode the stored tiles and read them transposed."""

    stored: Nf4Weight

    @property
    def shape(self) -> tuple[int, int, int]:
        experts, n, k = self.stored.shape
        return experts, k, n

    @property
    def device(self) -> torch.device:
        return self.stored.device

    @property
    def dtype(self) -> torch.dtype:
        return self.stored.dtype


def check_nf4_shape(shape: tuple[int, ...]) -> None:
    if len(shape) != 3:
        raise ValueError(f"NF4 expert weights are (experts, N, K) stacks, got shape {tuple(shape)}")
    if (shape[1] * shape[2]) % BLOCKSIZE:
        raise ValueError(
            f"NF4 quantization needs N*K of each expert to be a multiple of {BLOCKSIZE} (one absmax per "
            f"{BLOCKSIZE} elements), got N={shape[1]}, K={shape[2]}"
        )


def _quantize_blockwise(blocks: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, blocksize) fp32 -> (uint8 index of the nearest value of the sorted `code` to each element / its
    block's absmax, flattened; absmax (blocks,)). bitsandbytes' blockwise scheme, rounding to the nearest code by
    bucketing on the midpoints between code values."""
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)
    bounds = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8), absmax


@torch.no_grad()
def quantize_nf4(weight: torch.Tensor, double_quant: bool = False) -> Nf4Weight:
    """(E, N, K) weight -> Nf4Weight on the weight's device, one expert at a time (one fp32 expert of scratch).

    Same codes and absmax as bitsandbytes' quantize_4bit(W_e, blocksize=64, quant_type="nf4") per expert, and with
    double_quant its absmax compressed as compress_statistics=True does (``quantize_absmax``)."""
    check_nf4_shape(weight.shape)
    num_experts, n, k = weight.shape
    num_blocks = n * k // BLOCKSIZE
    code = nf4_code(weight.device)
    packed = torch.empty(num_experts, n * k // 2, dtype=torch.uint8, device=weight.device)
    absmax_scale = absmax_offset = None
    if double_quant:
        absmax = torch.empty(num_experts, num_blocks, dtype=torch.uint8, device=weight.device)
        absmax_scale = torch.empty(num_experts, cdiv(num_blocks, ABSMAX_BLOCKSIZE), dtype=torch.float32,
                                   device=weight.device)
        absmax_offset = torch.empty(num_experts, dtype=torch.float32, device=weight.device)
    else:
        absmax = torch.empty(num_experts, num_blocks, dtype=torch.float32, device=weight.device)
    for e in range(num_experts):
        q, amax = _quantize_blockwise(weight[e].reshape(-1, BLOCKSIZE).float(), code)
        packed[e] = (q[::2] << 4) | q[1::2]
        if double_quant:
            absmax[e], absmax_scale[e], absmax_offset[e] = quantize_absmax(amax)
        else:
            absmax[e] = amax
    return Nf4Weight(packed, absmax, (num_experts, n, k), weight.dtype, absmax_scale, absmax_offset)


def quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One expert's fp32 absmax (blocks,) -> (uint8 codes (blocks,), scale (ceil(blocks/256),), offset ()):
    bitsandbytes' double quantization, quantize_blockwise(absmax - absmax.mean(), blocksize=256) into the signed
    dynamic code, with nearest-code rounding."""
    offset = absmax.mean()
    centered = absmax - offset
    num_blocks = centered.numel()
    padding = -num_blocks % ABSMAX_BLOCKSIZE
    blocks = torch.nn.functional.pad(centered, (0, padding)).view(-1, ABSMAX_BLOCKSIZE)
    codes, scale = _quantize_blockwise(blocks, dynamic_code(absmax.device))
    return codes[:num_blocks], scale, offset


def dequantize_absmax(weight: Nf4Weight) -> torch.Tensor:
    """The fp32 absmax (E, N*K/64) of `weight`: as stored, or decoded from its double quantization."""
    if not weight.double_quant:
        return weight.absmax
    scale = weight.absmax_scale.repeat_interleave(ABSMAX_BLOCKSIZE, dim=1)[:, :weight.absmax.shape[1]]
    return dynamic_code(weight.device)[weight.absmax.long()] * scale + weight.absmax_offset[:, None]


def reference_dequantize_nf4(weight: Nf4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Nf4Weight -> (E, N, K) in `dtype` (default: the quantized weight's dtype), bitsandbytes' arithmetic."""
    codes = torch.stack([weight.packed >> 4, weight.packed & 0xF], dim=-1).reshape(weight.packed.shape[0], -1)
    absmax = dequantize_absmax(weight)
    values = nf4_code(weight.device)[codes.long()].view(codes.shape[0], -1, BLOCKSIZE) * absmax[..., None]
    return values.to(weight.dtype).to(dtype or weight.dtype).view(weight.shape)


def _decode_word(word: str, outputs: tuple[str, str, str, str]) -> list[str]:
    """PTX decoding one 32-bit word of packed codes (4 bytes, 8 weights) into four registers of 16-bit weight pairs,
    byte j's pair in outputs[j], by byte lookups in the planes l0-l3 (low bytes of the 16 values) and h0-h3 (high
    bytes) that ``_register_decode_asm`` describes. The word is its own selector: prmt reads the low 16 bits of a
    selector (bytes 0 and 1's codes, low nibble first), so the high half's selectors are the same masks shifted down.
    The masks are computed for the whole word at once (5 instructions, where each half on its own took 3 and 4), its
    three right shifts as the high halves of products by powers of two (mul.hi: x >> s = hi(x * 2^(32 - s))): ptxas
    issues those as IMAD.HI on the FMA pipe, which the decode leaves mostly idle, where shifts go to the integer pipe
    that bounds it (benchmarks/sass_report.py, Triton 3.6 for sm_90: the one-token gate/up loop with LoRA 448 -> 400
    integer-pipe instructions; not yet timed on a GPU)."""
    lines = [f"and.b32 s7, {word}, 0x77777777;", f"mul.hi.u32 sel, {word}, 0x80000000;",
             "lop3.b32 sel, sel, 0x44444444, 0x32103210, 0xEA;", "mul.hi.u32 s7h, s7, 0x10000;",
             "mul.hi.u32 selh, sel, 0x10000;"]
    for half, (low_bits, pick) in enumerate((("s7", "sel"), ("s7h", "selh"))):
        lines += [f"prmt.b32 a0, l0, l1, {low_bits};", f"prmt.b32 a1, l2, l3, {low_bits};",
                  f"prmt.b32 la, a0, a1, {pick};", f"prmt.b32 a0, h0, h1, {low_bits};",
                  f"prmt.b32 a1, h2, h3, {low_bits};", f"prmt.b32 ha, a0, a1, {pick};",
                  # la / ha: the low / high bytes of the weights of (lo nibble, hi nibble) of the two bytes; a
                  # weight pair (hi nibble, lo nibble) of one byte is one output register, in weight order.
                  f"prmt.b32 {outputs[2 * half]}, la, ha, 0x4051;",
                  f"prmt.b32 {outputs[2 * half + 1]}, la, ha, 0x6273;"]
    return lines


def _decode_run(first_word: int, outputs: str) -> list[str]:
    """PTX decoding the 16 bytes of operands $first_word .. $first_word + 3 (``_decode_word`` each) into the 16 pair
    registers {outputs}0 .. {outputs}15, in weight order ("$" for the asm's own outputs $0-$15)."""
    lines = []
    for word in range(4):
        lines += _decode_word(f"${first_word + word}", tuple(f"{outputs}{4 * word + j}" for j in range(4)))
    return lines


_DECODE_REGISTERS = ".reg .b32 l<4>, h<4>, s7, sel, s7h, selh, a0, a1, la, ha;"


def _register_decode_asm(pair_type: str) -> str:
    """PTX decoding 16 packed NF4 bytes (32 weights, one 64-block) to 16-bit weights in registers, for
    ``nf4_decode_runs``. Operands: $0-$15 the 32 weights in order, two per register (byte j's: high nibble's in the
    low half, as the element order of packed 16-bit values puts weight 2j first), $16-$19 the 16 bytes, $20 the
    block's absmax.

    The 16 values code[q] * absmax are computed once per call in fp32 and rounded to 16 bits (bitsandbytes'
    arithmetic), then split into a plane of low bytes and one of high bytes, four registers each. A weight is then
    two byte lookups, and ``prmt`` looks up four at a time: its selector takes 4-bit fields, which is what NF4 codes
    are, but only 3 bits index (8 bytes of two registers) and the 4th asks for sign replication. So each plane is
    looked up with the 3 low bits in entries 0-7 and in entries 8-15, and a third prmt picks per byte by the 4th
    bit (moved to bit 2 of a selector 0x3210 + 4 * bit) (``_decode_word``). About 3 integer instructions per weight,
    and no shared-memory table, which the tensor cores' operands also need."""
    lines = ["{", ".reg .f32 p<16>;", ".reg .b32 t<8>;", _DECODE_REGISTERS]
    for q, c in enumerate(NF4_CODE):
        lines.append(f"mul.rn.f32 p{q}, $20, 0f{struct.unpack('<I', struct.pack('<f', c))[0]:08X};")
    for i in range(8):  # t_i = (entry 2i+1 | entry 2i)
        lines.append(f"cvt.rn.{pair_type}.f32 t{i}, p{2 * i + 1}, p{2 * i};")
    for j in range(4):  # l_j / h_j: low / high bytes of entries 4j .. 4j+3
        lines.append(f"prmt.b32 l{j}, t{2 * j}, t{2 * j + 1}, 0x6420;")
        lines.append(f"prmt.b32 h{j}, t{2 * j}, t{2 * j + 1}, 0x7531;")
    lines += _decode_run(16, "$")
    lines.append("}")
    return " ".join(lines)  # one line: inductor embeds kernel sources (with this constant's repr) in a string literal


def _code_planes(dtype: torch.dtype) -> list[int]:
    """The 16 NF4 values rounded to `dtype` (16-bit), as the eight plane registers l0-l3, h0-h3 of ``_decode_word``
    (byte k of l_j: the low byte of value 4j + k; of h_j: its high byte)."""
    bits = [b & 0xFFFF for b in torch.tensor(NF4_CODE, dtype=torch.float32).to(dtype).view(torch.int16).tolist()]
    planes = []
    for shift in (0, 8):
        planes += [sum(((bits[4 * j + k] >> shift) & 0xFF) << (8 * k) for k in range(4)) for j in range(4)]
    return planes


_DECODE_ASM_BF16 = tl.constexpr(_register_decode_asm("bf16x2"))
_DECODE_ASM_FP16 = tl.constexpr(_register_decode_asm("f16x2"))
_DECODE_CONSTRAINTS = tl.constexpr(",".join(["=r"] * 16 + ["r"] * 4 + ["r"] * 16))


@triton.jit
def nf4_decode_halves(packed, absmax, OUT_DTYPE: tl.constexpr):
    """``nf4_decode_runs`` before its reordering: (first, second), each shaped like `packed` (rows, bytes), holding
    weights 0-15 and 16-31 of each run of 16 bytes (32 weights): first[:, 16 i + j] is weight 32 i + j of the
    run's row, second[:, 16 i + j] weight 32 i + 16 + j. A GEMV that sums products over the columns takes them so,
    with its x read in the same order (contiguous 16 at a time)."""
    if OUT_DTYPE == tl.bfloat16:
        first, second = tl.inline_asm_elementwise(_DECODE_ASM_BF16, _DECODE_CONSTRAINTS, [packed, absmax],
                                                  dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=16)
    else:
        first, second = tl.inline_asm_elementwise(_DECODE_ASM_FP16, _DECODE_CONSTRAINTS, [packed, absmax],
                                                  dtype=(tl.float16, tl.float16), is_pure=True, pack=16)
    return first, second


@triton.jit
def nf4_decode_runs(packed, absmax, OUT_DTYPE: tl.constexpr):
    """Packed NF4 bytes (uint8 (rows, bytes), bytes a multiple of 16) and each byte's fp32 absmax -> the weights,
    OUT_DTYPE (bf16 or fp16) (rows, 2 * bytes), decoded in registers by PTX (``_register_decode_asm``): NVIDIA GPUs
    only.

    The PTX takes the 16 consecutive bytes a thread holds with the absmax of the first, so each aligned run of 16
    bytes of a row must lie in one 64-weight block (true of a tile of a 64-aligned row; the loads vectorise to 16
    bytes per thread, and the GPU tests check the result). It returns the run's weights 0-15 and 16-31 as two
    tensors shaped like `packed` (``nf4_decode_halves``); putting them back in order only renames registers."""
    first, second = nf4_decode_halves(packed, absmax, OUT_DTYPE)
    ROWS: tl.constexpr = packed.shape[0]
    RUNS: tl.constexpr = packed.shape[1] // 16
    weights = tl.join(tl.reshape(first, (ROWS, RUNS, 16)), tl.reshape(second, (ROWS, RUNS, 16)))
    return tl.reshape(tl.permute(weights, (0, 1, 3, 2)), (ROWS, 32 * RUNS))


def _register_decode_mma_asm(code_dtype: torch.dtype, mma_type: str) -> str:
    """PTX for ``nf4_gemv_mma``: two 16-byte runs of codes (rows lo and hi) decoded to the 16 NF4 values themselves,
    unscaled (``_decode_word`` over constant planes of the values rounded to code_dtype), 8 ``mma.sync.m16n8k16``
    over them and x, and each block's sum then scaled by its absmax. Operands: $0-$15 the sums (fp32: $0 lo's, $1
    hi's, the rest 0), $16-$19 lo's bytes, $20-$35 lo's absmax (the first read), $36-$39 hi's bytes, $40-$55 hi's
    absmax, $56-$71 x as 16-bit pairs at the run's columns, zero in the lanes whose B column is unused (below).

    Lane (g, t) = (lane // 4, lane % 4) holds rows lo_g and hi_g at columns [32 t, 32 t + 32) of a 128-column step:
    lanes t = 0, 1 the row's first 64-weight block, t = 2, 3 its second. mma i takes the lane's weights 4i..4i+3 of
    each row (decoded pairs 2i and 2i + 1) as its k-slots 2t, 2t + 1, 2t + 8, 2t + 9, A's rows g and g + 8 being lo_g
    and hi_g. B's column n comes from lanes (n, t): column 0 holds x in the first block's k-slots (lanes (0, 0) and
    (0, 1)) and 0 in the second's, column 4 the reverse, the other columns 0. So D[g][0], which lane (g, 0) holds,
    is lo_g's unscaled sum over its first block, and D[g][4], in lane (g, 2), over its second: each lane that holds
    a block's sum holds that block's absmax too, and the row's sum over the step is the sum over its four lanes
    (the lanes t = 1, 3 hold 0).

    Decoding the unscaled values takes the lookup planes as constants: the 16 values scaled by the block's absmax
    and rounded (bitsandbytes' order, which ``_register_decode_asm`` keeps) were 32 instructions a run to rebuild.
    The product sum * absmax rounds each weight's value once less than bitsandbytes' dequantized weight."""
    planes = _code_planes(code_dtype)

    lines = ["{", ".reg .b32 wl<16>, wh<16>;", ".reg .f32 c<4>;", _DECODE_REGISTERS]
    lines += [f"mov.b32 {name}, 0x{value:08X};" for name, value in zip([f"l{j}" for j in range(4)]
                                                                        + [f"h{j}" for j in range(4)], planes)]
    lines += _decode_run(16, "wl") + _decode_run(36, "wh")
    lines += ["mov.b32 c0, 0;", "mov.b32 c1, 0;", "mov.b32 c2, 0;", "mov.b32 c3, 0;"]
    for i in range(8):
        lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{mma_type}.{mma_type}.f32 {{c0, c1, c2, c3}}, "
                     f"{{wl{2 * i}, wh{2 * i}, wl{2 * i + 1}, wh{2 * i + 1}}}, {{${56 + 2 * i}, ${57 + 2 * i}}}, "
                     "{c0, c1, c2, c3};")
    lines += ["mul.rn.f32 $0, c0, $20;", "mul.rn.f32 $1, c2, $40;"] + [f"mov.b32 ${n}, 0;" for n in range(2, 16)]
    lines.append("}")
    return " ".join(lines)  # one line: inductor embeds kernel sources (with this constant's repr) in a string literal


_GEMV_MMA_ASM_BF16 = tl.constexpr(_register_decode_mma_asm(torch.bfloat16, "bf16"))
_GEMV_MMA_ASM_FP16 = tl.constexpr(_register_decode_mma_asm(torch.float16, "f16"))
_GEMV_MMA_CONSTRAINTS = tl.constexpr(",".join(["=r"] * 16 + ["r"] * 56))


@triton.jit
def nf4_gemv_mma(packed_lo, absmax_lo, packed_hi, absmax_hi, x_pairs, OUT_DTYPE: tl.constexpr):
    """(lo, hi) float32 (rows,): two NF4 tiles of packed bytes (rows, 64) (128 columns of rows lo and hi; absmax per
    byte, as for ``nf4_decode_runs``) times x (x_pairs (64,) int32: x's 16-bit values at those columns, two a word),
    decoded in registers and multiplied on the tensor cores (``_register_decode_mma_asm``): no fp32 conversion of
    the weights nor of x, no FMA. NVIDIA GPUs from Ampere on; the tiles must give each lane 16 bytes, four lanes a row,
    which a (32, 64) tile has with 4 warps (``check_register_decode_layout`` checks the compiled kernel)."""
    ROWS: tl.constexpr = packed_lo.shape[0]
    BYTES: tl.constexpr = packed_lo.shape[1]
    # B's columns 0 and 4 (see _register_decode_mma_asm): x from the lanes of rows 0 and 4 of each 8 (a warp's lanes
    # g = 0 and 4), over the first half of the columns and the second half; 0 from every other lane.
    in_row = tl.arange(0, ROWS)[:, None] % 8
    first_half = (tl.arange(0, BYTES) < BYTES // 2)[None, :]
    used = ((in_row == 0) & first_half) | ((in_row == 4) & ~first_half)
    # As x * used (IMAD, FMA pipe) rather than a select (integer pipe, the decode's bound); in PTX, so that the
    # compiler keeps the multiply.
    x_tile = tl.inline_asm_elementwise("mul.lo.u32 $0, $1, $2;", "=r,r,r",
                                       [tl.broadcast_to(x_pairs[None, :], (ROWS, BYTES)), used.to(tl.int32)],
                                       dtype=tl.int32, is_pure=True, pack=1)
    if OUT_DTYPE == tl.bfloat16:
        sums = tl.inline_asm_elementwise(_GEMV_MMA_ASM_BF16, _GEMV_MMA_CONSTRAINTS,
                                         [packed_lo, absmax_lo, packed_hi, absmax_hi, x_tile], dtype=tl.float32,
                                         is_pure=True, pack=16)
    else:
        sums = tl.inline_asm_elementwise(_GEMV_MMA_ASM_FP16, _GEMV_MMA_CONSTRAINTS,
                                         [packed_lo, absmax_lo, packed_hi, absmax_hi, x_tile], dtype=tl.float32,
                                         is_pure=True, pack=16)
    # Element 0 of a lane's 16 holds lo's scaled block sum, element 1 hi's (known per register: the selects fold
    # away); a row's four lanes hold its two blocks' sums and two zeros.
    place = tl.arange(0, BYTES) % 16
    lo = tl.sum(tl.where((place == 0)[None, :], sums, 0.0), axis=1)
    hi = tl.sum(tl.where((place == 1)[None, :], sums, 0.0), axis=1)
    return lo, hi


def has_register_decode(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``nf4_decode_runs`` can produce `dtype` on `device`: PTX for sm_80 and later (its packed 16-bit
    conversions), so NVIDIA GPUs from Ampere on (not ROCm, not a T4), and 16-bit outputs."""
    if device.type != "cuda" or torch.version.hip is not None or dtype not in (torch.bfloat16, torch.float16):
        return False
    return _compute_capability(device.index if device.index is not None else torch.cuda.current_device()) >= (8, 0)


@functools.cache
def _compute_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


_checked_decode_kernels: set[int] = set()


def check_register_decode_layout(compiled) -> None:
    """Raise if a compiled kernel hands ``nf4_decode_runs`` fewer than 16 consecutive bytes per thread (or
    ``nf4_gemv_mma`` other than 16 bytes a lane and four lanes a row).

    The PTX decodes a thread's registers 16 at a time with one absmax, which is right only when they are 16 bytes
    of one row; the layout is the compiler's choice (loads vectorise to 16 bytes when the alignment is known and the
    tile has 16 bytes a thread). Checked once per compiled kernel, from its TTGIR: a wrong layout fails loudly instead
    of decoding with the wrong absmax."""
    if id(compiled) in _checked_decode_kernels:
        return
    ttgir = compiled.asm["ttgir"]
    for line in ttgir.splitlines():
        if "elementwise_inline_asm" not in line or "packed_element = 16" not in line:
            continue
        match = re.search(r"tensor<\d+x(\d+)xi8, (#\w+)>", line)
        definition = match and re.search(rf"^{match.group(2)} = .*sizePerThread = \[(\d+), (\d+)\].*order = \[1, 0\]",
                                          ttgir, re.MULTILINE)
        fits = definition and int(definition.group(2)) % 16 == 0
        if fits and "mma.sync" in line:
            # nf4_gemv_mma: 16 bytes a lane, four lanes a row (128 columns), the warps over rows.
            fits = (int(definition.group(2)) == 16 and "threadsPerWarp = [8, 4]" in definition.group(0)
                    and re.search(r"warpsPerCTA = \[\d+, 1\]", definition.group(0)) is not None)
        if not fits:
            raise RuntimeError(
                "fastmoe: the NF4 register decode was compiled with a layout that does not give each thread 16 "
                f"consecutive bytes ({match.group(0) if match else line[:200]}); this is a fastmoe bug, please report "
                "it with your GPU, torch and triton versions"
            )
    _checked_decode_kernels.add(id(compiled))


# ----------------------------------------------------------------------------------------------------------
# Tiles of an NF4 expert, dequantized in registers inside a GEMM's K loop
# ----------------------------------------------------------------------------------------------------------
#
# An NF4 expert is its row-major (R, C) weight flattened: element i in byte i // 2 (high nibble when i is even)
# with absmax i // 64. A GEMM reads it as W (forward: contraction over C, the tile's rows are W's rows) or as W^T
# (backward: contraction over R, the tile's columns are C). Either way a tile is a block of the stored (R, C)
# layout, loaded along C (unit stride), and the forward transposes it in registers for tl.dot.
#
# When C % 64 == 0 (every real model) each row starts on a byte and on an absmax block, so a tile is a
# (rows, cols / 2) byte block split into nibbles, and a (rows, cols / 64) absmax block broadcast over its 64
# columns. Other shapes (tests, toy models) gather each element's byte and absmax from its flat index.
# The tiles read absmax as fp32: a double-quantized one is decoded for the whole stack first (absmax_fp32,
# 4 bytes per 64 weights, once per GEMM): decoding it per tile, a dependent gather from the dynamic code each K
# step, made the GEMMs 5-25% slower on an H100.


@triton.jit
def absmax_values(absmax_ptr, blocks, mask, absmax_code_ptr, absmax_scale_ptr, absmax_offset,
                  DOUBLE_QUANT: tl.constexpr):
    """The fp32 absmax of one expert's NF4 blocks `blocks`: stored fp32, or DOUBLE_QUANT: absmax_ptr holds uint8
    indices into the dynamic code (absmax_code_ptr), each block's absmax dynamic_code[q] * absmax_scale[block // 256]
    + absmax_offset (the expert's), as dequantize_absmax computes it (256: ABSMAX_BLOCKSIZE)."""
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + blocks, mask=mask, other=0).to(tl.int32)
        scale = tl.load(absmax_scale_ptr + blocks // 256, mask=mask, other=0.0)
        absmax = tl.load(absmax_code_ptr + q) * scale + absmax_offset
    else:
        absmax = tl.load(absmax_ptr + blocks, mask=mask, other=0.0)
    return absmax


@triton.jit
def aligned_nf4_tile(q_ptr, absmax_ptr, rows, row_mask, col0, C, COLS_IN_RANGE: tl.constexpr, COLS: tl.constexpr,
                     absmax_code_ptr=None, absmax_scale_ptr=None, absmax_offset=0.0,
                     DOUBLE_QUANT: tl.constexpr = False):
    """The packed bytes (len(rows), COLS / 2) of elements (rows, col0 + arange(COLS)) of an NF4 expert stored (R, C)
    row-major with C % 64 == 0, and their absmax (len(rows), max(1, COLS / 64)) (see dequantize_nf4_tile)."""
    # A row holds C / 2 bytes, a multiple of 32: the hint lets row starts vectorise.
    row_bytes = tl.multiple_of(C // 2, 32)
    byte_cols = col0 // 2 + tl.arange(0, COLS // 2)
    # One absmax per 64 columns of a row; a tile narrower than 64 (col0 a multiple of COLS) sits in one block.
    GROUPS: tl.constexpr = (COLS + 63) // 64
    groups = col0 // 64 + tl.arange(0, GROUPS)
    if COLS_IN_RANGE:
        byte_mask, group_mask = row_mask[:, None], row_mask[:, None]
    else:
        byte_mask = row_mask[:, None] & (byte_cols < row_bytes)[None, :]
        group_mask = row_mask[:, None] & (groups < C // 64)[None, :]
    packed = tl.load(q_ptr + rows[:, None] * row_bytes + byte_cols[None, :], mask=byte_mask, other=0)
    absmax = absmax_values(absmax_ptr, rows[:, None] * (C // 64) + groups[None, :], group_mask, absmax_code_ptr,
                           absmax_scale_ptr, absmax_offset, DOUBLE_QUANT)
    return packed, absmax


@triton.jit
def absmax_per_byte(absmax, COLS: tl.constexpr):
    """aligned_nf4_tile's absmax (rows, groups) repeated for each packed byte: (rows, COLS / 2), as the register
    decode takes it."""
    GROUPS: tl.constexpr = (COLS + 63) // 64
    return tl.reshape(tl.broadcast_to(absmax[:, :, None], (absmax.shape[0], GROUPS, COLS // 2 // GROUPS)),
                      (absmax.shape[0], COLS // 2))


@triton.jit
def dequantize_nf4_tile(q_ptr, absmax_ptr, code, rows, row_mask, col0, C,
                        ROWS_ALIGNED: tl.constexpr, REGISTER_DECODE: tl.constexpr, COLS_IN_RANGE: tl.constexpr,
                        COLS: tl.constexpr, W_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr,
                        absmax_code_ptr=None, absmax_scale_ptr=None, absmax_offset=0.0,
                        DOUBLE_QUANT: tl.constexpr = False):
    """Elements (rows, col0 + arange(COLS)) of an NF4 expert stored (R, C) row-major, dequantized to a
    (len(rows), COLS) tile: code[nibble] * absmax in fp32 (code: the 16 NF4 values; absmax: fp32, or with DOUBLE_QUANT
    decoded here from its double quantization, see absmax_values), rounded to the weight's dtype (as bitsandbytes'
    dequantize_4bit) and then to the GEMM's dtype. col0 is a multiple of COLS; COLS_IN_RANGE: col0 + COLS <= C (no
    column mask). Flat indices stay int32: one expert holds far fewer than 2^31 elements."""
    if ROWS_ALIGNED:
        packed, absmax = aligned_nf4_tile(q_ptr, absmax_ptr, rows, row_mask, col0, C, COLS_IN_RANGE, COLS,
                                          absmax_code_ptr, absmax_scale_ptr, absmax_offset, DOUBLE_QUANT)
        if REGISTER_DECODE:
            return nf4_decode_runs(packed, absmax_per_byte(absmax, COLS), OUT_DTYPE)
        GROUPS: tl.constexpr = (COLS + 63) // 64
        packed = packed.to(tl.int32)
        # Element 2j is the high nibble of byte j: join puts it first, reshape interleaves the pairs in place.
        nibbles = tl.reshape(tl.join(packed >> 4, packed & 0xF), (rows.shape[0], COLS))
        scale = tl.reshape(tl.broadcast_to(absmax[:, :, None], (rows.shape[0], GROUPS, COLS // GROUPS)),
                           (rows.shape[0], COLS))
    else:
        cols = col0 + tl.arange(0, COLS)
        idx = rows[:, None] * C + cols[None, :]
        mask = row_mask[:, None] & (cols < C)[None, :]
        byte = tl.load(q_ptr + (idx >> 1), mask=mask, other=0).to(tl.int32)
        nibbles = (byte >> ((1 - (idx & 1)) * 4)) & 0xF
        scale = absmax_values(absmax_ptr, idx >> 6, mask, absmax_code_ptr, absmax_scale_ptr, absmax_offset,
                              DOUBLE_QUANT)
    # The lookup is a register gather from the 16 codes, not a load: the pipeliner would turn a load into
    # cp.async copies of every looked-up value into shared memory (4 bytes each, a tile of fp32 per stage).
    flat = tl.gather(code, tl.reshape(nibbles, (nibbles.shape[0] * nibbles.shape[1],)), 0)
    value = tl.reshape(flat, (nibbles.shape[0], nibbles.shape[1])) * scale
    return value.to(W_DTYPE).to(OUT_DTYPE)


def nf4_tile_layout(weight: Nf4Weight, compute_dtype: torch.dtype) -> dict:
    """The constexprs ROWS_ALIGNED, REGISTER_DECODE and W_DTYPE of ``dequantize_nf4_tile`` for tiles of `weight` in a
    GEMM of compute_dtype; the launch still checks REGISTER_DECODE against its tile size (``register_decode_fits``)."""
    rows_aligned = weight.shape[2] % BLOCKSIZE == 0
    # The PTX decode (nf4_decode_runs) on NVIDIA GPUs when rows start on a 64-block (a tile is then at least 64
    # columns wide, and a thread's 16-byte runs stay in one block) and the weights round to the GEMM's dtype directly;
    # otherwise the portable decode, whose code lookup goes through shared memory.
    register_decode = (rows_aligned and weight.dtype == compute_dtype
                       and has_register_decode(weight.device, compute_dtype))
    return {"ROWS_ALIGNED": rows_aligned, "REGISTER_DECODE": register_decode, "W_DTYPE": triton_dtype(weight.dtype)}


def register_decode_fits(tile_rows: int, tile_cols: int, num_warps: int) -> bool:
    """Whether a (tile_rows, tile_cols) tile of stored NF4 weights holds 16 bytes for each of a program's threads: the
    PTX decode takes 16 consecutive bytes at a time."""
    return tile_rows * tile_cols // 2 >= 16 * 32 * num_warps


@triton.jit
def _decode_absmax_kernel(q_ptr, stride_qe, code_ptr, scale_ptr, stride_se, offset_ptr, out_ptr, experts_ptr, num_blocks,
                          BLOCK: tl.constexpr, LISTED: tl.constexpr):
    # absmax[e, b] decoded by absmax_values, one expert per program_id(1): expert program_id(1), or when LISTED the
    # expert experts_ptr lists there (-1: none; a repeat writes the same).
    if LISTED:
        expert = tl.load(experts_ptr + tl.program_id(1)).to(tl.int64)
        if expert < 0:
            return
    else:
        expert = tl.program_id(1).to(tl.int64)
    blocks = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = blocks < num_blocks
    value = absmax_values(q_ptr + expert * stride_qe, blocks, mask, code_ptr, scale_ptr + expert * stride_se,
                          tl.load(offset_ptr + expert), True)
    tl.store(out_ptr + expert * num_blocks + blocks, value, mask=mask)


def absmax_fp32(weight: Nf4Weight, experts: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 absmax (E, N*K/64) the kernels read: as stored, or decoded from its double quantization by one kernel
    (4 bytes per 64 weights, freed after the GEMM that asked): for the whole stack, or only for the experts listed in
    `experts` (int32, -1 for none, repeats allowed; the other experts' rows are left unwritten). A decode step touches
    a few of 128 experts: decoding the whole stack's absmax would move some 60 MB per MoE layer for them."""
    if not weight.double_quant:
        return weight.absmax
    if not use_triton(weight.absmax):
        return dequantize_absmax(weight)
    num_experts, num_blocks = weight.absmax.shape
    out = torch.empty(num_experts, num_blocks, dtype=torch.float32, device=weight.device)
    block = 1024
    rows = num_experts if experts is None else experts.numel()
    _decode_absmax_kernel[(cdiv(num_blocks, block), rows)](
        weight.absmax, weight.absmax.stride(0), dynamic_code(weight.device), weight.absmax_scale,
        weight.absmax_scale.stride(0), weight.absmax_offset, out, experts, num_blocks, BLOCK=block,
        LISTED=experts is not None,
    )
    return out


@triton.jit
def _dequantize_nf4_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, numel, REGISTER_DECODE: tl.constexpr,
                           W_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    # One expert per program_id(1), numel elements each, contiguous stacks: N*K % 64 == 0, so every expert starts on
    # a byte and an absmax block (fp32). A program takes BLOCK // 64 whole absmax blocks as a (blocks, 32 bytes) tile.
    expert = tl.program_id(1).to(tl.int64)
    blocks = tl.program_id(0) * (BLOCK // 64) + tl.arange(0, BLOCK // 64)
    block_mask = blocks < numel // 64
    absmax = tl.load(absmax_ptr + expert * (numel // 64) + blocks, mask=block_mask, other=0.0)
    byte_offs = blocks[:, None] * 32 + tl.arange(0, 32)[None, :]
    # numel % 64 == 0: the hint keeps each 32-byte block row one aligned run, loaded 16 bytes a thread.
    packed = tl.load(packed_ptr + expert * tl.multiple_of(numel // 2, 32) + byte_offs, mask=block_mask[:, None],
                     other=0)
    if REGISTER_DECODE:
        values = nf4_decode_runs(packed, tl.broadcast_to(absmax[:, None], (BLOCK // 64, 32)), W_DTYPE)
    else:
        packed = packed.to(tl.int32)
        nibbles = tl.reshape(tl.join(packed >> 4, packed & 0xF), (BLOCK // 64, 64))
        values = (tl.load(code_ptr + nibbles) * absmax[:, None]).to(W_DTYPE)
    offs = blocks[:, None] * 64 + tl.arange(0, 64)[None, :]
    tl.store(out_ptr + expert * numel + offs, values.to(out_ptr.dtype.element_ty), mask=block_mask[:, None])


def triton_dtype(dtype: torch.dtype) -> tl.dtype:
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _dequantize_nf4(tensors: list[torch.Tensor], shape: list[int], weight_dtype: torch.dtype,
                    dtype: torch.dtype) -> torch.Tensor:
    """The Triton dequantization of the Nf4Weight(tensors, shape, weight_dtype) to dtype."""
    weight = Nf4Weight(tensors[0].contiguous(), tensors[1].contiguous(), tuple(shape), weight_dtype,
                       *(t.contiguous() for t in tensors[2:]))
    num_experts, n, k = weight.shape
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    # The PTX decode (nf4_decode_runs) on NVIDIA GPUs for 16-bit weights, the portable one elsewhere. 4096 weights
    # a program are 16 bytes for each of its 128 threads, what the PTX decodes at a time.
    register_decode = has_register_decode(weight.device, weight.dtype)
    block = 4096 if register_decode else 1024
    compiled = _dequantize_nf4_kernel[(cdiv(n * k, block), num_experts)](
        weight.packed, absmax_fp32(weight), nf4_code(weight.device), out, n * k,
        REGISTER_DECODE=register_decode, W_DTYPE=triton_dtype(weight.dtype), BLOCK=block, num_warps=4,
    )
    if register_decode:
        check_register_decode_layout(compiled)
    return out


def _dequantize_nf4_fake(tensors: list[torch.Tensor], shape: list[int], weight_dtype: torch.dtype,
                         dtype: torch.dtype) -> torch.Tensor:
    return tensors[0].new_empty(shape, dtype=dtype)


_dequantize_nf4_op = GraphOp("dequantize_nf4", _dequantize_nf4, _dequantize_nf4_fake)


def dequantize_nf4(weight: Nf4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Nf4Weight -> (E, N, K) in `dtype` (default: the quantized weight's dtype). Materialises the whole stack: for
    merging adapters, a dense fallback, or one product by torch's grouped GEMM where each expert has rows enough
    (grouped_gemm.products_by_torch; elsewhere the GEMMs dequantize tiles)."""
    dtype = dtype or weight.dtype
    # The interpreter cannot be trusted with bf16 (see dispatch.use_triton), as output or as intermediate rounding.
    interpreted_bf16 = weight.device.type != "cuda" and torch.bfloat16 in (weight.dtype, dtype)
    if not use_triton(weight.packed) or interpreted_bf16:
        return reference_dequantize_nf4(weight, dtype)
    return _dequantize_nf4_op(list(weight.tensors()), list(weight.shape), weight.dtype, dtype)
