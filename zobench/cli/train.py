"""`zobench train`: one fine-tuning, its record in OUT/record.json (and the result kept with --save).
`zobench eval`: a kept result scored on a task, without training (a train of no steps on its settings)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from zobench import api
from zobench.cell.delta import claim_target, read
from zobench.cli.common import HELP, one_line, trust_flag
from zobench.errors import EXIT_OK, UserError
from zobench.files import atomic_write, read_json
from zobench.methods import METHODS
from zobench.outdirs import check_output_dir, check_output_file
from zobench.spec.config import CellConfig
from zobench.spec.yaml_text import parse_yaml


def add_parser(sub) -> None:
    p = sub.add_parser("train", help=HELP["train"])
    defaults = CellConfig()
    p.add_argument("--model", default=defaults.model, help="smollm2 | random:<config> | dir | hub id | file.gguf")
    p.add_argument("--task", default=defaults.task)
    p.add_argument("--method", default=defaults.method, help=" | ".join(METHODS.names()))
    p.add_argument("--density", type=float, default=defaults.density)
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--quant", default=defaults.quant)
    p.add_argument("--dtype", default=defaults.dtype)
    p.add_argument("--data-dir", dest="data_dir", default=None)
    p.add_argument("--save", default=None, help="keep the trained result in this directory (a small delta)")
    p.add_argument("--overwrite", action="store_true", help="replace a delta already at --save")
    p.add_argument("--delta", default=None, help="start from a result saved with --save (on its base model)")
    trust_flag(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other run setting, e.g. --set lr=1e-6 --set n_test=200 (repeatable)")
    p.add_argument("--out", required=True, help="directory for the run's outputs (OUT/record.json)")
    memory_flag(p)
    p = sub.add_parser("eval", help=HELP["eval"])
    p.add_argument("--delta", required=True, help="the directory `zobench train --save` wrote")
    p.add_argument("--task", default=None, help="default: the task it was trained on")
    p.add_argument("--data-dir", dest="data_dir", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. --set n_test=872")
    p.add_argument("--out", required=True, help="directory for the record (OUT/record.json)")
    trust_flag(p)
    memory_flag(p)


def memory_flag(p) -> None:
    p.add_argument("--no-memory-check", action="store_true",
                   help="start even if the run's estimated peak is more than the memory this machine has "
                        "available (by default refused, with both figures)")


def run(args) -> int:
    return _eval(args) if args.command == "eval" else _train(args)


def _train(args) -> int:
    overrides = _parse_set(args.set)
    for key in ("model", "task", "method", "density", "steps", "quant", "dtype", "data_dir", "save", "delta",
                "overwrite", "trust_remote_code"):
        overrides.setdefault(key, getattr(args, key))
    out = _record_target(args.out)
    if overrides.get("save"):
        claim_target(overrides["save"], bool(overrides.get("overwrite")), "--save")
    overrides.setdefault("predictions", str(out.parent / "predictions.npz"))
    rec = api.train(progress=_print_progress, memory_check=not args.no_memory_check,
                    **overrides)  # checked before training: a result is never lost
    if rec.predictions:  # named relative to the record, so the folder moves as one
        rec.predictions["path"] = os.path.relpath(rec.predictions["path"], out.parent)
    rec.config.pop("predictions", None)
    atomic_write(out, json.dumps(rec.to_json(), indent=1, default=str), "record file")
    for warning in rec.warnings:
        print(f"zobench: warning: {warning}", file=sys.stderr)
    print(_summary(rec))
    print(f"record: {out}")
    if rec.artifact:
        print(f"saved:  {rec.artifact['path']} ({rec.artifact['kind']}, step {rec.artifact['step']}, "
              f"{rec.artifact['bytes'] / 2**20:.2f} MiB)")
    return EXIT_OK


# what eval fixes: it trains nothing, on the delta's own model and method, and writes no delta
EVAL_FIXED = ("steps", "warmup_steps", "method", "model", "delta", "save", "overwrite", "eval_every", "eval_before",
              "eval_after")


def _eval(args) -> int:
    """Train with no steps on the delta's own settings: the record's test score is the saved result's."""
    _record_target(args.out)  # an --out that cannot be written is its own error, not the delta's
    meta = read(args.delta)  # checked: settings no file may choose are not among its config
    if not meta["config"].get("task") and not args.task:
        raise UserError(f"{args.delta}: trained on instruction data ({meta['config'].get('data')}), not a task: "
                        f"give --task to evaluate it on one")
    keys = set(CellConfig.keys()) - {"save", "delta", "timeout_s", "overwrite", "checkpoint", "predictions",
                                     "trust_remote_code", "malloc"}  # malloc: this process's, not the delta's
    settings = {k: v for k, v in meta["config"].items() if k in keys}
    settings.update(steps=0, warmup_steps=0, eval_before=True, eval_after=False, eval_every=0, delta=args.delta)
    if args.task:
        settings.update(task=args.task, max_length=None)
    if args.data_dir:
        settings["data_dir"] = args.data_dir
    extra = _parse_set(args.set)
    fixed = [k for k in extra if k in EVAL_FIXED]
    if fixed:
        raise UserError(f"--set {fixed[0]}: eval evaluates the saved result as it is; it cannot set "
                        f"{', '.join(EVAL_FIXED)} (train with `zobench train --delta` to go on from it)")
    settings.update(extra)
    args.set = [f"{k}={json.dumps(v, default=str)}" for k, v in settings.items()]
    for key in ("model", "task", "method", "density", "steps", "quant", "dtype", "data_dir", "save"):
        setattr(args, key, None)
    args.overwrite = False
    try:
        return _train(args)
    except UserError as e:  # what the delta named (its base model, its data) failed: say which delta
        if str(args.delta) in str(e):
            raise
        raise UserError(f"--delta {args.delta}: {one_line(e)}") from None


def _record_target(out_dir: str) -> Path:
    """OUT/record.json, checked before any work: OUT a writable directory, the record and the predictions
    beside it either absent or a run's own (``_refuse_foreign_outputs``)."""
    if Path(out_dir).suffix == ".json":
        raise UserError(f"--out {out_dir}: names a directory (the record goes to OUT/record.json)")
    out = check_output_file(check_output_dir(out_dir, "output") / "record.json", "record file")
    _refuse_foreign_outputs(out)
    return out


def _is_zobench_record(path: Path) -> dict | None:
    """The record at ``path`` if it is one ``zobench train`` / ``eval`` wrote (a JSON object with a record's
    schema and cell id), else None."""
    try:
        obj = read_json(path, "record file")
    except UserError:
        return None
    return obj if isinstance(obj, dict) and isinstance(obj.get("schema"), int) and "cell_id" in obj else None


def _refuse_foreign_outputs(record: Path) -> None:
    """A run replaces OUT/record.json and OUT/predictions.npz: only when they are a run's (the record one
    zobench wrote, the predictions the ones that record names), never a file of the same name the user keeps
    there."""
    old = _is_zobench_record(record) if record.exists() else None
    if record.exists() and old is None:
        raise UserError(f"{record}: exists and is not a record zobench wrote; zobench only replaces what it "
                        f"wrote (choose another --out)")
    predictions = record.parent / "predictions.npz"
    if predictions.exists() or predictions.is_symlink():
        named = (old or {}).get("predictions") or {}
        if not (isinstance(named, dict) and named.get("path") == predictions.name):
            raise UserError(f"{predictions}: exists and is not the predictions of a record zobench wrote there; "
                            f"zobench only replaces what it wrote (choose another --out)")
        check_output_file(predictions, "predictions file")


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_yaml(value, f"--set {key.strip()}", lines=False)
    return out


def _print_progress(event: dict) -> None:
    if event.get("step") and (event["step"] == event["steps"] or event["step"] % 10 == 0):
        print(f"  step {event['step']}/{event['steps']}  loss {event['loss']:.4f}", file=sys.stderr, flush=True)


def _summary(rec) -> str:
    """One line: what ran and what it scored. An evaluation (no steps, a delta loaded) names the delta's step
    and its score as ``test``, not ``steps=0`` and ``test_before``."""
    m = rec.metrics
    delta = m.get("delta") if not m.get("steps_done") else None
    if delta:
        parts = [f"method={delta.get('method') or rec.config['method']}", f"delta_step={delta.get('step')}"]
        names = {"test_before": "test"}
    else:
        parts = [f"method={rec.config['method']}", f"steps={m.get('steps_done')}",
                 f"final_loss={m.get('final_loss'):.4f}" if m.get("final_loss") is not None else ""]
        names = {}
    for when in ("test_before", "test_after", "best_dev"):
        scores = {k: v for k, v in (m.get(when) or {}).items() if isinstance(v, (int, float))}
        if scores:  # a split with no examples (n_test 0) has no score to show
            parts.append(f"{names.get(when, when)}=" + ",".join(f"{k}:{v:.3f}" for k, v in scores.items()))
    if m.get("density_obtained") is not None:
        parts.append(f"density={m.get('density_obtained'):.3g}")
    if m.step_s:
        parts.append(f"step_median={m.step_s.median * 1000:.0f}ms")
    return " ".join(p for p in parts if p)
