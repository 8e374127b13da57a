"""The configuration layer, pure data: what a cell is (``config``), what a suite is (``suite``; an influence
suite: ``influence``), how a suite expands into cells (``matrix``), selectors. Reading and validating a suite
imports no torch."""
