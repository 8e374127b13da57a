"""Tasks: MeZO's prompts and sampling (base, glue, generation) and the model side (scoring); instruction
tuning on Alpaca rows (instruction, and its model side, responses).

``task: <name>`` in a suite names one of ``spec.catalog.TASK_INFO`` (with its aliases and default
``max_length``); this registry maps each to its class, one line in ``CLASSES``.
"""

from __future__ import annotations

from zobench.registry import Registry
from zobench.spec.catalog import TASK_INFO
from zobench.tasks.base import Example, Splits, Task
from zobench.tasks.generation import DROP, SQuAD
from zobench.tasks.glue import CB, COPA, RTE, SST2, WSC, BoolQ, MultiRC, WiC
from zobench.tasks.instruction import Alpaca

CLASSES = {"sst2": SST2, "rte": RTE, "cb": CB, "boolq": BoolQ, "wsc": WSC, "wic": WiC, "multirc": MultiRC,
           "copa": COPA, "squad": SQuAD, "drop": DROP, "alpaca": Alpaca}
if set(CLASSES) != {t.name for t in TASK_INFO}:  # a declared task without a class, or a class declared nowhere
    raise ImportError(f"tasks declared {sorted(t.name for t in TASK_INFO)} but implemented {sorted(CLASSES)}")

TASKS = Registry("task")
for _info in TASK_INFO:
    for _i, _name in enumerate((_info.name, *_info.aliases)):
        TASKS.register(_name, CLASSES[_info.name], alias=_i > 0)


def get_task(name: str) -> Task:
    """A task instance by its short name (did-you-mean on a typo)."""
    return TASKS.get(name)()


__all__ = ["TASKS", "Example", "Splits", "Task", "get_task"]
