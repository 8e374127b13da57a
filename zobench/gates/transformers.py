"""Gate: transformers' model classes, imported only after ``gates.hide.trim_transformers_imports`` has
answered transformers' optional-package checks (its cache module would otherwise import hqq, and hqq
torch's compiler, in every process that loads a model). Import them from here, never from transformers.
"""

from __future__ import annotations

from zobench.gates.hide import trim_transformers_imports

trim_transformers_imports()  # before the names below import transformers' modeling code

from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
)

try:  # what transformers' config classes raise for a mistyped field (huggingface_hub's strict dataclasses)
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # an older huggingface_hub, whose configs raise ValueError or TypeError instead
    class StrictDataclassError(Exception):
        pass

__all__ = ["AutoConfig", "AutoModelForCausalLM", "AutoTokenizer", "GenerationConfig", "PreTrainedModel",
           "StrictDataclassError"]
