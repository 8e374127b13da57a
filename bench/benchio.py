"""What the benchmarks share: their summary printed and, when asked, kept as JSON (written whole or not at all)."""

from __future__ import annotations

import json
from pathlib import Path

from zobench.files import atomic_write


def emit(summary: dict, path: Path | None) -> None:
    """Print ``summary`` as indented JSON; also write it to ``path`` when one is given."""
    text = json.dumps(summary, indent=1)
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text + "\n", "benchmark summary")
