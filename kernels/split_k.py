"""What the decoding GEMV kernels share: K split across programs, and the deterministic fix-up of the splits.

At a decode step's one row a GEMV reads each weight once; one program per output block walking all of K is too few
programs, each a long serial loop, to keep the GPU's memory busy. So K is split too: each program writes its float32
partial to a workspace, counts its arrival on its output block's counter, and the last program of the block to
arrive sums the partials in a fixed order (the result does not depend on which program finished first) and finishes
the output. Users: the few-rows linear layers (``lora_linear``) and the one-token experts block
(``moe.one_token_experts``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grid import cdiv, next_power_of_2

# SMs of the H200 the GEMV configurations are aimed at; on another GPU they are still correct, only less well fitted.
GPU_SMS = 132
# A GEMV's K step on a GPU: 64 weights a row (one NF4 absmax block).
GEMV_BLOCK_K = 64


def gemv_split(programs: int, k: int, block_k: int = GEMV_BLOCK_K) -> int:
    """Splits of K for a GEMV launch of `programs` programs per split over a K of k: doubled while the programs stay
    within 5 per SM (a GEMV program stages no tensor-core operand in shared memory, so several fit an SM) and each
    split keeps at least 2 K steps for its pipeline. Measured on the few-rows linear layers (see
    lora_linear._few_rows_config) and the one-token experts block (moe/one_token.py), H200."""
    max_split = max(1, cdiv(k, block_k) // 2)
    split = 1
    while split * 2 <= max_split and programs * split * 2 <= 5 * GPU_SMS:
        split *= 2
    return split


def interpreter_split(k: int, block_k: int) -> int:
    """Splits of K for the CPU interpreter: 1-2 K steps a split (at most 4 splits, the last ones short or empty when
    K is not a multiple), so that the CPU tests go through the split-K fix-up."""
    return min(4, next_power_of_2(cdiv(k, block_k) + 1) // 2)


@triton.jit
def last_to_arrive(arrivals_ptr, counter, ARRIVALS: tl.constexpr):
    """Called by each of the ARRIVALS programs sharing `counter` after storing its partial: whether this program is
    the last of them to get here, which then reads every partial (from L2, with cache_modifier=".cg": this SM's L1 is
    not kept coherent with the others' stores) and has reset the counter for the next launch."""
    # Triton's scalar atomic is issued by one thread: the barrier puts every thread's partial before it, and its
    # release makes them visible to the program whose acquire sees the final count.
    tl.debug_barrier()
    is_last = tl.atomic_add(arrivals_ptr + counter, 1, sem="acq_rel") == ARRIVALS - 1
    if is_last:
        tl.store(arrivals_ptr + counter, 0)
    return is_last


# Per device, int32 arrival counters for the split-K fix-up, zero between launches (each counter's last program
# resets it), so one tensor serves every call and every CUDA graph replay; launches that share it must not run at once
# (one stream, as decoding runs). Grown, never shrunk, and the outgrown tensors kept alive: a graph captured earlier
# still points at them.
_arrival_counts: dict[torch.device, list[torch.Tensor]] = {}


def arrival_counts(device: torch.device, counters: int) -> torch.Tensor:
    """At least `counters` zeroed int32 arrival counters on device."""
    held = _arrival_counts.setdefault(device, [])
    if not held or held[-1].numel() < counters:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # Zeros allocated under capture would only be written when the graph replays.
            raise RuntimeError("a split-K decoding kernel needs more arrival counters than it has: run the layer "
                               "once before capturing it in a CUDA graph")
        # 1024 counters to start: more output blocks than a decoder's projections have, so growing is rare.
        size = max(counters, 2 * held[-1].numel() if held else 1024)
        held.append(torch.zeros(size, dtype=torch.int32, device=device))
    return held[-1]
