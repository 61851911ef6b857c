"""Prefect artifacts the pipeline flows publish: what a run produced, readable in the Prefect UI.

    dataset-<name>            table: rows per split, rejects by reason, caption lengths, image sizes
    train-summary             markdown: steps, final loss, images/s, wall time, checkpoint, MLflow run
    sample-grid               markdown: the evaluation grid's path, the image inline when small, metrics
    sample-grid-image         image: the grid served by an http(s) MLflow server (only then)
    registry-<model>          markdown: the registered version, its aliases and the gate's decision
    registry-<model>-link     link: the MLflow UI page of the version (http(s) tracking) or its models:/ URI

(The training progress artifact, `train-progress`, is kept by the train task itself while it runs.)

Artifacts are a view, never a result: each helper is a no-op outside a flow or task run and logs a
warning instead of raising, so a Prefect API hiccup cannot fail a run whose real outputs are published.
"""

from __future__ import annotations

import base64
import functools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

from prefect.artifacts import create_image_artifact, create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging import get_run_logger

from tasks.contracts import DatasetVersion, EvalReport, RegisteredModel, TrainResult
from tasks.evaluate import EVAL_DIR, MLFLOW_FILE
from tasks.settings import get_settings

# The Prefect UI renders a markdown image as <img src=...> without rewriting the URL, so a PNG
# inlined as a data: URI shows in place; an `image` artifact would also print its URL as text,
# which for a data: URI is the whole base64 blob. Larger grids are linked by path only, to keep
# artifacts (stored in the Prefect database) small.
MAX_INLINE_IMAGE_BYTES = 256 * 1024

F = TypeVar("F", bound=Callable[..., Any])


def _best_effort(fn: F) -> F:
    """Run `fn` only inside a flow or task run; log and swallow any error it raises."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # an artifact is a view: never fail the run for it
            get_run_logger().warning("could not publish the %s artifact: %s: %s", fn.__name__, type(exc).__name__, exc)
            return None

    return wrapper  # type: ignore[return-value]


def artifact_key(*parts: str) -> str:
    """A valid artifact key (lowercase letters, digits, dashes) from free-form parts."""
    text = "-".join(parts).lower()
    return re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]", "-", text)).strip("-") or "artifact"


def mlflow_ui_base(tracking_uri: str | None = None) -> str | None:
    """The MLflow UI's base URL when tracking goes to an http(s) server, else None."""
    uri = tracking_uri if tracking_uri is not None else get_settings().mlflow_tracking_uri
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else None


def mlflow_run_url(run_id: str, tracking_uri: str | None = None) -> str | None:
    base = mlflow_ui_base(tracking_uri)
    return f"{base}/#/runs/{run_id}" if base else None  # the MLflow UI's hash route for a run


def mlflow_model_version_url(name: str, version: str, tracking_uri: str | None = None) -> str | None:
    base = mlflow_ui_base(tracking_uri)
    return f"{base}/#/models/{quote(name, safe='')}/versions/{version}" if base else None


def mlflow_artifact_url(run_id: str, path: str, tracking_uri: str | None = None) -> str | None:
    """A run artifact as the tracking server serves it to its UI (`mlflow server` proxies artifacts)."""
    base = mlflow_ui_base(tracking_uri)
    return f"{base}/get-artifact?{urlencode({'path': path, 'run_uuid': run_id})}" if base else None


# ---- dataset ---------------------------------------------------------------------------------


def dataset_rows(dataset: DatasetVersion) -> list[dict[str, Any]]:
    """(section, statistic, value) rows from the version's manifest (ingest's sql/stats.sql output)."""
    manifest = json.loads(Path(dataset.manifest).read_text(encoding="utf-8"))
    stats = manifest.get("statistics", {})
    counts = manifest.get("counts", dataset.counts)
    rows: list[tuple[str, str, Any]] = [
        ("dataset", "name", dataset.name),
        ("dataset", "version", dataset.version),
        ("dataset", "resolution", f"{dataset.resolution} px"),
        ("dataset", "inputs", counts.get("inputs", "")),
        ("split", "train", counts.get("train", 0)),
        ("split", "val", counts.get("val", 0)),
    ]
    if "val_fraction" in manifest.get("split", {}):
        rows.append(("split", "val_fraction", manifest["split"]["val_fraction"]))
    rows.append(("rejects", "total", counts.get("rejects", 0)))
    rows += [("rejects", reason, n) for reason, n in stats.get("rejects_by_reason", {}).items()]
    rows += [("caption chars", k, v) for k, v in stats.get("caption_chars", {}).items()]
    rows += [("caption chars histogram", k, v) for k, v in stats.get("caption_chars_histogram", {}).items()]
    rows += [("original min side histogram", k, v) for k, v in stats.get("orig_min_side_histogram", {}).items()]
    rows += [("top original sizes", k, v) for k, v in stats.get("top_orig_sizes", {}).items()]
    return [{"section": s, "statistic": k, "value": v} for s, k, v in rows]


@_best_effort
def publish_dataset(dataset: DatasetVersion):
    """Table artifact of the dataset version's statistics."""
    return create_table_artifact(
        dataset_rows(dataset),
        key=artifact_key("dataset", dataset.name),
        description=f"Dataset **{dataset.name}@{dataset.version}** at `{dataset.root}`",
    )


# ---- training --------------------------------------------------------------------------------


def train_markdown(train: TrainResult, wall_s: float | None = None, tracking_uri: str | None = None) -> str:
    m = train.metrics
    lines = [
        "# Training",
        "",
        "| | |",
        "|---|---|",
        f"| steps | {train.step} |",
        f"| final loss | {_fmt(m.get('loss'))} |",
        f"| images/s | {_fmt(m.get('images_per_s'), '.1f')} |",
        f"| wall time (this flow run) | {_duration(wall_s)} |",
        f"| checkpoint | `{train.checkpoint}` |",
        f"| run directory | `{train.run_dir}` |",
    ]
    if train.mlflow_run_id:
        url = mlflow_run_url(train.mlflow_run_id, tracking_uri)
        run = f"[{train.mlflow_run_id}]({url})" if url else f"`{train.mlflow_run_id}`"
    else:
        run = "not tracked"
    lines.append(f"| MLflow run | {run} |")
    return "\n".join(lines) + "\n"


@_best_effort
def publish_training(train: TrainResult, wall_s: float | None = None):
    """Markdown artifact summing up the training run."""
    return create_markdown_artifact(
        train_markdown(train, wall_s), key="train-summary", description=f"Training run `{Path(train.run_dir).name}`"
    )


# ---- evaluation ------------------------------------------------------------------------------


def grid_markdown(report: EvalReport, max_inline_bytes: int = MAX_INLINE_IMAGE_BYTES) -> str:
    grid = Path(report.grid_path)
    lines = ["# Sample grid", "", f"`{grid}`", ""]
    size = grid.stat().st_size if grid.is_file() else None
    if size is not None and size <= max_inline_bytes:
        data = base64.b64encode(grid.read_bytes()).decode("ascii")
        lines += [f"![sample grid](data:image/png;base64,{data})", ""]
    elif size is not None:
        lines += [f"(not shown inline: {size / 1024:.0f} KiB is over the {max_inline_bytes // 1024} KiB limit)", ""]
    else:
        lines += ["(the grid file is missing)", ""]
    verdict = "passed" if report.passed else "not passed"
    lines += [
        f"Gate: **{verdict}**, {report.primary_metric} vs threshold {report.threshold:g}. {report.reason}",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {_fmt(v)} |" for k, v in sorted(report.metrics.items())],
    ]
    return "\n".join(lines) + "\n"


@_best_effort
def publish_grid(report: EvalReport):
    """Markdown artifact with the evaluation grid (inline when small) and the metrics; with an
    http(s) tracking server also an image artifact served by it."""
    artifact_id = create_markdown_artifact(grid_markdown(report), key="sample-grid", description="Evaluation samples and metrics")
    url = _served_grid_url(report)
    if url is not None:
        create_image_artifact(url, key="sample-grid-image", description="The evaluation grid, served by MLflow")
    return artifact_id


def _served_grid_url(report: EvalReport) -> str | None:
    """The grid's URL on the tracking server, from the MLflow run id evaluate recorded beside it."""
    out_dir = Path(report.grid_path).parent
    record = out_dir / MLFLOW_FILE
    if mlflow_ui_base() is None or not record.is_file():
        return None
    logged = json.loads(record.read_text(encoding="utf-8"))
    path = f"{EVAL_DIR}/{out_dir.name}/{Path(report.grid_path).name}"  # where evaluate logged it in that run
    return mlflow_artifact_url(logged["run_id"], path, logged.get("tracking_uri"))


# ---- registry --------------------------------------------------------------------------------


def registry_markdown(registered: RegisteredModel, report: EvalReport | None = None, tracking_uri: str | None = None) -> str:
    url = mlflow_model_version_url(registered.name, registered.version, tracking_uri)
    lines = [
        "# Registered model",
        "",
        "| | |",
        "|---|---|",
        f"| model | {registered.name} |",
        f"| version | {registered.version} |",
        f"| aliases | {', '.join(registered.aliases) or 'none'} |",
        f"| URI | `{registered.uri}` |",
    ]
    if url:
        lines.append(f"| MLflow UI | [{registered.name} v{registered.version}]({url}) |")
    if report is not None:
        verdict = "passed" if report.passed else "not passed"
        lines.append(f"| gate | {verdict}: {report.reason} |")
    aliased = ", ".join(f"`models:/{registered.name}@{a}`" for a in registered.aliases)
    if aliased:
        lines += ["", f"Load by alias: {aliased}"]
    return "\n".join(lines) + "\n"


@_best_effort
def publish_registry(registered: RegisteredModel, report: EvalReport | None = None):
    """Markdown artifact of the registration, and a link artifact to the model version."""
    artifact_id = create_markdown_artifact(
        registry_markdown(registered, report), key=artifact_key("registry", registered.name),
        description=f"MLflow registered model {registered.name} v{registered.version}",
    )
    url = mlflow_model_version_url(registered.name, registered.version)
    create_link_artifact(
        url or registered.uri,
        link_text=f"{registered.name} v{registered.version}",
        key=artifact_key("registry", registered.name, "link"),
        description=f"`{registered.uri}`" + ("" if url else " (no MLflow UI: the tracking URI is not http(s))"),
    )
    return artifact_id


# ---- formatting ------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "n/a" if value is None else format(value, spec)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    minutes, s = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}h {minutes:02d}m {s:04.1f}s" if hours else f"{minutes}m {s:04.1f}s" if minutes else f"{s:.1f}s"
