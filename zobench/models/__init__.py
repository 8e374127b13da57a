from zobench.models.load import LoadedModel, builtin_tokenizer, load_model, resolve_dtype

__all__ = ["LoadedModel", "builtin_tokenizer", "load_model", "resolve_dtype"]
