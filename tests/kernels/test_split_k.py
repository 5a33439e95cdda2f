import torch
from fastmoe.kernels import split_k


def test_arrival_counters_grow_zeroed_and_keep_the_outgrown_ones():
    """A graph captured before the counters grew still points at the old tensor: it must stay allocated."""
    device = torch.device("cpu")
    current = split_k.arrival_counts(device, 1)
    assert split_k.arrival_counts(device, current.numel()) is current
    grown = split_k.arrival_counts(device, current.numel() + 1)
    assert grown.numel() > current.numel() and not grown.any() and grown.dtype == torch.int32
    assert any(t is current for t in split_k._arrival_counts[device])
    assert split_k.arrival_counts(device, 1) is grown


def test_gemv_split_fills_five_programs_per_sm_and_keeps_two_k_steps_a_split():
    for programs in (1, 7, 64, 112, 128, 256, 660, 1000):
        for k in (64, 100, 1024, 1792, 2048, 4096, 8192):
            split = split_k.gemv_split(programs, k)
            steps = -(-k // split_k.GEMV_BLOCK_K)
            assert split >= 1 and split & (split - 1) == 0
            assert split == 1 or (programs * split <= 5 * split_k.GPU_SMS and steps >= 2 * split)
            # The next doubling would break one of the two rules.
            assert programs * split * 2 > 5 * split_k.GPU_SMS or steps < 4 * split
    assert split_k.gemv_split(112, 2048) == 4  # LFM2-8B-A1B's gate and up: 4 experts of 28 column blocks


def test_interpreter_split_takes_one_or_two_k_steps_a_split():
    for k in range(1, 300, 7):
        split = split_k.interpreter_split(k, 32)
        steps = -(-k // 32)
        assert 1 <= split <= 4 and (split == 4 or -(-steps // split) <= 2)
