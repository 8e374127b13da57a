"""What decides a cached sketch: the model (plus its adapter or delta), the gradient scope, the sketch's size,
seed and normalization. Pure data, checked as the command line's flags are (a spec may come from a cache's
``spec.json``: someone else's file); no torch, so reading an influence suite's settings loads nothing.

``InfluenceSpec.meta()`` is written beside the cache and compared before reuse, so a query can never be
scored against sketches of another model, scope, K, sketch seed or normalization.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from zobench.cell.delta import read
from zobench.cell.delta_check import check_adapter
from zobench.errors import UserError, shown

SCOPES = ("lora", "all", "sensitive")  # "all": every parameter, as the trainer's scope of that name
DEFAULT_K = 1 << 16


@dataclass
class InfluenceSpec:
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
    def from_dict(cls, d: dict, where: str) -> InfluenceSpec:
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise UserError(f"{where}: unknown key '{shown(key)}' (expected one of: {', '.join(sorted(known))})")
        for f in fields(cls):  # a spec may come from a cache's spec.json: data from someone else
            if f.name in d and not _typed(d[f.name], f.type):
                raise UserError(f"{where}: key '{f.name}' = {d[f.name]!r:.80}: expected {f.type}")
        spec = cls(**d)
        if spec.dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"{where}: key 'dtype': expected float32, bfloat16 or float16")
        if not 0 < spec.density <= 1 or not 1 <= spec.max_length <= 1 << 20 or spec.sketch_seed < 0 or \
                not 1 <= spec.calib_sequences <= 1 << 20 or not 1 <= spec.calib_length <= 1 << 20:
            raise UserError(f"{where}: density, max_length, sketch_seed or calib_* out of range")
        if spec.scope == "full":
            raise UserError(f"{where}: key 'scope': 'full' is called 'all' (every parameter), as everywhere else")
        if spec.scope not in SCOPES:
            raise UserError(f"{where}: key 'scope': expected one of {', '.join(SCOPES)}, got '{shown(spec.scope)}'")
        if not isinstance(spec.k, int) or spec.k < 1:
            raise UserError(f"{where}: key 'k': expected a positive integer, got {spec.k!r}")
        if spec.adapter:
            if not (Path(spec.adapter) / "adapter_config.json").is_file():
                raise UserError(f"{where}: key 'adapter': {shown(spec.adapter, 200)} has no adapter_config.json")
            check_adapter(Path(spec.adapter))
        if spec.delta:
            if spec.adapter:
                raise UserError(f"{where}: give an adapter or a delta, not both")
            kind = read(spec.delta)["kind"]
            if kind == "trajectory":
                raise UserError(f"{where}: key 'delta': {spec.delta} is a dense ZO trajectory; influence takes "
                                f"sparse, LoRA or first-order deltas")
        return spec

    def meta(self) -> dict:
        """The keys a cache must match (paths reduced to content hashes, so a moved adapter still matches)."""
        d = asdict(self)
        d.pop("data_dir")
        if self.adapter:
            d["adapter"] = _dir_hash(Path(self.adapter))
        if self.delta:
            d["delta"] = _dir_hash(Path(self.delta))
        else:
            d.pop("delta")  # caches made before deltas existed still match
        if self.scope != "sensitive":
            for key in ("density", "calib_sequences", "calib_length"):
                d.pop(key)
        return d


def _dir_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _typed(value, kind: str) -> bool:
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
