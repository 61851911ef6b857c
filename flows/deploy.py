"""Deployments of the whole pipeline: scheduled retraining, and runs started from the Prefect UI.

A deployment of `text_to_image_pipeline` holds a preset's parameters (the UI's Run form starts
from them) and a cron schedule (weekly by default). Two ways to run its flow runs:

- served: this process polls the Prefect server and runs each flow run in a child process
  (`prefect.serve`; stopping it pauses the schedule, so no runs pile up while nobody serves);
- on a `process` work pool: the deployment points at this checkout, and a worker on this
  machine (`prefect worker start --pool NAME`) runs it, so the deploying process can exit.

Both need a Prefect server (PREFECT_API_URL). `prefect.yaml` describes the same cpu-demo
deployment for `prefect deploy`.

    t2i deploy                                            # serve text-to-image-pipeline/cpu-demo (blocks)
    t2i deploy --preset gpu-32px --set embed.encoder.weights=/data/clip.safetensors --work-pool local
"""

from __future__ import annotations

import zoneinfo
from pathlib import Path
from typing import Any

from prefect import Flow, serve
from prefect.client.orchestration import get_client
from prefect.deployments.runner import RunnerDeployment
from prefect.exceptions import InvalidNameError, ObjectNotFound
from prefect.schedules import Cron, Schedule
from prefect.settings import get_current_settings

from flows.pipeline import PipelineParams, text_to_image_pipeline

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# What a worker loads, relative to the working directory its pull step moves to (PROJECT_ROOT).
FLOW_ENTRYPOINT = "flows/pipeline.py:text_to_image_pipeline"
DEFAULT_CRON = "0 3 * * 0"  # Sundays 03:00: weekly retraining on whatever the source holds by then
DEFAULT_TIMEZONE = "UTC"
TAGS = ["t2i"]


class DeployError(ValueError):
    """A deployment that cannot work as asked (bad schedule, no server, missing work pool)."""


def deployment_parameters(params: PipelineParams) -> dict[str, Any]:
    """The deployment's default parameters: the preset plus only what this deploy changed.

    The flow takes one parameter, `params`; a run created from the UI or the API replaces it
    as a whole (Prefect merges run parameters with the deployment's at the top level only).
    """
    changed = params.model_dump(mode="json", exclude_defaults=True)
    return {"params": {"preset": params.preset, **changed}}


def cron_schedule(cron: str, timezone: str = DEFAULT_TIMEZONE) -> Schedule:
    """A validated cron schedule (`cron` is read in `timezone`, an IANA name)."""
    try:
        zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise DeployError(f"unknown time zone {timezone!r}: use an IANA name such as UTC or Europe/Berlin") from exc
    try:
        return Cron(cron, timezone=timezone)
    except ValueError as exc:
        raise DeployError(
            f"invalid cron expression {cron!r}: five fields, minute hour day-of-month month day-of-week, "
            f"e.g. {DEFAULT_CRON!r} for Sundays at 03:00"
        ) from exc


def build_deployment(
    params: PipelineParams,
    name: str | None = None,
    schedule: Schedule | None = None,
    work_pool: str | None = None,
) -> RunnerDeployment:
    """The deployment of `text_to_image_pipeline` (not yet sent to the server).

    With `work_pool`, the flow is loaded from this checkout so that the deployment carries a
    pull step into PROJECT_ROOT (where a worker finds `flows/`, `configs/` and the relative
    data root); served, the runner runs the flow object it already holds.
    """
    if name is not None and not name.strip():
        raise DeployError("the deployment name must not be empty: leave out --deployment for the preset's name")
    try:
        params.to_preset()  # a bad preset or override fails now, not in the first scheduled run
    except ValueError as exc:
        raise DeployError(str(exc)) from exc
    params = absolute_paths(params)
    flow = text_to_image_pipeline if work_pool is None else Flow.from_source(str(PROJECT_ROOT), FLOW_ENTRYPOINT)
    try:
        return flow.to_deployment(
            name=name if name is not None else default_deployment_name(params),
            parameters=deployment_parameters(params),
            schedules=[schedule] if schedule is not None else None,
            tags=TAGS,
            work_pool_name=work_pool,
        )
    except InvalidNameError as exc:
        raise DeployError(f"{exc} Choose another --deployment name.") from exc


def absolute_paths(params: PipelineParams) -> PipelineParams:
    """`params` with a preset file and a source folder given relative to this process's working
    directory made absolute: a worker runs the flow in PROJECT_ROOT, where they would name other
    files or none. A preset named in configs/ stays a name."""
    update = {}
    preset = Path(params.preset)
    if preset.suffix in {".yaml", ".yml"} and preset.is_file():  # what resolve_preset_path reads as a file
        update["preset"] = str(preset.absolute())
    if params.source:  # empty: the generated shapes set
        update["source"] = str(Path(params.source).absolute())
    return params.model_copy(update=update)


def default_deployment_name(params: PipelineParams) -> str:
    """The preset's name (`cpu-demo`, or a preset file's stem): `text-to-image-pipeline/cpu-demo`."""
    return Path(params.preset).stem


def require_api_url() -> str:
    """The configured Prefect server; without one a deployment would live in a throwaway API."""
    url = get_current_settings().api.url
    if not url:
        raise DeployError(
            "PREFECT_API_URL is not set, so there is no Prefect server to deploy to. Start one with "
            "`prefect server start --host 127.0.0.1` and point clients at it: "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api` (or `prefect config set PREFECT_API_URL=...`)."
        )
    return url


def serve_deployment(deployment: RunnerDeployment) -> None:
    """Create or update the deployment and run its flow runs from this process until interrupted."""
    # One run at a time: a second training run on the same machine would only halve the first's speed.
    serve(deployment, limit=1)


def check_work_pool(work_pool: str) -> None:
    """Fail unless `work_pool` exists on the server and is a `process` pool (runs this checkout)."""
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(work_pool)
        except ObjectNotFound as exc:
            raise DeployError(
                f"work pool {work_pool!r} not found on {require_api_url()}: create it with "
                f"`prefect work-pool create {work_pool} --type process`, then start a worker on this machine "
                f"with `prefect worker start --pool {work_pool}`"
            ) from exc
    if pool.type != "process":
        raise DeployError(
            f"work pool {work_pool!r} is a {pool.type!r} pool; `t2i deploy --work-pool` points the deployment "
            f"at this checkout ({PROJECT_ROOT}), which only a `process` pool on this machine can run. For "
            "Docker or Kubernetes pools deploy from the image with `prefect deploy` (see infra/README.md)."
        )
