"""fastmoe's Triton kernels, one op per file (kernels, launch code, custom op and autograd, PyTorch reference).

Installed as ``fastmoe.kernels``. See README.md beside this file for why a top-level ``kernels`` must find
nothing here.
"""

if __name__ == "kernels":
    # Imported as a top-level `kernels` because a checkout's root is on sys.path (it comes before site-packages).
    # That name is Hugging Face's package, which transformers and bitsandbytes probe: hand the name to it where it
    # is installed, else look like what transformers reads as "not installed" (no version, no file). Either way none
    # of our modules is reachable under that name.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _checkout_root]
    _installed = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _installed is not None and _installed.loader is not None:
        # The import system returns whatever sys.modules holds under the name once this file has run.
        _module = importlib.util.module_from_spec(_installed)
        sys.modules["kernels"] = _module
        _installed.loader.exec_module(_module)
    else:
        __file__ = None
        __path__ = []
else:
    from .dispatch import reference_only, use_triton

    __all__ = ["reference_only", "use_triton"]
