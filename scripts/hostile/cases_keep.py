"""What must keep holding (regressions): a stopped run resumes, pickles and shell strings are refused,
deltas from elsewhere are refused, caches are not reused for other data."""

from __future__ import annotations

import json
import signal
import subprocess
from collections import Counter

import numpy as np

from hostile.common import delta_case, eval_delta, meta_edit, results_lines, run_suite_args, set_in
from hostile.fixtures import ROWS, TRAIN, _Payload, pickle_payload, suite_text
from hostile.harness import Case
from hostile.runners import all_of, path_exists, proc_with, signal_runner

CLS = "keep"
TWO = suite_text(methods=("forward", "random"), steps=400)


def _resume(ctx, res):
    r = subprocess.run(ctx.argv(run_suite_args("in/s.yaml", "--resume")), cwd=ctx.work, env=ctx.env(),
                       capture_output=True, text=True, timeout=240)
    res.notes.append(f"--resume exit {r.returncode}")
    if r.returncode != 0 or "Traceback" in r.stderr:
        res.why.append(f"--resume after SIGTERM: exit {r.returncode}: {r.stderr.strip()[-150:]}")
        return
    recs = results_lines(ctx.p("out/r/t.jsonl"))
    ok = Counter(x["cell_id"] for x in recs if x.get("status") == "ok")
    if len(ok) != 2 or any(n != 1 for n in ok.values()):
        res.why.append(f"after --resume: ok records per cell {dict(ok)} (want 2 cells, once each)")


def _pickled(rel: str, remove: str | None = None):
    def spoil(path, ctx):
        if remove:
            (path / remove).unlink()
        (path / rel).write_bytes(pickle_payload(ctx.markers / "PWNED-pickle"))
    return spoil


def _norms_pickle(ctx):
    cache = ctx.copy("cache", "in/cache")
    np.save(cache / "row_norms.f32.npy", np.array([_Payload(str(ctx.markers / "PWNED-npy"))], dtype=object),
            allow_pickle=True)


def _sketch_truncated(ctx):
    cache = ctx.copy("cache", "in/cache")
    data = (cache / "sketch.f16").read_bytes()
    (cache / "sketch.f16").write_bytes(data[:len(data) // 2])


QUERY = ["influence", "query", "--cache", "{sb}/in/cache", "--instruction", "Say the number 3", "--generation",
         "The number is 3.", "--top", "3"]


def _shell(argv: list[str], name: str, heavy: bool = False, needs: tuple = ()):
    return Case(CLS, name, argv, needles=(), outputs=("out",), bound_s=60, heavy=heavy, needs=needs,
                note="the string reaches no shell: refused as a name, the marker never appears")


CASES = [
    Case(CLS, "sigterm-mid-run-then-resume", None, expect=(130,), setup=lambda c: c.write("in/s.yaml", TWO),
         runner=signal_runner(run_suite_args("in/s.yaml"),
                              all_of(path_exists("out/r/t.jsonl", lines=1), proc_with("spawn_main")),
                              signal.SIGTERM, within=30, settle=1, then=_resume),
         outputs=("out",), heavy=True, bound_s=300,
         note="SIGTERM while the second cell trains: exit 130, no cell left; --resume records each cell once"),
    Case(CLS, "sigkill-mid-run-takes-the-cell", None, expect=(-9,),
         setup=lambda c: c.write("in/s.yaml", suite_text(methods=("random",), steps=1_000_000)),
         runner=signal_runner(run_suite_args("in/s.yaml"), proc_with("spawn_main"), signal.SIGKILL, within=10,
                              settle=2), outputs=("out",), heavy=True, bound_s=200),
    delta_case(CLS, "sparse-safetensors-is-a-pickle", "sparse", _pickled("delta.safetensors"),
               note="a pickle where a safetensors file is expected: refused, never unpickled"),
    delta_case(CLS, "sparse-pt-file-instead", "sparse", _pickled("delta.pt", remove="delta.safetensors"),
               needles=()),
    delta_case(CLS, "lora-bin-pickle-instead", "lora",
               _pickled("adapter/adapter_model.bin", remove="adapter/adapter_model.safetensors"),
               argv=["influence", "cache", "--delta", "{sb}/in/d", "--data", "{fx}/data.jsonl", "--scope", "lora",
                     "--k", "16", "--max-length", "32", "--out", "{sb}/out/c"], needles=()),
    Case(CLS, "cache-row-norms-pickle", QUERY, expect=(0,), setup=_norms_pickle, heavy=True, needs=("cache",),
         outputs=("in/cache/row_norms.f32.npy",), note="np.load(allow_pickle=False): recomputed, never run"),
    Case(CLS, "cache-sketch-truncated", QUERY, setup=_sketch_truncated, needles=("sketch.f16",), needs=("cache",)),
    Case(CLS, "cache-out-holds-other-data", ["influence", "cache", "--model", "random:tiny-llama", "--data",
         "{sb}/in/other.jsonl", "--scope", "all", "--k", "64", "--max-length", "32", "--out", "{sb}/in/cache"],
         setup=lambda c: (c.copy("cache", "in/cache"), c.write("in/other.jsonl", "".join(
             json.dumps(dict(r, output=r["output"] + "!")) + "\n" for r in ROWS))),
         needles=("{sb}/in/cache",), heavy=True, needs=("cache",), note="never resumed over other data's rows"),
    Case(CLS, "suite-yaml-python-tag", ["run", "{sb}/in/s.yaml", "--dry-run"],
         setup=lambda c: c.write("in/s.yaml", f"name: !!python/object/apply:os.system "
                                              f"['touch {c.markers}/PWNED-yaml']\n"),
         needles=("{sb}/in/s.yaml",), bound_s=30),
    _shell(TRAIN + ["--model", "$(touch {markers}/PWNED-model)", "--out", "{sb}/out/run"], "model-name-shell-string"),
    _shell(TRAIN + ["--data-dir", "`touch {markers}/PWNED-datadir`", "--out", "{sb}/out/run"],
           "data-dir-shell-string"),
    _shell(["run", "{fx}/suite.yaml", "--out", "{sb}/out/r", "--reports", "{sb}/out/rep", "--executor", "ray",
            "--address", "$(touch {markers}/PWNED-address)"], "ray-address-shell-string", heavy=True,
           needs=("suite.yaml",)),
]
CASES[-1].env = {"TMPDIR": "{rt}", "RAY_TMPDIR": "{rt}"}
CASES += [
    delta_case(CLS, "delta-kind-unknown", "sparse", meta_edit(set_in("kind", "pickle"))),
    delta_case(CLS, "delta-format-2", "sparse", meta_edit(set_in("format", 2))),
    delta_case(CLS, "parent-folder-missing", "sparse", meta_edit(set_in("parent", "/nonexistent/hostile/parent")),
               needles=("/nonexistent/hostile/parent",)),
    delta_case(CLS, "parent-not-a-delta", "sparse", lambda p, c: meta_edit(set_in("parent", str(c.p("other"))))(p, c),
               needles=("other",)),
    delta_case(CLS, "base-fingerprint-mismatch", "sparse", meta_edit(set_in("base.fingerprint", "0123456789abcdef"))),
    Case(CLS, "eval-delta-missing", eval_delta("in/nothing"), needles=("{sb}/in/nothing",), bound_s=30),
    Case(CLS, "duplicate-ids-refused", ["influence", "cache", "--model", "random:tiny-llama", "--data",
         "{sb}/in/data.jsonl", "--out", "{sb}/out/c"],
         setup=lambda c: c.write("in/data.jsonl", "".join(json.dumps(dict(r, id="x")) + "\n" for r in ROWS)),
         needles=("{sb}/in/data.jsonl",), bound_s=30),
]
