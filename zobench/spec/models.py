"""Model specs as names, checked without loading anything (no torch, no transformers): pure data, so the spec
checks a suite's models without the layers that load them.

A spec is one of (see ``zobench.models.load``): the embedded default ``smollm2``; ``random:<config>``
(a shipped architecture config or a path to a ``config.json``); a ``.gguf`` file; a local model
directory; or a Hugging Face hub id ``org/name``. ``check_model_spec`` refuses what can never load (an
unknown short name, a missing file or shipped config) with a did-you-mean, so that a typo fails when
the suite is read instead of as a failed cell after minutes of other cells.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from zobench.errors import UserError

BUILTIN = {"smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf"}
# The shipped architecture configs: package data beside the loader (zobench/models/configs), read here as files.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "models" / "configs"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def random_config_path(name: str) -> Path:
    """The config file behind ``random:<name>``: a shipped config by name, or a path to a .json file."""
    path = Path(name)
    return path if path.suffix == ".json" else CONFIG_DIR / f"{name}.json"


def _hint(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def check_model_spec(spec, where: str) -> str:
    """``spec`` if it can name a model, else a one-line ``UserError`` (``where`` names file and key)."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"{where} = {spec!r}: expected a model name")
    if spec.lower() in BUILTIN:
        return spec
    if spec.startswith("random:"):
        name = spec.split(":", 1)[1]
        if not random_config_path(name).is_file():
            configs = shipped_configs()
            raise UserError(f"{where} = {spec!r}: no such architecture config (shipped: {', '.join(configs)}, "
                            f"or a path to a config.json){_hint(name, configs)}")
        return spec
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"{where} = {spec!r}: GGUF file not found")
        return spec
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{where} = {spec!r}: directory has no config.json")
        return spec
    if spec.startswith((".", "/", "~")) or path.exists():
        raise UserError(f"{where} = {spec!r}: no model directory there")
    if HUB_ID.match(spec):
        return spec  # a hub id: whether it can be fetched (or is cached) is only known when it loads
    known = sorted(BUILTIN) + [f"random:{c}" for c in shipped_configs()]
    raise UserError(f"{where} = {spec!r}: unknown model (expected smollm2, random:<config>, a .gguf file, a "
                    f"model directory or a hub id 'org/name'){_hint(spec, known)}")
