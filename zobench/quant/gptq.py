"""GPTQ, 4-bit, through gptqmodel's own per-layer GPTQ and its portable torch kernel.

gptqmodel's high-level API loads a model from a directory and walks it with its own thread pools; here
the in-memory model is quantized instead, with the pieces gptqmodel exposes to transformers/optimum:
``GPTQ.hf_quantize`` (the algorithm, one layer at a time from its accumulated Hessian) and
``hf_pack_layer`` into ``TorchLinear`` (the ``torch`` kernel: packed int32 codes, dequantized per forward;
it runs on CPU and CUDA alike). The calibration walk is GPTQ's usual one: the inputs of the first decoder
block are captured once, then each block in turn collects its linears' Hessians, is quantized, and is
run again to give the next block inputs that carry the quantization error so far. Within a block the
linears are quantized in call order, those reading the same input together (q/k/v, then o, then
gate/up, then down), as gptqmodel's ``true_sequential`` does.

The result is cached per weights (``ctx.cache_key``), settings and calibration sample, because it takes
minutes on a CPU for a real model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import safe_open, save_file

from zobench.data.calibration import corpus_batches, find_corpus
from zobench.errors import Unsupported, UserError
from zobench.files import temp_dir
from zobench.gates import gptqmodel
from zobench.measure.memory import trim_heap
from zobench.outdirs import build_lock
from zobench.quant.base import Backend, QuantContext, Storage, _parent

# gptqmodel 7.6.0 pins numpy==2.2.6 in its metadata, but runs on the numpy 2.4 the project is pinned to,
# so it goes in without its declared dependencies; the extra installs the few it imports.
INSTALL = "pip install 'zobench[gptq]' && pip install --no-deps 'gptqmodel==7.6.0'"
BITS, GROUP_SIZE = 4, 128
# gptqmodel's own defaults for GPTQ (optimum passes 0.01; gptqmodel raises the damping on failure).
DAMP_PERCENT, DAMP_AUTO_INCREMENT, BLOCKSIZE = 0.05, 0.01, 128
CACHE_FORMAT = 1  # bump when the cached layout changes


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the wanted inputs are seen."""


class GPTQ(Backend):
    name = "gptq"
    requires = ("gptqmodel",)
    install = INSTALL
    perturbable = False
    # Per group of 128 weights in a row: an fp16 scale and a 4-bit zero point packed into int32 (2.5 B).
    # g_idx (one int32 per input column) is priced as 4 B per output row: exact for square layers, and
    # within 3% of any SmolLM2 layer's bytes (k/v_proj, 576 -> 192, are the furthest off). A layer whose
    # in_features is not a multiple of 128 (576 in SmolLM2) keeps group size 128 with a shorter last
    # group, as gptqmodel itself does; that group's statistics (half a group per row there) are left out.
    storage = Storage(bits=BITS, group_size=GROUP_SIZE, group_bytes=2 + BITS / 8, row_bytes=4)
    # What `import gptqmodel` adds to a cell's process beyond what every cell imports (every gptq cell
    # imports it); measured once with gptqmodel 7.6.0: results/bench/measurements.md.
    import_rss_mib = 77.0

    def quantize(self, model: torch.nn.Module, names: list[str], ctx: QuantContext) -> None:
        start = time.perf_counter()
        LayerGPTQ, GPTQConfig, TorchLinear, hf_pack_layer = gptqmodel.load()
        shapes = {n: model.get_submodule(n) for n in names}
        shapes = {n: (m.in_features, m.out_features, m.bias is not None) for n, m in shapes.items()}
        if ctx.tokenizer is None:
            raise UserError("quant 'gptq' needs a tokenizer for its calibration data")
        corpus = find_corpus(ctx.calib_path, ctx.data_dir)
        target = self._cache_path(ctx, names, shapes, corpus)
        # Cells at once on one node wait for the one that builds these layers, then load its result.
        with build_lock(target) if target is not None else contextlib.nullcontext():
            hit = target is not None and (target / "layers.safetensors").exists()
            if hit:
                # A layer at a time, its tensors taken as the layer's buffers (no second copy): reading the
                # whole file first held every layer twice until the phase ended, and the heap kept the pages,
                # so a cell that loaded the cache trained ~50 MiB above one that had quantized (SmolLM2).
                with safe_open(str(target / "layers.safetensors"), "pt") as f:
                    keys: dict[str, list[str]] = {}
                    for k in f.keys():
                        keys.setdefault(k.rpartition(".")[0], []).append(k)
                    for name in names:
                        own = {k.rpartition(".")[2]: f.get_tensor(k) for k in keys.get(name, [])}
                        self._install(model, name, _new_layer(TorchLinear, shapes[name]), own, ctx)
            else:
                batches = corpus_batches(corpus, ctx.tokenizer, ctx.calib_sequences, ctx.calib_length,
                                         vocab_size=ctx.vocab_size)
                cfg = dict(bits=BITS, group_size=GROUP_SIZE, sym=True, desc_act=False, act_group_aware=False,
                           damp_percent=DAMP_PERCENT, damp_auto_increment=DAMP_AUTO_INCREMENT,
                           offload_to_disk=False)  # else each config makes a temporary directory

                def quantize_layer(name, gptq):
                    scale, zero, g_idx, *_ = gptq.hf_quantize(
                        blocksize=BLOCKSIZE, percdamp=DAMP_PERCENT, damp_auto_increment=DAMP_AUTO_INCREMENT,
                        group_size=GROUP_SIZE, actorder=False, act_group_aware=False)
                    # The packer works on CPU tensors; the float layer is dropped right after.
                    linear = model.get_submodule(name).to("cpu")
                    q = _new_layer(TorchLinear, shapes[name])
                    hf_pack_layer(q, linear, scale.cpu(), zero.cpu(), g_idx.cpu())
                    self._install(model, name, q, None, ctx)

                _calibrate(model, names, batches, lambda m: _new_gptq(LayerGPTQ, GPTQConfig, m, cfg),
                           quantize_layer)
                if target is not None:
                    try:
                        _save(target, {f"{n}.{k}": v for n in names
                                       for k, v in model.get_submodule(n).state_dict().items()},
                              {"names": names, "seconds": time.perf_counter() - start})
                    except OSError as e:  # a full or read-only cache: quantized, only not kept for next time
                        ctx.info["cache_warning"] = (f"GPTQ result not cached in {target.parent}: "
                                                     f"{e.strerror or e}")
        ctx.info["quant_calib_corpus"] = corpus.describe()
        ctx.info["quant_cache_hit"] = hit
        ctx.info["quant_s"] = round(time.perf_counter() - start, 3)

    def _cache_path(self, ctx, names, shapes, corpus) -> Path | None:
        if ctx.cache_dir is None or not ctx.cache_key:
            return None
        key = {"weights": ctx.cache_key, "format": CACHE_FORMAT, "gptqmodel": version("gptqmodel"),
               "bits": BITS, "group_size": GROUP_SIZE, "sym": True, "desc_act": False, "true_sequential": True,
               "damp": DAMP_PERCENT, "blocksize": BLOCKSIZE, "layers": [[n, *shapes[n]] for n in names],
               "corpus": corpus.key, "n_seq": ctx.calib_sequences,
               "seq_len": ctx.calib_length, "vocab": ctx.vocab_size, "dtype": str(ctx.dtype),
               "tokenizer": getattr(ctx.tokenizer, "name_or_path", type(ctx.tokenizer).__name__)}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return Path(ctx.cache_dir) / "gptq" / digest

    @staticmethod
    def scales(module: torch.nn.Module) -> torch.Tensor:
        """The layer's float16 scale per group of 128 input columns of each output row (``[groups, out]``): the
        torch kernel dequantizes from it at every forward, so a change in place is a change of the layer
        (QZO, ``methods.qzo``). Not where it keeps a dequantized copy (``GPTQ_TORCH_CACHE_WEIGHTS=1``)."""
        if getattr(module, "_cache_enabled", False):
            raise RuntimeError("this GPTQ layer caches its dequantized weight (GPTQ_TORCH_CACHE_WEIGHTS is set): "
                               "a change of its scales would not reach its forward")
        return module.scales

    def scaled_layers(self, model: torch.nn.Module, linears: list[str]) -> list[str]:
        # A packed layer holds its codes in buffers (qweight), not a weight parameter; GPTQ quantizes the block
        # linears alone, so every such layer is one.
        return [name for name, m in model.named_modules() if hasattr(m, "qweight") and hasattr(m, "scales")]

    def scale_count(self, out_features: int, in_features: int) -> int:
        return out_features * -(-in_features // GROUP_SIZE)  # a shorter last group in a row counts as one

    @staticmethod
    def _install(model, name, q, state, ctx) -> None:
        if state is not None:
            q.load_state_dict(state, assign=True)
        q = q.to(ctx.device)
        # TorchLinear.post_init wraps its dequantization in torch.compile: on a 2-core CPU inductor
        # spends ~30 s on the first call and again on each new shape, for a few ms saved per layer.
        q.optimized = True
        q.post_init()
        q.eval()
        parent, attr = _parent(model, name)
        setattr(parent, attr, q)
        trim_heap()  # what the layers before this one freed (quant.base.Backend.quantize)


def _new_layer(TorchLinear, shape):
    in_f, out_f, bias = shape
    return TorchLinear(bits=BITS, group_size=GROUP_SIZE, sym=True, desc_act=False, in_features=in_f,
                       out_features=out_f, bias=bias, pack_dtype=torch.int32, register_buffers=True)


def _new_gptq(LayerGPTQ, GPTQConfig, module, cfg):
    gptq = LayerGPTQ(module, GPTQConfig(**cfg))
    gptq.quantizer.configure(perchannel=True)  # what gptqmodel's own GPTQ processor sets
    return gptq


def _blocks(model, names):
    """The decoder blocks holding ``names``: ``[(block module, [names in it])]`` in model order."""
    for prefix, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList):
            continue
        groups = {i: [n for n in names if n.startswith(f"{prefix}.{i}.")] for i in range(len(mod))}
        if sum(len(g) for g in groups.values()) == len(names):
            return [(mod[i], g) for i, g in groups.items() if g]
    raise Unsupported("quant 'gptq' quantizes linears inside the decoder blocks (one ModuleList) only")


def _run(block, args, kwargs):
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def _calibrate(model, names, batches, new_gptq, quantize_layer) -> None:
    blocks = _blocks(model, names)
    device = next(model.parameters()).device
    # All sequences go through as one batch: each quantized layer then dequantizes its weight once per
    # pass instead of once per sequence, which was most of the time on a CPU.
    captured = []

    def capture(_mod, args, kwargs):
        captured.append((list(args), dict(kwargs)))
        raise _Stop

    hook = blocks[0][0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        model(input_ids=torch.cat(batches).to(device), use_cache=False)
    except _Stop:
        pass
    finally:
        hook.remove()
    args, kwargs = captured[0]

    for block, block_names in blocks:
        for stage in _stages(block, model, block_names, args, kwargs):
            gptqs = {n: new_gptq(model.get_submodule(n)) for n in stage}
            hooks = [model.get_submodule(n).register_forward_hook(_collect(g, last=(n == stage[-1])))
                     for n, g in gptqs.items()]
            try:
                _run(block, args, kwargs)
            except _Stop:
                pass
            finally:
                for h in hooks:
                    h.remove()
            for n, g in gptqs.items():
                quantize_layer(n, g)
                g.free()
        hidden = _run(block, args, kwargs)  # the next block sees this block's quantized output
        if args:
            args[0] = hidden
        else:
            kwargs["hidden_states"] = hidden


def _collect(gptq, last: bool):
    def hook(_mod, inp, out):
        gptq.add_batch(inp[0].detach(), out)
        if last:
            raise _Stop  # the rest of the block is not needed for this stage
    return hook


def _stages(block, model, block_names, args, kwargs):
    """``block_names`` in call order, grouped by the input tensor they read (q/k/v share theirs)."""
    calls = []
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda _m, inp, _o, n=n: calls.append((n, inp[0].data_ptr()))) for n in block_names]
    try:
        _run(block, args, kwargs)
    finally:
        for h in hooks:
            h.remove()
    stages, last_ptr = [], None
    for n, ptr in calls:
        if any(n in s for s in stages):
            continue
        if stages and ptr == last_ptr:
            stages[-1].append(n)
        else:
            stages.append([n])
        last_ptr = ptr
    missing = [n for n in block_names if not any(n in s for s in stages)]
    return stages + ([missing] if missing else [])


def _save(target: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write the cache entry to a temporary directory and rename it, so no reader sees half of it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(target.parent, ".tmp-")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "layers.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            tmp.rename(target)
        except OSError:  # another run wrote the same entry first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
