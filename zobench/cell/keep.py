"""The pipeline's side of deltas (``zobench.cell.delta``): apply one to the freshly loaded base model, and
keep what a run trained.

A delta trained from another delta is applied root first, each link checked (``delta.chain``): the
grandparent of a delta is part of the trained model as much as its parent is.
"""

from __future__ import annotations

from pathlib import Path

from zobench.cell import delta as D
from zobench.cell import delta_tensors as DT
from zobench.cell.delta_check import check_adapter
from zobench.cell.run import Run
from zobench.errors import UserError
from zobench.methods import get_method
from zobench.models.lora import load_adapter
from zobench.spec.config import CellConfig
from zobench.zo.drift import measure_restore_drift
from zobench.zo.masks import linear_layers, scoped_params
from zobench.zo.trainer import replay

QUANTIZED_KINDS = ("scales", "codes")  # deltas of the quantized layers themselves (QZO, QuZO)


def load_into(pipeline) -> dict:
    """Apply the delta named by ``pipeline.cfg.delta`` (its ancestors first) to the freshly loaded base
    model; returns what the record says about it."""
    path = Path(pipeline.cfg.delta)
    links = D.chain(path)
    DT.check_base(links[0][1], links[0][0], pipeline.run_state.model)
    for folder, meta in links:
        if pipeline.pending_quantized and meta["kind"] not in QUANTIZED_KINDS:
            raise UserError(f"{folder}: a {meta['kind']} delta trained on top of quantization "
                            f"{pipeline.pending_quantized[-1][1]['kind']} ({pipeline.pending_quantized[-1][0]}); "
                            f"zobench applies those only after quantizing")
        _apply(pipeline, folder, meta)
    meta = links[-1][1]
    quant = meta["config"].get("quant", "none")
    if meta["kind"] == "sparse" and quant != pipeline.cfg.quant:
        pipeline.record.add_warning(f"{path}: trained beside {quant} weights, loaded with quant "
                                    f"'{pipeline.cfg.quant}': not the trained model")
    if meta["config"].get("trust_remote_code") is True and not pipeline.cfg.trust_remote_code:
        pipeline.record.add_warning(f"{path}: trained with remote code allowed; it stays off here unless the "
                                    f"command line passes --trust-remote-code")
    return {"path": str(path), "kind": meta["kind"], "step": meta["step"], "method": meta["config"].get("method"),
            "chain": len(links)}


def _apply(pipeline, path: Path, meta: dict) -> None:
    run = pipeline.run_state
    kind = meta["kind"]
    if kind == "sparse":
        mask, values = DT.sparse_parts(path)
        DT.write_sparse(run.model, mask, values, str(path / D.TENSORS))
        if pipeline.cfg.method_info.needs_mask:  # continued sparse training keeps the delta's entries
            run.mask = mask
    elif kind == "trajectory":
        _replay(pipeline, meta)
    elif kind in QUANTIZED_KINDS:  # QZO's scales, QuZO's codes: they exist once the model is quantized
        quant = meta["config"].get("quant", "none")
        if quant != pipeline.cfg.quant:
            raise UserError(f"{path}: holds the quantization {kind} of {quant} weights; load it with quant '{quant}' "
                            f"(this run's is '{pipeline.cfg.quant}')")
        pipeline.pending_quantized.append((path, meta))
    elif kind == "lora":
        check_adapter(path / "adapter")
        DT.check_adapter_weights(path / "adapter")
        load_adapter(run.loaded, path / "adapter")
    else:
        DT.write_tensors(run.model, path)


def apply_quantized(pipeline) -> None:
    """The ``scales`` and ``codes`` links of the delta's chain, root first, onto the freshly quantized model."""
    model, backend = pipeline.run_state.model, pipeline.backend
    current = None
    for path, meta in pipeline.pending_quantized:
        if meta["kind"] == "codes":
            DT.write_codes(model, path)
        else:
            current = current or {name: backend.scales(model.get_submodule(name))
                                  for name in backend.scaled_layers(model, linear_layers(model))}
            DT.write_scales(path, meta, current)
    pipeline.pending_quantized = []


def _replay(pipeline, meta: dict) -> None:
    """The trained weights of a dense ZO run, rebuilt from the base and the trajectory (bit for bit)."""
    run = pipeline.run_state
    # A run saved before ``generator`` existed drew its z with torch's generator: replay with that one.
    saved = {"generator": "torch", **meta["config"]}
    cfg = CellConfig.from_dict({k: v for k, v in saved.items() if k in CellConfig.keys()},
                               "delta.json: config", check_paths=False)
    trained = Run.of(cfg, run.device, run.task, run.splits, loaded=run.loaded, cache_root=run.cache_root)
    trained.params = scoped_params(run.model, cfg.resolved_scope)
    stepper, trainable = get_method(cfg.method).build_stepper(trained)
    measure_restore_drift(trainable, cfg.eps)  # training ran this probe first: so does the replay
    replay(trainable, stepper.optimizer, meta["trajectory"], cfg.eps, meta["step"])


def save_from(pipeline, target: Path, overwrite: bool = False) -> dict | None:
    """The run's artifact at ``target`` (the selected step's weights: the best dev step when dev selected
    it, else the last), or None for a method that trains nothing."""
    cfg, m, trainable, stepper = pipeline.cfg, pipeline.metrics, pipeline.trainable, pipeline.stepper
    step = m.get("best_step") if m.get("test_best") is not None else m.get("steps_done")
    kw = dict(cfg=dict(cfg.to_dict(), save=None, checkpoint=None, overwrite=False, predictions=None),
              fingerprint=pipeline.base_fingerprint,
              step=step, extra={"parent": cfg.delta} if cfg.delta else None, overwrite=overwrite)
    if trainable is not None and trainable.keeps_own_delta:  # it says what it keeps (QZO: the trained scales)
        kind, tensors, extra = trainable.delta_parts()
        return DT.save(target, kind, tensors=tensors, extra=dict(kw.pop("extra") or {}, **extra), **kw)
    if trainable is not None and trainable.snapshots:  # sparse: the model holds the selected step's values
        return DT.save(target, "sparse", tensors=sparse_tensors(trainable, pipeline.run_state.model), **kw)
    if trainable is not None:
        trajectory = m.get("trajectory")[:step]
        return DT.save(target, "trajectory", extra=dict(kw.pop("extra") or {}, trajectory=trajectory), **kw)
    model = stepper.model if stepper is not None else None  # none where the cell did not train (steps 0)
    if model is not None and pipeline.method.keeps_adapter:
        return DT.save(target, "lora", adapter_model=model, **kw)
    if model is not None:
        return DT.save(target, "tensors", tensors={n: p for n, p in model.named_parameters() if p.requires_grad},
                      **kw)
    return None


def sparse_tensors(t, model) -> dict:
    """A ``SparseTrainable``'s trained values with their flat indices, as a sparse delta stores them."""
    out = {}
    for name, idx, values in zip(t.names, t.indices, t.master.split(t.sizes)):
        if idx is None:  # the values beside a quantized layer: its own flat indices, in the same order
            module = name.removesuffix(".values")
            idx, name = model.get_submodule(module).flat_index(), f"{module}.weight"
        # int32 indices when they fit (in every tensor of a 7B model they do): half the bytes of int64
        out[f"{name}::index"] = idx.int() if idx.numel() == 0 or int(idx.max()) < 2**31 else idx.long()
        out[f"{name}::value"] = values.float()
    return out
