"""kernels/grid.py: the launchers' plain cdiv and next_power_of_2 give what Triton's constexpr functions give."""

import triton

from fastmoe.kernels.grid import cdiv, next_power_of_2


def test_plain_launch_arithmetic_equals_tritons():
    for n in range(-3, 20000):
        assert next_power_of_2(n) == triton.next_power_of_2.fn(n), n
        for divisor in (1, 3, 16, 64, 100):
            assert cdiv(n, divisor) == triton.cdiv.fn(n, divisor), (n, divisor)
    for n in (2**20 - 1, 2**20, 2**20 + 1, 3 * 2**31):
        assert next_power_of_2(n) == triton.next_power_of_2.fn(n)
