"""Every field of a delta checked before use: a delta is data from someone else (docs/security.md).

What is refused, each in one line naming the file and the field (the tensors' own checks are
``cell.delta_tensors``'s; everything here is pure data, no torch): a ``delta.json`` of another shape, format
or kind; a step that is not a whole number in [0, 10^8]; a config with keys zobench does not know or values
of the wrong type (the same checks as a suite's settings, ``CellConfig``); a trajectory shorter than its
step or with seeds and coefficients that are not finite numbers of the right kind; tensors whose safetensors
header is broken, whose names are not ``<param>::index`` / ``<param>::value`` pairs, whose indices are not
1-D integers, unique and non-negative, or whose values are not finite; a LoRA adapter without a readable
``adapter_config.json`` or with pickled weights.

A delta may name its base model (an id or a path: data, checked against the weights' fingerprint when it is
loaded), but it can never switch on remote code (``trust_remote_code`` from a file is ignored: only the
command line turns it on) or name code to import.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from zobench.errors import UserError, shown
from zobench.files import MAX_CONFIG_BYTES, read_json
from zobench.spec.config import LIMITS, NOT_FROM_FILES, CellConfig

FORMAT = 1
META = "delta.json"
TENSORS = "delta.safetensors"
KINDS = ("sparse", "trajectory", "lora", "tensors", "scales", "codes")
# Keys of deltas trained on instruction files (``zobench influence train``) beside a cell's settings.
INSTRUCTION_KEYS = ("data", "loss")
MAX_SEED = 2**63


def whole_number(value, where: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise UserError(f"{where}: expected a whole number in [{low}, {high:g}], got {value!r}"[:300])
    return value


def check_meta(meta, where: str) -> dict:
    """``meta`` (a parsed ``delta.json``) if it is a delta zobench can use, else one line saying why."""
    if not isinstance(meta, dict):
        raise UserError(f"{where}: not a zobench delta (expected a JSON object)")
    if meta.get("format") != FORMAT or isinstance(meta.get("format"), bool) or meta.get("kind") not in KINDS:
        raise UserError(f"{where}: not a zobench delta of format {FORMAT} (kind one of {', '.join(KINDS)})")
    whole_number(meta.get("step"), f"{where}: key 'step'", 0, LIMITS["steps"])
    base = meta.get("base")
    if not isinstance(base, dict) or not isinstance(base.get("fingerprint"), str) or \
            not isinstance(base.get("model"), str) or not base["model"]:
        raise UserError(f"{where}: key 'base': expected {{model: a name or path, fingerprint: a string}}")
    parent = meta.get("parent")
    if parent is not None and (not isinstance(parent, str) or not parent or "\0" in parent):
        raise UserError(f"{where}: key 'parent': expected the path of the parent delta")
    meta = dict(meta, config=check_config(meta.get("config"), f"{where}: config"))
    if meta["kind"] == "trajectory":
        check_trajectory(meta.get("trajectory"), meta["step"], f"{where}: key 'trajectory'")
    if meta["kind"] == "scales" and not isinstance(meta.get("scales_base"), str):
        raise UserError(f"{where}: key 'scales_base': expected the identity of the scales it was trained from")
    return meta


def check_config(config, where: str) -> dict:
    """The recorded training settings, type-checked as a suite's are (paths are not required to exist
    here: a delta can be evaluated on another machine with its own --data-dir). Settings no file may
    choose (``NOT_FROM_FILES``) are dropped: the command line decides them."""
    if not isinstance(config, dict):
        raise UserError(f"{where}: expected a mapping of settings")
    known = set(CellConfig.keys())
    for key in config:
        if key not in known and key not in INSTRUCTION_KEYS:
            raise UserError(f"{where}: unknown key '{key}'; a delta holds zobench's own settings only")
    data = config.get("data")
    if data is not None and not isinstance(data, str):
        raise UserError(f"{where}: key 'data': expected the path of an instruction file")
    settings = {k: v for k, v in config.items() if k in known and k not in NOT_FROM_FILES}
    CellConfig.from_dict(settings, where, check_paths=False)
    return {k: v for k, v in config.items() if k not in NOT_FROM_FILES}


def check_trajectory(trajectory, step: int, where: str) -> None:
    """A dense ZO run's steps: at least ``step`` of them, each a list of [seed, coefficient] pairs."""
    if not isinstance(trajectory, list) or len(trajectory) < step:
        raise UserError(f"{where}: expected a list of at least {step} steps (the delta's step)")
    for i, directions in enumerate(trajectory[:step]):
        if not isinstance(directions, list) or not directions:
            raise UserError(f"{where}[{i}]: expected a list of [seed, coefficient] pairs")
        for pair in directions:
            if not isinstance(pair, list) or len(pair) != 2:
                raise UserError(f"{where}[{i}]: expected [seed, coefficient] pairs")
            seed, coef = pair
            whole_number(seed, f"{where}[{i}]: seed", 0, MAX_SEED - 1)
            if not isinstance(coef, (int, float)) or isinstance(coef, bool) or not math.isfinite(coef):
                raise UserError(f"{where}[{i}]: coefficient {coef!r} is not a finite number")


def resolve_paths(meta: dict, folder: Path) -> dict:
    """Paths inside ``meta`` made usable from here: a relative path is the delta folder's (see
    ``zobench.cell.delta``), never the working directory's (a parent found there would be another delta,
    applied silently if it had the same base weights)."""
    def local(value: str) -> str:
        return value if os.path.isabs(value) else os.path.normpath(folder / value)

    meta = dict(meta)
    if meta.get("parent"):
        meta["parent"] = local(meta["parent"])
    config = dict(meta["config"])
    for key in ("data_dir", "calib_path", "delta"):
        if isinstance(config.get(key), str) and config[key]:
            config[key] = local(config[key])
    model = meta["base"]["model"]
    if not model.startswith("random:") and (folder / model).exists() and not os.path.isabs(model):
        meta["base"] = dict(meta["base"], model=str(folder / model))
        if config.get("model") == model:
            config["model"] = str(folder / model)
    meta["config"] = config
    return meta


def check_adapter(path: Path) -> None:
    """A LoRA adapter directory zobench will load: a JSON ``adapter_config.json`` (bounded) and weights in
    safetensors, never a pickle (``adapter_model.bin`` could run code when unpickled)."""
    config = read_json(path / "adapter_config.json", "LoRA adapter config", MAX_CONFIG_BYTES)
    if not isinstance(config, dict) or config.get("peft_type") not in (None, "LORA"):
        raise UserError(f"{path / 'adapter_config.json'}: not a LoRA adapter config")
    if not (path / "adapter_model.safetensors").is_file():
        raise UserError(f"{path}: no adapter_model.safetensors (zobench loads adapter weights only as "
                        f"safetensors, never as a pickle)")
    # PEFT imports the module named by ``megatron_core`` when ``megatron_config`` is set: a file naming code
    # to import. (``auto_mapping``, which PEFT writes itself, is read only by AutoPeftModel loading, which
    # zobench never uses: the base model is the one the user named.)
    if config.get("megatron_config") is not None:
        raise UserError(f"{path / 'adapter_config.json'}: sets megatron_config, which makes PEFT import a module "
                        f"the file names; zobench loads plain LoRA adapters only")
    # Ranks and scales peft allocates by before it checks anything against the weights (r = 2,000,000 took
    # 4 GB; 10**9 asked for 256 GB): bounded as a suite's lora_r / lora_alpha are
    bounds = (("r", "rank_pattern", LIMITS["lora_r"]), ("lora_alpha", "alpha_pattern", LIMITS["lora_alpha"]))
    for key, pattern, top in bounds:
        per_module = config.get(pattern) or {}
        if not isinstance(per_module, dict):
            raise UserError(f"{path / 'adapter_config.json'}: {pattern}: expected a mapping of modules to numbers")
        for v in (config.get(key), *per_module.values()):
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v <= top):
                raise UserError(f"{path / 'adapter_config.json'}: {key} = {shown(v)}: expected a number in "
                                f"(0, {top}]")
