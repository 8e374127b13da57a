"""Valid artifacts built once per harness run with the tree under test, and the tools to spoil them.

Built (under <run>/fixtures, the working directory of every build, so saved parent paths are relative):
    sparse/ child/ grandchild/   a sparse delta, one trained from it (parent "sparse"), one from that
    traj/ tensors/ lora/         a dense ZO trajectory, first-order tensors, a LoRA adapter delta
    data.jsonl cache/            an instruction file and an influence cache over it (scope all, k 64)
    suite.yaml results/t.jsonl   a two-cell tiny suite and its results
Everything else a case needs (payloads, bombs, spoiled copies) is written by the case itself.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import time
from pathlib import Path

import numpy as np

TINY = {"n_train": 16, "n_dev": 0, "n_test": 0, "batch_size": 4, "max_length": 32, "warmup_steps": 1,
        "eval_before": False, "eval_after": False}
TINY_SET = [a for k, v in TINY.items() for a in ("--set", f"{k}={json.dumps(v)}")]
TRAIN = ["train", "--model", "random:tiny-llama", "--steps", "3", *TINY_SET]
ROWS = [{"instruction": f"Say the number {i}", "input": "", "output": f"The number is {i}."} for i in range(8)]


class FixtureMissing(Exception):
    pass


def suite_text(name: str = "t", methods=("forward", "random"), **defaults) -> str:
    lines = [f"name: {name}", "reference: false", "timeout_s: 300", "defaults:"]
    settings = {"model": "random:tiny-llama", "steps": 3, "density": 0.05, **TINY, **defaults}
    lines += [f"  {k}: {json.dumps(v)}" for k, v in settings.items()]
    lines += ["matrix:", f"  method: [{', '.join(methods)}]"]
    return "\n".join(lines) + "\n"


BUILDS = [
    ("sparse", TRAIN + ["--method", "random", "--density", "0.05", "--save", "sparse", "--out", "runs/sparse"]),
    ("child", TRAIN + ["--method", "random", "--density", "0.05", "--delta", "sparse", "--save", "child",
                       "--out", "runs/child"]),
    ("grandchild", TRAIN + ["--method", "random", "--density", "0.05", "--delta", "child", "--save",
                            "grandchild", "--out", "runs/grandchild"]),
    ("traj", TRAIN + ["--method", "full", "--set", "lr=1e-3", "--save", "traj", "--out", "runs/traj"]),
    ("tensors", TRAIN + ["--method", "fo-sgd", "--set", "lr=1e-2", "--save", "tensors", "--out", "runs/tensors"]),
    ("lora", ["influence", "train", "--model", "random:tiny-llama", "--data", "data.jsonl", "--method", "lora",
              "--steps", "2", "--batch-size", "4", "--max-length", "32", "--save", "lora"]),
    ("cache", ["influence", "cache", "--model", "random:tiny-llama", "--data", "data.jsonl", "--scope", "all",
               "--k", "64", "--max-length", "32", "--out", "cache"]),
    ("results", ["run", "suite.yaml", "--out", "results", "--reports", "reports"]),
]


class Fixtures:
    def __init__(self, root: Path):
        self.root = root
        self.built: dict[str, Path] = {}
        self.errors: dict[str, str] = {}
        self.seconds: dict[str, float] = {}

    def path(self, name: str) -> Path:
        if name not in self.built:
            raise FixtureMissing(f"fixture {name!r} not built: {self.errors.get(name, 'not requested')}")
        return self.built[name]

    def build(self, run, wanted: set[str], log=print) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
        (self.root / "suite.yaml").write_text(suite_text())
        self.built["data.jsonl"], self.built["suite.yaml"] = self.root / "data.jsonl", self.root / "suite.yaml"
        order = {"child": {"sparse"}, "grandchild": {"sparse", "child"}}
        need = set(wanted)
        for name in list(need):
            need |= order.get(name, set())
        env = {k: v for k, v in os.environ.items() if not k.startswith("HOSTILE_")}
        env.update(HOME=str(self.root / "home"), HF_HUB_OFFLINE="1", ZOBENCH_CACHE=run.cache,
                   MPLCONFIGDIR=str(run.root / "mpl"), PYTHONPATH=str(run.tree), TOKENIZERS_PARALLELISM="false")
        for name, args in BUILDS:
            if name not in need:
                continue
            if any(dep not in self.built for dep in order.get(name, ())):
                self.errors[name] = "its parent fixture failed"
                continue
            target = self.root / ("results/t.jsonl" if name == "results" else name)
            if target.exists() and (self.root / f".{name}.ok").exists():
                self.built[name] = target  # built by an earlier run (--fixtures)
                continue
            t0 = time.monotonic()
            r = subprocess.run([run.python, "-m", "zobench.cli", *args], cwd=self.root, env=env,
                               capture_output=True, text=True, timeout=600)
            self.seconds[name] = time.monotonic() - t0
            if r.returncode == 0 and target.exists():
                self.built[name] = target
                (self.root / f".{name}.ok").write_text(str(run.tree))
                log(f"  fixture {name}: {self.seconds[name]:.1f} s")
            else:
                last = (r.stderr.strip().splitlines() or ["?"])[-1]
                self.errors[name] = f"exit {r.returncode}: {last[:200]}"
                log(f"  fixture {name}: FAILED ({self.errors[name]})")


# -- safetensors by hand (no torch in the harness) ------------------------------------------------------

DTYPES = {"I32": np.int32, "I64": np.int64, "F32": np.float32, "F64": np.float64, "F16": np.float16,
          "BF16": None, "U8": np.uint8}


def st_read(path: Path) -> dict[str, np.ndarray]:
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        s, e = info["data_offsets"]
        out[name] = np.frombuffer(data[s:e], dtype=DTYPES[info["dtype"]]).reshape(info["shape"]).copy()
    return out


def st_write(path: Path, tensors: dict[str, np.ndarray], header_patch: dict | None = None) -> None:
    names = {np.dtype(v): k for k, v in DTYPES.items() if v is not None}
    header, blobs, at = {}, [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        blob = arr.tobytes()
        header[name] = {"dtype": names[arr.dtype], "shape": list(arr.shape), "data_offsets": [at, at + len(blob)]}
        blobs.append(blob)
        at += len(blob)
    for name, patch in (header_patch or {}).items():
        header[name] = {**header.get(name, {}), **patch}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def first_sparse(tensors: dict) -> tuple[str, str]:
    """(index name, value name) of the first trained tensor of a sparse delta."""
    idx = sorted(k for k in tensors if k.endswith("::index"))[0]
    return idx, idx.replace("::index", "::value")


def spoil_sparse(path: Path, how) -> None:
    """Apply ``how(tensors, idx_name, val_name)`` (in place on the dict) to ``path``'s delta.safetensors."""
    st = path / "delta.safetensors"
    tensors = st_read(st)
    idx, val = first_sparse(tensors)
    how(tensors, idx, val)
    st_write(st, tensors)


def edit_json(path: Path, how) -> None:
    """Rewrite the JSON file at ``path`` with ``how(obj)`` (returns the new object, or None to keep obj)."""
    obj = json.loads(path.read_text())
    new = how(obj)
    path.write_text(json.dumps(obj if new is None else new, indent=1))


# -- payloads ------------------------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pickle ran')",))


def pickle_payload(marker: Path) -> bytes:
    """A pickle that, when unpickled, writes ``marker``."""
    return pickle.dumps({"weight": _Payload(str(marker))}, protocol=2)


EVIL_PY = '''import os
open({marker!r}, "w").write("remote code ran in pid %d" % os.getpid())
from transformers import PretrainedConfig, PreTrainedModel


class EvilConfig(PretrainedConfig):
    model_type = "hostile-evil"


class EvilModel(PreTrainedModel):
    config_class = EvilConfig
'''


def evil_model(where: Path, marker: Path, cache: str | None = None) -> Path:
    """A model directory whose config names custom code (auto_map) that writes ``marker`` when imported.
    With ``cache`` (ZOBENCH_CACHE), a real tokenizer is copied in, so loading gets as far as the model."""
    where.mkdir(parents=True, exist_ok=True)
    for tok in sorted(Path(cache).glob("models/*/tokenizer.json")) if cache else []:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (tok.parent / name).is_file():
                (where / name).write_bytes((tok.parent / name).read_bytes())
        break
    (where / "config.json").write_text(json.dumps({
        "model_type": "hostile-evil", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel",
                     "AutoModel": "evil.EvilModel"}}))
    (where / "evil.py").write_text(EVIL_PY.format(marker=str(marker)))
    return where


def nested(depth: int, open_: str = "[", close: str = "]") -> str:
    return open_ * depth + close * depth


def yaml_bomb(levels: int = 9, width: int = 10) -> str:
    """Billion laughs: ``width ** levels`` leaves from a few hundred bytes of aliases."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"
