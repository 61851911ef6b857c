"""Registration and the champion gate, against a temporary SQLite-backed MLflow (see conftest)."""

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # mlflow reads DO_NOT_TRACK only as "true"

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import python_without  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from models.pipeline import TextToImage  # noqa: E402
from models.schedule import NoiseSchedule, ScheduleConfig  # noqa: E402
from models.text_encoder import TextEncoder, TextEncoderConfig  # noqa: E402
from models.unet import UNet, UNetConfig  # noqa: E402
from tasks.contracts import EvalReport, TrainResult  # noqa: E402
from tasks.register import (  # noqa: E402
    CANDIDATE,
    CHAMPION,
    RegisterConfig,
    RegisterError,
    champion_metrics,
    register_model,
    restore_champion,
)
from tasks.settings import get_settings  # noqa: E402

NAME = "t2i-test"

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # tiny tensors: threads cost more than they save


def save_tiny_model(directory, tiny_clip: str, seed: int) -> TrainResult:
    """A tiny 'trained' TextToImage (random weights, perturbed so the prompt matters), saved."""
    torch.manual_seed(seed)
    encoder = TextEncoder(TextEncoderConfig(model_name=tiny_clip, allow_random_init=True, random_init_seed=3))
    unet = UNet(UNetConfig(channels=(16, 32), attention_levels=(False, True), layers_per_block=1, head_dim=8,
                           norm_groups=8, context_dim=encoder.width))
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pipe = TextToImage(unet, NoiseSchedule(ScheduleConfig(num_train_timesteps=100)), encoder, resolution=8,
                       extra={"step": 10, "dataset": "shapes@abc123"})
    pipe.save(directory)
    return TrainResult(run_dir=str(directory.parent), checkpoint=str(directory), step=10, metrics={"loss": 0.5})


def report(clip_score: float, passed: bool = True) -> EvalReport:
    return EvalReport(grid_path="grid.png", metrics={"clip_score": clip_score, "fd_clip": 12.5},
                      primary_metric="clip_score", threshold=0.1, passed=passed, reason="test verdict")


@pytest.fixture
def models_(tmp_path, tiny_clip):
    """Three different tiny trained models."""
    return [save_tiny_model(tmp_path / f"run{i}" / "model", tiny_clip, seed=i) for i in range(3)]


def _aliases(name: str = NAME) -> dict[str, str]:
    uri = get_settings().mlflow_tracking_uri
    return {a: str(v) for a, v in MlflowClient(uri, registry_uri=uri).get_registered_model(name).aliases.items()}


def test_gate_first_passing_worse_better_restore_and_retry(models_):
    config = RegisterConfig(model_name=NAME)
    assert champion_metrics(NAME) is None

    first = register_model(models_[0], report(0.30), config)
    assert (first.version, first.uri, first.aliases) == ("1", f"models:/{NAME}/1", [CANDIDATE, CHAMPION])
    assert champion_metrics(NAME) == {"clip_score": 0.30, "fd_clip": 12.5}

    # The evaluation said "passed" but the champion is better now: candidate only.
    worse = register_model(models_[1], report(0.20), config)
    assert worse.version == "2" and worse.aliases == [CANDIDATE]
    assert _aliases() == {CANDIDATE: "2", CHAMPION: "1"}

    better = register_model(models_[2], report(0.40), config)
    assert better.aliases == [CANDIDATE, CHAMPION] and _aliases() == {CANDIDATE: "3", CHAMPION: "3"}
    uri = get_settings().mlflow_tracking_uri
    tags = MlflowClient(uri, registry_uri=uri).get_model_version(NAME, "3").tags
    assert tags["previous_champion"] == "1" and tags["gate.decision"].startswith("champion")

    restored = restore_champion(NAME, 1)
    assert restored.aliases == [CHAMPION] and _aliases() == {CANDIDATE: "3", CHAMPION: "1"}
    assert champion_metrics(NAME)["clip_score"] == 0.30
    with pytest.raises(RegisterError, match="no version 9"):
        restore_champion(NAME, 9)

    # A retried registration of weights already registered adds no version (and moves no alias
    # against the gate: v1 is champion again and stays so).
    assert register_model(models_[0], report(0.30), config) == restored
    uri = get_settings().mlflow_tracking_uri
    assert len(MlflowClient(uri, registry_uri=uri).search_model_versions(f"name = '{NAME}'")) == 3

    # Evaluated again with other metrics: the champion's metrics are the new evaluation's alone.
    again = report(0.35).model_copy(update={"metrics": {"clip_score": 0.35, "attr_accuracy": 0.9}})
    register_model(models_[0], again, config)
    assert champion_metrics(NAME) == {"clip_score": 0.35, "attr_accuracy": 0.9}  # no fd_clip from the first


def test_first_model_failing_the_gate_is_candidate_only_and_tags_are_complete(models_):
    client_uri = get_settings().mlflow_tracking_uri
    client = MlflowClient(client_uri, registry_uri=client_uri)
    experiment = client.create_experiment("train-exp")
    train_run = client.create_run(experiment).info.run_id
    train = models_[0].model_copy(update={"mlflow_run_id": train_run})

    registered = register_model(train, report(0.05, passed=False), RegisterConfig(model_name=NAME),
                                tags={"owner": "tests"})
    assert registered.aliases == [CANDIDATE] and champion_metrics(NAME) is None

    mv = client.get_model_version(NAME, registered.version)
    assert mv.run_id == train_run  # logged into the training run, which exists in this store
    tags = mv.tags
    assert tags["dataset_version"] == "shapes@abc123"
    assert tags["encoder_id"].startswith("t2i-test-tiny-clip__random-init-3")
    assert tags["mlflow_train_run_id"] == train_run
    assert tags["prefect_flow_run_id"] == "none"
    assert tags["git_commit"]
    assert tags["eval.clip_score"] == "0.05" and tags["eval.fd_clip"] == "12.5"
    assert tags["eval.passed"] == "false" and tags["eval.primary_metric"] == "clip_score"
    assert tags["owner"] == "tests"


def test_bad_inputs_are_clear_errors(models_, tmp_path, tiny_clip):
    with pytest.raises(RegisterError, match="primary_metric"):
        bad = report(0.3).model_copy(update={"primary_metric": "nope"})
        register_model(models_[0], bad, RegisterConfig(model_name=NAME))
    with pytest.raises(RegisterError, match="not a saved TextToImage"):
        register_model(models_[0].model_copy(update={"checkpoint": str(tmp_path)}), report(0.3))
    # A broken or tampered checkpoint fails the same way on every retry: bad input, not a hiccup.
    broken = save_tiny_model(tmp_path / "broken" / "model", tiny_clip, seed=9)
    (tmp_path / "broken" / "model" / "unet.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RegisterError, match="safetensors"):
        register_model(broken, report(0.3), RegisterConfig(model_name=NAME))
    with pytest.raises(RegisterError, match="overwrite"):
        register_model(models_[0], report(0.3), RegisterConfig(model_name=NAME), tags={"eval.clip_score": "1"})
    with pytest.raises(ValueError, match="model_name"):
        RegisterConfig(model_name="bad/name")
    with pytest.raises(ValueError, match="extra"):
        RegisterConfig(modelname="typo")


def test_tag_keys_mlflow_refuses_fail_before_anything_is_logged(models_):
    # MLflow refuses such keys only when the version is created, after the model was logged, and
    # as an MlflowException that the Prefect task would retry (logging the model again each time).
    for key in ("owner@team", "../up", "", ".", "a//b"):
        with pytest.raises(RegisterError, match="tag"):
            register_model(models_[0], report(0.3), RegisterConfig(model_name=NAME), tags={key: "x"})
        with pytest.raises(ValueError, match="tags"):
            RegisterConfig(tags={key: "x"})  # a preset's register.tags: refused where the preset loads
    uri = get_settings().mlflow_tracking_uri
    client = MlflowClient(uri, registry_uri=uri)
    assert client.search_registered_models() == []
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
    RegisterConfig(tags={"team/owner: ml-platform": "x", "cost_center.id": "7"})  # what MLflow accepts


def test_a_deleted_training_run_gets_a_new_run(models_):
    uri = get_settings().mlflow_tracking_uri
    client = MlflowClient(uri, registry_uri=uri)
    train_run = client.create_run(client.create_experiment("train-exp")).info.run_id
    client.delete_run(train_run)  # e.g. cleaned up in the UI; MLflow cannot log into it
    train = models_[0].model_copy(update={"mlflow_run_id": train_run})

    registered = register_model(train, report(0.3), RegisterConfig(model_name=NAME))
    mv = client.get_model_version(NAME, registered.version)
    assert mv.run_id != train_run and client.get_run(mv.run_id).info.lifecycle_stage == "active"
    assert mv.tags["mlflow_train_run_id"] == train_run  # the provenance stays


def test_prefect_task_retries_only_what_a_retry_can_fix():
    from mlflow.exceptions import MlflowException

    from tasks.register import _retry_unless_bad_input, register_task

    class _State:
        def __init__(self, exc):
            self.exc = exc

        def result(self):
            raise self.exc

    assert register_task.retries == 2
    assert _retry_unless_bad_input(None, None, _State(RegisterError("no such checkpoint"))) is False
    assert _retry_unless_bad_input(None, None, _State(MlflowException("database is locked"))) is True


def test_registering_leaves_mlflows_global_uris_as_they_were(tiny_clip, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    trained = save_tiny_model(tmp_path / "run" / "model", tiny_clip, seed=3)
    register_model(trained, report(0.9), RegisterConfig(model_name="t2i-uris"))
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == before
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ  # not inherited by children


def test_register_and_pull_need_no_prefect():
    # A serving process pulls registered models through this module; Prefect is only the flow's.
    python_without(
        ("prefect",),
        "import tasks.register as r\n"
        "assert r._prefect_flow_run_id() == 'none' and callable(r.register_task) and callable(r.sample_images)\n",
    )
