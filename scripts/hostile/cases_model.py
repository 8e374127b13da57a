"""Silently wrong models: a delta whose files are spoiled must be refused (exit 2, naming the delta), never
loaded into a model that is quietly not the trained one, and never crash (exit 4)."""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np

from hostile.common import DELETE, cache_with_delta, delta_case, eval_delta, meta_edit, set_in
from hostile.fixtures import edit_json, nested, spoil_sparse, st_read, st_write
from hostile.harness import Case

CLS = "model"


def _sp(how):
    return lambda path, ctx: spoil_sparse(path, how)


def _set(a, i, v):
    a = a.copy()
    a.flat[i] = v
    return a


def _nan(t, i, v): t[v] = _set(t[v], 0, np.nan)
def _inf(t, i, v): t[v] = _set(t[v], 0, np.inf)
def _neg(t, i, v): t[i] = _set(t[i], 0, -1)
def _frac(t, i, v): t[i] = t[i].astype(np.float32) + 0.5
def _dup(t, i, v): t[i] = _set(t[i], 1, t[i][0])
def _oob(t, i, v): t[i] = _set(t[i], 0, 10**9)
def _huge64(t, i, v): t[i] = _set(t[i].astype(np.int64), 0, 2**40)
def _short(t, i, v): t[v] = t[v][:-1]
def _novalue(t, i, v): del t[v]
def _2d(t, i, v): t[i] = t[i].reshape(1, -1)


def _rename(t, i, v):
    t["model.layers.99.mlp.up_proj.weight::index"], t["model.layers.99.mlp.up_proj.weight::value"] = t.pop(i), t.pop(v)


def _raw(fn):
    """A spoil that rewrites delta.safetensors' bytes: fn(bytes) -> bytes."""
    def spoil(path, ctx):
        st = path / "delta.safetensors"
        st.write_bytes(fn(st.read_bytes()))
    return spoil


def _header_len(b):
    return struct.pack("<Q", 2**62) + b[8:]


def _beyond(b):
    n = struct.unpack("<Q", b[:8])[0]
    return struct.pack("<Q", n + 10**6) + b[8:]


def _garbage(b):
    n = struct.unpack("<Q", b[:8])[0]
    return b[:8] + b"{" * n + b[8 + n:]


def _offsets(b):
    n = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8:8 + n])
    name = sorted(k for k in header if k != "__metadata__")[0]
    header[name]["data_offsets"] = [0, 10**12]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b[8 + n:]


def _st_dir(path, ctx):
    (path / "delta.safetensors").unlink()
    (path / "delta.safetensors").mkdir()


def _fifo(path, ctx):
    (path / "delta.json").unlink()
    os.mkfifo(path / "delta.json")


def _parent(value):
    def spoil(path, ctx):
        edit_json(path / "delta.json", set_in("parent", value(path, ctx) if callable(value) else value))
    return spoil


def _cycle(path, ctx):
    other = ctx.copy("sparse", "in/e")
    edit_json(path / "delta.json", set_in("parent", str(other)))
    edit_json(other / "delta.json", set_in("parent", str(path)))


def _chain(remove):
    def setup(ctx):
        for name in ("sparse", "child", "grandchild"):
            ctx.copy(name, f"in/{name}")
        if remove:
            shutil.rmtree(ctx.p(f"in/{remove}"))
    return setup


D = delta_case
SPARSE = [
    D(CLS, "sparse-nan-value", "sparse", _sp(_nan), note="NaN written into the weights silently"),
    D(CLS, "sparse-inf-value", "sparse", _sp(_inf)),
    D(CLS, "sparse-negative-index", "sparse", _sp(_neg), note="-1 wraps around to the last weight"),
    D(CLS, "sparse-fractional-index", "sparse", _sp(_frac), note="float indices, truncated by .long()"),
    D(CLS, "sparse-duplicate-index", "sparse", _sp(_dup), note="two values for one weight: which wins?"),
    D(CLS, "sparse-index-out-of-range", "sparse", _sp(_oob)),
    D(CLS, "sparse-int64-index-2pow40", "sparse", _sp(_huge64)),
    D(CLS, "sparse-values-shorter-than-indices", "sparse", _sp(_short)),
    D(CLS, "sparse-index-without-values", "sparse", _sp(_novalue)),
    D(CLS, "sparse-unknown-parameter-name", "sparse", _sp(_rename)),
    D(CLS, "sparse-2d-index-tensor", "sparse", _sp(_2d)),
    D(CLS, "safetensors-empty-file", "sparse", _raw(lambda b: b"")),
    D(CLS, "safetensors-header-length-2pow62", "sparse", _raw(_header_len)),
    D(CLS, "safetensors-header-beyond-eof", "sparse", _raw(_beyond)),
    D(CLS, "safetensors-header-not-json", "sparse", _raw(_garbage)),
    D(CLS, "safetensors-offsets-out-of-range", "sparse", _raw(_offsets)),
    D(CLS, "safetensors-truncated", "sparse", _raw(lambda b: b[:len(b) // 2])),
    D(CLS, "safetensors-is-a-directory", "sparse", _st_dir),
    D(CLS, "safetensors-missing", "sparse", lambda p, c: (p / "delta.safetensors").unlink()),
]

JSON = [
    D(CLS, "delta-json-not-json", "sparse", lambda p, c: (p / "delta.json").write_text("{format: 1,")),
    D(CLS, "delta-json-a-list", "sparse", meta_edit(lambda m: [m])),
    D(CLS, "delta-json-a-string", "sparse", meta_edit(lambda m: "sparse")),
    D(CLS, "delta-json-no-base", "sparse", meta_edit(set_in("base", DELETE))),
    D(CLS, "delta-json-base-is-string", "sparse", meta_edit(set_in("base", "random:tiny-llama"))),
    D(CLS, "delta-json-no-fingerprint", "sparse", meta_edit(set_in("base.fingerprint", DELETE))),
    D(CLS, "delta-json-no-config", "sparse", meta_edit(set_in("config", DELETE))),
    D(CLS, "delta-json-config-is-list", "sparse", meta_edit(set_in("config", ["random:tiny-llama"]))),
    D(CLS, "delta-json-config-model-is-int", "sparse", meta_edit(set_in("config.model", 5))),
    D(CLS, "delta-json-no-step", "sparse", meta_edit(set_in("step", DELETE))),
    D(CLS, "delta-json-step-is-string", "sparse", meta_edit(set_in("step", "3"))),
    D(CLS, "delta-json-step-negative", "sparse", meta_edit(set_in("step", -5))),
    D(CLS, "delta-json-step-fractional", "sparse", meta_edit(set_in("step", 2.5))),
    D(CLS, "delta-json-nested-100k", "sparse", lambda p, c: (p / "delta.json").write_text(nested(100_000)),
      note="json.loads raises RecursionError, which is not a JSONDecodeError"),
    D(CLS, "delta-json-is-a-fifo", "sparse", _fifo, bound_s=20, note="reading a FIFO blocks forever"),
    D(CLS, "parent-is-int", "sparse", _parent(5)),
    D(CLS, "parent-is-itself", "sparse", _parent(lambda p, c: str(p)), note="applied twice, or looped"),
    D(CLS, "parent-cycle-of-two", "sparse", _cycle),
    Case(CLS, "grandparent-folder-removed", ["eval", "--delta", "grandchild", "--out", "{sb}/out/e"],
         setup=_chain("sparse"), cwd="in", needles=("sparse",), outputs=("out",), heavy=True,
         needs=("sparse", "child", "grandchild"),
         note="grandchild -> child -> sparse with sparse gone: the chain must be followed to the end (run "
              "from the deltas' folder, where the relative parents resolve under either rule)"),
    Case(CLS, "relative-parent-used-from-elsewhere", ["eval", "--delta", "{sb}/in/child", "--out", "{sb}/out/e"],
         expect=(0,), setup=_chain(None), outputs=("out",), heavy=True, needs=("sparse", "child", "grandchild"),
         note="child's parent is 'sparse' (relative): it resolves against the delta's own folder, so this works"),
    Case(CLS, "relative-grandparent-used-from-elsewhere",
         ["eval", "--delta", "{sb}/in/grandchild", "--out", "{sb}/out/e"], expect=(0,), setup=_chain(None),
         outputs=("out",), heavy=True, needs=("sparse", "child", "grandchild")),
]

TRAJ = [
    D(CLS, "trajectory-step-negative", "traj", meta_edit(set_in("step", -1))),
    D(CLS, "trajectory-step-1e18", "traj", meta_edit(set_in("step", 10**18)), bound_s=60),
    D(CLS, "trajectory-step-beyond-its-length", "traj", meta_edit(set_in("step", 100)),
      note="3 steps recorded, 100 claimed: replaying 3 and calling it 100 is silently wrong"),
    D(CLS, "trajectory-not-a-list", "traj", meta_edit(set_in("trajectory", "abc"))),
    D(CLS, "trajectory-entries-wrong-shape", "traj", meta_edit(set_in("trajectory", [["a", "b"]] * 3))),
    D(CLS, "trajectory-nan-coefficient", "traj",
      lambda p, c: (p / "delta.json").write_text((p / "delta.json").read_text().replace(
          '"trajectory": [', '"trajectory": [[[0, NaN]], ', 1)), note="JSON NaN is accepted by json.loads"),
]


def _tensors(how):
    def spoil(path, ctx):
        t = st_read(path / "delta.safetensors")
        how(t)
        st_write(path / "delta.safetensors", t)
    return spoil


def _first(t):
    return sorted(t)[0]


TENSORS = [
    D(CLS, "tensors-wrong-shape", "tensors",
      _tensors(lambda t: t.__setitem__(_first(t), t[_first(t)].reshape(-1)[:7]))),
    D(CLS, "tensors-unknown-name", "tensors", _tensors(lambda t: t.__setitem__("not.a.parameter", t.pop(_first(t)))),
      note="a tensor the model does not have is silently skipped today"),
    D(CLS, "tensors-nan", "tensors", _tensors(lambda t: t.__setitem__(_first(t), _set(t[_first(t)], 0, np.nan)))),
]


def _adapter(how):
    def spoil(path, ctx):
        how(path / "adapter")
    return spoil


def _cfg(how):
    return _adapter(lambda a: edit_json(a / "adapter_config.json", how))


LORA_ARGS = cache_with_delta("in/d", scope="lora")
LORA = [
    D(CLS, "lora-config-not-json", "lora", _adapter(lambda a: (a / "adapter_config.json").write_text("{r: 8")),
      argv=LORA_ARGS),
    D(CLS, "lora-config-is-list", "lora", _cfg(lambda c: [c]), argv=LORA_ARGS),
    D(CLS, "lora-config-r-is-string", "lora", _cfg(set_in("r", "eight")), argv=LORA_ARGS),
    D(CLS, "lora-config-targets-missing-modules", "lora", _cfg(set_in("target_modules", ["no_such_proj"])),
      argv=LORA_ARGS),
    D(CLS, "lora-config-unknown-peft-type", "lora", _cfg(set_in("peft_type", "EVIL")), argv=LORA_ARGS),
    D(CLS, "lora-config-missing", "lora", _adapter(lambda a: (a / "adapter_config.json").unlink()), argv=LORA_ARGS),
    D(CLS, "lora-weights-corrupt", "lora",
      _adapter(lambda a: (a / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{{{{")),
      argv=LORA_ARGS),
    D(CLS, "lora-eval-bad-config", "lora", _cfg(set_in("lora_alpha", [1, 2])),
      argv=eval_delta() + ["--task", "sst2"], note="the same through zobench eval"),
]
for c in LORA:
    c.needs = ("lora", "data.jsonl")

CASES = SPARSE + JSON + TRAJ + TENSORS + LORA
