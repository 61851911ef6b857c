"""Register stage: a trained model and its evaluation in, a registered MLflow model version out.

    registered = register_model(train_result, eval_report, RegisterConfig(model_name="t2i-shapes"))
    images = sample_images("models:/t2i-shapes@champion", ["a red circle in the top left"], seed=0)
    restore_champion("t2i-shapes", "3")  # put an earlier version back as champion

The version is an MLflow pyfunc (see `models/mlflow_model.py`) logged into the training run (or a
new run when that run is not in this tracking store, or deleted), with the `models` package as its code, so a
server needs nothing else of the project:

    mlflow models serve -m models:/t2i-shapes@champion --env-manager local -h 127.0.0.1 -p 5000

Aliases, not stages: every new version gets `candidate`; `champion` moves to it only when the
evaluation gate passed and its primary metric is not worse than the current champion's (which
may have changed since the evaluation). The previous champion stays registered.

Version tags: `dataset_version`, `encoder_id`, `git_commit`, `prefect_flow_run_id`,
`mlflow_train_run_id`, `eval.<metric>` = str(float) per evaluation metric, `eval.passed`
("true"/"false"), `eval.primary_metric`, and `gate.*` (threshold, reason, decision).
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import subprocess
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from PIL import Image

import models
from models import mlflow_model
from models.pipeline import CONFIG_FILE, UNET_FILE, TextToImage
from tasks import storage
from tasks.contracts import EvalReport, RegisteredModel, TrainResult
from tasks.evaluate import is_better_or_equal
from tasks.prefect_compat import exponential_backoff, task
from tasks.register_config import TAG_KEY_RULE, RegisterConfig, invalid_tag_keys
from tasks.settings import get_settings
from tasks.tracking import ensure_experiment, mlflow_uris, set_alias, training_run

log = logging.getLogger(__name__)

CANDIDATE = "candidate"
CHAMPION = "champion"
EVAL_PREFIX = "eval."
EVAL_PASSED = "eval.passed"
EVAL_PRIMARY = "eval.primary_metric"
FINGERPRINT_TAG = "model_fingerprint"
RESERVED_TAGS = {"dataset_version", "encoder_id", "git_commit", "prefect_flow_run_id", "mlflow_train_run_id",
                 "train_step", FINGERPRINT_TAG, "previous_champion"}
MAX_TAG_CHARS = 4000  # MLflow stores at most 5000 characters per tag value
ARTIFACT_NAME = "model"  # the logged model's name within its run
# What a server installs with `--env-manager virtualenv|uv`; pinned to what registration ran with,
# because a seeded random encoder must rebuild bit-identically (see TextToImage.load).
REQUIREMENTS = ("torch", "open_clip_torch", "safetensors", "pillow", "pandas", "numpy")


class RegisterError(ValueError):
    """Bad input to registration (missing checkpoint, metric, version): retrying cannot help."""


# ---- the gate ------------------------------------------------------------------------------------


def _gate(report: EvalReport, champion: ModelVersion | None) -> tuple[bool, str]:
    """(promote to champion?, why)."""
    if not report.passed:
        return False, f"evaluation gate failed: {report.reason}"
    if champion is None:
        return True, "first model to pass the gate"
    primary = report.primary_metric
    incumbent = _eval_metrics(champion.tags).get(primary)
    if incumbent is None:
        # The champion was evaluated on another metric; the evaluation compared what it could.
        return True, f"gate passed; champion v{champion.version} has no {primary} to compare"
    new = report.metrics[primary]
    if not is_better_or_equal(primary, new, incumbent):
        return False, f"{primary} {new:.6g} is worse than champion v{champion.version}'s {incumbent:.6g}"
    return True, f"{primary} {new:.6g} is not worse than champion v{champion.version}'s {incumbent:.6g}"


# ---- registration --------------------------------------------------------------------------------


def register_model(
    train: TrainResult,
    report: EvalReport,
    config: RegisterConfig | None = None,
    tags: dict[str, str] | None = None,
) -> RegisteredModel:
    """Log the trained model as a pyfunc, register it as a new version of `config.model_name`,
    tag it, give it `candidate`, and `champion` when the gate allows.

    Idempotent: weights already registered under this name (same fingerprint) are not logged again;
    the existing version gets the tags and alias decisions of this call.
    """
    config = config or RegisterConfig()
    checkpoint = Path(train.checkpoint)
    if not (checkpoint / CONFIG_FILE).is_file() or not (checkpoint / UNET_FILE).is_file():
        raise RegisterError(f"TrainResult.checkpoint {checkpoint} is not a saved TextToImage ({CONFIG_FILE}, {UNET_FILE})")
    if report.primary_metric not in report.metrics:
        raise RegisterError(
            f"EvalReport.primary_metric {report.primary_metric!r} is not among its metrics {sorted(report.metrics)}"
        )
    extra = {**config.tags, **(tags or {})}
    clash = sorted(k for k in extra if k in RESERVED_TAGS or k.startswith((EVAL_PREFIX, "gate.")))
    if clash:
        raise RegisterError(f"extra tags {clash} would overwrite the tags registration sets itself")
    if bad := invalid_tag_keys(extra):
        raise RegisterError(f"extra tags {bad}: {TAG_KEY_RULE}")
    try:
        pipe = TextToImage.load(checkpoint)  # refuses a broken or tampered checkpoint before anything is logged
    except (ValueError, FileNotFoundError) as exc:  # UnsafeCheckpointError is a ValueError; no retry mends either
        raise RegisterError(f"TrainResult.checkpoint {checkpoint} cannot be loaded: {exc}") from exc
    fingerprint = _fingerprint(checkpoint)
    version_tags = {**_version_tags(train, report, pipe, fingerprint), **extra}
    client = _client()
    name = config.model_name

    existing = _version_with_fingerprint(client, name, fingerprint)
    if existing is not None:
        log.info("model %s v%s already holds these weights (%s); not logging again", name, existing.version, fingerprint)
        mv = existing
    else:
        with mlflow_uris(get_settings().mlflow_tracking_uri):  # the fluent calls below read the global URIs
            model_uri = _log_pyfunc(client, train, config, pipe, checkpoint, fingerprint)
            mv = _create_version(name, model_uri, version_tags)  # born with its fingerprint: a retry finds it

    champion = _champion_version(client, name)
    if champion is not None and str(champion.version) == str(mv.version):
        promote, reason = True, "already champion"  # a re-run after a completed promotion
    else:
        promote, reason = _gate(report, champion)
    version_tags.update({
        "gate.threshold": str(float(report.threshold)),
        "gate.reason": report.reason[:MAX_TAG_CHARS],
        "gate.decision": f"{'champion' if promote else 'candidate only'}: {reason}",
    })
    if promote and champion is not None and str(champion.version) != str(mv.version):
        version_tags["previous_champion"] = str(champion.version)
    for key, value in version_tags.items():
        client.set_model_version_tag(name, mv.version, key, value)
    if existing is not None:  # this evaluation replaces the last one's metrics; it does not mix with them
        for key in sorted(k for k in existing.tags if k.startswith(EVAL_PREFIX) and k not in version_tags):
            client.delete_model_version_tag(name, mv.version, key)

    if existing is None or _is_newest(client, name, mv.version):
        # A retry completes its own registration; re-running an old model does not pull `candidate` back.
        set_alias(client, name, CANDIDATE, mv.version)
    if promote:
        set_alias(client, name, CHAMPION, mv.version)
    log.info("registered %s v%s (%s)", name, mv.version, version_tags["gate.decision"])
    return _registered(client, name, mv.version)


def restore_champion(name: str, version: str | int) -> RegisteredModel:
    """Point `champion` at an earlier version again (e.g. after a bad promotion)."""
    client = _client()
    version = str(version)
    try:
        mv = client.get_model_version(name, version)
    except MlflowException as exc:
        known = [v.version for v in client.search_model_versions(f"name = '{name}'")]
        raise RegisterError(
            f"model {name!r} has no version {version} (registered versions: {sorted(known, key=int) or 'none'})"
        ) from exc
    if mv.tags.get(EVAL_PASSED) == "false":
        log.warning("restoring %s v%s as champion although its evaluation gate failed", name, version)
    set_alias(client, name, CHAMPION, version)
    return _registered(client, name, version)


def champion_metrics(name: str) -> dict[str, float] | None:
    """The evaluation metrics (`eval.<metric>` tags) of the current champion, or None without one."""
    champion = _champion_version(_client(), name)
    return None if champion is None else _eval_metrics(champion.tags)


def _eval_metrics(tags: dict[str, str]) -> dict[str, float]:
    out = {}
    for key, value in tags.items():
        if key.startswith(EVAL_PREFIX) and key not in (EVAL_PASSED, EVAL_PRIMARY):
            try:
                out[key.removeprefix(EVAL_PREFIX)] = float(value)
            except ValueError:
                log.warning("ignoring non-numeric tag %s=%r", key, value)
    return out


def _client() -> MlflowClient:
    uri = get_settings().mlflow_tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _champion_version(client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = aliases.get(CHAMPION)
    return None if version is None else client.get_model_version(name, str(version))


def _registered(client: MlflowClient, name: str, version: str) -> RegisteredModel:
    aliases = client.get_registered_model(name).aliases  # {alias: version}
    return RegisteredModel(
        name=name,
        version=str(version),
        uri=f"models:/{name}/{version}",
        aliases=sorted(a for a, v in aliases.items() if str(v) == str(version)),
    )


def _is_newest(client: MlflowClient, name: str, version: str | int) -> bool:
    return int(version) >= max(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))


def _version_tags(train: TrainResult, report: EvalReport, pipe: TextToImage, fingerprint: str) -> dict[str, str]:
    tags = {
        "dataset_version": str(pipe.extra.get("dataset", "unknown")),
        "encoder_id": mlflow_model.encoder_identity(train.checkpoint)[1],
        "git_commit": _git_commit(),
        "prefect_flow_run_id": _prefect_flow_run_id(),
        "mlflow_train_run_id": train.mlflow_run_id or "none",
        "train_step": str(train.step),
        FINGERPRINT_TAG: fingerprint,
        EVAL_PASSED: "true" if report.passed else "false",
        EVAL_PRIMARY: report.primary_metric,
    }
    tags.update({f"{EVAL_PREFIX}{k}": str(float(v)) for k, v in report.metrics.items()})
    return tags


def _fingerprint(checkpoint: Path) -> str:
    """sha256 of the UNet weights and the config (which names the encoder and its weights' hash)."""
    h = hashlib.sha256()
    for name in (UNET_FILE, CONFIG_FILE):
        with open(checkpoint / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _version_with_fingerprint(client: MlflowClient, name: str, fingerprint: str) -> ModelVersion | None:
    found = client.search_model_versions(f"name = '{name}' and tags.`{FINGERPRINT_TAG}` = '{fingerprint}'")
    return min(found, key=lambda mv: int(mv.version)) if found else None


def _run_id(client: MlflowClient, train: TrainResult, config: RegisterConfig, fingerprint: str) -> str:
    """The training run when this tracking store has it (and it is not deleted: MLflow cannot log
    into a deleted run), else a new run in `config.experiment`."""
    run_id = training_run(client, train.mlflow_run_id)
    if run_id is not None:
        return run_id
    experiment_id = ensure_experiment(client, config.experiment)
    run = client.create_run(experiment_id, run_name=f"register-{fingerprint}", tags={"t2i.stage": "register"})
    return run.info.run_id


def _log_pyfunc(
    client: MlflowClient, train: TrainResult, config: RegisterConfig, pipe: TextToImage, checkpoint: Path, fingerprint: str
) -> str:
    """Log the pyfunc into the run (under `mlflow_uris`); returns its model URI."""
    run_id = _run_id(client, train, config, fingerprint)
    with tempfile.TemporaryDirectory(prefix="t2i-register-") as tmp:
        tmp = Path(tmp)
        artifacts = mlflow_model.stage_artifacts(pipe, checkpoint, tmp / "artifacts")
        code_file = mlflow_model.write_model_code(tmp)
        package = Path(models.__file__).resolve().parent
        shutil.copytree(package, tmp / "models", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=ARTIFACT_NAME,
                python_model=str(code_file),
                artifacts=artifacts,
                code_paths=[str(tmp / "models")],
                signature=mlflow_model.signature(),
                input_example=mlflow_model.input_example(steps=4),  # also a smoke test: MLflow runs it once
                pip_requirements=_requirements(),
                metadata={"t2i_resolution": pipe.resolution, "t2i_fingerprint": fingerprint,
                          "t2i_package_version": models.__version__},
            )
    return info.model_uri


def _create_version(name: str, model_uri: str, tags: dict[str, str]) -> ModelVersion:
    # The fluent call (under `mlflow_uris`) links the version to its logged model and run.
    return mlflow.register_model(model_uri, name, tags=tags)


def _requirements() -> list[str]:
    pins = []
    for package in REQUIREMENTS:
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")  # drop local tags such as +cpu
        except PackageNotFoundError:
            pins.append(package)
    return pins


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _prefect_flow_run_id() -> str:
    try:
        from prefect.runtime import flow_run
    except ImportError:  # registering from a process without Prefect (tasks.prefect_compat)
        return "none"
    return str(flow_run.id) if flow_run.id else "none"


# ---- pulling -------------------------------------------------------------------------------------


def sample_images(
    model_uri_or_dir: str,
    prompts: list[str],
    seed: int = 0,
    steps: int = 50,
    guidance_scale: float = 3.0,
    sampler: str = "ddim",
    device: str | None = None,
) -> list[Image.Image]:
    """Images for `prompts` (prompt i from seed + i) from a `models:/` or `runs:/` URI, a downloaded
    MLflow model directory, or a saved `TextToImage` directory."""
    device = device or _default_device()
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    path = Path(model_uri_or_dir)
    if (path / CONFIG_FILE).is_file():
        pipe = TextToImage.load(path, device=device)
    elif (path / "MLmodel").is_file():
        pipe = mlflow_model.load_pipeline_from_model_dir(path, device=device)
    elif re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", model_uri_or_dir):  # models:/, runs:/, s3://, file:// ...
        pipe = _pipeline_from_uri(model_uri_or_dir, device)
    else:
        raise FileNotFoundError(
            f"{model_uri_or_dir} is neither a models:/ or runs:/ URI, nor a directory holding {CONFIG_FILE} "
            "(a saved TextToImage) or MLmodel (a downloaded MLflow model)"
        )
    return pipe(list(prompts), seed=seed, steps=steps, guidance_scale=guidance_scale, sampler=sampler)


def _pipeline_from_uri(uri: str, device: str) -> TextToImage:
    tracking = get_settings().mlflow_tracking_uri
    with mlflow_uris(tracking), tempfile.TemporaryDirectory(prefix="t2i-sample-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        except MlflowException as exc:
            raise RegisterError(f"cannot fetch {uri} from the MLflow store at {tracking}: {exc.message}") from exc
        return mlflow_model.load_pipeline_from_model_dir(local, device=device)  # weights are in memory before tmp goes


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---- Prefect -------------------------------------------------------------------------------------


def _retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry tracking-server hiccups; a RegisterError fails the same way every time."""
    try:
        state.result()
    except RegisterError:
        return False
    except Exception:
        return True
    return True


@task(
    name="register",
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),
    retry_condition_fn=_retry_unless_bad_input,
    cache_policy=None,
)
def register_task(
    train: TrainResult, report: EvalReport, config: RegisterConfig, tags: dict[str, str] | None = None
) -> RegisteredModel:
    """Prefect wrapper. No result caching: a retry re-enters `register_model`, which finds weights it
    already registered by their fingerprint instead of adding a second version."""
    storage.pull(Path(train.run_dir))  # with an s3:// data root, when another machine trained it
    return register_model(train, report, config, tags)
