"""The scale-out servers for real: an MLflow tracking server and a Prefect server, both on a
private PostgreSQL cluster (the `postgres` fixture in conftest.py), started as subprocesses on
127.0.0.1. What the compose stack in infra/ runs, minus Docker, MinIO and the logins.

- registration through tasks/register.py lands in PostgreSQL and loads back by alias;
- four registrations at once get four distinct, consecutive versions, none lost or mixed up
  (SQLite's single writer is what this scale-out step replaces);
- the whole flow, tracked by both servers, ends with a model that generates an image.

Skipped (with the reason) only where no PostgreSQL server binaries are installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import mlflow
from conftest import console_script, free_port, running_server
from mlflow import MlflowClient
from test_register import report, save_tiny_model

from tasks.register import CANDIDATE, CHAMPION, FINGERPRINT_TAG, RegisterConfig, register_model, sample_images
from tasks.tracking import mlflow_uris

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("one_cpu_thread")]

REPO = Path(__file__).resolve().parents[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "MLFLOW_TRACKING_", "T2I_"))}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", MLFLOW_DISABLE_TELEMETRY="true", **extra)
    return env


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    """An MLflow tracking server on the `mlflow` database, serving artifacts from a temp dir; its URL."""
    workdir = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = [
        console_script("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
        # psycopg2 named, as in infra/: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3.
        # No password in the URI (it would show in `ps`): libpq reads PGPASSWORD, as in infra/.
        "--backend-store-uri", postgres.url("mlflow", driver="postgresql+psycopg2", with_password=False),
        "--artifacts-destination", str(workdir / "artifacts"),
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with running_server(cmd, clean_env(PGPASSWORD=postgres.password), f"{url}/health", workdir) as log_path:
        yield url
    assert "database is locked" not in log_path.read_text()


@pytest.fixture(scope="module")
def prefect_server(postgres, tmp_path_factory):
    """A Prefect server on the `prefect` database, with its own PREFECT_HOME; its API URL."""
    workdir = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    cmd = [console_script("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui", "--analytics-off"]
    env = clean_env(
        PREFECT_HOME=str(workdir / "home"),
        PREFECT_API_DATABASE_CONNECTION_URL=postgres.url("prefect", driver="postgresql+asyncpg"),
    )
    url = f"http://127.0.0.1:{port}/api"
    with running_server(cmd, env, f"{url}/health", workdir):
        yield url


def rows(postgres, database: str, query: str, *args) -> list[tuple]:
    with postgres.connect(database) as con, con.cursor() as cur:
        cur.execute(query, args)
        return cur.fetchall()


def test_register_on_postgres_and_load_by_alias(postgres, mlflow_server, tiny_clip, tmp_path, monkeypatch):
    monkeypatch.setenv("T2I_MLFLOW_TRACKING_URI", mlflow_server)
    trained = save_tiny_model(tmp_path / "run" / "model", tiny_clip, seed=0)

    registered = register_model(trained, report(0.30), RegisterConfig(model_name="t2i-pg"))
    assert (registered.version, registered.aliases) == ("1", [CANDIDATE, CHAMPION])
    # in PostgreSQL (not some SQLite file of the server's), with the alias
    assert rows(postgres, "mlflow", "SELECT version FROM model_versions WHERE name = %s", "t2i-pg") == [(1,)]
    assert rows(postgres, "mlflow", "SELECT alias, version FROM registered_model_aliases WHERE name = %s ORDER BY alias",
                "t2i-pg") == [("candidate", 1), ("champion", 1)]  # fmt: skip

    (image,) = sample_images("models:/t2i-pg@champion", ["a red circle"], steps=2, device="cpu")
    assert image.size == (8, 8)


CHILD = """
import sys, time
from pathlib import Path

import open_clip, torch

torch.set_num_threads(1)
clip_dir, train, report, name, experiment, ready, go, out = sys.argv[1:]
open_clip.add_model_config(clip_dir)
from tasks.contracts import EvalReport, TrainResult
from tasks.register import RegisterConfig, register_model

Path(ready).touch()
while not Path(go).exists():  # all four start registering together
    time.sleep(0.01)
registered = register_model(TrainResult.model_validate_json(train), EvalReport.model_validate_json(report),
                            RegisterConfig(model_name=name, experiment=experiment))
Path(out).write_text(registered.model_dump_json())
"""


def test_parallel_registrations_get_distinct_consecutive_versions(mlflow_server, tiny_clip, tmp_path):
    import open_clip

    name, experiment, n = "t2i-pg-parallel", "t2i-parallel", 4
    clip_dir = tmp_path / "clip"
    clip_dir.mkdir()
    (clip_dir / f"{tiny_clip}.json").write_text(json.dumps(open_clip.get_model_config(tiny_clip)))
    models = [save_tiny_model(tmp_path / f"run{i}" / "model", tiny_clip, seed=10 + i) for i in range(n)]
    go = tmp_path / "go"
    env = clean_env(T2I_MLFLOW_TRACKING_URI=mlflow_server, T2I_DATA_ROOT=str(tmp_path / "data"))
    logs = [tmp_path / f"child{i}.log" for i in range(n)]
    procs = []
    for i, m in enumerate(models):
        with open(logs[i], "wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-c", CHILD, str(clip_dir), m.model_dump_json(),
                 report(0.1 * (i + 1)).model_dump_json(), name, experiment, str(tmp_path / f"ready{i}"), str(go),
                 str(tmp_path / f"out{i}.json")],
                env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            ))  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not all((tmp_path / f"ready{i}").exists() for i in range(n)):
            assert all(p.poll() is None for p in procs), [log.read_text()[-4000:] for log in logs]
            assert time.monotonic() < deadline, "registration processes did not get ready"
            time.sleep(0.05)
        go.touch()
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        text = log.read_text()
        assert p.returncode == 0 and "database is locked" not in text, text[-4000:]
    results = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(n)]

    versions = sorted(int(r["version"]) for r in results)
    # The very first registrations of a model, racing: the experiment and the aliases are created
    # by check-then-insert, which tasks/tracking.py makes safe to lose.
    assert versions == [1, 2, 3, 4], versions
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    registered = {int(mv.version): mv for mv in client.search_model_versions(f"name = '{name}'")}
    assert sorted(registered) == versions, "the registry holds exactly these versions"
    # nothing mixed up: each process's version holds that process's weights
    from tasks.register import _fingerprint

    for model, result in zip(models, results):
        fingerprint = _fingerprint(Path(model.checkpoint))
        assert registered[int(result["version"])].tags[FINGERPRINT_TAG] == fingerprint
        # and its artifacts reached the server's store (MLmodel read back through the proxy)
        with mlflow_uris(mlflow_server):
            info = mlflow.models.get_model_info(f"models:/{name}/{result['version']}")
        assert info.metadata["t2i_fingerprint"] == fingerprint
    aliases = client.get_registered_model(name).aliases
    assert {CANDIDATE, CHAMPION} <= aliases.keys() and set(map(int, aliases.values())) <= set(registered)


def test_flow_against_prefect_and_mlflow_servers(
    postgres, prefect_server, mlflow_server, tiny_pipeline_params, tmp_path, monkeypatch
):
    from prefect.client.orchestration import get_client
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    from flows.pipeline import text_to_image_pipeline

    monkeypatch.setenv("T2I_MLFLOW_TRACKING_URI", mlflow_server)
    updates = {PREFECT_API_URL: prefect_server, PREFECT_RESULTS_LOCAL_STORAGE_PATH: str(tmp_path / "prefect-results")}
    with temporary_settings(updates=updates):
        state = text_to_image_pipeline(tiny_pipeline_params, return_state=True)
        assert state.is_completed(), state.message
        summary = state.result()
        flow_run_id = state.state_details.flow_run_id
        with get_client(sync_client=True) as client:
            assert str(client.api_url).startswith(prefect_server)  # not an ephemeral API
            assert client.read_flow_run(flow_run_id).state.is_completed()
        APILogWorker.drain_all()  # ship the run's logs and events while the server is still up
        EventsWorker.drain_all()

    # both servers kept their records in PostgreSQL
    assert rows(postgres, "prefect", "SELECT state_type FROM flow_run WHERE id = %s", str(flow_run_id)) == [("COMPLETED",)]
    name = summary.registered.name
    assert rows(postgres, "mlflow", "SELECT version FROM model_versions WHERE name = %s", name) == [
        (int(summary.registered.version),)
    ]
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == summary.registered.version
    assert champion.tags["prefect_flow_run_id"] == str(flow_run_id)
    assert client.get_run(summary.train.mlflow_run_id).info.status == "FINISHED"  # the training run, on the server

    (image,) = sample_images(f"models:/{name}@champion", ["a red circle"], steps=2, device="cpu")
    assert image.size == (8, 8)
