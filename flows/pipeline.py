"""The whole pipeline as one Prefect flow, plus sub-flows usable alone.

    caption source -> ingest -> embed -> train -> evaluate -> register

Flow bodies only sequence tasks and pass descriptors (tasks/contracts.py); all work
lives in `tasks/`. Parameters are pydantic models with titles and descriptions, so
the Prefect UI renders a typed form for a deployment of `text_to_image_pipeline`.

    python -m flows.pipeline            # the cpu-demo preset, Prefect's ephemeral API
"""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from tasks.contracts import DatasetVersion, EmbeddingSet, EvalReport, RegisteredModel, TrainResult
from tasks.embed import embed_task
from tasks.evaluate import evaluate_task
from tasks.ingest import ingest_task
from tasks.presets import Preset, load_preset
from tasks.register import register_task
from tasks.shapes import shapes_task
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
        None, title="Gate threshold", description="the primary metric a model must reach to become champion; empty: the preset's"
    )
    model_name: str | None = Field(None, title="Registered model name", description="MLflow registered model; empty: the preset's")
    overrides: list[str] = Field(
        default_factory=list, title="Overrides", description="extra section.key=value settings, e.g. train.lr=0.001"
    )

    def to_preset(self) -> Preset:
        """The preset with this run's parameters applied on top (validated like the preset file)."""
        mapped = {
            "ingest.resolution": self.resolution,
            "shapes.resolution": self.resolution,
            "embed.encoder.weights": self.encoder_weights,
            "train.steps": self.steps,
            "train.batch_size": self.batch_size,
            "evaluate.sampler": self.sampler,
            "evaluate.threshold": self.gate_threshold,
            "register.model_name": self.model_name,
        }
        overrides = [f"{k}={_yaml_scalar(v)}" for k, v in mapped.items() if v is not None]
        return load_preset(self.preset, overrides + list(self.overrides))


def _yaml_scalar(value: object) -> str:
    return f"'{value}'" if isinstance(value, str) else str(value)


class PipelineSummary(BaseModel):
    dataset: DatasetVersion
    embeddings: EmbeddingSet
    train: TrainResult
    report: EvalReport
    registered: RegisteredModel


@flow(name="ingest-dataset", log_prints=True)
def ingest_flow(params: PipelineParams = PipelineParams()) -> DatasetVersion:
    """Sub-flow: the source (or the generated shapes set) to a published dataset version."""
    preset = params.to_preset()
    source = params.source or shapes_task(preset.shapes)
    return ingest_task(source, params.dataset_name, preset.ingest)


@flow(name="ingest-and-embed", log_prints=True)
def ingest_embed_flow(params: PipelineParams = PipelineParams()) -> EmbeddingSet:
    """Sub-flow: ingest, then precompute the caption embeddings."""
    preset = params.to_preset()
    dataset = ingest_flow(params)
    return embed_task(dataset, preset.embed)


@flow(name="evaluate-and-register", log_prints=True)
def evaluate_register_flow(
    train: TrainResult, dataset: DatasetVersion, params: PipelineParams = PipelineParams()
) -> RegisteredModel:
    """Sub-flow: evaluate an existing training run and register it (champion only if the gate passes)."""
    preset = params.to_preset()
    report = evaluate_task(train, dataset, preset.evaluate, model_name=preset.register.model_name)
    return register_task(train, report, preset.register)


@flow(name="text-to-image-pipeline", log_prints=True)
def text_to_image_pipeline(params: PipelineParams = PipelineParams()) -> PipelineSummary:
    """Caption source -> dataset version -> embeddings -> trained UNet -> evaluation -> registry."""
    preset = params.to_preset()
    source = params.source or shapes_task(preset.shapes)
    dataset = ingest_task(source, params.dataset_name, preset.ingest)
    embeddings = embed_task(dataset, preset.embed)
    trained = train_task(dataset, embeddings, preset.train)
    report = evaluate_task(trained, dataset, preset.evaluate, model_name=preset.register.model_name)
    registered = register_task(trained, report, preset.register)
    return PipelineSummary(dataset=dataset, embeddings=embeddings, train=trained, report=report, registered=registered)


if __name__ == "__main__":
    text_to_image_pipeline()
