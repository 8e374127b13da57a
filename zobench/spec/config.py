"""Typed configuration of one run (a suite cell or `zobench train`), validated before anything loads.

Every key has a type and a default; ``CellConfig.from_dict`` rejects unknown keys (with a did-you-mean),
wrong types and bad values with one line naming the key and where it came from. Names (methods, quant
backends, tasks, models) are checked against what the ground declares of them (``spec.catalog``,
``spec.models``), so validating a config imports no torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, fields
from typing import Any

from zobench.errors import UserError, shown
from zobench.spec import catalog
from zobench.spec.catalog import MethodInfo
from zobench.spec.models import check_model_spec

DTYPES = ("float32", "bfloat16", "float16")
DIRECTIONS = ("rademacher", "gaussian")
# How z is drawn from a step's seed: "philox", counter-based (zobench.zo.fused: one fused pass, the same z on
# every device and thread count); "torch", torch.Generator words through a sign table (zobench.zo.directions:
# what every run before the setting existed drew, so its saved trajectories replay bit for bit).
GENERATORS = ("philox", "torch")
SCOPES = ("linear", "linear+head", "all")
OPTIMIZERS = ("sgd", "momentum", "adam")
SHAPE_WARMUPS = ("auto", "always", "never")  # auto: on CUDA devices (CellConfig.shape_warmup)
MALLOCS = ("release", "glibc")  # how the cell's process allocates host memory (CellConfig.malloc, zobench.procs)
ROUNDINGS = ("stochastic", "nearest")  # quzo: how perturbations and updates land on the low-bit grid
SCHEDULES = ("constant", "linear")
# Upper bounds: far beyond any real run, low enough that a typo (steps: 1e30) is refused, not run.
LIMITS = {"lora_r": 1 << 16, "lora_alpha": 1 << 20,
          "steps": 10**8, "n_train": 10**9, "n_dev": 10**9, "n_test": 10**9, "max_length": 1 << 20,
          "batch_size": 1 << 16, "eval_batch_size": 1 << 16, "q": 1024, "calib_sequences": 1 << 20,
          "calib_length": 1 << 20, "warmup_steps": 10**8, "eval_every": 10**8, "ref_every": 10**8}
# Settings a file (a suite, a delta, a checkpoint) may never choose (docs/security.md): remote code runs only
# when the command line asks for it, and where progress is kept is the driver's business.
NOT_FROM_FILES = {
    "trust_remote_code": "remote code runs only when the command line asks (--trust-remote-code)",
    "checkpoint": "zobench run keeps each cell's progress itself",
    "overwrite": "replacing a kept result needs --overwrite on the command line",
    "predictions": "zobench keeps each cell's predictions beside its record itself",
}
AT_LEAST_0 = ("steps", "n_train", "n_dev", "n_test", "warmup_steps", "eval_every")
AT_LEAST_1 = ("batch_size", "eval_batch_size", "q", "calib_sequences", "calib_length", "ref_every", "lora_r",
              "lora_alpha")


@dataclass
class CellConfig:
    # what is trained
    model: str = "smollm2"
    model_fallback: str | None = None  # loaded instead when `model` cannot be (e.g. random:llama-2-7b)
    dtype: str = "float32"
    quant: str = "none"
    task: str = "sst2"
    data_dir: str | None = None
    trust_remote_code: bool = False
    device: str = "auto"
    # data
    n_train: int = 1000
    n_dev: int = 500
    n_test: int = 1000
    dev_from: str = "train"            # or "validation": dev drawn like test (tasks.base.Task.sample)
    max_length: int | None = None      # default: the task's (long enough for its longest example)
    batch_size: int = 16
    eval_batch_size: int = 16
    shared_prompt: bool = True         # score single-token options from one forward of their prompt
    pack: bool = False                 # forward packed rows, not padding (tasks.scoring; llama-like models)
    # method
    method: str = "full"
    density: float = 1e-3              # mask methods: the fraction of the scope trained
    scope: str | None = None           # default: the method's (all for full ZO as in MeZO, linear for masks)
    per_tensor: bool = False
    calib_path: str | None = None
    calib_sequences: int = 16
    calib_length: int = 256
    layer_fraction: float = 0.25       # lezo: the fraction of transformer blocks perturbed each step
    # qzo: the bound C on the directional derivative, (L+ - L-) / (2 eps) clipped to [-C, C] before the
    # update. 100 is the QZO authors' value (their released code clamps to +-100 under --clip_zo_grad);
    # their eps is 1e-3 (zobench's default) and their lr 1e-7 (OPT-6.7B, SST-2) to 1e-5 (their script's
    # default): a suite sets lr for qzo cells.
    clip_threshold: float = 100.0
    rounding: str = "stochastic"       # quzo: onto the grid stochastically (unbiased) or to the nearest level
    lora_r: int = 8                    # lora: the adapter's rank,
    lora_alpha: int = 16               # its scaling numerator (alpha / r),
    lora_targets: str = "q_proj,v_proj"  # and the linears it wraps, by module name, comma-separated
    # optimisation
    steps: int = 100
    lr: float = 1e-6
    eps: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "constant"
    optimizer: str = "sgd"
    momentum: float = 0.9
    q: int = 1
    direction: str = "rademacher"
    generator: str = "philox"
    master_fp32: bool = False
    # evaluation and measurement
    eval_before: bool = True
    eval_after: bool = True
    eval_every: int = 0
    warmup_steps: int = 2
    ref_every: int = 1                 # an in-cell reference forward after every N-th timed step
    # before the first step, one forward at each batch shape the steps will use, so that per-shape set-up
    # (cuDNN attention's plan for a new sequence length on CUDA: ~40 ms on an H200, a one-time cost that a
    # long run amortises) is not timed as a step; auto: on CUDA devices, always, never
    shape_warmup: str = "auto"
    # the host allocator: "release" hands every freed block over 128 KiB back to the OS at once (peaks are of
    # live memory, the same from run to run; forwards pay page faults); "glibc" leaves malloc as a user's
    # process has it (timings as a user gets them; peaks include what the heap kept, ~10% from run to run)
    malloc: str = "release"
    seed: int = 0
    timeout_s: float | None = None      # this cell's limit in a suite (default: the suite's timeout_s)
    # keeping and reusing what was trained (zobench.cell.delta)
    save: str | None = None            # keep the trained result there (in a suite: one directory per cell)
    overwrite: bool = False            # an existing delta at `save` may be replaced (--overwrite only)
    delta: str | None = None           # start from a saved result on top of the model
    checkpoint: str | None = None      # a suite cell's progress file (zobench.cell.checkpoint), set by the driver
    predictions: str | None = None     # where per-example predictions go (zobench.cell.predictions), likewise

    def __post_init__(self):
        if self.max_length is None and self.task in catalog.TASKS:  # an unknown task is reported by validate()
            self.max_length = catalog.TASKS.get(self.task).max_length

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config", check_paths: bool = True) -> "CellConfig":
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, value in d.items():
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1) if isinstance(key, str) else []
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise UserError(f"{where}: unknown key '{shown(key)}'{hint}")
            values[key] = _coerce(value, known[key], where)
        cfg = cls(**values)
        cfg.validate(where, check_paths)
        return cfg

    @classmethod
    def from_file(cls, d: dict[str, Any], where: str) -> "CellConfig":
        """``from_dict`` for settings read from a file: the keys of ``NOT_FROM_FILES`` are refused."""
        refuse_file_keys(d, where)
        return cls.from_dict(d, where)

    # -- validation --------------------------------------------------------------------------------
    def validate(self, where: str = "config", check_paths: bool = True) -> None:
        self._check_names(where)
        self._check_numbers(where)
        self._check_choices(where)
        for key in ("calib_path", "data_dir", "delta") if check_paths else ():
            path = getattr(self, key)
            if path and not os.path.exists(path):
                self._bad(where, key, "an existing path")

    def _bad(self, where: str, key: str, expected: str):
        raise UserError(f"{where}: key '{key}' = {shown(repr(getattr(self, key)))}: expected {expected}")

    def _check_names(self, where: str) -> None:
        for key, registry in (("method", catalog.METHODS), ("quant", catalog.QUANTS), ("task", catalog.TASKS)):
            try:
                registry.check(getattr(self, key))  # the known names and a did-you-mean on a typo
            except UserError as e:
                raise UserError(f"{where}: key '{key}': {e}") from None
        check_model_spec(self.model, f"{where}: key 'model'")
        if self.model_fallback is not None:
            check_model_spec(self.model_fallback, f"{where}: key 'model_fallback'")

    def _check_numbers(self, where: str) -> None:
        for key, top in LIMITS.items():
            if getattr(self, key) > top:
                self._bad(where, key, f"at most {top:g}")
        for key in AT_LEAST_0:
            if getattr(self, key) < 0:
                self._bad(where, key, "a number >= 0")
        for key in AT_LEAST_1:
            if getattr(self, key) < 1:
                self._bad(where, key, "a number >= 1")
        for key in ("density", "layer_fraction"):
            if not 0 < getattr(self, key) <= 1:
                self._bad(where, key, "a fraction in (0, 1]")
        if self.eps <= 0:
            self._bad(where, "eps", "a positive number")
        if self.clip_threshold <= 0:
            self._bad(where, "clip_threshold", "a positive number")
        if self.lr < 0:
            self._bad(where, "lr", "a number >= 0")
        if self.weight_decay < 0:  # (torch's optimizers refuse it too: a negative decay grows the weights)
            self._bad(where, "weight_decay", "a number >= 0")
        if not 0 <= self.momentum < 1:  # at 1 and above the heavy ball's buffer never forgets, or grows
            self._bad(where, "momentum", "a number in [0, 1)")
        if self.steps > 0 and self.n_train < 1:
            self._bad(where, "n_train", f"a number >= 1 for a cell that runs steps ({self.steps}: each draws a "
                                        f"batch of training examples)")
        if self.max_length < 2:  # a prompt token and an answer (or response) token at least
            self._bad(where, "max_length", "a number >= 2")
        if not 0 <= self.seed < 2**63:  # (torch.manual_seed takes no more)
            self._bad(where, "seed", "a whole number in [0, 2**63)")
        if self.timeout_s is not None and self.timeout_s <= 0:
            self._bad(where, "timeout_s", "a positive number of seconds")
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]{1,3})?", self.device):  # what cells and the estimator run on
            self._bad(where, "device", "auto, cpu, cuda or cuda:N")
        if not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", t) for t in self.lora_targets.split(",")):
            self._bad(where, "lora_targets", "module names separated by commas (q_proj,v_proj)")

    def _check_choices(self, where: str) -> None:
        choices = {"dev_from": ("train", "validation"), "dtype": DTYPES, "direction": DIRECTIONS,
                   "generator": GENERATORS, "optimizer": OPTIMIZERS,
                   "schedule": SCHEDULES, "scope": (None, *SCOPES), "rounding": ROUNDINGS,
                   "shape_warmup": SHAPE_WARMUPS, "malloc": MALLOCS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                self._bad(where, key, "one of " + ", ".join(str(a) for a in allowed if a is not None))
        if self.method_info.needs_scales and self.quant not in catalog.PLAIN_SCALES:
            self._bad(where, "quant", f"one of {', '.join(catalog.PLAIN_SCALES)} for method '{self.method}', which "
                                      f"trains the quantization scales (plain float scales only: nf4's are "
                                      f"8-bit codes themselves)")
        for key, allowed in self.method_info.allowed:  # what the method needs of the cell (spec.catalog)
            if getattr(self, key) not in allowed:
                self._bad(where, key, f"one of {', '.join(str(a) for a in allowed if a is not None)} with "
                                      f"method '{self.method}'")
        if self.quant != "none" and self.method_info.needs_mask and self.resolved_scope != "linear":
            self._bad(where, "scope", "'linear' with a quant backend (the sparse values live beside the "
                                      "quantized linears)")
        if self.method_info.needs_scales and self.resolved_scope != "linear":
            self._bad(where, "scope", f"'linear' for method '{self.method}' (the scales are the quantized linears')")

    # -- derived -----------------------------------------------------------------------------------
    @property
    def method_info(self) -> MethodInfo:
        """What the method declares (``spec.catalog``): its family, whether it needs a mask, its settings."""
        return catalog.METHODS.get(self.method)

    @property
    def lora_modules(self) -> tuple[str, ...]:
        return tuple(self.lora_targets.split(","))

    @property
    def resolved_scope(self) -> str:
        return self.scope or self.method_info.default_scope

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def refuse_file_keys(d: dict[str, Any], where: str) -> None:
    """One line naming the first key of ``d`` that no file may set (``NOT_FROM_FILES``)."""
    for key in d:
        if key in NOT_FROM_FILES:
            raise UserError(f"{where}: key '{key}' cannot be set in a file: {NOT_FROM_FILES[key]}")


def _coerce(value: Any, f: dataclasses.Field, where: str) -> Any:
    """Accept the YAML/CLI spellings of a field's type (ints for floats, '1e-3' strings for floats)."""
    t = str(f.type)
    if value is None and "None" in t:
        return None
    if t.startswith("bool"):
        if isinstance(value, bool):
            return value
    elif t.startswith("int"):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)  # 1.0e+3 in YAML is a float; a whole number is what was meant
    elif t.startswith("float"):
        number = _number(value)
        if number is not None:
            if math.isfinite(number):
                return number
            raise UserError(f"{where}: key '{f.name}' = {value!r}: expected a finite number")
    elif t.startswith("str"):
        if isinstance(value, str):
            return value
    name = t.split(" ")[0].replace("|", " or ")
    raise UserError(f"{where}: key '{f.name}' = {value!r}: expected {name}")


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None
