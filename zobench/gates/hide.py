"""Keep transformers and peft from importing what a cell never uses.

transformers' cache module and peft's LoRA module both import hqq at import time whenever hqq is installed
(for an HQQ key/value cache and for LoRA on HQQ layers), and hqq imports torch's compiler
(``torch._inductor``); peft imports bitsandbytes the same way. On the 2-core reference machine that cost every
process loading a model about 2.5 s of CPU (``import torch; from transformers import LlamaForCausalLM``:
10.9-11.6 s of user time with it, 7.9-9.0 s without, three runs each, side by side) and a LoRA cell about 30
MiB of peak memory.

Two strengths:

- ``trim_transformers_imports()``: for any process that loads a model through zobench (a library user's
  too). Only transformers' own check is answered "no"; ``import hqq`` still works.
- ``hide_unused(needed, optional)``: for a cell's own fresh process, which zobench owns. The optional
  packages the cell will not use (the quant backends' ``requires``, given as values by the cell's process:
  ``quant.hide_others``) are hidden from the import system (``sys.modules[name] = None``: ``import`` raises
  ``ModuleNotFoundError`` and ``importlib.util.find_spec`` answers None), so no library finds them,
  peft included. A quantization backend that needs one calls ``allow`` first (``Backend.check_available``
  does), which takes the hiding back.
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


def hide_unused(needed, optional) -> list[str]:
    """In a cell's own process, before peft or transformers' modeling code is imported: hide the packages of
    ``optional`` that are not ``needed`` (and not imported yet). Returns the names hidden."""
    hidden = sorted(m for m in set(optional) - set(needed) if m not in sys.modules)
    for name in hidden:
        sys.modules[name] = None  # the import system's own "not importable" marker
    return hidden


def allow(name: str) -> None:
    """Take back ``hide_unused`` for ``name`` (a no-op where it was not hidden)."""
    if name in sys.modules and sys.modules[name] is None:
        del sys.modules[name]
