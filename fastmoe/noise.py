"""Messages from the libraries underneath that a fastmoe user cannot act on, silenced one at a time by their exact
text (never a whole category or logger), and only where fastmoe itself triggers them.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

# bitsandbytes, when imported on a CPU with AVX512-BF16 (peft imports it whenever it is installed), tries to fetch a
# CPU 4-bit GEMM from the Hub through Hugging Face's `kernels` package and logs this when it cannot. The fallback is
# its own CPU kernel; fastmoe's 4-bit experts never use either, and the message appears in runs that quantize nothing.
_BNB_CPU_OPS_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_KERNELS_PROBE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropBitsandbytesKernelsProbe(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_BNB_KERNELS_PROBE)


def silence_bitsandbytes_kernels_probe() -> None:
    """Drop bitsandbytes' "Failed to load CPU gemm_4bit_forward" record; its logger's other records still show.
    Must run before bitsandbytes is imported (fastmoe/__init__.py calls it); idempotent."""
    logger = logging.getLogger(_BNB_CPU_OPS_LOGGER)
    if not any(isinstance(f, _DropBitsandbytesKernelsProbe) for f in logger.filters):
        logger.addFilter(_DropBitsandbytesKernelsProbe())


@contextlib.contextmanager
def peft_checkpointing_probe() -> Iterator[None]:
    """Around peft's `PeftModel(...)`: it reads `model.is_gradient_checkpointing`, which transformers 5.23 deprecated
    (in favour of `is_activation_checkpointing`, which older supported releases lack) with a FutureWarning that only
    peft can act on. A user's own use of the old name still warns outside this block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield

