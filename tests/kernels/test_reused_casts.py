"""kernels/reused_casts.py: inside a scope a cast (or a derived tensor) is made once and reused; a source changed in
place is cast again into the same tensor (what a captured CUDA graph reads); outside a scope, and for tensors autograd
tracks, a plain cast every time."""

import torch
from fastmoe.kernels.reused_casts import CastCache, cast, derived, reused_casts


def test_a_cast_is_reused_and_refreshed_in_place_when_its_source_changes():
    source = torch.randn(5, 7)
    view = source.t()  # a strided view is its own entry
    with reused_casts(CastCache()):
        first, first_view = cast(source, torch.float16), cast(view, torch.float16)
        assert cast(source, torch.float16) is first and cast(view, torch.float16) is first_view
        assert first_view.stride() == view.stride() and torch.equal(first_view, view.half())
        source.mul_(3)  # an optimizer step: the version counter moves
        again = cast(source, torch.float16)
        assert again is first and torch.equal(again, source.half())
        assert torch.equal(cast(view, torch.float16), source.t().half())
        assert cast(source, torch.float32) is source  # no cast needed


def test_outside_a_scope_and_under_autograd_every_cast_is_new():
    source = torch.randn(4, 3)
    assert cast(source, torch.float16) is not cast(source, torch.float16)
    trainable = torch.randn(4, 3, requires_grad=True)
    with reused_casts(CastCache()):
        assert cast(trainable, torch.float16) is not cast(trainable, torch.float16)
        assert cast(trainable, torch.float16).requires_grad
        with torch.no_grad():
            assert cast(trainable, torch.float16) is cast(trainable, torch.float16)


def test_a_derived_tensor_is_made_once_per_scope_and_remade_in_place_when_its_source_changes():
    """What a decode step derives from a frozen weight (an NF4 weight's fp32 absmax): made at the first step, the
    same tensor after, made again into it when the source changed in place; outside a scope, made at every call."""
    source = torch.arange(6.0)
    made = []

    def make():
        made.append(1)
        return source * 2

    assert not torch.equal(derived(source, "double", make), torch.zeros(6)) and len(made) == 1
    derived(source, "double", make)
    assert len(made) == 2
    with reused_casts(CastCache()):
        first = derived(source, "double", make)
        assert derived(source, "double", make) is first and len(made) == 3
        source.add_(1.0)
        again = derived(source, "double", make)
        assert again is first and torch.equal(again, source * 2) and len(made) == 4
        assert derived(source, "triple", lambda: source * 3) is not first
