"""The shape every quantization backend has, and the model-level driver.

A backend replaces the linear layers inside the transformer blocks (the ``linear`` scope of the ZO
masks) with its quantized modules; embeddings, norms and the output head keep the model's dtype, as
bitsandbytes and GPTQ do by default. Replaced modules keep their names, so a mask's parameter names
(``model.layers.0.mlp.up_proj.weight``) still find their layer after quantization.

``Backend.storage`` describes the format in numbers (bits per weight, per-group statistics) so that the
memory estimator can price a layer without loading any weights.

Quantization knows nothing of the ZO engine: the cell gives ``quantize_model`` the names of the layers to
quantize (its ``linear`` scope) and the mask as values.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch

from zobench.errors import Unsupported
from zobench.fingerprint import weights_fingerprint
from zobench.gates.hide import allow
from zobench.measure.memory import trim_heap
from zobench.quant.sparse import attach_sparse, split_selected


@dataclass
class QuantContext:
    """What a backend may need besides the layers: calibration data and a cache for slow quantizers."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    tokenizer: object = None
    data_dir: str | None = None
    calib_path: str | None = None
    calib_sequences: int = 16
    calib_length: int = 256
    vocab_size: int | None = None      # random-weight models fold token ids into their vocabulary
    seed: int = 0
    cache_dir: Path | None = None
    cache_key: str = ""                 # identifies the weights being quantized (fingerprint + mask)
    info: dict = field(default_factory=dict)  # the backend reports what it did here (cache hit, seconds)


@dataclass(frozen=True)
class Storage:
    """Bytes of a quantized [out, in] weight: ``bits`` per weight plus per-group / per-row statistics."""

    bits: float                  # bits per stored weight
    group_size: int | None = None
    group_bytes: float = 0.0     # bytes of statistics per group of ``group_size`` weights
    row_bytes: float = 0.0       # bytes of statistics per output row

    def weight_bytes(self, out_features: int, in_features: int) -> float:
        n = out_features * in_features
        groups = n / self.group_size if self.group_size else 0
        return n * self.bits / 8 + groups * self.group_bytes + out_features * self.row_bytes


class Backend:
    """One quantization format. Subclasses set the class attributes and implement ``quantize_linear``
    (per layer) or override ``quantize`` (whole model, e.g. GPTQ, which needs calibration activations)."""

    name: str = "?"
    requires: tuple[str, ...] = ()   # importable modules this backend needs
    install: str = ""                # the one line that installs them
    storage: Storage | None = None   # None: weights stay in the model's dtype
    perturbable: bool = False        # can full ZO perturb these weights in place?
    # Host memory its package adds to a process once imported, beyond what every cell already imports
    # (the estimator adds it to a CPU cell's peak RSS).
    import_rss_mib: float = 0.0
    # Whether a CPU cell's framework floor is measured with this backend (``analysis.calibration``: the
    # negligible calibration cell quantized by it): what its layers' first forward adds to a process once,
    # whatever the model (bitsandbytes on this machine: +29-32 MiB). A backend that cannot quantize that
    # cell (GPTQ needs calibration data) keeps ``import_rss_mib``.
    measures_floor: bool = False
    devices: tuple[str, ...] = ("cpu", "cuda")

    def check_available(self, device: str = "cpu") -> None:
        """Raise ``Unsupported`` (one line, with the install command) when this backend cannot run here."""
        for m in self.requires:
            allow(m)  # a cell process hides the optional packages its quant was not expected to need
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            raise Unsupported(f"quant '{self.name}' needs {', '.join(missing)}: {self.install}")
        if not any(str(device).startswith(d) for d in self.devices):
            raise Unsupported(f"quant '{self.name}' does not run on {device}")

    def quantize(self, model: torch.nn.Module, names: list[str], ctx: QuantContext) -> None:
        """Replace each ``nn.Linear`` named in ``names`` by its quantized module, in place. The new module takes
        the model's train / eval mode: a module is made in training mode, and bitsandbytes picks its CPU int8
        matmul by the mode (training: dequantize and a float matmul, no outlier split; eval: LLM.int8), so a
        fresh layer in an eval model would run another product than after the model's next ``eval()``."""
        for name in names:
            parent, attr = _parent(model, name)
            linear = getattr(parent, attr)
            setattr(parent, attr, self.quantize_linear(linear, ctx).train(model.training))
            del linear
            trim_heap()

    def quantize_linear(self, linear: torch.nn.Linear, ctx: QuantContext) -> torch.nn.Module:
        raise NotImplementedError

    @property
    def per_layer(self) -> bool:
        """Whether each layer is quantized from its own weight alone (no pass over the whole model, as
        GPTQ's calibration): such a backend can take each layer as soon as it exists and free its float
        weight before the next one is made (``quantize_model(..., layers=...)``)."""
        return type(self).quantize is Backend.quantize

    # A function module -> its dense weight in the compute dtype, for formats whose batched forward
    # builds exactly that (dequantize, then one dense matmul): a dense-and-sparse layer then merges its
    # sparse values into it where ``merges_on`` says so (quant.sparse). None: the layer adds a separate
    # sparse product.
    dequantize = None

    # A function module -> the layer's quantization scales as the plain float tensor its forward reads, for a
    # method that perturbs them in place (QZO); declared per backend in ``spec.catalog.PLAIN_SCALES``. None:
    # the format has no such tensor (double-quantized or packed scales, or no quantization).
    scales = None

    def scaled_layers(self, model: torch.nn.Module, linears: list[str]) -> list[str]:
        """The module names of the layers this backend quantized in ``model``, whose ``scales`` a method may
        train. ``linears``: the block linears as the scopes find them, by their weight parameter
        (``zo.masks.linear_layers``), which is every one a backend that keeps a weight quantized."""
        return linears

    def scale_count(self, out_features: int, in_features: int) -> int:
        """How many values ``scales`` gives for a layer of that shape: one per group of ``storage.group_size``
        of its weights (bitsandbytes' 4-bit blocks run over the flattened weight), else one per output row."""
        g = self.storage.group_size
        return -(-out_features * in_features // g) if g else out_features

    def quantize_transient(self, numel: int, dtype_bytes: int, device: str) -> float:
        """Bytes quantizing one layer of ``numel`` weights needs beyond the layer and its result, at most (the
        estimator prices the largest layer's; 0 where not measured)."""
        return 0.0

    def merges_on(self, device: str) -> bool:
        """Whether dense-and-sparse layers on ``device`` ("cpu", "cuda", "cuda:1") merge S into the weight
        ``dequantize`` builds, rather than add a separate sparse product (only a backend with a
        ``dequantize`` says True)."""
        return False


class NoQuant(Backend):
    name = "none"
    perturbable = True

    def quantize(self, model, names, ctx) -> None:
        return None


def _parent(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def quantize_model(model: torch.nn.Module, backend: Backend, ctx: QuantContext, names: list[str],
                   mask: dict[str, torch.Tensor] | None = None) -> list[tuple[str, torch.Tensor]]:
    """Quantize the linear layers ``names`` of ``model`` in place with ``backend``: the block linears, those
    of the ``linear`` scope (the cell gives their module names: ``zo.masks.scoped_params``).

    With a ``mask`` (over those linears' weights), the masked entries are first taken out of the weights
    and kept beside the quantized layers as trainable values (``quant.sparse``). Returns the value
    vectors ``[(name, tensor)]`` that ZO may perturb (empty without a mask).
    """
    # A comprehension, not a loop: a loop variable would keep the last float layer (and through its
    # weight the checkpoint's whole memory map) alive while this frame is; with a GPTQ cache hit that
    # held the checkpoint's pages resident for the whole run (results/bench/measurements.md).
    shapes = {name: (model.get_submodule(name).out_features, model.get_submodule(name).in_features)
              for name in names}
    # In the layers' order, whatever order the mask's names come in (a cached mask reads back sorted by name):
    # the trainable values are drawn in this order, so a mask from the cache must train as the one just built.
    taken = split_selected(model, mask or {})
    taken = {**{name: taken[name] for name in names if name in taken}, **taken}
    if not ctx.cache_key:
        # The weights' fingerprint samples only the first values of each tensor, so the taken entries
        # are hashed too: the dense parts of a random and a sensitive split differ only there.
        h = hashlib.sha256(weights_fingerprint([(n, model.get_submodule(n).weight) for n in names]).encode())
        for name in sorted(taken):
            h.update(name.encode())
            h.update(taken[name][0].cpu().numpy().tobytes())
        ctx.cache_key = h.hexdigest()[:16]
    backend.quantize(model, names, ctx)
    _detach_from_checkpoint(model)  # before the sparse values are attached: it replaces buffers
    merge = backend.dequantize if backend.merges_on(str(ctx.device)) else None
    return attach_sparse(model, taken, shapes, ctx.dtype, merge)


@torch.no_grad()
def _detach_from_checkpoint(model: torch.nn.Module) -> None:
    """Copy the float tensors that stay (embeddings, norms, head) out of the checkpoint's memory map.

    from_pretrained maps the safetensors file and the weights live in its pages. Quantizing reads every
    page, and as long as any tensor still points into the map, all of those file pages stay resident
    (several times the quantized state: results/bench/measurements.md). Owning copies let the map close,
    so the quantized model costs what it stores.
    """
    for p in model.parameters():
        if type(p) is torch.nn.Parameter and p.is_floating_point() and p.device.type == "cpu":
            p.data = p.data.clone()
    for module in model.modules():
        for name, b in module._buffers.items():
            if b is not None and b.device.type == "cpu" and b.is_floating_point():
                module._buffers[name] = b.clone()
    gc.collect()
