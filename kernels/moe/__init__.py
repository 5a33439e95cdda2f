"""The MoE kernels: routing, the grouped GEMMs over rows sorted by expert (16-bit or NF4 weights), the SwiGLU
experts block and JetMoe's expert map/reduce, each op file with its Triton kernels, custom ops and PyTorch
reference.

* ``routing``: ``route_sigmoid_topk``, ``route_softmax_topk``, ``router_topk`` (linear layer included),
  ``sort_by_expert`` -> ``ExpertSchedule``
* ``nf4``: the NF4 format of 3D expert weights (``quantize_nf4``, ``dequantize_nf4``, double-quantized absmax) and the
  in-register tile decode the GEMMs use
* ``grouped_gemm``: ``grouped_mm``, ``grouped_mm_swiglu``, ``grouped_mm_swiglu_backward``, ``grouped_wgrad``
* ``experts``: ``moe_experts``, ``moe_experts_nf4`` with ``ExpertLora``; ``moe_experts_clamped_swiglu`` and
  ``moe_experts_clamped_swiglu_nf4`` (gpt-oss's layout, biases and activation)
* ``expert_map_reduce``: ``expert_map``, ``expert_reduce``, ``expert_map_nf4``, ``expert_reduce_nf4``
* ``one_token``: ``one_token_experts``, the experts block of one token (batch-1 decoding) in two GEMV launches, which
  ``moe_experts`` takes at one token when nothing is differentiated
"""

from .expert_map_reduce import (
    expert_map,
    expert_map_nf4,
    expert_reduce,
    expert_reduce_nf4,
    reference_expert_map,
    reference_expert_reduce,
)
from .experts import (
    ExpertLora,
    moe_experts,
    moe_experts_clamped_swiglu,
    moe_experts_clamped_swiglu_nf4,
    moe_experts_nf4,
    output_is_read,
    output_read,
    output_unused,
    reference_moe_experts,
    reference_moe_experts_clamped_swiglu,
    reference_moe_experts_clamped_swiglu_nf4,
    reference_moe_experts_nf4,
)
from .grouped_gemm import (
    ClampedSwiglu,
    GemmWeight,
    gemm_block_m,
    grouped_mm,
    grouped_mm_swiglu,
    grouped_mm_swiglu_backward,
    grouped_wgrad,
)
from .nf4 import (
    Nf4Weight,
    TransposedNf4Weight,
    check_nf4_shape,
    dequantize_absmax,
    dequantize_nf4,
    quantize_nf4,
    reference_dequantize_nf4,
)
from .routing import (
    ExpertSchedule,
    reference_route_sigmoid_topk,
    reference_route_softmax_topk,
    reference_router_topk,
    route_sigmoid_topk,
    route_softmax_topk,
    router_topk,
    sort_by_expert,
)

__all__ = [
    "ClampedSwiglu",
    "ExpertLora",
    "ExpertSchedule",
    "GemmWeight",
    "Nf4Weight",
    "TransposedNf4Weight",
    "check_nf4_shape",
    "dequantize_absmax",
    "dequantize_nf4",
    "expert_map",
    "expert_map_nf4",
    "expert_reduce",
    "expert_reduce_nf4",
    "gemm_block_m",
    "grouped_mm",
    "grouped_mm_swiglu",
    "grouped_mm_swiglu_backward",
    "grouped_wgrad",
    "moe_experts",
    "moe_experts_clamped_swiglu",
    "moe_experts_clamped_swiglu_nf4",
    "moe_experts_nf4",
    "output_is_read",
    "output_read",
    "output_unused",
    "quantize_nf4",
    "reference_dequantize_nf4",
    "reference_expert_map",
    "reference_expert_reduce",
    "reference_moe_experts",
    "reference_moe_experts_clamped_swiglu",
    "reference_moe_experts_clamped_swiglu_nf4",
    "reference_moe_experts_nf4",
    "reference_route_sigmoid_topk",
    "reference_route_softmax_topk",
    "reference_router_topk",
    "route_sigmoid_topk",
    "route_softmax_topk",
    "router_topk",
    "sort_by_expert",
]
