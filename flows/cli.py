"""`t2i`: the command line over the pipeline's stages and flows.

    t2i run --preset cpu-demo                 # the whole pipeline (what `make demo` runs)
    t2i shapes --out data/raw/shapes          # generate the built-in demo source
    t2i ingest SOURCE --name NAME --resolution 32
    t2i embed DATASET_DIR --allow-random-init
    t2i train DATASET_DIR EMBEDDINGS_DIR --preset cpu-demo
    t2i evaluate RUN_DIR DATASET_DIR
    t2i register RUN_DIR | t2i register --restore VERSION   # RUN_DIR/eval_report.json from `t2i evaluate`
    t2i sample "a red circle in the top left" --model models:/t2i-shapes@champion --out out.png
    t2i deploy --preset cpu-demo [--cron '0 3 * * 0'] [--work-pool local]   # scheduled retraining

Every stage command is the plain function the flow's task wraps; `--set section.key=value`
overrides any preset value (unknown keys are errors).
"""

from __future__ import annotations

import json
import os
import reprlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    help="t2i-pipeline: caption dataset -> Parquet -> CLIP embeddings -> UNet/DDPM -> evaluation -> MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

PresetOpt = Annotated[str, typer.Option("--preset", "-p", help="preset name in configs/ or a YAML path")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="override a preset value, e.g. --set train.steps=100 (repeatable)"),
]
DaskOpt = Annotated[
    Optional[str],
    typer.Option(
        "--dask-address",
        help="Dask scheduler (tcp://host:8786) to run ingest's and embed's shards on; default: T2I_DASK_ADDRESS, else this machine",
    ),
]


def _offline_defaults() -> None:
    # Prefect's and MLflow's telemetry try to resolve hosts; the pipeline runs offline.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def _message(exc: Exception) -> str:
    """`exc`'s message on one line; a pydantic error as `where: what` per error, without its URL."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or exc.title}: {e['ctx']['error'] if e['type'] == 'value_error' else e['msg']}"
        + ("" if isinstance(e["input"], (dict, list)) else f" (got {reprlib.repr(e['input'])})")
        for e in exc.errors()
    )


def _preset(name: str, overrides: list[str] | None):
    from tasks.presets import load_preset

    try:
        return load_preset(name, overrides or [])
    except ValueError as exc:
        raise typer.BadParameter(_message(exc)) from exc


@contextmanager
def _stage_errors() -> Iterator[None]:
    """A stage refusing its input or failing for good ends the command with its message on one
    line, not a traceback: the project reports bad input as a ValueError (or a subclass), a missing
    file, a TrainingError, a StorageError or a flow's StageFailed, each saying what to do. A
    library's ValueError prints the same way; any other exception keeps its traceback."""
    try:
        yield
    except Exception as exc:
        from flows.pipeline import StageFailed
        from tasks.storage import StorageError
        from tasks.train import TrainingError

        if not isinstance(exc, (ValueError, FileNotFoundError, TrainingError, StorageError, StageFailed)):
            raise
        typer.secho(f"Error: {_message(exc)}", err=True, fg="red")
        raise typer.Exit(1) from exc


def load_train_result(run_dir: Path):
    """The TrainResult a finished run wrote into its directory."""
    from tasks.train import RESULT_FILE, read_train_result

    result = read_train_result(run_dir)
    if result is None:
        raise typer.BadParameter(f"{Path(run_dir) / RESULT_FILE} not found: {run_dir} is not a finished training run (see `t2i train`)")
    return result


def _echo_json(title: str, obj) -> None:
    typer.secho(title, bold=True)
    typer.echo(json.dumps(obj.model_dump(mode="json") if hasattr(obj, "model_dump") else obj, indent=2))


@app.command()
def shapes(
    out: Annotated[Optional[Path], typer.Option(help="folder to write; default <data root>/raw/shapes-<config hash> (T2I_DATA_ROOT, default data)")] = None,
    preset: PresetOpt = "cpu-demo",
    set_: SetOpt = None,
) -> None:
    """Generate the built-in shapes source (images + metadata.jsonl + heldout.json)."""
    from tasks.shapes import default_shapes_dir, generate_shapes

    config = _preset(preset, set_).shapes
    with _stage_errors():
        path = generate_shapes(out or default_shapes_dir(config), config)
    typer.echo(f"shapes source ({config.n_images} images, {config.resolution} px): {path}")


@app.command()
def ingest(
    source: Annotated[str, typer.Argument(help="image folder, folder of .tar shards, or a .csv/.parquet URL list")],
    name: Annotated[str, typer.Option(help="dataset name under <data root>/datasets/ (T2I_DATA_ROOT, default data)")],
    resolution: Annotated[Optional[int], typer.Option(help="training image side in pixels")] = None,
    preset: PresetOpt = "cpu-demo",
    set_: SetOpt = None,
    dask_address: DaskOpt = None,
) -> None:
    """Ingest a caption dataset into a versioned Parquet dataset (idempotent)."""
    from tasks.ingest import ingest_dataset

    overrides = list(set_ or []) + ([f"ingest.resolution={resolution}"] if resolution is not None else [])
    config = _preset(preset, overrides).ingest
    with _stage_errors():
        dataset = ingest_dataset(source, name, config, dask_address=dask_address)
    _echo_json("dataset version", dataset)


@app.command()
def embed(
    dataset_dir: Annotated[Path, typer.Argument(help="a published dataset version directory")],
    weights: Annotated[Optional[str], typer.Option(help="open_clip weights file or cached pretrained tag")] = None,
    model_name: Annotated[Optional[str], typer.Option(help="open_clip model name, e.g. ViT-B-32")] = None,
    allow_random_init: Annotated[
        Optional[bool],
        typer.Option(
            "--allow-random-init/--no-allow-random-init",
            help="with no weights, use a seeded random encoder (demo only); default: the preset's",
        ),
    ] = None,
    preset: PresetOpt = "cpu-demo",
    set_: SetOpt = None,
    dask_address: DaskOpt = None,
) -> None:
    """Precompute caption embeddings for a dataset version (idempotent)."""
    from tasks.embed import embed_from_path
    from tasks.presets import yaml_string

    overrides = list(set_ or [])
    if weights is not None:
        overrides.append(f"embed.encoder.weights={yaml_string(weights)}")
    if model_name is not None:
        overrides.append(f"embed.encoder.model_name={yaml_string(model_name)}")
    if allow_random_init is not None:
        overrides.append(f"embed.encoder.allow_random_init={str(allow_random_init).lower()}")
    config = _preset(preset, overrides).embed
    with _stage_errors():
        result = embed_from_path(dataset_dir, config, dask_address=dask_address)
    _echo_json("embedding set", result)


@app.command()
def train(
    dataset_dir: Annotated[Path, typer.Argument(help="a published dataset version directory")],
    embeddings_dir: Annotated[Path, typer.Argument(help="the embedding set directory for that dataset")],
    preset: PresetOpt = "cpu-demo",
    set_: SetOpt = None,
) -> None:
    """Train (or resume) the UNet; prints the TrainResult."""
    from tasks.embed import load_embedding_set
    from tasks.ingest import load_dataset_version
    from tasks.train import train_model

    config = _preset(preset, set_).train
    with _stage_errors():
        result = train_model(load_dataset_version(dataset_dir), load_embedding_set(embeddings_dir), config)
    _echo_json("training result", result)


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="a finished training run directory")],
    dataset_dir: Annotated[Path, typer.Argument(help="the dataset version it was trained on")],
    preset: PresetOpt = "cpu-demo",
    set_: SetOpt = None,
) -> None:
    """Sample the evaluation grid, compute metrics and the gate verdict; prints the EvalReport."""
    from models.checkpoint import write_text_atomic
    from tasks.evaluate import evaluate_model
    from tasks.ingest import load_dataset_version
    from tasks.register import champion_metrics

    p = _preset(preset, set_)
    train_result = load_train_result(run_dir)
    with _stage_errors():
        report = evaluate_model(
            train_result,
            load_dataset_version(dataset_dir),
            p.evaluate,
            champion_metrics=champion_metrics(p.register.model_name),
        )
    # atomically: `t2i register` must never read half a report
    write_text_atomic(Path(run_dir) / "eval_report.json", report.model_dump_json(indent=2))
    _echo_json("evaluation report", report)


@app.command()
def register(
    run_dir: Annotated[Optional[Path], typer.Argument(help="a finished, evaluated training run directory")] = None,
    restore: Annotated[Optional[str], typer.Option(help="move the champion alias back to this version")] = None,
    preset: PresetOpt = "cpu-demo",
    set_: SetOpt = None,
) -> None:
    """Register a run's model in MLflow (candidate; champion if its gate passed), or --restore a version."""
    from tasks.contracts import EvalReport
    from tasks.register import register_model, restore_champion

    config = _preset(preset, set_).register
    if run_dir is not None and restore is not None:
        raise typer.BadParameter("give either RUN_DIR or --restore VERSION, not both")
    if restore is not None:
        with _stage_errors():
            restored = restore_champion(config.model_name, restore)
        _echo_json("restored", restored)
        return
    if run_dir is None:
        raise typer.BadParameter("give RUN_DIR (evaluated with `t2i evaluate`) or --restore VERSION")
    report_path = Path(run_dir) / "eval_report.json"
    if not report_path.is_file():
        raise typer.BadParameter(f"{report_path} not found: run `t2i evaluate {run_dir} DATASET_DIR` first")
    train_result = load_train_result(run_dir)
    with _stage_errors():
        report = EvalReport.model_validate_json(report_path.read_text())
        registered = register_model(train_result, report, config)
    _echo_json("registered", registered)


@app.command()
def sample(
    prompts: Annotated[list[str], typer.Argument(help="one or more prompts")],
    model: Annotated[
        str, typer.Option(help="models:/<name>@<alias>, models:/<name>/<version>, runs:/..., or a saved model dir")
    ] = "models:/t2i-shapes@champion",
    out: Annotated[Path, typer.Option(help="output PNG; several prompts get -0, -1 ... suffixes")] = Path("out.png"),
    seed: Annotated[int, typer.Option(help="seed of the first image (prompt i uses seed + i)")] = 0,
    steps: Annotated[int, typer.Option(help="sampler steps")] = 50,
    guidance: Annotated[float, typer.Option(help="classifier-free guidance scale")] = 3.0,
    sampler: Annotated[str, typer.Option(help="ddim, dpmpp_2m or ddpm")] = "ddim",
    scale: Annotated[int, typer.Option(min=1, help="upscale the written PNG by this factor (nearest), for viewing")] = 1,
) -> None:
    """Generate images from a registered (or saved) model."""
    from PIL import Image

    from tasks.register import sample_images

    Image.init()
    if Image.registered_extensions().get(out.suffix.lower()) not in Image.SAVE:  # checked before minutes of sampling
        raise typer.BadParameter(f"{out} does not name an image file: e.g. --out out.png", param_hint="--out")
    with _stage_errors():
        images = sample_images(model, list(prompts), seed=seed, steps=steps, guidance_scale=guidance, sampler=sampler)
    for i, image in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        if scale > 1:
            image = image.resize((image.width * scale, image.height * scale), resample=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        typer.echo(f"{prompts[i]!r} -> {path}")


@app.command()
def run(
    preset: PresetOpt = "cpu-demo",
    source: Annotated[Optional[str], typer.Option(help="caption source; default: generate the shapes dataset")] = None,
    name: Annotated[str, typer.Option(help="dataset name")] = "shapes",
    set_: SetOpt = None,
    dask_address: DaskOpt = None,
) -> None:
    """Run the whole pipeline as a Prefect flow (ephemeral API unless PREFECT_API_URL is set)."""
    _offline_defaults()
    from flows.pipeline import PipelineParams, text_to_image_pipeline
    from tasks.settings import get_settings

    params = PipelineParams(
        preset=preset, source=source, dataset_name=name, overrides=list(set_ or []), dask_address=dask_address
    )
    try:
        params.to_preset()  # fail fast on a bad preset or override, before Prefect starts
    except ValueError as exc:
        raise typer.BadParameter(_message(exc)) from exc
    started = time.perf_counter()
    with _stage_errors():
        summary = text_to_image_pipeline(params)
    elapsed = time.perf_counter() - started
    settings = get_settings()
    r = summary.report
    typer.secho(f"\npipeline finished in {elapsed / 60:.1f} min", bold=True)
    typer.echo(f"dataset version : {summary.dataset.name}/{summary.dataset.version} {summary.dataset.counts}")
    typer.echo(f"embeddings      : {summary.embeddings.encoder_id}")
    typer.echo(f"trained         : step {summary.train.step}, {summary.train.run_dir}")
    typer.echo("metrics         : " + ", ".join(f"{k}={v:.3g}" for k, v in sorted(r.metrics.items())))
    typer.echo(f"gate            : {'passed' if r.passed else 'failed'} ({r.reason})")
    typer.echo(f"sample grid     : {r.grid_path}")
    typer.echo(f"registered      : {summary.registered.uri} (aliases: {', '.join(summary.registered.aliases)})")
    typer.echo(
        "\nnext:\n"
        f"  .venv/bin/t2i sample 'a red circle' --model {summary.registered.uri} --out out.png --scale 8\n"
        f"  .venv/bin/mlflow ui --backend-store-uri {settings.mlflow_tracking_uri} -h 127.0.0.1   # MLflow UI\n"
        "  .venv/bin/prefect server start --host 127.0.0.1   # Prefect UI (flow runs of later `t2i run`s)"
    )


@app.command(
    help="Deploy the whole pipeline to the Prefect server at PREFECT_API_URL, on a weekly schedule.\n\n"
    "Without --work-pool it serves the deployment: creates or updates it, then runs its flow runs "
    "(scheduled, or started from the UI's Run form) one at a time in child processes of this command "
    "until Ctrl-C, which also pauses the schedule. With --work-pool it registers the deployment and exits.\n\n"
    "The deployment's default parameters are the preset with --source, --name and --set applied, "
    "as `t2i run` takes them."
)
def deploy(
    preset: PresetOpt = "cpu-demo",
    source: Annotated[Optional[str], typer.Option(help="caption source; default: generate the shapes dataset")] = None,
    name: Annotated[str, typer.Option(help="dataset name")] = "shapes",
    set_: SetOpt = None,
    deployment: Annotated[
        Optional[str],
        typer.Option("--deployment", "-d", help="deployment name; default: the preset's name, e.g. cpu-demo"),
    ] = None,
    cron: Annotated[
        str,
        typer.Option(
            help="when scheduled runs start: minute hour day-of-month month day-of-week; "
            "the default is Sundays at 03:00"
        ),
    ] = "0 3 * * 0",
    timezone: Annotated[str, typer.Option(help="IANA time zone the cron expression is read in")] = "UTC",
    no_schedule: Annotated[
        bool,
        typer.Option(
            "--no-schedule",
            help="no schedule: runs start only from the UI, `prefect deployment run` or the API "
            "(an existing deployment of that name loses its schedules)",
        ),
    ] = False,
    work_pool: Annotated[
        Optional[str],
        typer.Option(
            help="register the deployment on this `process` work pool and exit, instead of serving; "
            "a worker on this machine (`prefect worker start --pool NAME`) runs it from this checkout"
        ),
    ] = None,
) -> None:
    """Deploy the whole pipeline to the Prefect server at PREFECT_API_URL, on a weekly schedule."""
    _offline_defaults()
    from flows.deploy import (
        DeployError,
        build_deployment,
        check_work_pool,
        cron_schedule,
        require_api_url,
        serve_deployment,
    )
    from flows.pipeline import PipelineParams

    _preset(preset, set_)  # fail fast on a bad preset or override, before Prefect is asked anything
    params = PipelineParams(preset=preset, source=source, dataset_name=name, overrides=list(set_ or []))
    try:
        schedule = None if no_schedule else cron_schedule(cron, timezone)
        api_url = require_api_url()
        if work_pool is not None:
            check_work_pool(work_pool)
        spec = build_deployment(params, name=deployment, schedule=schedule, work_pool=work_pool)
    except DeployError as exc:
        raise typer.BadParameter(str(exc)) from exc

    full_name = f"{spec.flow_name}/{spec.name}"
    when = "no schedule" if schedule is None else f"cron {schedule.cron!r} ({schedule.timezone})"
    typer.secho(f"deployment {full_name} on {api_url}: {when}", bold=True)
    typer.echo("default parameters: " + json.dumps(spec.parameters))
    if work_pool is None:
        serve_deployment(spec)
        return
    deployment_id = spec.apply(work_pool_name=work_pool)
    typer.echo(
        f"deployment id {deployment_id}, work pool {work_pool!r}, code in {spec.storage.destination}\n"
        f"next:\n  .venv/bin/prefect worker start --pool {work_pool}    # on this machine, runs the flow runs\n"
        f"  .venv/bin/prefect deployment run '{full_name}' --watch"
    )


if __name__ == "__main__":
    app()
