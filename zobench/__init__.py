"""zobench: benchmark and profile zeroth-order (forward-only) fine-tuning of LLMs."""

import logging

__version__ = "0.1.0"


class _NotActionable(logging.Filter):
    """bitsandbytes, on a CPU with AVX512-BF16, tries to fetch a faster 4-bit kernel from the Hugging Face hub
    at import and warns when it cannot; zobench runs offline, so a user can do nothing about that line (the
    record says which CPU instructions, and so which kernels, the run had: ``env.cpu_flags``). Only that
    message is dropped; every other bitsandbytes warning still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NotActionable())
