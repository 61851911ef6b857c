"""The register stage's config, apart from `tasks/register.py` so that presets load without MLflow
(the GPU benchmark box reads presets but has no MLflow or Prefect)."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator


class RegisterConfig(BaseModel):
    """Where a model is registered. Presets (section `register`) list only what differs."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model_name: str = "t2i-shapes"
    experiment: str = "t2i"
    tags: dict[str, str] = Field(default_factory=dict, description="extra tags for every registered version")

    @field_validator("model_name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError(f"model_name {v!r}: use letters, digits, '_', '.', '-' (it becomes part of a models:/ URI)")
        return v
