"""What every report figure shares: method colours, figure and legend layout, the plots folder, writing a PNG
(the plots themselves: ``report.plots``, ``report.curves``, ``report.claims_plot``).

Figures are built with ``matplotlib.figure.Figure`` directly (its Agg canvas), never through pyplot: no
backend is switched for the caller's process, no display is needed, and no figure lingers in pyplot's
registry. PNG metadata carries no software version, so the same records give the same bytes; it carries
``Software: zobench``, by which a later render knows the file is its own to replace (``report.owned``).
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from zobench.errors import UserError
from zobench.files import atomic_write
from zobench.report.cells import CellView, declared, method, method_order
from zobench.report.owned import PNG_SOFTWARE

# For methods that name no colour of their own: picked by a stable hash of the name, never by position.
PALETTE = ("#bcbd22", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d")
OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)}  # legends right of the axes, never on data
# Line styles of the quant backends in line plots: float ("none") solid in every plot, the others in name order.
QUANT_LINESTYLES = ("--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3)))


def plots_folder(out_md: Path) -> Path:
    """``<report>_plots/`` beside the report; refused when it is a link or not a directory (stale plots in
    it are removed, and zobench never removes files through a link into someone else's folder)."""
    folder = out_md.parent / f"{out_md.stem}_plots"
    if folder.is_symlink():
        raise UserError(f"{folder}: the plots folder is a symbolic link; zobench writes (and removes stale "
                        f"plots) only in a folder of its own")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: the plots folder exists and is not a directory")
    return folder  # made when the first plot is written


def color(m: str) -> str:
    """A fixed colour per method (its ``Method.color``; the forward reference grey), the same in every plot
    and report; any number of methods gets one."""
    own = getattr(declared(m), "color", None)
    return own or PALETTE[zlib.crc32(m.encode()) % len(PALETTE)]


def quant_linestyles(quants) -> dict:
    """quant backend -> its line style: "none" solid, the others (nf4 beside nf4-plain, int8, ...) each
    its own, so that two backends of one method are two lines a reader can tell apart."""
    others = sorted({q for q in quants if q != "none"})
    return {"none": "-", **{q: QUANT_LINESTYLES[i % len(QUANT_LINESTYLES)] for i, q in enumerate(others)}}


def new_figure(width: float, height: float, title: str, xlabel: str, ylabel: str):
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.set_axisbelow(True)
    return fig, ax


def legend(ax, colors: dict[str, str]) -> None:
    ax.legend(handles=[Patch(color=c, label=name) for name, c in colors.items()], fontsize="small", **OUTSIDE)


def method_legend(ax, recs: list[CellView]) -> None:
    seen = sorted({method(r) for r in recs}, key=method_order)
    legend(ax, {m: color(m) for m in seen})


def seeds_note(n: int) -> str:
    return f" ({n} seeds)" if n > 1 else ""


def save_figure(fig: Figure, path: Path) -> None:
    """``fig`` as a PNG marked as zobench's (``report.owned``), written whole or not at all."""
    buf = io.BytesIO()
    # bbox "tight": the extent of every artist, so a legend outside the axes is never cut off
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": PNG_SOFTWARE}, bbox_inches="tight",
                pad_inches=0.1)
    atomic_write(path, buf.getvalue(), "plot")  # a full disk leaves the old PNG, never half of one
