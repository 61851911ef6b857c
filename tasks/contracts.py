"""Descriptors passed between stages: small, JSON-serialisable, never tensors.

Prefect hashes and persists task inputs and results, so each stage hands the next
one of these (see ARCHITECTURE.md, "Contracts between stages").
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Descriptor(BaseModel):
    # NaN and infinities written as JSON's NaN/Infinity (as Python's json does), not null: a
    # diverged model's metric must read back as a float (`t2i evaluate` then `t2i register`).
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")


class DatasetVersion(_Descriptor):
    name: str
    version: str = Field(description="content hash of the source fingerprint and the ingest config")
    root: str = Field(description="directory holding train/, val/, rejects.parquet, manifest.json")
    counts: dict[str, int] = Field(description="rows per split: train, val, rejects")
    resolution: int
    manifest: str


class EmbeddingSet(_Descriptor):
    path: str
    dataset_version: str
    encoder_id: str = Field(description="short, filesystem-safe identity of the encoder")
    encoder: dict = Field(description="model name, weights identity, layer, width, context length")
    num_tokens: int = Field(description="context length the token states pad back to")
    width: int
    counts: dict[str, int]


class TrainResult(_Descriptor):
    run_dir: str
    checkpoint: str
    step: int
    mlflow_run_id: str | None = None
    metrics: dict[str, float] = {}


class EvalReport(_Descriptor):
    grid_path: str
    metrics: dict[str, float]
    primary_metric: str
    threshold: float
    passed: bool
    reason: str


class RegisteredModel(_Descriptor):
    name: str
    version: str
    uri: str
    aliases: list[str]
