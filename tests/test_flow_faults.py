"""Faults: the whole Prefect flow (tiny config, temporary Prefect API) with injected failures.

- a transient error on the first attempt of embed and of register, and training dying mid-run
  after a checkpoint: each is retried, training resumes from that checkpoint (not step 0), and
  the flow completes;
- an error that persists: the flow ends Failed naming the stage and the cause, with nothing
  half-published (no partial dataset or embedding directory, no registered model version).
- every stage task retries with exponential backoff and jitter and has a timeout; a hung attempt
  is stopped by it, retried, and the run fails naming the stage.

Retry delays are shrunk to milliseconds (backoff and jitter kept) so the retries cost no waiting.
"""

import dataclasses
import time
from pathlib import Path
from types import MappingProxyType

import pytest
from mlflow import MlflowClient
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

import tasks.embed
import tasks.register
import tasks.train
from flows import pipeline
from flows.pipeline import text_to_image_pipeline
from tasks.embed import embed_task
from tasks.evaluate import evaluate_task
from tasks.ingest import ingest_task
from tasks.register import register_task
from tasks.settings import get_settings
from tasks.shapes import shapes_task
from tasks.train import train_task

pytestmark = pytest.mark.slow


def _mlflow_client() -> MlflowClient:
    # registry_uri too: register sets MLflow's process-wide registry URI, which outlives a test
    uri = get_settings().mlflow_tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch):
    fast = {name: dataclasses.replace(p, first_delay_s=0.01) for name, p in pipeline.STAGE_POLICIES.items()}
    monkeypatch.setattr(pipeline, "STAGE_POLICIES", MappingProxyType(fast))


def _task_runs(flow_run_id) -> dict:
    """Task runs of the flow run by task name ("embed", "train", ...)."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r for r in runs}


def _state_names(task_run) -> list[str]:
    with get_client(sync_client=True) as client:
        states = client.read_task_run_states(task_run.id)
    return [s.name for s in sorted(states, key=lambda s: s.timestamp)]


def _fail_first_call(monkeypatch, module, name: str, exc: Exception, after: bool = False) -> list[str]:
    """Replace module.name so its first call raises `exc` (before doing anything, or `after` the
    real call did its work); later calls run the real function. Returns the call log."""
    real = getattr(module, name)
    calls: list[str] = []

    def flaky(*args, **kwargs):
        calls.append("call")
        if len(calls) == 1 and not after:
            raise exc
        result = real(*args, **kwargs)
        if len(calls) == 1:
            raise exc
        return result

    monkeypatch.setattr(module, name, flaky)
    return calls


def _registered_versions(name: str) -> list:
    client = _mlflow_client()
    return client.search_model_versions(f"name = '{name}'")


def test_transient_faults_are_retried_and_training_resumes_from_its_checkpoint(
    prefect_api, tiny_pipeline_params, monkeypatch
):
    # One flow run, three faults (a full run per fault would double this file's time):
    # - embed: the first attempt cannot reach the weights store;
    embed_calls = _fail_first_call(monkeypatch, tasks.embed, "embed_dataset", ConnectionError("weights store unreachable"))
    # - register: the first attempt dies after the version was created (the tracking server drops the
    #   connection before tags and aliases are set): the retry must finish that version, not add one;
    register_calls = _fail_first_call(
        monkeypatch, tasks.register, "_create_version", ConnectionError("tracking server went away"), after=True
    )
    # - train: checkpoint_every=3 of 6 steps; attempt 1 writes step 3's checkpoint, runs one more step
    #   and dies in the next one. Attempt 2 must load step 3 and redo only what came after it.
    real_step, real_resume = tasks.train._Trainer._train_step, tasks.train._Trainer._resume
    steps_run: list[int] = []
    resumed_from: list[int] = []
    killed: list[int] = []

    def train_step(self, step, micro):
        if step == 4 and not killed:
            killed.append(step)
            raise OSError("injected: lost the worker in the middle of step 4")
        out = real_step(self, step, micro)
        steps_run.append(step)
        return out

    def resume(self):
        step = real_resume(self)
        resumed_from.append(step)
        return step

    monkeypatch.setattr(tasks.train._Trainer, "_train_step", train_step)
    monkeypatch.setattr(tasks.train._Trainer, "_resume", resume)

    state = text_to_image_pipeline(tiny_pipeline_params, return_state=True)

    assert state.is_completed(), state.message
    runs = _task_runs(state.state_details.flow_run_id)
    for stage in ("embed", "train", "register"):
        run = runs[stage]
        assert run.state.name == "Completed" and run.run_count == 2, (stage, run.state, run.run_count)
        assert _state_names(run) == ["Pending", "Running", "AwaitingRetry", "Retrying", "Completed"], stage
    assert runs["ingest"].run_count == 1 and runs["evaluate"].run_count == 1
    summary = state.result()

    assert len(embed_calls) == 2

    assert killed == [4]
    assert resumed_from == [0, 3], resumed_from  # attempt 2 started from the step-3 checkpoint, not from 0
    assert steps_run == [0, 1, 2, 3, 3, 4, 5], steps_run  # only step 3 (run after the checkpoint) ran twice
    assert summary.train.step == 6

    assert len(register_calls) == 1  # the retry found the version by its fingerprint instead of creating another
    (version,) = _registered_versions("t2i-e2e")
    assert str(version.version) == summary.registered.version
    assert {"candidate", "champion"} <= set(summary.registered.aliases)
    assert version.tags["gate.decision"].startswith("champion")  # a tag the first attempt never set


def test_a_persistent_failure_fails_the_flow_naming_the_stage_and_publishes_nothing(
    prefect_api, tiny_pipeline_params, monkeypatch
):
    # Embedding dies after it wrote the row shards into its temporary directory, on every attempt.
    calls = []

    def disk_full(*args, **kwargs):
        calls.append("call")
        raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(tasks.embed, "_write_caption_shards", disk_full)

    state = text_to_image_pipeline(tiny_pipeline_params, return_state=True)

    assert state.is_failed()
    assert "stage 'embed' failed" in state.message and "No space left on device (injected)" in state.message, state.message
    runs = _task_runs(state.state_details.flow_run_id)
    assert runs["embed"].state.name == "Failed" and runs["embed"].run_count == 3 == len(calls)  # 1 + 2 retries
    assert "train" not in runs and "register" not in runs  # later stages never started

    data = get_settings().data_root
    # the dataset version before it is published whole; no temporaries beside it
    (version_dir,) = (data / "datasets" / "shapes").iterdir()
    assert (version_dir / "manifest.json").is_file()
    # no embedding set, not even a partial one: every attempt removed its temporary directory
    embeddings = data / "embeddings"
    assert [p.relative_to(embeddings) for p in embeddings.rglob("*")] == [Path(version_dir.name)]  # an empty parent
    assert not (data / "runs").exists()
    client = _mlflow_client()
    assert client.search_registered_models() == []


@pytest.mark.parametrize(
    "stage_task", [shapes_task, ingest_task, embed_task, train_task, evaluate_task, register_task], ids=lambda t: t.name
)
def test_every_stage_retries_with_exponential_backoff_jitter_and_a_timeout(stage_task):
    configured = pipeline.STAGE_POLICIES[stage_task.name].apply(stage_task)
    assert configured.retries >= 1 and configured.timeout_seconds > 0 and configured.retry_jitter_factor > 0
    delays = configured.retry_delay_seconds
    assert len(delays) == configured.retries and all(b == 2 * a > 0 for a, b in zip(delays, delays[1:])), delays
    assert configured.retry_condition_fn is stage_task.retry_condition_fn  # the stage's own "worth retrying?" kept


def test_a_hung_attempt_times_out_is_retried_and_fails_naming_its_stage(prefect_api):
    # Not the whole pipeline: a 0.3 s timeout there would also stop attempts inside imports and
    # MLflow's database setup, and a real hang needs a timeout longer than a loaded CI box's slowest
    # attempt, times three attempts. A stand-in task under the train stage's policy shows the wiring.
    @task(name="train")
    def hung():
        for _ in range(600):  # 60 s, in steps either kind of Prefect timeout (alarm or thread) can stop
            time.sleep(0.1)

    @flow
    def one_stage():
        return pipeline.run_stage(hung, timeout_s=0.3)

    started = time.perf_counter()
    state = one_stage(return_state=True)

    assert time.perf_counter() - started < 20
    assert state.is_failed()
    assert "stage 'train' failed: TaskRunTimeoutError" in state.message, state.message
    (run,) = _task_runs(state.state_details.flow_run_id).values()
    assert run.state.name == "TimedOut" and run.run_count == 3  # 1 + 2 retries, each stopped
