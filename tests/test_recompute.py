"""fastmoe.recompute: torch's checkpoint, wherever fastmoe installs it, runs its recompute marked, so that the layers
skip the products whose output nobody reads there (the models' tests check those skips' gradients)."""

import functools

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from fastmoe.offloaded_checkpointing import checkpoint_with_offloaded_inputs
from fastmoe.recompute import marking_recompute, recomputing_for_backward


def recording(seen: list):
    def layer(x):
        seen.append(recomputing_for_backward())
        return torch.sin(x) * 2

    return layer


@pytest.mark.parametrize("checkpoint_function", [
    marking_recompute(functools.partial(checkpoint, use_reentrant=False)),
    checkpoint_with_offloaded_inputs,
], ids=["standard", "offloaded"])
def test_the_forward_is_not_marked_and_each_recompute_is(checkpoint_function):
    seen = []
    x = torch.randn(5, requires_grad=True)
    out = checkpoint_function(recording(seen), x)
    assert seen == [False]
    out.sum().backward(retain_graph=True)
    assert seen == [False, True]
    out.sum().backward()  # a second backward recomputes again
    assert seen == [False, True, True]
    assert not recomputing_for_backward()
    assert torch.allclose(x.grad, 2 * 2 * torch.cos(x.detach()))


def test_unmarked_checkpoint_and_no_grad_forward_are_not_recomputes():
    seen = []
    x = torch.randn(5, requires_grad=True)
    checkpoint(recording(seen), x, use_reentrant=False).sum().backward()
    assert seen == [False, False]
    with torch.no_grad():
        marking_recompute(functools.partial(checkpoint, use_reentrant=False))(recording(seen), x)
    assert seen == [False, False, False]
