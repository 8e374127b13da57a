"""Tasks: MeZO's prompts and sampling (base, glue, generation) and the model side (scoring)."""

from __future__ import annotations

from zobench.registry import Registry
from zobench.tasks.base import Example, Splits, Task

TASKS = Registry("task")
for _names, _factory in (
    (("sst2", "sst-2", "sst"), "zobench.tasks.glue:SST2"),
    (("rte",), "zobench.tasks.glue:RTE"),
    (("cb",), "zobench.tasks.glue:CB"),
    (("boolq",), "zobench.tasks.glue:BoolQ"),
    (("wsc", "wsc.fixed"), "zobench.tasks.glue:WSC"),
    (("wic",), "zobench.tasks.glue:WiC"),
    (("multirc",), "zobench.tasks.glue:MultiRC"),
    (("copa",), "zobench.tasks.glue:COPA"),
    (("squad", "squad1", "squad-v1.1"), "zobench.tasks.generation:SQuAD"),
    (("drop",), "zobench.tasks.generation:DROP"),
):
    for _i, _name in enumerate(_names):
        TASKS.register(_name, _factory, alias=_i > 0)


def get_task(name: str) -> Task:
    """A task instance by its short name (did-you-mean on a typo)."""
    return TASKS.get(name)()


__all__ = ["TASKS", "Example", "Splits", "Task", "get_task"]
