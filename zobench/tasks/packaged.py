"""The small SST-2 sample shipped inside zobench (the only data the project carries).

It lets the embedded default suite run with no data folder and no network. `build_sst2_sample`
regenerates it from an official GLUE SST-2 folder, so the files can be checked against their source.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SST2_DIR = Path(__file__).resolve().parents[1] / "data" / "sst2"
SST2_TRAIN_ROWS = 2000
SST2_SEED = 0
SST2_NOTE = (f"sst2: the packaged sample ({SST2_TRAIN_ROWS:,} of the 67,349 GLUE SST-2 train rows, seed {SST2_SEED}; "
             f"its validation split GLUE's whole 872 rows); pass --data-dir for the full train split")


def build_sst2_sample(source_dir: str | Path, out_dir: str | Path = SST2_DIR, n: int = SST2_TRAIN_ROWS,
                      seed: int = SST2_SEED) -> None:
    """Write out_dir/train.tsv (n rows of source train.tsv drawn with the seed, kept in file order) and
    out_dir/dev.tsv (the whole source dev.tsv), both with the GLUE header."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = (source_dir / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    header, rows = lines[0], lines[1:]
    keep = sorted(np.random.RandomState(seed).permutation(len(rows))[:n].tolist())
    (out_dir / "train.tsv").write_text(header + "".join(rows[i] for i in keep), encoding="utf-8")
    (out_dir / "dev.tsv").write_bytes((source_dir / "dev.tsv").read_bytes())
