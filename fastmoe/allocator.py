"""The CUDA caching allocator setting fastmoe asks for: expandable segments.

Why: long sequences allocate activations of many sizes (a layer's recompute at 65,536 tokens holds blocks of 64 MB
to 1 GB), and the default allocator keeps each freed block at its size, so memory reserved for a size that does
not come back is lost to the others. On Trinity-Mini with 8 layers and 24 GB, that fragmentation was the limit:
fastmoe's offloaded checkpointing ran out of memory at 65,536 tokens with the default allocator and trained 98,304
with expandable segments (peak allocated 22.2 GB), which grow one mapping per stream instead. Unsloth sets the same.

The allocator reads its settings once, when CUDA is first used: fastmoe fills the setting in at import when the user
has set none (PYTORCH_CUDA_ALLOC_CONF, or PYTORCH_ALLOC_CONF, its newer name) and CUDA is not yet initialised. A
user's own setting is never touched.
"""

from __future__ import annotations

import os

EXPANDABLE_SEGMENTS = "expandable_segments:True"


def prefer_expandable_segments() -> bool:
    """Set PYTORCH_CUDA_ALLOC_CONF to expandable segments where nobody has chosen otherwise yet; whether it did."""
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ or "PYTORCH_ALLOC_CONF" in os.environ:
        return False
    import torch

    if torch.cuda.is_initialized():
        return False
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = EXPANDABLE_SEGMENTS
    return True
