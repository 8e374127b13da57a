"""Gate modules: the only places an optional or heavy package is imported on first use, one module each.

zobench imports at the top of its modules, so its import graph is its architecture (docs/architecture.md).
A package that only some runs need, and that would cost every other run its import (memory that lands in
a measured cell's peak, seconds of start-up, or an error where it is not installed), is imported inside a
function of its gate instead, and nowhere else:

    bnb           bitsandbytes (the nf4, fp4 and int8 backends)
    gptqmodel     gptqmodel (the gptq backend; zobench[gptq]), without the process settings its import makes
    hqq           hqq (the hqq backend; zobench[hqq])
    peft          peft (LoRA): its import pulls in bitsandbytes and hqq wherever they are installed
    ray           Ray (--executor ray; zobench[ray]): importing, connecting, the cluster's nodes
    datasets      Hugging Face datasets (a task's data without --data-dir; not a dependency)
    pandas        pandas (``results.to_pandas`` only)
    pynvml        NVIDIA's management library (GPU memory and driver facts; CUDA machines only)
    transformers  transformers' model classes, imported after ``hide.trim_transformers_imports``
    hide          what a cell's process keeps from the import system (optional packages it will not use)

A gate imports nothing of zobench but the ground (``zobench.errors``) and sits in the ground: any layer may
use it. ruff's import-outside-top-level rule (PLC0415) is switched off for this folder alone
(pyproject.toml).
"""
