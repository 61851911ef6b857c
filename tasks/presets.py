"""Presets: YAML files in `configs/` that list only what differs from the defaults.

A preset has one section per stage (`shapes`, `ingest`, `embed`, `train`,
`evaluate`, `register`); each
section is validated by that stage's own config model, so an unknown key or a
bad value is an error that names it. `--set train.steps=100` style overrides are
applied on top.

    preset = load_preset("cpu-demo", overrides=["train.steps=50"])
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from tasks.embed import EmbedConfig
from tasks.evaluate import EvalConfig
from tasks.ingest import IngestConfig
from tasks.register_config import RegisterConfig
from tasks.shapes import ShapesConfig
from tasks.train import TrainConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


# `register` is also the name of ABCMeta.register on the class; the field shadows it harmlessly.
warnings.filterwarnings("ignore", message='Field name "register" in "Preset" shadows', category=UserWarning)


class Preset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "defaults"
    description: str = ""
    shapes: ShapesConfig = Field(default_factory=ShapesConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    register: RegisterConfig = Field(default_factory=RegisterConfig)


def available_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_preset_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} and path.is_file():
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    raise ValueError(
        f"unknown preset {str(name_or_path)!r}: not a YAML file and not one of {available_presets()} in {CONFIG_DIR}"
    )


def load_preset(name_or_path: str | Path | None = None, overrides: list[str] | None = None) -> Preset:
    """Defaults, then the preset file, then `section.key=value` overrides (values parsed as YAML)."""
    raw: dict[str, Any] = {}
    if name_or_path is not None:
        path = resolve_preset_path(name_or_path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path} is not valid YAML: {error}") from error
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a preset must be a mapping of sections, got {type(loaded).__name__}")
        raw = {"name": path.stem, **loaded}
    for item in overrides or []:
        raw = apply_override(raw, item)
    return Preset.model_validate(raw)


def yaml_string(value: str) -> str:
    """`value` as a YAML scalar that `apply_override` reads back as the same string: a JSON
    string (JSON is YAML), quotes and backslashes escaped, other characters as they are."""
    return json.dumps(value, ensure_ascii=False)


def apply_override(raw: dict[str, Any], item: str) -> dict[str, Any]:
    """`train.unet.channels=[32,64]` -> raw["train"]["unet"]["channels"] = [32, 64] (a new dict)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {item!r} must look like section.key=value, e.g. train.steps=100")
    out = copy.deepcopy(raw)
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {part!r} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as error:
        raise ValueError(
            f"override {item!r}: the value is not valid YAML ({' '.join(str(error).split())}); "
            "quote a string that holds YAML syntax, e.g. key='a: b'"
        ) from error
    return out
