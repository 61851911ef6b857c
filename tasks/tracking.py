"""MLflow calls that several stages make and that must hold up under concurrent runs.

Imported lazily by the stages (MLflow is not needed to import `tasks.train`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tasks.settings import get_settings

log = logging.getLogger(__name__)


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created when missing; safe when several runs create it at once."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    settings = get_settings()
    # A tracking server chooses its own artifact store; the embedded SQLite store uses ours.
    remote = settings.mlflow_tracking_uri.startswith(("http://", "https://", "databricks"))
    artifacts = None if remote else Path(settings.mlflow_artifact_root).resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifacts)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id  # another run created it first


def training_run(client: MlflowClient, run_id: str | None) -> str | None:
    """`run_id` when this tracking store holds it as an active run, else None (logged): a run of
    another store, or a deleted one, which MLflow refuses to log into. The caller makes a new run."""
    if not run_id:
        return None
    try:
        info = client.get_run(run_id).info
    except MlflowException:
        log.warning("training run %s is not in this tracking store; logging into a new run", run_id)
        return None
    if info.lifecycle_stage != "active":
        log.warning("training run %s is deleted; logging into a new run", run_id)
        return None
    return info.run_id


def set_alias(client: MlflowClient, name: str, alias: str, version: str | int, attempts: int = 3) -> None:
    """Point `alias` at `version`. MLflow's store looks an alias up, then inserts it, so two
    registrations setting a new alias at once can collide; setting an alias is idempotent, so retry."""
    for attempt in range(attempts):
        try:
            client.set_registered_model_alias(name, alias, str(version))
            return
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


@contextlib.contextmanager
def mlflow_uris(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking and registry URIs, which its fluent API reads, set to `uri`
    for the block and put back afterwards: `set_*_uri` also exports MLFLOW_*_URI to every later
    subprocess, and a URI left behind would send another caller's registrations elsewhere."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_env = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved_tracking = getattr(tracking_utils, "_tracking_uri", None)  # MLflow keeps these in module globals
    saved_registry = getattr(registry_utils, "_registry_uri", None)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_tracking)
        registry_utils._registry_uri = saved_registry
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
