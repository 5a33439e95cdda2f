"""Host-side arithmetic of launch grids and block sizes.

triton.cdiv and triton.next_power_of_2 are constexpr functions (Triton 3.5 on), callable inside kernels: called from
host code each unwraps its arguments first, ~3 us a call against ~0.05 us for the arithmetic itself. An eager
training step's launchers make about a hundred such calls a decoder layer (the MoE block's forward and backward 57),
so the launchers use these plain versions; kernels keep tl.cdiv.
"""

from __future__ import annotations


def cdiv(x: int, y: int) -> int:
    """ceil(x / y) for positive y."""
    return (x + y - 1) // y


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (0 for n <= 0, as triton.next_power_of_2)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()
