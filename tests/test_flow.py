"""End to end: the whole Prefect flow on a tiny shapes set, under a temporary Prefect API."""

import time

import mlflow
import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import PipelineParams, text_to_image_pipeline
from models.pipeline import TextToImage
from tasks.settings import get_settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=180):
        yield


def tiny_params(clip_name: str) -> PipelineParams:
    return PipelineParams(
        preset="cpu-demo",
        model_name="t2i-e2e",
        overrides=[
            "shapes.n_images=120",
            "shapes.resolution=16",
            "ingest.resolution=8",
            f"embed.encoder.model_name={clip_name}",
            "embed.encoder.allow_random_init=true",
            "embed.batch_size=64",
            "train.steps=6",
            "train.batch_size=8",
            "train.warmup_steps=1",
            "train.unet={channels: [16, 32], attention_levels: [false, true], layers_per_block: 1, norm_groups: 8, head_dim: 8}",
            "train.checkpoint_every=3",
            "train.sample_every=0",
            "train.sample_captions=2",
            "train.sample_steps=2",
            "evaluate.steps=2",
            "evaluate.seeds=[0]",
            "evaluate.n_val_captions=1",
            "evaluate.n_attribute_prompts=4",
            "evaluate.n_fd_samples=4",
            "evaluate.steps_table=false",
            "evaluate.threshold=0.0",
        ],
    )


def _task_states(flow_run_id) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}


def test_pipeline_registers_a_model_and_second_run_hits_the_cache(prefect_api, tiny_clip):
    params = tiny_params(tiny_clip)

    started = time.perf_counter()
    state = text_to_image_pipeline(params, return_state=True)
    first_s = time.perf_counter() - started
    assert state.is_completed(), state.message
    summary = state.result()

    # the registered model: a version with the expected tags and aliases, loadable by alias
    registered = summary.registered
    assert registered.name == "t2i-e2e" and "candidate" in registered.aliases
    assert "champion" in registered.aliases  # threshold 0: the first model passes the gate
    client = MlflowClient(tracking_uri=get_settings().mlflow_tracking_uri)
    version = client.get_model_version_by_alias("t2i-e2e", "champion")
    assert version.tags["dataset_version"].endswith(summary.dataset.version)
    assert version.tags["encoder_id"] == summary.embeddings.encoder_id
    assert version.tags["prefect_flow_run_id"] == str(state.state_details.flow_run_id)
    assert "eval.attr_accuracy" in version.tags
    mlflow.set_tracking_uri(get_settings().mlflow_tracking_uri)
    from tasks.register import sample_images

    (image,) = sample_images("models:/t2i-e2e@champion", ["a red circle"], steps=2)
    assert image.size == (8, 8)
    assert TextToImage.load(summary.train.checkpoint).resolution == 8

    states = _task_states(state.state_details.flow_run_id)
    assert states["ingest"] == "Completed" and states["embed"] == "Completed"

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
