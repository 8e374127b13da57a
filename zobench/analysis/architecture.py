"""A model's shapes, read from its config alone: the model is built on the meta device (``from_config``
allocates nothing there), so tied weights, the ``linear`` scope and the head are exactly what
``zobench.zo.masks.scoped_params`` sees. What the memory estimator (``analysis.estimate``) prices."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from zobench.errors import UserError
from zobench.files import cache_dir
from zobench.gates.transformers import AutoConfig, AutoModelForCausalLM
from zobench.models import layerwise
from zobench.models.load import file_key, random_config
from zobench.models.shards import tensor_files
from zobench.spec.config import SCOPES
from zobench.spec.models import BUILTIN, CONFIG_DIR
from zobench.tasks.logits import slices_logits
from zobench.zo.masks import scoped_params


@dataclass(frozen=True)
class Arch:
    """The numbers the estimate needs, read off the meta-device model."""

    source: str                 # the spec whose config was used (the fallback when the model is absent)
    numel: int                  # unique parameters (tied weights once), as runner's model_numel
    other_numel: int            # parameters outside the block linears' weights (embeddings, norms, head, biases)
    buffer_bytes: int
    linears: tuple              # (out, in) of every block linear weight: the "linear" scope, quantized
    linear_names: tuple         # their parameter names, in the same order
    scopes: dict                # scope -> tuple of tensor numels (zobench.zo.masks.scoped_params)
    hidden: int
    intermediate: int
    gated: bool                 # gate and up projections (SwiGLU): three [tokens, I] tensors at once
    q_width: int
    kv_width: int
    vocab: int
    layers: int                 # transformer blocks
    eager_heads: int            # attention heads when attention is "eager" (scores materialized), else 0
    slices_logits: bool         # logits only at the kept positions (tasks.logits.slices_logits)
    layerwise: bool = False     # its blocks can run one at a time (models.layerwise: a streamed sensitive mask)
    streams: bool = False       # its weights can arrive tensor by tensor (random, or a local safetensors checkpoint)
    mapped_dtype: str | None = None  # the dtype of a safetensors checkpoint whose tensors a CPU load maps, not reads


def _local_config(spec: str, trust: bool, network: bool):
    """The transformers config of a model spec (see zobench.models.load), reading no weights."""
    if spec.lower() in BUILTIN:
        # The converted model's own config when it is in the cache, else the shipped copy of it.
        stem = Path(BUILTIN["smollm2"]).stem
        found = sorted((cache_dir() / "models").glob(f"{stem}-*/config.json"))
        if found:
            return AutoConfig.from_pretrained(str(found[-1].parent))
        return random_config(str(CONFIG_DIR / "smollm2-135m.json"), trust)
    if spec.startswith("random:"):
        return random_config(spec.split(":", 1)[1], trust)
    if spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"model '{spec}': GGUF file not found")
        converted = cache_dir() / "models" / f"{path.stem}-{file_key(path)}"
        if (converted / "config.json").exists():
            return AutoConfig.from_pretrained(str(converted))
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if Path(spec).is_dir() and not (Path(spec) / "config.json").exists():
        raise UserError(f"model '{spec}': directory has no config.json")
    try:
        return AutoConfig.from_pretrained(spec, trust_remote_code=trust, local_files_only=not network)
    except (OSError, ValueError) as e:
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise UserError(f"model '{spec}': no config to estimate from: {str(e).splitlines()[0]}{offline}") \
            from None


def model_config(spec: str, fallback: str | None = None, trust: bool = False):
    """(config, spec used). Tries the local copy first, then the fallback (as the runner would load it),
    then the hub, so a suite whose model has a shipped fallback never waits on the network."""
    try:
        return _local_config(spec, trust, network=False), spec
    except UserError:
        if fallback:
            return _local_config(fallback, trust, network=False), fallback
        hub = not spec.startswith("random:") and not spec.endswith(".gguf") and not Path(spec).exists()
        if hub and os.environ.get("HF_HUB_OFFLINE", "").upper() not in ("1", "ON", "YES", "TRUE"):
            return _local_config(spec, trust, network=True), spec
        raise


def _mapped_dtype(spec: str, config, streams: bool) -> str | None:
    """The dtype a checkpoint's tensors are stored in, where loading ``spec`` on a CPU maps them from
    safetensors files instead of reading them (``models.load``: the builtin and GGUF models are converted to
    float32 safetensors; a local folder's own safetensors, when it ``streams``: ``_streams``): in that dtype
    the load holds none of their pages until a forward reads them. None for random weights and anything else."""
    if spec.startswith("random:"):
        return None
    if spec.lower() in BUILTIN or spec.endswith(".gguf"):
        return "float32"
    if not (Path(spec).is_dir() and streams):
        return None
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(stored).removeprefix("torch.") if stored is not None else None


def _streams(spec: str, model) -> bool:
    """Whether ``models.load`` can leave ``spec``'s block linears out of the model until they are asked for."""
    if spec.startswith("random:") or spec.lower() in BUILTIN or spec.endswith(".gguf"):
        return True  # drawn, or read from the safetensors zobench converts the GGUF file to
    files = tensor_files(Path(spec)) if Path(spec).is_dir() else None
    return files is not None and all(n in files for n, _ in model.named_parameters())


@functools.lru_cache(maxsize=32)
def architecture(spec: str, fallback: str | None = None, trust: bool = False) -> Arch:
    """The shapes of the model ``spec`` names (its ``fallback`` where it has no config here)."""
    config, used = model_config(spec, fallback, trust)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    except (ValueError, KeyError) as e:
        raise UserError(f"model '{used}': cannot build its architecture: {str(e).splitlines()[0]}") from None
    params = {id(p): p for p in model.parameters()}
    scopes = {s: tuple(p.numel() for _, p in scoped_params(model, s)) for s in SCOPES}
    linear = scoped_params(model, "linear")
    linears = tuple(tuple(p.shape) for _, p in linear)
    hidden = int(model.get_input_embeddings().weight.shape[1])
    # One block's linears give the widths: the first name with a layer number is the first block.
    blocks = list(dict.fromkeys(m.group(0) for n, _ in linear if (m := re.search(r"^.*?\.\d+\.", n))))
    first = blocks[0] if blocks else ""
    block = [(n, tuple(p.shape)) for n, p in linear if n.startswith(first)]
    widest = max((s[0] for _, s in block if s[1] == hidden), default=hidden)

    def width(keys, default):
        return next((s[0] for n, s in block if any(k in n.rsplit(".", 2)[-2] for k in keys)), default)

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    streams = _streams(used, model)  # reads a local folder's safetensors index: once
    attn = getattr(text, "_attn_implementation", None) or "sdpa"
    return Arch(
        source=used, numel=sum(p.numel() for p in params.values()),
        other_numel=sum(p.numel() for p in params.values()) - sum(o * i for o, i in linears),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        linears=linears, linear_names=tuple(n for n, _ in linear), scopes=scopes, hidden=hidden, intermediate=widest,
        layers=max(len(blocks), 1),
        gated=sum(1 for _, s in block if s == (widest, hidden)) >= 2,
        q_width=width(("q_proj", "query", "q_lin", "wq"), hidden),
        kv_width=width(("k_proj", "key", "k_lin", "wk"), hidden),
        vocab=int(model.get_output_embeddings().weight.shape[0]),
        eager_heads=int(getattr(text, "num_attention_heads", 1)) if attn == "eager" else 0,
        slices_logits=slices_logits(model), layerwise=layerwise.supports(model), streams=streams,
        mapped_dtype=_mapped_dtype(used, config, streams))
