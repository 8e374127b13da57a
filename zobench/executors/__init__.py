"""Where cells run. An executor takes cells (``submit``), hands back their records as they finish
(``finished``) and cleans up (``close``); the driver (``zobench.driver``) is the only writer of the results
file, and nothing downstream depends on the order in which cells finish.

    local   one cell at a time, each in a fresh process on this machine (the default)
    pool    ``--jobs N`` cells at once on this machine, each in its own fresh process, with the CPU threads
            divided between them and one GPU each where there are GPUs
    ray     cells as Ray tasks on a private local Ray or an existing cluster (``--address``), each still in
            a fresh process of its own; needs ``zobench[ray]``

Adding an executor is one file here implementing ``base.Executor`` and one entry in ``EXECUTORS``.
"""

from zobench.executors.base import Executor
from zobench.registry import Registry

EXECUTORS = Registry("executor")
EXECUTORS.register("local", "zobench.executors.local:LocalExecutor")
EXECUTORS.register("pool", "zobench.executors.pool:PoolExecutor")
EXECUTORS.register("ray", "zobench.executors.ray_executor:RayExecutor")

__all__ = ["EXECUTORS", "Executor"]
