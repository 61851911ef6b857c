"""The register stage's config, apart from `tasks/register.py` so that presets load without MLflow
(the GPU benchmark box reads presets but has no MLflow or Prefect)."""

from __future__ import annotations

import posixpath
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator


# MLflow's rule for tag keys (mlflow.utils.validation._validate_tag_name), which it applies only when
# the version is created, after the model was logged.
TAG_KEY = re.compile(r"[/\w.\- :]{1,250}")
TAG_KEY_RULE = (
    "MLflow takes tag keys of letters, digits, '_', '.', '-', ' ', ':', '/' (at most 250; no '..', '//', "
    "leading or trailing '/')"
)


def invalid_tag_keys(keys) -> list[str]:
    """The keys MLflow would refuse as tag keys: other characters, too long, or not a normalised path."""
    return sorted(
        (k for k in keys
         if not (isinstance(k, str) and TAG_KEY.fullmatch(k)) or posixpath.normpath(k) != k or k == "."
         or k.startswith(("..", "/"))),
        key=str,
    )


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

    @field_validator("tags")
    @classmethod
    def _check_tags(cls, v: dict[str, str]) -> dict[str, str]:
        if bad := invalid_tag_keys(v):
            raise ValueError(f"tags {bad}: {TAG_KEY_RULE}")
        return v
