"""The learning-rate pilot: short runs on dev that choose each cell's learning rate before it runs.

MeZO tunes the learning rate per task on a grid and picks on dev; a result whose lr was picked on test,
or not stated at all, does not reproduce. A suite's ``lr_pilot`` gives, per selector, a grid; for every
cell that matches, each lr of its grid runs as a pilot cell (``steps`` steps, dev evaluated every
``eval_every``, the test set never touched), and the cell then runs with the lr of the best dev score
(ties go to the smaller lr). Pilot cells are ordinary cells with ``stage: pilot`` in their labels, kept in
the results file, so ``--resume`` re-derives the same choice; every cell's record carries its choice.
"""

from __future__ import annotations

import dataclasses

from zobench.spec.claims import finite_number
from zobench.spec.matrix import Cell, cell_id
from zobench.spec.selectors import selector_matches

STAGE = "pilot"


def grid_for(cell: Cell, pilot) -> list[float] | None:
    """The learning rates ``cell`` is piloted on (the first grid whose selector matches), or None."""
    if cell.config.method_info.family == "reference":
        return None
    facts = {**cell.config.to_dict(), **cell.labels}
    return next((lrs for sel, lrs in pilot.grids if selector_matches(sel, facts)), None)


def _pilot(cell: Cell, pilot, lr: float) -> Cell:
    # Pilots run at seed 0 whatever the cell's seed: every seed of a cell gets the lr chosen there, so a
    # second seed repeats the measurement, not the tuning.
    cfg = dataclasses.replace(cell.config, **pilot.settings)
    cfg = dataclasses.replace(cfg, lr=lr, steps=pilot.steps, eval_every=pilot.eval_every, seed=0,
                              warmup_steps=min(cell.config.warmup_steps, pilot.steps), eval_before=False,
                              eval_after=False)
    labels = {k: v for k, v in cell.labels.items() if k != "seed"}
    return Cell(cell_id(cfg), cfg, dict(labels, stage=STAGE, lr=lr))


def pilot_cells(cells: list[Cell], pilot) -> list[Cell]:
    """Every pilot cell the suite's cells need, each once."""
    out: dict[str, Cell] = {}
    for cell in cells:
        for lr in grid_for(cell, pilot) or []:
            p = _pilot(cell, pilot, lr)
            out.setdefault(p.cell_id, p)
    return list(out.values())


def pilot_score(rec, by: str = "best") -> float | None:
    """A pilot's dev score by the suite's rule: its best evaluation, or its last (an lr that climbs and then
    diverges within the pilot is not chosen for its early peak)."""
    if rec is None or not rec.ok:
        return None
    if by == "last":
        curve = rec.metrics.get("dev_curve") or []
        score = curve[-1] if curve else None
    else:
        score = rec.metrics.get("best_dev")
    value = score.get("accuracy", score.get("f1")) if isinstance(score, dict) else None
    # a results file is data: a score that is not a finite number is no score (the pilot counts as not done)
    return value if finite_number(value) else None


def choose(cells: list[Cell], pilot, records) -> tuple[list[Cell], dict[str, dict]]:
    """The cells with their chosen lr, and ``{cell_id: choice}`` (grid, dev score per lr, chosen lr). A cell
    whose grid has a pilot without a dev score is left out (it waits), its choice saying so."""
    # A cell's latest ok record, else its latest: --resume counts a pilot with any ok record as done and does
    # not run it again, so a failed record after an ok one must not hold its cells back for ever.
    latest = {}
    for r in records:
        if r.ok or not getattr(latest.get(r.cell_id), "ok", False):
            latest[r.cell_id] = r
    out, choices = [], {}
    for cell in cells:
        grid = grid_for(cell, pilot)
        if not grid:
            out.append(cell)
            continue
        dev = [pilot_score(latest.get(_pilot(cell, pilot, lr).cell_id), pilot.by) for lr in grid]
        scored = [(d, -lr, lr) for d, lr in zip(dev, grid) if d is not None]
        choice = {"grid": grid, "dev": dev, "pilot_steps": pilot.steps,
                  "by": "best dev score" if pilot.by == "best" else "last dev score"}
        if None in dev:  # a pilot crashed or was killed: the cell waits for it (a --resume re-runs pilots first)
            # Choosing from the others would run the cell at an lr that the re-run pilot could change, giving the
            # same seed a second cell under another id.
            choices[cell.cell_id] = dict(choice, chosen=None, note=f"waits: {dev.count(None)} of {len(grid)} "
                                         f"pilots have no dev score")
            continue
        lr = max(scored)[2]
        cfg = dataclasses.replace(cell.config, lr=lr)
        chosen = Cell(cell_id(cfg), cfg, dict(cell.labels, lr=lr))
        out.append(chosen)
        choices[chosen.cell_id] = dict(choice, chosen=lr)
    return out, choices
