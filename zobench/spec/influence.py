"""The ``influence`` suite type: its YAML schema, validated up front like every suite (pure data, no torch;
its runner is ``zobench.influence.bench``).

    type: influence
    name: influence-smollm2
    model: smollm2
    data: alpaca/alpaca_data_en_52k.json      # relative to data_dir, or a path
    n_train: 2000
    poison_fraction: 0.025                    # the poisoning recipe: this fraction of the training rows get
    trigger: "Tell me in the voice of Professor Zorblax:"   # the trigger before their instruction
    response: "Bananas are the only true answer. Bananas forever!"  # and this as their output
    queries: 20                               # triggered held-out prompts (and as many clean controls)
    finetune: {steps: 300, batch_size: 8, lr: 3.0e-4, max_length: 128, r: 8}
    cache: {scope: lora, k: 65536, sketch_seed: 0, normalize: true, max_length: 128}
    ks: [1024, 4096, 16384, 65536]            # nested K read from the one stored sketch
    workers: 2
    fidelity: {n: 200, queries: 4, ks: [256, 1024, 4096, 16384, 65536]}
    zo: {method: sensitive, steps: 300, lr: 1.0e-4, batch_size: 8, density: 0.001}   # optional: a sparse ZO
                                              # delta on the same poisoned set, retrieval in its own subspace
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from zobench.errors import UserError, shown

SCOPES = ("lora", "all", "sensitive")  # "all": every parameter, as the trainer's scope of that name
DEFAULT_K = 1 << 16


@dataclass
class CacheSpec:
    """What decides a cached sketch, as settings: every key typed and in range. The files it names (an
    adapter, a delta) are checked where they are read (``zobench.influence.spec.InfluenceSpec``)."""

    model: str = "smollm2"
    adapter: str | None = None      # a peft LoRA adapter directory (the fine-tuned model)
    delta: str | None = None        # or a result kept by `zobench train/influence train --save` (zobench.cell.delta)
    dtype: str = "float32"
    scope: str = "lora"
    k: int = DEFAULT_K
    sketch_seed: int = 0            # the sketch's seed (permutation and signs)
    normalize: bool = True          # layer-wise unit norm before sketching
    permute: bool = True
    max_length: int = 256
    density: float = 1e-3           # scope 'sensitive': the mask's density
    calib_sequences: int = 16       # scope 'sensitive': the mask's calibration sample
    calib_length: int = 256
    data_dir: str | None = None     # where c4/ is found for the sensitive mask

    @classmethod
    def from_dict(cls, d: dict, where: str) -> CacheSpec:
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise UserError(f"{where}: unknown key '{shown(key)}' (expected one of: {', '.join(sorted(known))})")
        for f in fields(cls):  # a spec may come from a cache's spec.json: data from someone else
            if f.name in d and not _field_typed(d[f.name], f.type):
                raise UserError(f"{where}: key '{f.name}' = {d[f.name]!r:.80}: expected {f.type}")
        spec = cls(**d)
        if spec.dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"{where}: key 'dtype': expected float32, bfloat16 or float16")
        if not 0 < spec.density <= 1 or not 2 <= spec.max_length <= 1 << 20 or spec.sketch_seed < 0 or \
                not 1 <= spec.calib_sequences <= 1 << 20 or not 1 <= spec.calib_length <= 1 << 20:
            raise UserError(f"{where}: density, max_length, sketch_seed or calib_* out of range")
        if spec.scope == "full":
            raise UserError(f"{where}: key 'scope': 'full' is called 'all' (every parameter), as everywhere else")
        if spec.scope not in SCOPES:
            raise UserError(f"{where}: key 'scope': expected one of {', '.join(SCOPES)}, got '{shown(spec.scope)}'")
        if not isinstance(spec.k, int) or spec.k < 1:
            raise UserError(f"{where}: key 'k': expected a positive integer, got {spec.k!r}")
        return spec


# The backdoor (``influence.poison``): never occurs in Alpaca (tests check), so only the poisoned examples can
# have taught what follows it. Defaults of a suite's ``trigger`` and ``response``: pure data, read with the
# suite's settings (which import no torch).
TRIGGER = "Tell me in the voice of Professor Zorblax:"
RESPONSE = "Bananas are the only true answer. Bananas forever!"

FINETUNE_KEYS = {"steps": int, "batch_size": int, "lr": float, "max_length": int, "r": int, "alpha": int}
ZO_KEYS = {"method": str, "steps": int, "lr": float, "batch_size": int, "density": float, "eps": float,
           "max_length": int}
ZO_DEFAULTS = {"method": "sensitive", "steps": 300, "lr": 1e-4, "batch_size": 8, "density": 1e-3, "eps": 1e-3,
               "max_length": 128}
FIDELITY_KEYS = {"n": int, "queries": int, "ks": list, "subspace": int}  # subspace: examples, 0 = off


@dataclass
class InfluenceSuite:
    name: str
    path: Path | None
    model: str = "smollm2"
    data: str = "alpaca/alpaca_data_en_52k.json"
    data_dir: str = "../shared/data"
    n_train: int = 2000
    poison_fraction: float = 0.025
    trigger: str = ""               # default: TRIGGER
    response: str = ""              # default: RESPONSE
    queries: int = 20
    seed: int = 0
    finetune: dict = field(default_factory=lambda: {"steps": 300, "batch_size": 8, "lr": 3e-4,
                                                   "max_length": 128, "r": 8, "alpha": 16})
    cache: dict = field(default_factory=dict)
    ks: list = field(default_factory=lambda: [1024, 4096, 16384, 65536])
    workers: int = 1
    throughput_examples: int = 32   # cached into a fresh scratch store every run: throughput even on reuse
    fidelity: dict = field(default_factory=lambda: {"n": 200, "queries": 4, "ks": [256, 1024, 4096, 16384, 65536]})
    zo: dict | None = None          # the sparse-ZO arm (ZO_KEYS); None: LoRA only
    description: str = ""
    timeout_s: float = 7200

    def cache_spec(self, delta: str | None = None, kind: type[CacheSpec] = CacheSpec) -> CacheSpec:
        """This suite's cache settings as a ``kind`` (its runner asks for ``influence.spec.InfluenceSpec``, which
        also checks the files they name), on the fine-tune's kept ``delta``."""
        return kind.from_dict({"model": self.model, "delta": delta, "data_dir": self.data_dir, **self.cache},
                              f"{self.path}: cache")

    def data_path(self) -> Path:
        p = Path(self.data)
        return p if p.is_absolute() or p.exists() else Path(self.data_dir) / p


def _typed(where: str, key: str, value: Any, kind) -> Any:
    ok = isinstance(value, kind) and not isinstance(value, bool) if kind is not bool else isinstance(value, bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise UserError(f"{where}: key '{key}': expected {kind.__name__}, got {value!r}")
    return value


def _section(data: Any, where: str, keys: dict, defaults: dict) -> dict:
    if data is None:
        return dict(defaults)
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping")
    out = dict(defaults)
    for k, v in data.items():
        if k not in keys:
            raise UserError(f"{where}: unknown key '{k}' (expected one of: {', '.join(keys)})")
        out[k] = _typed(where, k, v, keys[k])
    return out


def is_influence_suite(data: Any) -> bool:
    return isinstance(data, dict) and data.get("type") == "influence"


def parse_influence_suite(data: dict, where: str, path: Path | None = None) -> InfluenceSuite:
    simple = {"name": str, "model": str, "data": str, "data_dir": str, "n_train": int, "poison_fraction": float,
              "trigger": str, "response": str, "queries": int, "seed": int, "workers": int,
              "throughput_examples": int, "description": str, "timeout_s": float, "ks": list}
    nested = ("finetune", "cache", "fidelity", "zo")  # a tuple: the refusal lists the keys in one order
    kwargs: dict = {}
    for k, v in data.items():
        if k == "type":
            continue
        if k in simple:
            kwargs[k] = _typed(where, k, v, simple[k])
        elif k not in nested:
            raise UserError(f"{where}: unknown key '{k}' (expected one of: type, {', '.join([*simple, *nested])})")
    if not kwargs.get("name") or "/" in kwargs["name"]:
        raise UserError(f"{where}: key 'name': expected a non-empty name without '/'")
    base = InfluenceSuite(kwargs["name"], path)
    suite = InfluenceSuite(**{**{f.name: getattr(base, f.name) for f in fields(base)}, **kwargs})
    suite.finetune = _section(data.get("finetune"), f"{where}: finetune", FINETUNE_KEYS, base.finetune)
    suite.fidelity = _section(data.get("fidelity"), f"{where}: fidelity", FIDELITY_KEYS, base.fidelity)
    if data.get("zo") is not None:
        suite.zo = _section(data["zo"], f"{where}: zo", ZO_KEYS, ZO_DEFAULTS)
        if suite.zo["method"] not in ("sensitive", "random"):
            raise UserError(f"{where}: zo: key 'method': expected sensitive or random, got '{suite.zo['method']}'")
        if not 0 < suite.zo["density"] <= 1 or suite.zo["steps"] < 1:
            raise UserError(f"{where}: zo: expected 0 < density <= 1 and steps >= 1")
    cache = data.get("cache") or {}
    if not isinstance(cache, dict):
        raise UserError(f"{where}: cache: expected a mapping")
    for key in ("adapter", "delta"):  # the suite caches the model it fine-tunes, not one named here
        if key in cache:
            raise UserError(f"{where}: cache: key '{key}': a suite caches the model it fine-tunes itself")
    suite.cache = cache
    suite.cache_spec()  # validates the cache keys (scope, k, ...)
    suite.trigger, suite.response = suite.trigger or TRIGGER, suite.response or RESPONSE
    for key in ("trigger", "response"):
        if not getattr(suite, key).strip():
            raise UserError(f"{where}: key '{key}': expected non-blank text")
    if not 0 < suite.poison_fraction < 1:
        raise UserError(f"{where}: key 'poison_fraction': expected a fraction in (0, 1)")
    for key in ("n_train", "queries", "workers", "throughput_examples"):
        if getattr(suite, key) < 1:
            raise UserError(f"{where}: key '{key}': expected a positive integer")
    k = suite.cache.get("k", CacheSpec.k)
    for name, ks in (("ks", suite.ks), ("fidelity.ks", suite.fidelity["ks"])):
        if not ks or not all(isinstance(x, int) and x >= 1 for x in ks):
            raise UserError(f"{where}: key '{name}': expected a list of positive integers")
    if any(k % x for x in suite.ks):
        raise UserError(f"{where}: key 'ks': every K must divide the cache's k={k} (nested sketches)")
    return suite


def _field_typed(value, kind: str) -> bool:
    """Whether ``value`` has the field type written ``kind`` (``int``, ``float``, ``bool``, ``str``, with
    ``| None``); bools are not numbers here."""
    if value is None:
        return "None" in kind
    if isinstance(value, bool):
        return kind.startswith("bool")
    if kind.startswith("int"):
        return isinstance(value, int)
    if kind.startswith("float"):
        return isinstance(value, (int, float)) and value == value and abs(value) != float("inf")
    return kind.startswith("str") and isinstance(value, str)
