"""kernels/reused_casts.py: inside a scope a cast is made once and reused; a source changed in place is cast again
into the same tensor (what a captured CUDA graph reads); outside a scope, and for tensors autograd tracks, a plain
cast every time."""

import torch
from fastmoe.kernels.reused_casts import CastCache, cast, reused_casts


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
