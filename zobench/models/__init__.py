"""Models: loading (``load``: torch and transformers) and LoRA adapters (``lora``). Model specs as names,
checked without torch, are the spec's (``zobench.spec.models``)."""

from zobench.models.load import LoadedModel, builtin_tokenizer, load_model, resolve_dtype

__all__ = ["LoadedModel", "builtin_tokenizer", "load_model", "resolve_dtype"]
