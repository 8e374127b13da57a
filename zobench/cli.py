"""The `zobench` command. Each subcommand parses its flags, calls one function and sets the exit code.

Exit codes (``zobench.errors``): 0 success; 1 a budget is broken (``check``) and nothing else; 2 bad
input or an output that cannot be written (one line on stderr, no traceback); 3 cells failed
(``run --strict``); 4 an internal error (one line; the traceback is saved to a file it names).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import signal
import sys
import threading
from pathlib import Path

from zobench.errors import (EXIT_BUDGET, EXIT_CELLS_FAILED, EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK,
                            UserError)
from zobench.outdirs import output_lock


def _add_train(sub) -> None:
    from zobench.methods import METHODS
    from zobench.spec.config import CellConfig

    p = sub.add_parser("train", help="run one fine-tuning and write its record (OUT/record.json)")
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
    _trust_flag(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other run setting, e.g. --set lr=1e-6 --set n_test=200 (repeatable)")
    p.add_argument("--out", required=True, help="directory for the run's outputs (OUT/record.json)")
    p = sub.add_parser("eval", help="evaluate a saved result (--save) on a task, without training")
    p.add_argument("--delta", required=True, help="the directory `zobench train --save` wrote")
    p.add_argument("--task", default=None, help="default: the task it was trained on")
    p.add_argument("--data-dir", dest="data_dir", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. --set n_test=872")
    p.add_argument("--out", required=True, help="directory for the record (OUT/record.json)")
    _trust_flag(p)


def _trust_flag(p) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a model's own Python code (transformers' trust_remote_code); never taken from a "
                        "suite or delta file")


def _parse_set(items: list[str]) -> dict:
    from zobench.spec.suite import parse_yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_yaml(value, f"--set {key.strip()}")
    return out


def cmd_train(args) -> int:
    from zobench.api import train
    from zobench.cell.delta import claim_target
    from zobench.files import atomic_write
    from zobench.outdirs import check_output_dir, check_output_file

    overrides = _parse_set(args.set)
    for key in ("model", "task", "method", "density", "steps", "quant", "dtype", "data_dir", "save", "delta",
                "overwrite", "trust_remote_code"):
        overrides.setdefault(key, getattr(args, key))
    if Path(args.out).suffix == ".json":
        raise UserError(f"--out {args.out}: names a directory (the record goes to OUT/record.json)")
    out = check_output_file(check_output_dir(args.out, "output") / "record.json", "record file")
    if overrides.get("save"):
        claim_target(overrides["save"], bool(overrides.get("overwrite")), "--save")
    rec = train(progress=_print_progress, **overrides)  # checked before training: a result is never lost
    atomic_write(out, json.dumps(rec.to_json(), indent=1, default=str), "record file")
    for warning in rec.warnings:
        print(f"zobench: warning: {warning}", file=sys.stderr)
    print(_train_summary(rec))
    print(f"record: {out}")
    if rec.artifact:
        print(f"saved:  {rec.artifact['path']} ({rec.artifact['kind']}, step {rec.artifact['step']}, "
              f"{rec.artifact['bytes'] / 2**20:.2f} MiB)")
    return EXIT_OK


def cmd_eval(args) -> int:
    """Train with no steps on the delta's own settings: the record's test score is the saved result's."""
    from zobench.cell.delta import read

    from zobench.spec.config import CellConfig

    meta = read(args.delta)  # checked: settings no file may choose are not among its config
    if not meta["config"].get("task") and not args.task:
        raise UserError(f"{args.delta}: trained on instruction data ({meta['config'].get('data')}), not a task: "
                        f"give --task to evaluate it on one")
    keys = set(CellConfig.keys()) - {"save", "delta", "timeout_s", "overwrite", "checkpoint", "trust_remote_code"}
    settings = {k: v for k, v in meta["config"].items() if k in keys}
    settings.update(steps=0, warmup_steps=0, eval_before=True, eval_after=False, eval_every=0, delta=args.delta)
    if args.task:
        settings.update(task=args.task, max_length=None)
    if args.data_dir:
        settings["data_dir"] = args.data_dir
    settings.update(_parse_set(args.set))
    args.set = [f"{k}={json.dumps(v)}" for k, v in settings.items()]
    for key in ("model", "task", "method", "density", "steps", "quant", "dtype", "data_dir", "save"):
        setattr(args, key, None)
    args.overwrite = False
    try:
        return cmd_train(args)
    except UserError as e:  # what the delta named (its base model, its data) failed: say which delta
        if str(args.delta) in str(e):
            raise
        raise UserError(f"--delta {args.delta}: {_one_line(e)}") from None


def _print_progress(event: dict) -> None:
    if event.get("step") and (event["step"] == event["steps"] or event["step"] % 10 == 0):
        print(f"  step {event['step']}/{event['steps']}  loss {event['loss']:.4f}", file=sys.stderr, flush=True)


def _train_summary(rec) -> str:
    m = rec.metrics
    parts = [f"method={rec.config['method']}", f"steps={m.get('steps_done')}",
             f"final_loss={m.get('final_loss'):.4f}" if m.get("final_loss") is not None else ""]
    for when in ("test_before", "test_after"):
        if m.get(when):
            parts.append(f"{when}=" + ",".join(f"{k}:{v:.3f}" for k, v in m.get(when).items()))
    if m.get("density_obtained") is not None:
        parts.append(f"density={m.get('density_obtained'):.3g}")
    if m.step_s:
        parts.append(f"step_median={m.step_s.median * 1000:.0f}ms")
    return " ".join(p for p in parts if p)


def cmd_run(args) -> int:
    from zobench.driver import run_suite, select_cells
    from zobench.influence.suite import is_influence_suite, parse_influence_suite
    from zobench.progress import SuiteProgress
    from zobench.spec.suite import load_yaml, parse_suite

    data = load_yaml(args.suite)
    if is_influence_suite(data):
        return _run_influence(parse_influence_suite(data, args.suite, Path(args.suite)), args)
    suite = parse_suite(data, args.suite, Path(args.suite))
    if args.dry_run:
        cells = select_cells(suite, args.only)
        if suite.lr_pilot is not None:
            from zobench.spec.pilot import pilot_cells

            pilots = pilot_cells(cells, suite.lr_pilot)
            for c in pilots:
                print(f"{c.cell_id}  {c.describe()}")
            print(f"{len(pilots)} pilot cells ({suite.lr_pilot.steps} steps each) choose the lr of:")
        for c in cells:
            print(f"{c.cell_id}  {c.describe()}")
        print(f"{len(cells)} cells")
        return EXIT_OK
    results = _check_run_outputs(args, suite.name)
    with output_lock(results):  # one writer per results file: every cell recorded exactly once
        executor = _executor(args)
        with SuiteProgress() as progress:
            out = run_suite(suite, Path(args.out), resume=args.resume, only=args.only, reporter=progress,
                            executor=executor, overwrite=args.overwrite, trust_remote_code=args.trust_remote_code)
    progress.console.print(progress.summary())
    report = _write_report(out, Path(args.reports))
    print(f"results: {out}\nreport:  {report}")
    failed = [r for r in progress.records if r.status not in ("ok", "unsupported")]
    return EXIT_CELLS_FAILED if failed and args.strict else EXIT_OK


def _executor(args):
    from zobench.executors import EXECUTORS

    name = args.executor or ("pool" if args.jobs > 1 else "local")
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: expected a number of cells >= 1")
    if args.address and name != "ray":
        raise UserError(f"--address {args.address}: only --executor ray joins a cluster")
    if args.retries < 0:
        raise UserError(f"--retries {args.retries}: expected a number of retries >= 0")
    cls = EXECUTORS.get(name)
    if name == "ray":
        return cls(jobs=args.jobs, address=args.address, max_retries=args.retries)
    return cls(jobs=args.jobs) if args.jobs > 1 or name != "local" else cls()


def _check_run_outputs(args, name: str) -> Path:
    """Every place a run writes is writable before the first cell starts: a measurement that cannot be
    saved is never taken. Returns the results file."""
    from zobench.outdirs import check_output_dir, check_output_file

    results = check_output_file(Path(check_output_dir(args.out, "results")) / f"{name}.jsonl", "results file")
    check_output_file(Path(check_output_dir(args.reports, "reports")) / f"{name}.md", "report")
    return results


def _run_influence(suite, args) -> int:
    from zobench.influence.bench import run_influence_suite
    from zobench.results import append_record

    if args.dry_run:
        print(f"influence suite {suite.name}: {suite.n_train} examples, scope {suite.cache.get('scope', 'lora')}")
        return EXIT_OK
    out = _check_run_outputs(args, suite.name)
    with output_lock(out):
        rec = run_influence_suite(suite, Path(args.out), progress=lambda msg: print(f"  {msg}", flush=True))
        append_record(out, rec)
    report = _write_report(out, Path(args.reports))
    print(f"results: {out}\nreport:  {report}")
    return EXIT_OK


def _write_report(results: Path, out_dir: Path) -> Path:
    from zobench.report import render_results_file

    return render_results_file(results, Path(out_dir) / f"{Path(results).stem}.md")


def cmd_report(args) -> int:
    from zobench.outdirs import check_output_file

    results = Path(args.results)
    check_output_file(Path(args.out) / f"{results.stem}.md", "report")
    print(_write_report(results, Path(args.out)))
    return EXIT_OK


def cmd_check(args) -> int:
    from zobench.analysis.check import check, estimate_missing
    from zobench.results import load_records
    from zobench.spec.suite import load_suite

    if args.results is None and not args.suite:
        raise UserError("check: give a results file, or --suite SUITE.yaml to check the suite by estimates")
    records = load_records(args.results) if args.results else []
    suite_path = args.suite or next((r.suite_file for r in records if r.suite_file), None)
    if not suite_path:
        raise UserError(f"{args.results}: records name no suite file; pass --suite SUITE.yaml")
    suite = load_suite(suite_path)
    baseline = load_records(args.baseline) if args.baseline else None
    estimates: list = []
    if not args.measured_only:
        estimates, lines = estimate_missing(suite, records)
        for line in lines:
            print(line)
    violations, notes = check(records, suite, baseline, estimates)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    for v in violations:
        print(v.line())
    if not violations:
        what = args.results or f"{suite_path} (no results)"
        extra = f"; {len(estimates)} cell(s) by estimate, peak_mib_max only" if estimates else ""
        print(f"ok: {len(suite.budgets)} budget(s) hold for {what}{extra}")
    return EXIT_BUDGET if violations else EXIT_OK


def cmd_estimate(args) -> int:
    from zobench.analysis.estimate import describe, estimate_cell
    from zobench.driver import select_cells
    from zobench.spec.suite import load_suite

    suite = load_suite(args.suite)
    rows = []
    for cell in select_cells(suite, args.only):
        row = {"cell_id": cell.cell_id, "labels": cell.labels}
        try:
            row.update(estimate_cell(cell.config))
        except UserError as e:  # one cell the estimator cannot price (e.g. unsupported) is not an error
            row["error"] = str(e)
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=1))
        return EXIT_OK
    names = [" ".join(f"{k}={v}" for k, v in r["labels"].items()) for r in rows]
    width = max([len("cell"), *map(len, names)])
    print(f"{'cell':<{width}}  {'device':<6} {'peak MiB':>9}  main components (MiB)")
    for name, r in zip(names, rows):
        if "error" in r:
            print(f"{name:<{width}}  {'-':<6} {'-':>9}  {r['error']}")
        else:
            print(f"{name:<{width}}  {r['device']:<6} {r['peak_mib']:>9.0f}  {describe(r)}")
    # Which constants each figure stands on: measured on this machine, or a default (CUDA without a GPU: the
    # floor measured on an H200).
    seen = {r["device"]: r for r in rows if "calibration" in r}
    for device, r in sorted(seen.items()):
        cal = r["calibration"]
        how = "measured on this machine" if cal.get("source") == "measured" else f"default ({cal.get('why')})"
        print(f"framework footprint on {device}: {r['breakdown']['framework_mib']:.0f} MiB, {how}")
    return EXIT_OK


class Parser(argparse.ArgumentParser):
    """argparse, except that a usage error is one line and a hint, not a usage block (exit 2)."""

    argv: list[str] = []  # the command line being parsed (main sets it), to name a mistyped flag

    def error(self, message: str):
        known = {s for a in self._actions for s in a.option_strings}
        unknown = [t.split("=", 1)[0] for t in self.argv if t.startswith("--") and t.split("=", 1)[0] not in known]
        if unknown and "unrecognized" not in message:
            # argparse names a missing required flag first; the typo that caused it is what to fix
            close = difflib.get_close_matches(unknown[0], sorted(known), n=1, cutoff=0.75)
            message = f"unknown flag {unknown[0]}" + (f" (did you mean {close[0]}?)" if close else "") + \
                f"; {message}"
        _say(f"{self.prog}: error: {message} (see `{self.prog} --help`)")
        raise SystemExit(EXIT_INPUT)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="zobench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    p = sub.add_parser("run", help="run a suite: every cell in a fresh process, then the report")
    p.add_argument("suite")
    p.add_argument("--out", default="results", help="results directory (default results/)")
    p.add_argument("--reports", default="reports", help="report directory (default reports/)")
    p.add_argument("--resume", action="store_true", help="skip cells that already have an ok record")
    p.add_argument("--only", default=None, metavar="SELECTOR", help="e.g. method=sensitive,quant=nf4|int8")
    p.add_argument("--dry-run", action="store_true", help="print the expanded cells and exit")
    p.add_argument("--strict", action="store_true", help="exit 3 if any cell failed")
    p.add_argument("--overwrite", action="store_true", help="replace deltas a suite's `save:` finds already there")
    _trust_flag(p)
    p.add_argument("--jobs", type=int, default=1, help="cells at once on this machine, each in its own process")
    p.add_argument("--executor", default=None,
                   help="local (default) | pool (the default with --jobs > 1) | ray (needs zobench[ray])")
    p.add_argument("--address", default=None,
                   help="with --executor ray: an existing cluster (auto, ray://HOST:10001); else a private "
                        "local Ray")
    p.add_argument("--retries", type=int, default=2,
                   help="with --executor ray: retries of a cell whose worker or node died (default 2)")
    p = sub.add_parser("report", help="markdown report with plots from a results file")
    p.add_argument("results")
    p.add_argument("--out", default="reports", help="report directory (default reports/): OUT/<results>.md")
    p = sub.add_parser("check", help="exit 1 when a budget is broken")
    p.add_argument("results", nargs="?", default=None,
                   help="results JSONL (optional with --suite: then every cell is checked by its estimate)")
    p.add_argument("--suite", default=None, help="default: the suite file named in the records")
    p.add_argument("--baseline", default=None, help="records from the same machine to compare latency with")
    p.add_argument("--measured-only", action="store_true",
                   help="do not check cells without an ok measured record by their estimates")
    p = sub.add_parser("estimate", help="predicted peak memory of every cell of a suite (no weights loaded)")
    p.add_argument("suite")
    p.add_argument("--only", default=None, metavar="SELECTOR", help="e.g. method=sensitive,quant=nf4")
    p.add_argument("--json", action="store_true", help="machine-readable: one object per cell")
    from zobench.influence.commands import add_parsers

    add_parsers(sub)
    return parser


def cmd_influence(args) -> int:
    from zobench.influence import commands

    return {"cache": commands.cache, "query": commands.query, "train": commands.train}[args.influence_command](args)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "run": cmd_run, "report": cmd_report, "check": cmd_check,
            "estimate": cmd_estimate, "influence": cmd_influence}


def main(argv: list[str] | None = None) -> int:
    """Run one command. This is the one guard at the command boundary: whatever happens below, the exit
    code means what the module docstring says, and the user sees one line, not a traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    Parser.argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)  # a bad flag: one line and a --help hint, exit 2 (Parser.error)
    previous = _stop_on_sigterm()
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        _say(f"zobench: error: {_one_line(e)}")
        return EXIT_INPUT
    except KeyboardInterrupt:
        _say("zobench: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`zobench estimate ... | head`): nothing to report
        return EXIT_OK
    except OSError as e:  # the machine refused: a path not readable or writable, a full disk
        where = f"{e.filename}: " if e.filename else ""
        _say(f"zobench: error: {where}{e.strerror or _first_line(e)}")
        return EXIT_INPUT
    except Exception as e:
        if os.environ.get("ZOBENCH_DEBUG"):
            raise
        saved = _save_traceback()
        _say(f"zobench: internal error: {type(e).__name__}: {_first_line(e)} ({saved}; please report it, "
             f"or set ZOBENCH_DEBUG=1 to see it here)")
        return EXIT_INTERNAL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _stop_on_sigterm():
    """SIGTERM (``kill``, a scheduler's stop, ``timeout``) stops a command as Ctrl-C does: running cells are
    killed through the executor, records already written stay. Without this, the default action ends the
    process at once and a running cell's process lives on. Returns the handler to restore (None where
    none was installed: not the main thread, or someone else's handler is there)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    return signal.SIG_DFL


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _one_line(e: UserError) -> str:
    """A bad-input message as one line: a newline inside it (a key or path read from a file) is shown
    escaped rather than splitting the message or cutting it short."""
    return str(e).strip().replace("\r", "\\r").replace("\n", "\\n") or type(e).__name__


def _say(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass


def _save_traceback() -> str:
    import tempfile
    import traceback

    try:
        fd, path = tempfile.mkstemp(prefix="zobench-traceback-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(traceback.format_exc())
        return f"traceback in {path}"
    except OSError:
        return "traceback not saved: the temporary directory is not writable"


if __name__ == "__main__":
    sys.exit(main())
