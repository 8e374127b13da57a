"""Models: specs (``names``, pure data) and loading (``load``, imports torch and transformers).

The loading functions are imported on first use, so that validating a suite's model names imports no
torch.
"""

_LAZY = {"LoadedModel", "builtin_tokenizer", "load_model", "resolve_dtype"}


def __getattr__(name):
    if name in _LAZY:
        from zobench.models import load

        return getattr(load, name)
    raise AttributeError(f"module 'zobench.models' has no attribute '{name}'")


__all__ = sorted(_LAZY)
