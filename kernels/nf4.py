"""NF4 storage of 3D expert weights (QLoRA's 4-bit NormalFloat), bitsandbytes-compatible, and its dequantization.

Format, per expert weight W_e (N, K) of a stack (E, N, K), exactly bitsandbytes' ``quantize_4bit(quant_type="nf4",
blocksize=64)`` of W_e flattened row-major:

* blocks of 64 consecutive elements of the flattened W_e, each with its absmax (fp32);
* each element becomes the index of the nearest of bitsandbytes' 16 NF4 values to ``w / absmax``;
* two codes per byte, element 2j in the high nibble and 2j+1 in the low one.

So ``packed`` (E, N*K/2) uint8 and ``absmax`` (E, N*K/64) fp32, and element (n, k) of expert e is
``NF4[code] * absmax[e, (n*K + k) // 64]`` computed in fp32 and rounded to the weight's dtype, as
``bitsandbytes.functional.dequantize_4bit`` does. No double quantization of absmax: it costs 0.5 bit per weight
on top of 4, small next to keeping 16-bit experts, and keeps the in-kernel dequantization one load.

The grouped GEMMs of ``moe_experts_nf4`` dequantize tiles in registers (``grouped_gemm``); this file holds the
quantizer, the whole-tensor dequantization (for merging LoRA or a dense fallback) and its reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .dispatch import use_triton

BLOCKSIZE = 64

# bitsandbytes' NF4 code (bitsandbytes/functional.py get_4bit_type("nf4")), in code order.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

_code_cache: dict[torch.device, torch.Tensor] = {}


def nf4_code(device: torch.device | str) -> torch.Tensor:
    """The 16 NF4 values as an fp32 tensor on `device` (cached: kernels read it as a lookup table)."""
    device = torch.device(device)
    if device not in _code_cache:
        _code_cache[device] = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    return _code_cache[device]


@dataclass
class Nf4Weight:
    """An (E, N, K) weight stack in NF4: packed (E, N*K/2) uint8, absmax (E, N*K/64) fp32, and the shape and dtype
    it dequantizes to."""

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int, int]
    dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.absmax.numel() * self.absmax.element_size()


def check_nf4_shape(shape: tuple[int, ...]) -> None:
    if len(shape) != 3:
        raise ValueError(f"NF4 expert weights are (experts, N, K) stacks, got shape {tuple(shape)}")
    if (shape[1] * shape[2]) % BLOCKSIZE:
        raise ValueError(
            f"NF4 quantization needs N*K of each expert to be a multiple of {BLOCKSIZE} (one absmax per "
            f"{BLOCKSIZE} elements), got N={shape[1]}, K={shape[2]}"
        )


@torch.no_grad()
def quantize_nf4(weight: torch.Tensor) -> Nf4Weight:
    """(E, N, K) weight -> Nf4Weight on the weight's device, one expert at a time (one fp32 expert of scratch).

    Same codes and absmax as bitsandbytes' quantize_4bit(W_e, blocksize=64, quant_type="nf4") per expert."""
    check_nf4_shape(weight.shape)
    num_experts, n, k = weight.shape
    code = nf4_code(weight.device)
    # bitsandbytes rounds to the nearest code by bucketing on the midpoints of the sorted code.
    bounds = (code[:-1] + code[1:]) / 2
    packed = torch.empty(num_experts, n * k // 2, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(num_experts, n * k // BLOCKSIZE, dtype=torch.float32, device=weight.device)
    for e in range(num_experts):
        blocks = weight[e].reshape(-1, BLOCKSIZE).float()
        amax = blocks.abs().amax(dim=1)
        scaled = torch.clamp(blocks * (1.0 / amax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)
        q = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)
        packed[e] = (q[::2] << 4) | q[1::2]
        absmax[e] = amax
    return Nf4Weight(packed, absmax, (num_experts, n, k), weight.dtype)


def reference_dequantize_nf4(weight: Nf4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Nf4Weight -> (E, N, K) in `dtype` (default: the quantized weight's dtype), bitsandbytes' arithmetic."""
    codes = torch.stack([weight.packed >> 4, weight.packed & 0xF], dim=-1).reshape(weight.packed.shape[0], -1)
    values = nf4_code(weight.device)[codes.long()].view(codes.shape[0], -1, BLOCKSIZE) * weight.absmax[..., None]
    return values.to(weight.dtype).to(dtype or weight.dtype).view(weight.shape)


@triton.jit
def _dequantize_nf4_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, numel, W_DTYPE: tl.constexpr,
                           BLOCK: tl.constexpr):
    # packed and absmax are contiguous over all experts and N*K % 64 == 0, so a flat element index addresses
    # both across expert boundaries.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    byte = tl.load(packed_ptr + (offs >> 1), mask=mask, other=0).to(tl.int32)
    nibble = (byte >> ((1 - (offs & 1)) * 4).to(tl.int32)) & 0xF
    value = tl.load(code_ptr + nibble) * tl.load(absmax_ptr + (offs >> 6), mask=mask, other=0.0)
    tl.store(out_ptr + offs, value.to(W_DTYPE).to(out_ptr.dtype.element_ty), mask=mask)


def triton_dtype(dtype: torch.dtype) -> tl.dtype:
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def dequantize_nf4(weight: Nf4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Nf4Weight -> (E, N, K) in `dtype` (default: the quantized weight's dtype). Materialises the whole stack:
    for merging adapters or a dense fallback, not for training (``moe_experts_nf4`` dequantizes tiles)."""
    dtype = dtype or weight.dtype
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    # The interpreter cannot be trusted with bf16 (see dispatch.use_triton), as output or as intermediate rounding.
    interpreted_bf16 = weight.device.type != "cuda" and weight.dtype == torch.bfloat16
    if not use_triton(weight.packed, out) or interpreted_bf16:
        return reference_dequantize_nf4(weight, dtype)
    packed, absmax = weight.packed.contiguous(), weight.absmax.contiguous()
    block = 1024
    _dequantize_nf4_kernel[(triton.cdiv(out.numel(), block),)](
        packed, absmax, nf4_code(weight.device), out, out.numel(),
        W_DTYPE=triton_dtype(weight.dtype), BLOCK=block,
    )
    return out
