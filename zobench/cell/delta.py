"""What a fine-tuning run keeps: a small artifact, loaded anywhere a model is (``--delta DIR``).

    DIR/delta.json          what made it: format, zobench version, kind, the base model and a fingerprint
                            of its weights, the whole training config, the step it holds, its size
    sparse      DIR/delta.safetensors   per trained tensor ``<name>::index`` (int32 flat indices) and
                                        ``<name>::value`` (float32 trained values): 0.1% of the scope
    trajectory  (in delta.json)         dense ZO (full, lezo): each step's [[seed, coefficient], ...]; loading
                                        replays the steps onto the base weights, bit for bit in float32
    lora        DIR/adapter/            a PEFT LoRA adapter directory
    tensors     DIR/delta.safetensors   first-order full fine-tuning: the changed tensors

A delta is refused in one line when the base model it is loaded onto is not the one it was trained from
(``base.fingerprint``). Sparse deltas trained beside quantized weights (dense-and-sparse) store the same
indices and values; loading writes the values into the float weights and the run quantizes with the
delta's indices as its mask, which rebuilds the trained model exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from zobench.errors import UserError

FORMAT = 1
META = "delta.json"
TENSORS = "delta.safetensors"


def base_fingerprint(model: torch.nn.Module) -> str:
    """A cheap identity of a model's weights: names, shapes, dtypes and the first values of every tensor."""
    from zobench.zo.mask_build import weights_fingerprint

    return weights_fingerprint(list(model.named_parameters()))


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def save(target: Path, kind: str, cfg: dict, fingerprint: str, step: int, tensors: dict | None = None,
         extra: dict | None = None, adapter_model=None) -> dict:
    """Write the artifact to ``target`` (a new directory, replaced whole) and return its description."""
    import shutil
    import tempfile

    import zobench
    from zobench.files import check_output_dir

    target = Path(target)
    check_output_dir(target.parent, "artifact")
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if tensors is not None:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(stage / TENSORS))
        if adapter_model is not None:
            adapter_model.save_pretrained(str(stage / "adapter"))
        meta = {"format": FORMAT, "zobench": zobench.__version__, "kind": kind, "step": step,
                "base": {"model": cfg.get("model"), "fingerprint": fingerprint}, "config": cfg, **(extra or {})}
        (stage / META).write_text(json.dumps(meta, indent=1, default=str) + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        stage.rename(target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return {"path": str(target), "kind": kind, "step": step, "bytes": _dir_bytes(target)}


def read(path: str | Path) -> dict:
    """The artifact's ``delta.json``, or one line saying why ``path`` is not an artifact."""
    from zobench.files import read_text

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a directory (a delta is the directory `--save` wrote)")
    try:
        meta = json.loads(read_text(path / META, "delta description"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path / META}: not valid JSON ({e.msg})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("kind") not in KINDS:
        raise UserError(f"{path / META}: not a zobench delta of format {FORMAT}")
    return meta


def check_base(meta: dict, path: Path, model: torch.nn.Module) -> None:
    got = base_fingerprint(model)
    if got != meta["base"]["fingerprint"]:
        raise UserError(f"{path}: this delta was trained from another base model ({meta['base']['model']}, weights "
                        f"{meta['base']['fingerprint']}); the model given has weights {got}")


def sparse_parts(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(mask, values)``: flat indices and trained values per parameter name."""
    from safetensors.torch import load_file

    data = load_file(str(Path(path) / TENSORS))
    mask = {k.removesuffix("::index"): v.long() for k, v in data.items() if k.endswith("::index")}
    values = {k.removesuffix("::value"): v for k, v in data.items() if k.endswith("::value")}
    return mask, values


@torch.no_grad()
def write_sparse(model: torch.nn.Module, mask: dict, values: dict) -> None:
    params = dict(model.named_parameters())
    for name, idx in mask.items():
        p = params[name]
        p.data.view(-1)[idx.to(p.device)] = values[name].to(device=p.device, dtype=p.dtype)


@torch.no_grad()
def write_tensors(model: torch.nn.Module, path: Path) -> None:
    """A ``tensors`` delta (first-order fine-tuning): its saved tensors replace the model's."""
    from safetensors.torch import load_file

    state = load_file(str(Path(path) / TENSORS))
    for name, p in model.named_parameters():
        if name in state:
            p.copy_(state[name].to(p.dtype))


KINDS = ("sparse", "trajectory", "lora", "tensors")


# -- the pipeline's side -------------------------------------------------------------------------------

def load_into(pipeline) -> dict:
    """Apply the delta named by ``pipeline.cfg.delta`` to the freshly loaded base model (a parent delta
    first); returns what the record says about it."""
    path = Path(pipeline.cfg.delta)
    meta = read(path)
    if meta.get("parent"):
        _apply(pipeline, Path(meta["parent"]), read(meta["parent"]), check=True)
        _apply(pipeline, path, meta, check=False)
    else:
        _apply(pipeline, path, meta, check=True)
    quant = meta["config"].get("quant", "none")
    if meta["kind"] == "sparse" and quant != pipeline.cfg.quant:
        pipeline.record.add_warning(f"{path}: trained beside {quant} weights, loaded with quant "
                                    f"'{pipeline.cfg.quant}': not the trained model")
    return {"path": str(path), "kind": meta["kind"], "step": meta["step"], "method": meta["config"].get("method")}


def _apply(pipeline, path: Path, meta: dict, check: bool) -> None:
    run = pipeline.run_state
    if check:
        check_base(meta, path, run.model)
    kind = meta["kind"]
    if kind == "sparse":
        mask, values = sparse_parts(path)
        write_sparse(run.model, mask, values)
        if pipeline.method.needs_mask:  # continued sparse training keeps the delta's entries
            run.mask = mask
    elif kind == "trajectory":
        _replay(pipeline, meta)
    elif kind == "lora":
        from zobench.influence.poison import load_adapter

        load_adapter(run.loaded, path / "adapter")
    else:
        write_tensors(run.model, path)


def _replay(pipeline, meta: dict) -> None:
    """The trained weights of a dense ZO run, rebuilt from the base and the trajectory (bit for bit)."""
    from zobench.cell.pipeline import Run
    from zobench.spec.config import CellConfig
    from zobench.zo.masks import scoped_params
    from zobench.zo.trainable import measure_restore_drift
    from zobench.zo.trainer import replay

    run = pipeline.run_state
    # A run saved before ``generator`` existed drew its z with torch's generator: replay with that one.
    saved = {"generator": "torch", **meta["config"]}
    cfg = CellConfig.from_dict({k: v for k, v in saved.items() if k in CellConfig.keys()}, "delta.json: config")
    trained = Run(cfg, run.device, run.task, run.splits, loaded=run.loaded, cache_root=run.cache_root)
    trained.params = scoped_params(run.model, cfg.resolved_scope)
    stepper, trainable = cfg.method_class().build_stepper(trained)
    measure_restore_drift(trainable, cfg.eps)  # training ran this probe first: so does the replay
    replay(trainable, stepper.optimizer, meta["trajectory"], cfg.eps, meta["step"])


def save_from(pipeline, target: Path) -> dict | None:
    """The run's artifact at ``target`` (the selected step's weights: the best dev step when dev selected
    it, else the last), or None for a method that trains nothing."""
    cfg, m, trainable, stepper = pipeline.cfg, pipeline.metrics, pipeline.trainable, pipeline.stepper
    step = m.get("best_step") if m.get("test_best") is not None else m.get("steps_done")
    kw = dict(cfg=dict(cfg.to_dict(), save=None), fingerprint=pipeline.base_fingerprint, step=step,
              extra={"parent": cfg.delta} if cfg.delta else None)
    if hasattr(trainable, "snapshot"):  # sparse: the values now in the model are the selected step's
        return save(target, "sparse", tensors=sparse_tensors(trainable, pipeline.run_state.model), **kw)
    if trainable is not None:
        trajectory = m.get("trajectory")[:step]
        return save(target, "trajectory", extra=dict(kw.pop("extra") or {}, trajectory=trajectory), **kw)
    model = getattr(stepper, "model", None)
    if model is not None and hasattr(model, "peft_config"):
        return save(target, "lora", adapter_model=model, **kw)
    if model is not None:
        return save(target, "tensors", tensors={n: p for n, p in model.named_parameters() if p.requires_grad}, **kw)
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
