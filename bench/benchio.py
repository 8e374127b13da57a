"""What the benchmarks share: their summary printed and, when asked, kept as JSON (written whole or not at all)."""

from __future__ import annotations

import json
from pathlib import Path

from zobench.files import atomic_write


def emit(summary: dict, path: Path | None) -> None:
    """Print ``summary`` as indented JSON; also write it to ``path`` when one is given."""
    print(json.dumps(summary, indent=1))
    if path is not None:
        keep(summary, path)


def keep(summary: dict, path: str | Path) -> None:
    """Write ``summary`` to ``path`` as indented JSON, whole or not at all (an interrupted benchmark leaves the
    figures it had before, never half a file), its folder made if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(summary, indent=1) + "\n", "benchmark summary")
