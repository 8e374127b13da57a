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
from zobench.zo.masks import scoped_params
from zobench.zo.trainable import measure_restore_drift
from zobench.zo.trainer import replay


def load_into(pipeline) -> dict:
    """Apply the delta named by ``pipeline.cfg.delta`` (its ancestors first) to the freshly loaded base
    model; returns what the record says about it."""
    path = Path(pipeline.cfg.delta)
    links = D.chain(path)
    DT.check_base(links[0][1], links[0][0], pipeline.run_state.model)
    for folder, meta in links:
        if pipeline.codes_deltas and meta["kind"] != "codes":
            raise UserError(f"{folder}: a {meta['kind']} delta trained on top of quantized codes "
                            f"({pipeline.codes_deltas[-1]}); zobench applies codes only after quantizing")
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
    elif kind == "codes":  # the quantized layers do not exist yet: written once quantized (apply_codes)
        quant = meta["config"].get("quant")
        if quant != pipeline.cfg.quant:
            raise UserError(f"{path}: holds {quant} codes; it loads with quant '{quant}' only (not "
                            f"'{pipeline.cfg.quant}')")
        pipeline.codes_deltas.append(path)
    elif kind == "lora":
        check_adapter(path / "adapter")
        load_adapter(run.loaded, path / "adapter")
    else:
        DT.write_tensors(run.model, path)


def apply_codes(pipeline) -> None:
    """The codes deltas of the chain, root first, into the freshly quantized layers."""
    for path in pipeline.codes_deltas:
        DT.write_codes(pipeline.run_state.model, path)


def _replay(pipeline, meta: dict) -> None:
    """The trained weights of a dense ZO run, rebuilt from the base and the trajectory (bit for bit)."""
    run = pipeline.run_state
    # A run saved before ``generator`` existed drew its z with torch's generator: replay with that one.
    saved = {"generator": "torch", **meta["config"]}
    cfg = CellConfig.from_dict({k: v for k, v in saved.items() if k in CellConfig.keys()},
                               "delta.json: config", check_paths=False)
    trained = Run(cfg, run.device, run.task, run.splits, loaded=run.loaded, cache_root=run.cache_root)
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
    if hasattr(trainable, "changed_codes"):  # quzo: the codes that moved, against those at the start
        return DT.save(target, "codes", tensors=trainable.changed_codes(), **kw)
    if hasattr(trainable, "snapshot"):  # sparse: the values now in the model are the selected step's
        return DT.save(target, "sparse", tensors=sparse_tensors(trainable, pipeline.run_state.model), **kw)
    if trainable is not None:
        trajectory = m.get("trajectory")[:step]
        return DT.save(target, "trajectory", extra=dict(kw.pop("extra") or {}, trajectory=trajectory), **kw)
    model = getattr(stepper, "model", None)
    if model is not None and hasattr(model, "peft_config"):
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
