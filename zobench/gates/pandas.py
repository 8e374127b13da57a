"""Gate: pandas, imported by ``results.to_pandas`` alone.

The commands that read records (report, check, run --dry-run) never build a DataFrame, so they start
without it.
"""

from __future__ import annotations


def data_frame(rows: list[dict]):
    """``pandas.DataFrame(rows)``."""
    import pandas

    return pandas.DataFrame(rows)
