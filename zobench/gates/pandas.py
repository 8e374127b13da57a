"""Gate: pandas, imported by ``results.to_pandas`` and ``report.frames`` alone.

The commands that read records (report, check, run --dry-run) never build a DataFrame, so they start
without it.
"""

from __future__ import annotations


def data_frame(rows: list[dict]):
    """``pandas.DataFrame(rows)``."""
    import pandas

    return pandas.DataFrame(rows)


def concat_columns(blocks: list[dict[str, list]]):
    """One DataFrame of column blocks (``{column: values}`` each), stacked, a column missing from a block
    blank there."""
    import pandas

    if not blocks:
        return pandas.DataFrame()
    return pandas.concat([pandas.DataFrame(b) for b in blocks], ignore_index=True)
