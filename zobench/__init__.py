"""zobench: benchmark and profile zeroth-order (forward-only) fine-tuning of LLMs."""

__version__ = "0.1.0"
