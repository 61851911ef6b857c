"""The whole pipeline as one Prefect flow, plus sub-flows usable alone.

    caption source -> ingest -> embed -> train -> evaluate -> register

Flow bodies only sequence tasks and pass descriptors (tasks/contracts.py); all work
lives in `tasks/`. Parameters are pydantic models with titles and descriptions, so
the Prefect UI renders a typed form for a deployment of `text_to_image_pipeline`.

Every stage task runs under STAGE_POLICIES (retries with exponential backoff and jitter,
a timeout); a stage that fails for good ends the run Failed with a message naming the
stage and the cause. Each stage publishes atomically, so a failed run leaves no partial
dataset, embedding set or registered version behind. What a run produced is shown as
Prefect artifacts (flows/artifacts.py).

    python -m flows.pipeline            # the cpu-demo preset, Prefect's ephemeral API
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from prefect import Task, flow, get_run_logger
from prefect.tasks import exponential_backoff
from pydantic import BaseModel, ConfigDict, Field

from flows.artifacts import publish_dataset, publish_grid, publish_registry, publish_training
from tasks import storage
from tasks.contracts import DatasetVersion, EmbeddingSet, EvalReport, RegisteredModel, TrainResult
from tasks.embed import embed_task
from tasks.evaluate import evaluate_task
from tasks.ingest import ingest_task
from tasks.presets import Preset, load_preset, yaml_string
from tasks.register import register_task
from tasks.shapes import MIN_SHAPES_RESOLUTION, shapes_task
from tasks.train import train_task


class PipelineParams(BaseModel):
    """What a run may change; everything else comes from the preset."""

    model_config = ConfigDict(extra="forbid")

    preset: str = Field("cpu-demo", title="Preset", description="a name in configs/ (cpu-demo, gpu-32px, gpu-64px) or a YAML path")
    source: str | None = Field(
        None,
        title="Caption source",
        description="image folder (metadata.jsonl/csv/parquet or sidecar .txt), WebDataset tar folder, or URL list; "
        "empty: generate the built-in shapes dataset",
    )
    dataset_name: str = Field("shapes", title="Dataset name", description="name under data/datasets/")
    resolution: int | None = Field(None, title="Resolution", ge=8, description="training image side in pixels; empty: the preset's")
    encoder_weights: str | None = Field(
        None, title="Text encoder weights", description="open_clip weights file path or cached tag; empty: the preset's"
    )
    steps: int | None = Field(None, title="Training steps", ge=1, description="empty: the preset's")
    batch_size: int | None = Field(None, title="Batch size", ge=1, description="empty: the preset's")
    sampler: str | None = Field(None, title="Evaluation sampler", description="ddim, dpmpp_2m or ddpm; empty: the preset's")
    gate_threshold: float | None = Field(
        None,
        title="Gate threshold",
        allow_inf_nan=False,
        description="the primary metric a model must reach to become champion; empty: the preset's",
    )
    model_name: str | None = Field(None, title="Registered model name", description="MLflow registered model; empty: the preset's")
    overrides: list[str] = Field(
        default_factory=list, title="Overrides", description="extra section.key=value settings, e.g. train.lr=0.001; the fields above win over these"
    )
    dask_address: str | None = Field(
        None,
        title="Dask scheduler",
        description="tcp://host:8786 to run ingest's and embed's shards on; empty: T2I_DASK_ADDRESS, else this machine",
    )
    train_timeout_hours: float = Field(
        24.0, title="Training timeout (hours)", gt=0,
        description="a training attempt running longer is stopped and retried; the retry resumes from its last checkpoint",
    )

    def to_preset(self) -> Preset:
        """The preset with this run's parameters applied on top (validated like the preset file)."""
        mapped = {
            "ingest.resolution": self.resolution,
            # The shapes source is drawn at 32 px at least, then scaled down by ingest: drawn smaller
            # (aliased), a small circle and a small square share their pixels and captions mislabel them.
            "shapes.resolution": None if self.resolution is None else max(self.resolution, MIN_SHAPES_RESOLUTION),
            "train.resolution": self.resolution,  # evaluate needs none: it samples at the checkpoint's resolution
            "embed.encoder.weights": self.encoder_weights,
            "train.steps": self.steps,
            "train.batch_size": self.batch_size,
            "evaluate.sampler": self.sampler,
            "evaluate.threshold": self.gate_threshold,
            "register.model_name": self.model_name,
        }
        overrides = [f"{k}={_yaml_scalar(v)}" for k, v in mapped.items() if v is not None]
        # The typed fields win over `overrides`: a UI form's field beats a deployment's --set.
        return load_preset(self.preset, list(self.overrides) + overrides)


def _yaml_scalar(value: object) -> str:
    return yaml_string(value) if isinstance(value, str) else str(value)


# ---- how the flow runs a stage ------------------------------------------------------------------

R = TypeVar("R")
_HOUR = 3600.0


@dataclass(frozen=True)
class StagePolicy:
    """Retries of a stage task, spaced by exponential backoff with jitter (retries of many runs
    against one tracking server or object store spread out instead of arriving together), and a
    timeout, so that a hung attempt fails and is retried instead of holding its worker forever.
    Each stage is idempotent and publishes atomically, so a retry never sees half an output."""

    retries: int
    first_delay_s: float  # doubles with each further retry
    timeout_s: float
    jitter: float = 0.5  # a delay d becomes a random one in [0.63 d, 1.5 d], mean d (Prefect's clamped Poisson)

    def apply(self, stage_task: Task[..., R], timeout_s: float | None = None) -> Task[..., R]:
        return stage_task.with_options(
            retries=self.retries,
            retry_delay_seconds=exponential_backoff(backoff_factor=self.first_delay_s),
            retry_jitter_factor=self.jitter,
            timeout_seconds=timeout_s if timeout_s is not None else self.timeout_s,
        )


# Keyed by task name. Timeouts are generous upper bounds for the GPU presets (gpu-64px trains ~4.5 h);
# training's comes from PipelineParams.train_timeout_hours. Prefect enforces them inside the process
# (SIGALRM on the main thread): meant for hangs, since an attempt stopped in the middle of a first
# import or of MLflow's database setup can leave that process unable to retry cleanly.
STAGE_POLICIES: Mapping[str, StagePolicy] = MappingProxyType({
    "shapes": StagePolicy(retries=1, first_delay_s=5, timeout_s=0.5 * _HOUR),
    "ingest": StagePolicy(retries=2, first_delay_s=10, timeout_s=12 * _HOUR),
    "embed": StagePolicy(retries=2, first_delay_s=10, timeout_s=6 * _HOUR),
    "train": StagePolicy(retries=2, first_delay_s=10, timeout_s=24 * _HOUR),
    "evaluate": StagePolicy(retries=2, first_delay_s=10, timeout_s=3 * _HOUR),
    "register": StagePolicy(retries=2, first_delay_s=10, timeout_s=1 * _HOUR),
})


class StageFailed(RuntimeError):
    """A stage failed for good (its retries spent, or a failure retrying cannot fix). The message,
    which becomes the flow run's state message, names the stage and the cause."""

    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"stage {stage!r} failed: {type(cause).__name__}: {cause}")
        self.stage = stage


def run_stage(stage_task: Task[..., R], *args: Any, timeout_s: float | None = None, **kwargs: Any) -> R:
    """Call a stage task under its STAGE_POLICIES entry; its final failure is raised as StageFailed.

    A cached result whose output is gone (`make clean`, a wiped volume) is not trusted: the
    task runs again with its cache refreshed, which rebuilds (or, with an s3:// data root,
    first tries to pull) what the descriptor names."""
    policy = STAGE_POLICIES[stage_task.name]
    try:
        result = policy.apply(stage_task, timeout_s)(*args, **kwargs)
        if _output_missing(result):
            log = get_run_logger()
            log.warning("cached %s output %s is gone; running %s again", stage_task.name, _output_dir(result), stage_task.name)
            result = policy.apply(stage_task.with_options(refresh_cache=True), timeout_s)(*args, **kwargs)
        return result
    except Exception as exc:
        raise StageFailed(stage_task.name, exc) from exc


def _output_dir(result: object) -> Path | None:
    if isinstance(result, DatasetVersion):
        return Path(result.root)
    if isinstance(result, EmbeddingSet):
        return Path(result.path)
    return None


def _output_missing(result: object) -> bool:
    """A published dataset version or embedding set (manifest last) that is neither here nor pullable."""
    directory = _output_dir(result)
    if directory is None or (directory / "manifest.json").is_file():
        return False
    try:
        storage.pull(directory)
    except storage.StorageError:
        return True
    return not (directory / "manifest.json").is_file()


def _ingest(params: PipelineParams, preset: Preset) -> DatasetVersion:
    """The source (or the generated shapes set) to a published dataset version."""
    source = params.source or run_stage(shapes_task, preset.shapes)
    dataset = run_stage(ingest_task, source, params.dataset_name, preset.ingest, dask_address=params.dask_address)
    publish_dataset(dataset)
    return dataset


def _evaluate_and_register(
    train: TrainResult, dataset: DatasetVersion, preset: Preset
) -> tuple[EvalReport, RegisteredModel]:
    """Evaluate a training run, then register it (champion only if the gate passes)."""
    report = run_stage(evaluate_task, train, dataset, preset.evaluate, model_name=preset.register.model_name)
    publish_grid(report)
    registered = run_stage(register_task, train, report, preset.register)
    publish_registry(registered, report)
    return report, registered


class PipelineSummary(BaseModel):
    dataset: DatasetVersion
    embeddings: EmbeddingSet
    train: TrainResult
    report: EvalReport
    registered: RegisteredModel


@flow(name="ingest-dataset", log_prints=True)
def ingest_flow(params: PipelineParams = PipelineParams()) -> DatasetVersion:
    """Sub-flow: the source (or the generated shapes set) to a published dataset version."""
    return _ingest(params, params.to_preset())


@flow(name="ingest-and-embed", log_prints=True)
def ingest_embed_flow(params: PipelineParams = PipelineParams()) -> EmbeddingSet:
    """Sub-flow: ingest, then precompute the caption embeddings."""
    preset = params.to_preset()
    dataset = ingest_flow(params)
    return run_stage(embed_task, dataset, preset.embed, dask_address=params.dask_address)


@flow(name="evaluate-and-register", log_prints=True)
def evaluate_register_flow(
    train: TrainResult, dataset: DatasetVersion, params: PipelineParams = PipelineParams()
) -> RegisteredModel:
    """Sub-flow: evaluate an existing training run and register it (champion only if the gate passes)."""
    _, registered = _evaluate_and_register(train, dataset, params.to_preset())
    return registered


@flow(name="text-to-image-pipeline", log_prints=True)
def text_to_image_pipeline(params: PipelineParams = PipelineParams()) -> PipelineSummary:
    """Caption source -> dataset version -> embeddings -> trained UNet -> evaluation -> registry."""
    preset = params.to_preset()
    dataset = _ingest(params, preset)
    embeddings = run_stage(embed_task, dataset, preset.embed, dask_address=params.dask_address)
    started = time.perf_counter()
    trained = run_stage(train_task, dataset, embeddings, preset.train, timeout_s=params.train_timeout_hours * _HOUR)
    publish_training(trained, wall_s=time.perf_counter() - started)
    report, registered = _evaluate_and_register(trained, dataset, preset)
    return PipelineSummary(dataset=dataset, embeddings=embeddings, train=trained, report=report, registered=registered)


if __name__ == "__main__":
    text_to_image_pipeline()
