"""What decides a cached sketch: the model (plus its adapter or delta), the gradient scope, the sketch's size,
seed and normalization. The settings are ``spec.influence.CacheSpec``'s (pure data, checked as the command
line's flags are: a spec may come from a cache's ``spec.json``, someone else's file); this adds the checks of
the files they name (read without torch) and the key a cache is matched by.

``InfluenceSpec.meta()`` is written beside the cache and compared before reuse, so a query can never be
scored against sketches of another model, scope, K, sketch seed or normalization.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path

from zobench.cell.delta import read
from zobench.cell.delta_check import check_adapter
from zobench.errors import UserError, shown
from zobench.spec.influence import SCOPES, CacheSpec  # noqa: F401  (SCOPES: callers here)


class InfluenceSpec(CacheSpec):
    """``CacheSpec`` with the files it names checked (an adapter's config, a delta's kind) and its cache key."""

    @classmethod
    def from_dict(cls, d: dict, where: str) -> InfluenceSpec:
        spec = super().from_dict(d, where)
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
