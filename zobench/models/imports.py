"""Keep transformers from importing what zobench never uses.

transformers' cache module imports hqq at import time whenever hqq is installed (for an HQQ-quantized
key/value cache that zobench does not use), and hqq imports torch's compiler (``torch._inductor``). On the
2-core reference machine that cost every process loading a model about 2.5 s of CPU: ``import torch; from
transformers import LlamaForCausalLM`` took 10.9-11.6 s of user time with it and 7.9-9.0 s without (three
runs each, side by side). zobench's own hqq backend imports hqq when a cell quantizes with it, so only
those cells pay.
"""

from __future__ import annotations

import sys


def trim_transformers_imports() -> None:
    """Call before transformers' modeling code is first imported; later it changes nothing."""
    if "transformers.cache_utils" in sys.modules:
        return
    try:
        import transformers.utils as hf_utils
    except ImportError:
        return
    if hasattr(hf_utils, "is_hqq_available"):  # transformers 5.x reads it when its cache module loads
        hf_utils.is_hqq_available = lambda *args, **kwargs: False
