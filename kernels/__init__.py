"""fastmoe's Triton kernels, one op per file (kernels, launch code, autograd Function, PyTorch reference).

Installed as ``fastmoe.kernels``. See README.md beside this file for why a top-level ``kernels`` must find
nothing here.
"""

if __name__ == "kernels":
    # Imported as a top-level `kernels` because a checkout's root is on sys.path. That name is Hugging Face's
    # package, which transformers probes at import time: look like what transformers reads as "not installed"
    # (no version, no file) and expose none of our modules under that name.
    __file__ = None
    __path__ = []
else:
    from .dispatch import reference_only, use_triton

    __all__ = ["reference_only", "use_triton"]
