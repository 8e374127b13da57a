"""What a suite may name, and what each name declares: the methods, quantization backends and tasks.

Pure data in the ground, beside the rest of the spec: a suite is validated, expanded into cells and
identified (``spec.matrix``), and its records are read (``results``, ``report``) from this table alone,
so none of that loads the engine. The implementations live in the layers above and are registered under
the names declared here:

    methods/   ``methods.register`` refuses a method whose name is not declared, and checks that it
               implements what its declaration asks (``build_mask`` when ``needs_mask``)
    quant/     ``quant.BACKENDS`` maps every declared backend to its class: one missing fails its import
    tasks/     ``tasks.TASKS`` likewise, aliases included

Capabilities are declared here, never probed: the pipeline, the estimator and the report ask
``METHODS.get(name).needs_mask`` and never test a method's name or try it and catch the failure.
"""

from __future__ import annotations

from dataclasses import dataclass

from zobench.registry import Registry

FAMILIES = ("zo", "fo", "reference")
# The settings of the mask methods: a cell's identity keeps them only for the methods that use them.
MASK_SETTINGS = ("density", "per_tensor", "calib_path", "calib_sequences", "calib_length")


@dataclass(frozen=True)
class MethodInfo:
    """What a fine-tuning method is, as everything outside ``methods/`` needs to know it.

    family         "zo" (forward-only training), "fo" (a backward pass) or "reference" (nothing trained)
    needs_mask     builds a static mask of the entries it trains: a sparse method
    quantized      can train beside quantized weights (its trained values live outside them)
    needs_scales   trains the quantization scales themselves: its cells need a backend of ``PLAIN_SCALES``
    default_scope  the parameters it trains when a suite names no ``scope``
    settings       config keys that change what it runs (density, ...): a cell's identity keeps them only
                   for the methods that use them, so a density axis does not duplicate full ZO
    summary        one line for tables and --help
    order          where reports list it (the reference first, first-order baselines last)
    color          its colour in plots (None: one derived from the name)
    allowed        ((config key, values it may take), ...): what else it needs of a cell, refused when a suite
                   is validated (a method that trains int8/4-bit codes names those quant backends)
    """

    name: str
    family: str
    summary: str
    needs_mask: bool = False
    quantized: bool = False
    needs_scales: bool = False
    default_scope: str = "linear"
    settings: tuple[str, ...] = ()
    order: int = 100
    color: str | None = None
    allowed: tuple[tuple[str, tuple], ...] = ()

    @property
    def quantized_only(self) -> bool:
        """It trains quantized weights only (their scales, or codes of named backends): no float cell of its
        own exists to compare it with."""
        return self.needs_scales or any(k == "quant" and "none" not in v for k, v in self.allowed)


def _mask_method(name: str, summary: str, order: int, color: str) -> MethodInfo:
    return MethodInfo(name, "zo", summary, needs_mask=True, quantized=True, settings=MASK_SETTINGS, order=order,
                      color=color)


METHOD_INFO = (
    MethodInfo("forward", "reference", "nothing: inference only (the reference cell every suite adds)",
               quantized=True, order=0, color="#7f7f7f"),  # inference runs on any weights
    MethodInfo("full", "zo", "every weight (MeZO)", default_scope="all", order=10, color="#1f77b4"),
    MethodInfo("lezo", "zo", "every weight, a random layer_fraction of the blocks per step (LeZO)",
               default_scope="all", settings=("layer_fraction",), order=15, color="#bcbd22"),
    _mask_method("random", "exactly density x N weights, uniform over the scope (seeded)", 20, "#ff7f0e"),
    _mask_method("sensitive", "the largest squared gradients on a calibration corpus (C4)", 30, "#2ca02c"),
    _mask_method("magnitude", "the largest |w| (baseline)", 40, "#d62728"),
    _mask_method("task_grad", "the largest squared task-loss gradients before training (baseline)", 50, "#9467bd"),
    MethodInfo("fo-sgd", "fo", "first-order SGD on every weight (backward pass)", default_scope="all", order=60,
               color="#8c564b"),
    MethodInfo("fo-adam", "fo", "first-order AdamW on every weight (backward pass)", default_scope="all",
               order=70, color="#e377c2"),
    MethodInfo("lora", "fo", "LoRA (r=8 on q_proj/v_proj unless set) with AdamW (peft; backward pass)",
               default_scope="all", settings=("lora_r", "lora_alpha", "lora_targets"), order=80, color="#17becf"),
    MethodInfo("qzo", "zo", "the quantization scales only, codes fixed; clipped projected gradient (QZO)",
               quantized=True, needs_scales=True, settings=("clip_threshold",), order=35, color="#6b6ecf"),
)
METHOD_INFO += (
    MethodInfo("quzo", "zo", "the int8/4-bit codes themselves, perturbed and updated by stochastic rounding (QuZO)",
               quantized=True, settings=("rounding",), order=36, color="#8c6d31",
               allowed=(("quant", ("int8", "nf4", "nf4-plain", "fp4", "fp4-plain")), ("optimizer", ("sgd",)),
                        ("scope", (None, "linear")))),
)

# The quantization backends a suite may name (``quant:``); what each stores and needs is its class's
# declaration (``quant.base.Backend``), read by the layers that load it.
QUANT_NAMES = ("none", "nf4", "fp4", "int8", "gptq", "hqq", "nf4-plain", "fp4-plain")
# The backends whose scales are plain float tensors the forward reads, which a method may perturb in place
# (``needs_scales``: QZO): nf4-plain's and fp4-plain's float32 absmax per block of 64 weights, int8's per row,
# gptq's float16 scale per group of 128 input columns of a row. nf4's and fp4's absmax values are 8-bit codes
# themselves (double quantization); hqq's layers are not opened up for it.
PLAIN_SCALES = ("nf4-plain", "fp4-plain", "int8", "gptq")


@dataclass(frozen=True)
class TaskInfo:
    """A task's name, the other names it answers to, and its default ``max_length`` (tokens): the next power
    of two above the longest example of its official train and validation splits with the embedded
    tokenizer, so a default run truncates nothing (MeZO's default is 2048 for every task)."""

    name: str
    max_length: int
    aliases: tuple[str, ...] = ()


TASK_INFO = (
    TaskInfo("sst2", 128, ("sst-2", "sst")),
    TaskInfo("rte", 512),
    TaskInfo("cb", 512),
    TaskInfo("boolq", 2048),
    TaskInfo("wsc", 256, ("wsc.fixed",)),
    TaskInfo("wic", 128),
    TaskInfo("multirc", 2048),
    TaskInfo("copa", 64),
    TaskInfo("squad", 1024, ("squad1", "squad-v1.1")),
    TaskInfo("drop", 2048),
    TaskInfo("alpaca", 2048, ("instruction",)),  # longest Alpaca row: 1,156 tokens (99th percentile 318)
)


def _registry(kind: str, items: tuple, key=lambda item: item) -> Registry:
    reg = Registry(kind)
    for item in items:
        reg.register(key(item), item)
        for alias in getattr(item, "aliases", ()):
            reg.register(alias, item, alias=True)
    return reg


METHODS = _registry("method", METHOD_INFO, lambda m: m.name)
QUANTS = _registry("quant backend", QUANT_NAMES)
TASKS = _registry("task", TASK_INFO, lambda t: t.name)


def method_settings() -> set[str]:
    """Every method-specific config key: a cell's identity drops those its own method does not use."""
    return {key for m in METHOD_INFO for key in m.settings}


# Every phase a cell may measure, in the order they run: the whole cell's peak is the largest of them, and a
# budget may name the ones it holds.
CELL_PHASES = ("load", "mask", "quantize", "eval_before", "warmup", "train", "eval_dev", "eval_after", "eval_best")
