"""End to end: the whole Prefect flow on a tiny shapes set, under a temporary Prefect API."""

import base64
import json
import re
import shutil
import time
import warnings
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

from flows import artifacts
from flows.pipeline import text_to_image_pipeline
from models.pipeline import TextToImage
from tasks.contracts import EvalReport, RegisteredModel
from tasks.settings import get_settings

pytestmark = pytest.mark.slow


def _mlflow_client() -> MlflowClient:
    # registry_uri too: register sets MLflow's process-wide registry URI, which outlives a test
    uri = get_settings().mlflow_tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _task_states(flow_run_id) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}


def _artifacts(flow_run_id) -> dict[str, list]:
    """The flow run's artifacts (its tasks' included) by key, oldest first."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    by_key: dict[str, list] = {}
    for a in sorted(found, key=lambda a: a.created):
        by_key.setdefault(a.key, []).append(a)
    return by_key


def test_pipeline_registers_a_model_and_second_run_hits_the_cache(prefect_api, tiny_pipeline_params):
    params = tiny_pipeline_params

    started = time.perf_counter()
    state = text_to_image_pipeline(params, return_state=True)
    first_s = time.perf_counter() - started
    assert state.is_completed(), state.message
    summary = state.result()

    # the registered model: a version with the expected tags and aliases, loadable by alias
    registered = summary.registered
    assert registered.name == "t2i-e2e" and "candidate" in registered.aliases
    assert "champion" in registered.aliases  # threshold 0: the first model passes the gate
    client = _mlflow_client()
    version = client.get_model_version_by_alias("t2i-e2e", "champion")
    assert version.tags["dataset_version"].endswith(summary.dataset.version)
    assert version.tags["encoder_id"] == summary.embeddings.encoder_id
    assert version.tags["prefect_flow_run_id"] == str(state.state_details.flow_run_id)
    assert "eval.attr_accuracy" in version.tags
    from tasks.register import sample_images

    (image,) = sample_images("models:/t2i-e2e@champion", ["a red circle"], steps=2)
    assert image.size == (8, 8)
    assert TextToImage.load(summary.train.checkpoint).resolution == 8

    states = _task_states(state.state_details.flow_run_id)
    assert states["ingest"] == "Completed" and states["embed"] == "Completed"
    _check_artifacts(state.state_details.flow_run_id, summary)

    # unchanged inputs: ingest and embed come from the cache, train returns the finished run
    started = time.perf_counter()
    second = text_to_image_pipeline(params, return_state=True)
    second_s = time.perf_counter() - started
    assert second.is_completed(), second.message
    states = _task_states(second.state_details.flow_run_id)
    assert states["ingest"] == "Cached" and states["embed"] == "Cached", states
    assert second.result().dataset == summary.dataset
    assert second.result().train.run_dir == summary.train.run_dir
    assert second_s < first_s, (first_s, second_s)

    # outputs deleted behind the cache's back (`make clean`): the cached descriptors are not
    # trusted, ingest and embed run again and the flow completes
    shutil.rmtree(summary.dataset.root)
    shutil.rmtree(summary.embeddings.path)
    third = text_to_image_pipeline(params, return_state=True)
    assert third.is_completed(), third.message
    assert (Path(summary.dataset.root) / "manifest.json").is_file()
    assert (Path(summary.embeddings.path) / "manifest.json").is_file()
    assert third.result().dataset.version == summary.dataset.version


def _check_artifacts(flow_run_id, summary) -> None:
    found = _artifacts(flow_run_id)

    (table,) = found["dataset-shapes"]
    rows = {(r["section"], r["statistic"]): r["value"] for r in json.loads(table.data)}
    assert rows[("split", "train")] == summary.dataset.counts["train"] > 0
    assert rows[("split", "val")] == summary.dataset.counts["val"]
    assert rows[("rejects", "total")] == summary.dataset.counts["rejects"]
    assert rows[("dataset", "inputs")] == 120 and rows[("dataset", "version")] == summary.dataset.version

    (train,) = found["train-summary"]
    assert f"| steps | {summary.train.step} |" in train.data and summary.train.checkpoint in train.data
    assert f"`{summary.train.mlflow_run_id}`" in train.data  # sqlite tracking: the run id, no UI link
    assert f"| final loss | {summary.train.metrics['loss']:.4g} |" in train.data

    # progress: the train task's artifact ends at 100 (6 of 6 steps)
    (progress,) = found["train-progress"]
    assert progress.type == "progress" and progress.data == 100.0 and progress.task_run_id is not None

    # the grid, inline as a PNG the UI can show, byte for byte the evaluation's grid file
    (grid,) = found["sample-grid"]
    encoded = re.search(r"!\[sample grid\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", grid.data).group(1)
    assert base64.b64decode(encoded) == Path(summary.report.grid_path).read_bytes()
    assert "sample-grid-image" not in found  # no http(s) tracking server to serve it

    (registry,) = found["registry-t2i-e2e"]
    assert summary.registered.uri in registry.data and "champion" in registry.data
    (link,) = found["registry-t2i-e2e-link"]
    # Prefect stores a link artifact as markdown; sqlite tracking has no UI, so it links the models:/ URI
    assert link.data == f"[t2i-e2e v{summary.registered.version}](models:/t2i-e2e/{summary.registered.version})"


def test_artifact_helpers_are_no_ops_outside_a_run(tmp_path):
    report = EvalReport(grid_path=str(tmp_path / "grid.png"), metrics={}, primary_metric="m", threshold=0.0,
                        passed=True, reason="")
    registered = RegisteredModel(name="m", version="1", uri="models:/m/1", aliases=[])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Prefect warns about artifacts created outside a run
        assert artifacts.publish_grid(report) is None
        assert artifacts.publish_registry(registered) is None


def test_a_failing_artifact_does_not_fail_the_run(prefect_api, monkeypatch, caplog):
    def unreachable(*args, **kwargs):
        raise ConnectionError("Prefect API unreachable")

    monkeypatch.setattr(artifacts, "create_markdown_artifact", unreachable)
    registered = RegisteredModel(name="m", version="1", uri="models:/m/1", aliases=["candidate"])

    @flow
    def publishes() -> str:
        assert artifacts.publish_registry(registered) is None
        return "done"

    state = publishes(return_state=True)
    assert state.is_completed() and state.result() == "done"
    assert "could not publish the publish_registry artifact: ConnectionError" in caplog.text


def test_mlflow_links_only_for_an_http_tracking_server():
    assert artifacts.mlflow_model_version_url("t2i shapes", "3", "sqlite:///mlflow.db") is None
    assert artifacts.mlflow_model_version_url("t2i shapes", "3", "http://mlflow:5000/") == (
        "http://mlflow:5000/#/models/t2i%20shapes/versions/3"
    )
    assert artifacts.mlflow_run_url("abc", "https://mlflow.example") == "https://mlflow.example/#/runs/abc"
    assert artifacts.mlflow_artifact_url("abc", "eval/k/grid.png", "http://m:5000") == (
        "http://m:5000/get-artifact?path=eval%2Fk%2Fgrid.png&run_uuid=abc"
    )
    assert artifacts.artifact_key("registry", "T2I_Shapes v2") == "registry-t2i-shapes-v2"


def test_typed_parameters_win_over_overrides():
    from flows.pipeline import PipelineParams

    params = PipelineParams(
        steps=70, model_name="from-form", overrides=["train.steps=99", "register.model_name=from-set", "train.lr=0.01"]
    )
    preset = params.to_preset()
    assert preset.train.steps == 70 and preset.register.model_name == "from-form"
    assert preset.train.lr == 0.01  # an override with no typed field still applies
    assert PipelineParams(overrides=["train.steps=99"]).to_preset().train.steps == 99


def test_the_resolution_field_sets_every_stage_that_has_one():
    from flows.pipeline import PipelineParams

    for preset in ("cpu-demo", "gpu-64px"):  # gpu-64px sets train.resolution itself
        chosen = PipelineParams(preset=preset, resolution=32).to_preset()
        assert chosen.shapes.resolution == chosen.ingest.resolution == chosen.train.resolution == 32
    assert PipelineParams(preset="gpu-64px").to_preset().train.resolution == 64
    # Smaller: the shapes are drawn at 32 px, where their classes differ, and ingest scales them down.
    small = PipelineParams(preset="gpu-32px", resolution=16).to_preset()
    assert (small.shapes.resolution, small.ingest.resolution, small.train.resolution) == (32, 16, 16)


def test_the_encoder_weights_field_keeps_quotes_in_paths():
    from flows.pipeline import PipelineParams

    for path in ("/models/bob's.safetensors", "/m/a''b.pt", 'C:\\w "x".pt', "/models/😀/é.pt"):
        assert PipelineParams(preset="cpu-demo", encoder_weights=path).to_preset().embed.encoder["weights"] == path


def test_the_gate_threshold_field_must_be_finite():
    from pydantic import ValidationError

    from flows.pipeline import PipelineParams

    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValidationError, match="finite"):
            PipelineParams(gate_threshold=bad)
