"""The report's quantization trade-off table: each quantized cell beside its float counterpart (memory, step
time and accuracy against it)."""

from __future__ import annotations

from zobench.measure.load import LOADED_CPUS
from zobench.measure.machine import machine_name
from zobench.report.cells import CellView, declared, density, meaningful, median, pct, quant, setting
from zobench.report.table import DASH, Column, mib, pct_points, ratio, section, signed_points

# A method that trains quantized weights only (QZO, QuZO: ``MethodInfo.quantized_only``) has no float cell of its
# own: it is set beside the first of these a suite runs in float, the same model, task and seed (the float
# route SensZOQ, else MeZO).
FLOAT_STAND_INS = ("sensitive", "full")


def quant_table(ok: list[CellView], extras: list[str]) -> list[str]:
    """Each quantized cell beside the unquantized cell of the same method (and other settings); a method with
    no float cell at all beside a stand-in (``FLOAT_STAND_INS``), named in a column of its own."""
    if len({quant(r) for r in ok}) < 2:
        return []

    def twin_key(r, **instead):  # a pilot-chosen lr is each method's own, not a setting to match
        keys = [a for a in ("model", "task", "dtype", "method", "density", *extras)
                if a != "quant" and not (a == "lr" and r.lr_choice)]
        return tuple(instead[a] if a in instead else str(setting(r, a)) for a in keys)

    float_cells = {twin_key(r): r for r in ok if quant(r) == "none"}
    stand_in = {m: str(setting(r, "density")) for r in ok if quant(r) == "none"
                for m in FLOAT_STAND_INS if setting(r, "method") == m}

    def twin_of(r):
        info = declared(str(setting(r, "method")))
        if info is None or not info.quantized_only:
            return float_cells.get(twin_key(r))
        return next((float_cells[k] for m in FLOAT_STAND_INS if m in stand_in
                     and (k := twin_key(r, method=m, density=stand_in[m])) in float_cells), None)

    def vs_float(value_of, fn):
        def cell(r):
            twin, value = twin_of(r), value_of(r)
            other = value_of(twin) if twin else None
            return (fn(value, other) if isinstance(value, (int, float)) and isinstance(other, (int, float)) and other
                    else DASH)  # (a record's 0 s or 0 MiB has no ratio)
        return cell

    def score(r):
        return r.metrics.accuracy("test_after") if r is not None and meaningful(r) else None

    def loaded(r):
        return r is not None and (r.phase("train").other_cpus or 0) >= LOADED_CPUS

    step_ratio = vs_float(lambda c: median(c.metrics.step_s), lambda a, b: ratio(a / b))

    def elsewhere(r):  # the pair ran on two machines (as their records name them)
        twin = twin_of(r)
        here, there = machine_name(r.env), machine_name(twin.env) if twin is not None else ""
        return bool(here and there and here != there)

    def step_vs_float(r):
        text = step_ratio(r)
        marks = [m for m, on in (("loaded", loaded(r) or loaded(twin_of(r))), ("machines differ", elsewhere(r))) if on]
        return text + f" ({'; '.join(marks)})" if text != DASH and marks else text

    def float_cell(r):
        twin = twin_of(r)
        return DASH if twin is None else str(setting(twin, "method")) + (
            f" {pct(density(twin))}" if density(twin) is not None else "")

    rows = [r for r in ok if quant(r) != "none"]
    stood_in = any((t := twin_of(r)) is not None and setting(t, "method") != setting(r, "method") for r in rows)
    cols: list[Column] = [
        *([("float cell", float_cell)] if stood_in else []),
        ("peak MiB", lambda r: mib(r.derived.peak_mib)),
        ("peak / float", vs_float(lambda r: r.derived.peak_mib, lambda a, b: ratio(a / b))),
        ("weights MiB (est.)", lambda r: mib(r.estimated_weights_mib)),
        ("step / float", step_vs_float),
        ("test % after", lambda r: pct_points(score(r))),
        ("vs float (points)", lambda r: signed_points(score(r), score(twin_of(r)))),
    ]
    intro = ("Memory against accuracy per quant backend: each quantized cell beside the unquantized (`none`) "
             "cell of the same method. Quantized sparse cells train their masked values in 16/32-bit beside "
             "the quantized layers (dense-and-sparse). Step / float divides the seconds of two cells that ran "
             "at different times, so the machine's load then is in it: a pair where either cell trained beside "
             f"other work (at least {LOADED_CPUS} CPUs busy elsewhere) is marked (loaded), and a pair from two "
             "machines (machines differ); timings taken side by side (`make bench`, or a suite timing both in one "
             "run) are the figure to compare.")
    if stood_in:
        intro += (" A method that trains quantized weights only has no float cell of its own; it is set beside "
                  f"the float cell of {' or else '.join(f'`{m}`' for m in FLOAT_STAND_INS)} with the same "
                  "settings, named in the float cell column.")
    return section("Quantization trade-off", intro, cols, rows, extras)
