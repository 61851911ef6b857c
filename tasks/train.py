"""Train stage: a dataset version and its caption embeddings in, a trained UNet (EMA weights) out.

    result = train_model(dataset, embeddings, TrainConfig(steps=2000, unet={"channels": [32, 64, 128]}))
    pipe = TextToImage.load(result.checkpoint)

or, as a process (what `torchrun` runs for `nproc > 1`, and what the resume tests kill):

    python -m tasks.train --dataset ds.json --embeddings emb.json --config train.yaml [--run-dir DIR]

The recipe (DDPM, Ho et al. 2020, with the Stable Diffusion conditioning): per sample a random
time step t, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, the UNet sees (x_t, t, caption token
states, and with `pooled_conditioning` the caption's pooled embedding) and regresses eps or v, MSE
with optional Min-SNR-gamma weights; captions (tokens and pooled embedding together) are dropped to
the empty caption with probability `caption_dropout` so the model also learns the unconditional
prediction that classifier-free guidance needs.

Resumable by construction: everything random in step s comes from a generator seeded with
(seed, s), and the data position is `s * batch_size`, so a run restarted from the checkpoint of
step s draws exactly the batches and noise the uninterrupted run drew. A run lives in
`<runs_dir>/<run key>/`; the key hashes the dataset version, the encoder and the resolved config,
so a retried Prefect task finds the killed attempt's checkpoints and continues from them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, field_validator, model_validator

from models.checkpoint import (
    atomic_write,
    fsync_dir,
    load_state,
    load_weights,
    save_state,
    save_weights,
    write_json_atomic,
    write_text_atomic,
)
from models.ema import EMA
from models.schedule import NoiseSchedule, ScheduleConfig
from models.unet import UNet, UNetConfig
from tasks.contracts import DatasetVersion, EmbeddingSet, TrainResult
from tasks.data import EpochSampler, TrainData, TrainDataError, check_pair, load_train_data, mix_seed
from tasks.prefect_compat import NO_CACHE, task
from tasks.settings import get_settings

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
RUN_FILE = "run.json"  # run key, config, MLflow run id: written when a run starts
RESULT_FILE = "result.json"  # {run_key, result: the TrainResult, grid}: written last, its presence marks a finished run
DATA_CACHE_DIR = "data-cache"  # memory-mapped training data of `data_storage: disk`, removed at the end
METRICS_FILE = "metrics.jsonl"  # one line per log step, also without MLflow
MODEL_DIR = "model"  # the saved TextToImage with EMA weights, what later stages load
CHECKPOINTS_DIR = "checkpoints"
INTERRUPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM

# Fields that change how a run is observed, not what it computes: left out of the run key so
# that e.g. checkpointing more often or adding processes still resumes the same run.
_BOOKKEEPING_FIELDS = {
    "log_every", "checkpoint_every", "keep_last", "sample_every", "nproc", "nnodes", "rdzv_endpoint", "rdzv_id",
    "data_storage",
}  # fmt: skip


class TrainConfig(BaseModel):
    """Hyperparameters of one training run. Presets (configs/*.yaml, section `train`) list only
    what differs from these defaults; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    unet: dict[str, Any] = Field(
        default_factory=dict,
        description="UNetConfig fields; context_dim (and pooled_dim, see pooled_conditioning) default to the embeddings' widths",
    )
    pooled_conditioning: bool = Field(
        True,
        description="add the caption's pooled embedding to the UNet's time embedding (Imagen, SDXL): "
        "sets unet.pooled_dim to the embedding set's pooled width",
    )
    schedule: dict[str, Any] = Field(default_factory=dict, description="ScheduleConfig fields")
    resolution: PositiveInt | None = Field(None, description="expected image size; None = the dataset's")

    steps: PositiveInt = 20_000
    batch_size: PositiveInt = Field(64, description="images per optimizer step, over all processes and micro-batches")
    grad_accum: PositiveInt = Field(1, description="micro-batches per optimizer step")
    lr: float = Field(1e-4, gt=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine decays to lr * min_lr_ratio")
    warmup_steps: NonNegativeInt = 500
    weight_decay: float = Field(0.01, ge=0, description="AdamW decay on weight matrices and kernels, not on biases and norms")
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(1.0, gt=0, description="max global grad norm; None = no clipping")
    ema_decay: float = Field(0.9999, ge=0, lt=1)

    caption_dropout: float = Field(0.1, ge=0, le=1, description="probability of the empty caption (for guidance)")
    min_snr_gamma: float | None = Field(5.0, gt=0, description="Min-SNR-gamma loss weights (Hang et al. 2023); None = plain MSE")
    loss_weight_floor: float = Field(
        0.0, ge=0, le=1,
        description="lowest Min-SNR loss weight of the noisy steps (SNR < gamma): with v-prediction on a "
        "zero-terminal-SNR schedule it is ~SNR, ~0 for the noisiest half of the steps (where the layout is decided)",
    )  # fmt: skip
    flip: Literal["auto", "always", "never"] = Field(
        "auto", description="random horizontal flip; auto = only samples whose caption has no left/right words"
    )
    max_length: PositiveInt | None = Field(
        None, description="caption token length L the states are padded to; None = the set's longest caption (cheapest)"
    )
    data_storage: Literal["auto", "memory", "disk"] = Field(
        "auto",
        description="memory: decode the whole split into RAM (then the GPU when it fits); disk: stream it into "
        "memory-mapped files in the run directory and read each step's rows from there, for data larger than RAM; "
        "auto: disk when the decoded split would take more than half of the available RAM",
    )

    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 elsewhere")
    compile: bool = False
    channels_last: bool | None = Field(None, description="None: on CUDA")
    device: str | None = Field(None, description="None: cuda if available, else cpu")
    seed: int = 0
    nproc: PositiveInt = Field(1, description="processes (GPUs) per machine; > 1 launches torchrun with DDP")
    nnodes: PositiveInt | None = Field(
        None,
        description="machines, each running this same task on shared storage; > 1 joins a torchrun rendezvous at "
        "rdzv_endpoint. None: $PET_NNODES (the Kubernetes job template sets it), else 1",
    )
    rdzv_endpoint: str | None = Field(
        None, description="host:port of the c10d rendezvous when nnodes > 1; None: $PET_RDZV_ENDPOINT"
    )
    rdzv_id: str | None = Field(None, description="rendezvous id the machines share; None: the run key")

    log_every: PositiveInt = 50
    checkpoint_every: PositiveInt = 1000
    keep_last: PositiveInt = 2
    sample_every: NonNegativeInt = Field(0, description="steps between sample grids; 0 = only at the end")
    sample_captions: PositiveInt = 8
    sample_steps: PositiveInt = 25
    sample_guidance: float = Field(3.0, ge=0)

    @field_validator("unet")
    @classmethod
    def _valid_unet(cls, v: dict[str, Any]) -> dict[str, Any]:
        UNetConfig.from_dict({"context_dim": 512, **v})  # raises naming the bad key or value
        return v

    @field_validator("schedule")
    @classmethod
    def _valid_schedule(cls, v: dict[str, Any]) -> dict[str, Any]:
        ScheduleConfig.from_dict(v)
        return v

    @field_validator("betas")
    @classmethod
    def _valid_betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"AdamW betas must be in [0, 1), got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        per_step = self.grad_accum * self.nproc * (self.nnodes or 1)
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size {self.batch_size} must be divisible by grad_accum * nproc * nnodes = {per_step} "
                "(each process runs batch_size / (grad_accum * world size) images per micro-batch)"
            )
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} exceeds steps {self.steps}")
        if self.loss_weight_floor > 0 and self.min_snr_gamma is None:
            raise ValueError("loss_weight_floor floors Min-SNR weights: set min_snr_gamma too (plain MSE weighs every step 1)")
        T = ScheduleConfig.from_dict(self.schedule).num_train_timesteps
        if self.sample_steps > T:  # DDIM, which the sample grids use, takes 1..T steps
            raise ValueError(
                f"sample_steps {self.sample_steps} exceeds schedule.num_train_timesteps {T}: the sample grids use "
                f"DDIM, which takes at most one step per training time step; set sample_steps to at most {T}"
            )
        if self.resolution is not None:
            f = UNetConfig.from_dict({"context_dim": 512, **self.unet}).downsample_factor
            if self.resolution % f:
                raise ValueError(f"resolution {self.resolution} is not divisible by the UNet's downsample factor {f}")
        return self


class TrainingError(RuntimeError):
    """Training cannot start or cannot go on; the message says why and what to do."""


class NonFiniteLossError(TrainingError):
    """The loss or the gradient norm became NaN/inf."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class TrainingInterrupted(TrainingError):
    """SIGTERM: the current step finished, a checkpoint was written; run again to resume."""


class TorchrunFailed(TrainingError):
    """torchrun exited non-zero and no worker reported bad input: a process was killed (SIGTERM,
    the kernel's OOM killer) or lost its peers (NCCL, a machine gone); run again to resume. A GPU
    out of memory is reported by its worker instead (a TrainingError naming what to change)."""


# ---- the plain function ---------------------------------------------------------------------


def train_model(
    dataset: DatasetVersion,
    embeddings: EmbeddingSet,
    config: TrainConfig,
    run_dir: Path | None = None,
    mlflow_experiment: str | None = "t2i",
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train (or resume, or return the finished run of) the UNet for this dataset + encoder + config.

    `mlflow_experiment=None` turns tracking off. `on_progress(step, total)` is called when the loop
    starts (at the resumed step) and at every log step, never in between (no extra host syncs); it
    is not called under `torchrun` (`config.nproc > 1`), which launches processes of its own and
    returns what its rank 0 wrote."""
    check_pair(dataset, embeddings)
    _check_resolution(dataset, config)
    unet_config = resolve_unet_config(config, embeddings)
    key = run_key(dataset, embeddings, config, unet_config)
    run_dir = Path(run_dir) if run_dir is not None else get_settings().runs_dir / key

    finished = _finished_result(run_dir, key)
    if finished is not None:
        log.info("run %s already finished at step %d; returning it", key, finished.step)
        return finished

    if (config.nproc > 1 or resolved_nnodes(config) > 1) and _world_size() == 1:
        return _launch_torchrun(dataset, embeddings, config, run_dir, key, mlflow_experiment, progress)

    trainer = _Trainer(dataset, embeddings, config, unet_config, key, run_dir, mlflow_experiment, progress, on_progress)
    return trainer.run()


def _retry_unless_deterministic(task: Any, task_run: Any, state: Any) -> bool:
    """Retry kills, SIGTERM, I/O errors and failed torchrun runs (the retry resumes); bad input or a
    NaN loss would only fail the same way again."""
    try:
        state.result()
    except (TrainingInterrupted, TorchrunFailed):
        return True
    except (TrainingError, TrainDataError, ValueError):
        return False
    except Exception:
        return True
    return True


@task(name="train", retries=2, retry_delay_seconds=10, retry_condition_fn=_retry_unless_deterministic, cache_policy=NO_CACHE)
def train_task(
    dataset: DatasetVersion,
    embeddings: EmbeddingSet,
    config: TrainConfig,
    mlflow_experiment: str | None = "t2i",
) -> TrainResult:
    """Prefect wrapper. No result caching: a retry re-enters `train_model`, which resumes from
    the last checkpoint of the same run key (or returns the finished run). Keeps a Prefect
    progress artifact, `train-progress`, at the last logged step. With an s3:// data root the
    inputs are pulled first when this machine lacks them, and the finished run is pushed."""
    from tasks import storage  # imports nothing heavy, but keep this module's imports prefect-free

    storage.pull(Path(dataset.root))
    storage.pull(Path(embeddings.path))
    result = train_model(
        dataset, embeddings, config, mlflow_experiment=mlflow_experiment, progress=False, on_progress=_progress_artifact()
    )
    storage.push(Path(result.run_dir))
    return result


def _progress_artifact(key: str = "train-progress") -> Callable[[int, int], None] | None:
    """An `on_progress` callback that creates, then updates, a Prefect progress artifact; None
    outside a Prefect task run. A failing Prefect API costs a warning, never the training run."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from prefect.context import TaskRunContext

    if TaskRunContext.get() is None:
        return None
    artifact_id = None

    def report(step: int, total: int) -> None:
        nonlocal artifact_id
        percent = 100.0 * step / total
        try:
            if artifact_id is None:
                artifact_id = create_progress_artifact(percent, key=key, description=f"training step {step} of {total}")
            else:
                update_progress_artifact(artifact_id, percent, description=f"training step {step} of {total}")
        except Exception as exc:
            log.warning("could not update the training progress artifact: %s: %s", type(exc).__name__, exc)

    return report


def resolve_unet_config(config: TrainConfig, embeddings: EmbeddingSet) -> UNetConfig:
    """The UNet to build on `embeddings`: see `unet_config_for` (pooled width read from the set's manifest)."""
    pooled_dim = embedding_pooled_dim(embeddings) if config.pooled_conditioning else None
    return unet_config_for(config, embeddings.width, pooled_dim, f"the embedding set {embeddings.encoder_id}")


def unet_config_for(config: TrainConfig, width: int, pooled_dim: int | None, source: str) -> UNetConfig:
    """The UNet to build for text embeddings of token width `width` and pooled width `pooled_dim`
    (from `source`, named in errors): the config's fields, context_dim defaulting to `width` and,
    with `pooled_conditioning`, pooled_dim to `pooled_dim`."""
    defaults: dict[str, Any] = {"context_dim": width}
    if config.pooled_conditioning:
        defaults["pooled_dim"] = pooled_dim
    elif config.unet.get("pooled_dim") is not None:
        raise TrainingError(
            f"train.unet.pooled_dim is {config.unet['pooled_dim']} but train.pooled_conditioning is false; "
            "remove pooled_dim and set pooled_conditioning: true to condition on the pooled embedding"
        )
    unet_config = UNetConfig.from_dict({**defaults, **config.unet})
    if unet_config.context_dim != width:
        raise TrainingError(
            f"train.unet.context_dim is {unet_config.context_dim} but {source} has "
            f"token width {width}; remove context_dim from the preset (it defaults to the encoder's width)"
        )
    if config.pooled_conditioning and unet_config.pooled_dim != defaults["pooled_dim"]:
        raise TrainingError(
            f"train.unet.pooled_dim is {unet_config.pooled_dim} but {source} has "
            f"pooled width {defaults['pooled_dim']}; remove pooled_dim from the preset (it defaults to the encoder's)"
        )
    return unet_config


def embedding_pooled_dim(embeddings: EmbeddingSet) -> int:
    """Width E of the set's pooled caption embeddings (its manifest's `pooled_dim`)."""
    from tasks.embed import read_manifest  # the embed stage owns the on-disk embedding format

    return int(read_manifest(embeddings.path)["pooled_dim"])


def run_key(dataset: DatasetVersion, embeddings: EmbeddingSet, config: TrainConfig, unet_config: UNetConfig) -> str:
    """16 hex chars naming the run: same data, encoder and effective config -> same run directory."""
    resolved = config.model_dump(mode="json", exclude=_BOOKKEEPING_FIELDS)
    if resolved["loss_weight_floor"] == 0:
        del resolved["loss_weight_floor"]  # added later: runs from before it keep their keys (and resume)
    resolved["unet"] = unet_config.to_dict()
    resolved["schedule"] = ScheduleConfig.from_dict(config.schedule).to_dict()
    payload = {
        "dataset_version": dataset.version,
        "encoder_id": embeddings.encoder_id,
        "embeddings_dataset_version": embeddings.dataset_version,
        "config": resolved,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _check_resolution(dataset: DatasetVersion, config: TrainConfig) -> None:
    if config.resolution is not None and config.resolution != dataset.resolution:
        raise TrainingError(
            f"train.resolution is {config.resolution} but dataset {dataset.name}@{dataset.version} was ingested at "
            f"{dataset.resolution} px; set train.resolution to {dataset.resolution} (or leave it unset), or re-ingest "
            f"at {config.resolution} px"
        )
    f = UNetConfig.from_dict({"context_dim": 512, **config.unet}).downsample_factor
    if dataset.resolution % f:
        raise TrainingError(
            f"dataset resolution {dataset.resolution} is not divisible by the UNet's downsample factor {f} "
            f"(2 ** (levels - 1)); use fewer UNet levels or another resolution"
        )


def read_train_result(run_dir: str | Path) -> TrainResult | None:
    """The TrainResult a finished run wrote into `run_dir` (None: the run has not finished)."""
    data = _result_record(Path(run_dir))
    return None if data is None else TrainResult.model_validate(data["result"])


def _result_record(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RESULT_FILE  # {"run_key", "result": TrainResult, "grid"}
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _finished_result(run_dir: Path, key: str) -> TrainResult | None:
    data = _result_record(run_dir)
    if data is None:
        return None
    if data.get("run_key") != key:
        raise TrainingError(f"{run_dir / RESULT_FILE} belongs to run {data.get('run_key')}, not {key}; pass another run_dir")
    return TrainResult.model_validate(data["result"])


# ---- one training run ---------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class _Trainer:
    def __init__(
        self,
        dataset: DatasetVersion,
        embeddings: EmbeddingSet,
        config: TrainConfig,
        unet_config: UNetConfig,
        key: str,
        run_dir: Path,
        mlflow_experiment: str | None,
        progress: bool,
        on_progress: Callable[[int, int], None] | None = None,
    ):
        self.dataset, self.embeddings, self.config = dataset, embeddings, config
        self.unet_config, self.key, self.run_dir = unet_config, key, run_dir
        self.mlflow_experiment, self.progress = mlflow_experiment, progress
        self.dist = _Dist(int(os.environ.get("RANK", 0)), _world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        self.on_progress = on_progress if self.dist.is_main else None
        self.data_cache = run_dir / DATA_CACHE_DIR / f"{socket.gethostname()}-{self.dist.rank}"
        expected = config.nproc * resolved_nnodes(config)
        if self.dist.world != expected:
            raise TrainingError(
                f"started with WORLD_SIZE={self.dist.world} but train.nproc * nnodes is {expected}"
            )
        if config.batch_size % (config.grad_accum * self.dist.world):  # nnodes from $PET_NNODES escapes the validator
            raise TrainingError(
                f"batch_size {config.batch_size} is not divisible by grad_accum * WORLD_SIZE = "
                f"{config.grad_accum * self.dist.world}"
            )
        self.device = _resolve_device(config.device, self.dist.local_rank)
        self.amp_dtype = _resolve_precision(config.precision, self.device)
        self.channels_last = config.channels_last if config.channels_last is not None else self.device.type == "cuda"
        self.stop_requested = False
        self.last_metrics: dict[str, float] = {}  # the last log step's; kept in checkpoints for a resume at the end

    # -- setup ------------------------------------------------------------------------------

    def _load_data(self) -> TrainData:
        c = self.config
        storage = c.data_storage if c.data_storage != "auto" else _auto_storage(self.dataset, self.embeddings)
        data = load_train_data(
            self.dataset, self.embeddings, "train", max_length=c.max_length, flip=c.flip,
            storage=storage, cache_dir=self.data_cache if storage == "disk" else None,
        )  # fmt: skip
        if data.on_disk:
            log.info("training data streams from memory-mapped files in %s", self.data_cache)
        if data.resolution != self.dataset.resolution:
            raise TrainingError(f"decoded images are {data.resolution} px but the dataset version says {self.dataset.resolution}")
        if c.batch_size > len(data):
            raise TrainingError(
                f"batch_size {c.batch_size} is larger than the {len(data)} training images of "
                f"{self.dataset.name}@{self.dataset.version}; lower train.batch_size to at most {len(data)}"
            )
        if data.tokens.shape[-1] != self.unet_config.context_dim:
            raise TrainingError(
                f"token states are {data.tokens.shape[-1]} wide, the UNet's context_dim is {self.unet_config.context_dim}"
            )
        return data

    def _build(self) -> None:
        c = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(c.seed, 0xD0D0))  # the initial weights depend on the seed alone
            self.unet = UNet(self.unet_config)
        self.unet.to(self.device)
        if self.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.schedule = NoiseSchedule(ScheduleConfig.from_dict(c.schedule))
        # NoiseSchedule indexes its (T,) tables after `.to(x.device)`; with the tables already on the
        # device that is a no-op instead of a blocking host-to-device copy in every step.
        for name, value in vars(self.schedule).items():
            if isinstance(value, torch.Tensor):
                setattr(self.schedule, name, value.to(self.device))
        self.ema = EMA(self.unet, c.ema_decay) if self.dist.is_main else None

        decay, no_decay = [], []
        for p in self.unet.parameters():
            (decay if p.ndim >= 2 else no_decay).append(p)  # no decay on biases and norm gains (nanoGPT)
        groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        cuda = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(groups, lr=c.lr, betas=c.betas, fused=cuda or None, foreach=None if cuda else True)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _warmup_cosine(c.warmup_steps, c.steps, c.min_lr_ratio)
        )

        model: torch.nn.Module = self.unet
        if self.dist.world > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if c.compile:
            model = torch.compile(model)
        self.model = model

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> TrainResult:
        try:
            return self._run()
        except torch.OutOfMemoryError as exc:  # the same batch would run out again: say what to change, no retry
            raise TrainingError(self._out_of_memory(exc)) from exc
        finally:  # memory-mapped data of `data_storage: disk`, rebuilt by a resumed attempt
            shutil.rmtree(self.data_cache, ignore_errors=True)
            with contextlib.suppress(OSError):
                (self.run_dir / DATA_CACHE_DIR).rmdir()  # the last rank out removes the folder

    @property
    def micro_batch(self) -> int:
        """Images per process and micro-batch."""
        return self.config.batch_size // (self.config.grad_accum * self.dist.world)

    def _out_of_memory(self, exc: BaseException) -> str:
        c, micro = self.config, self.micro_batch
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # The next grad_accum that still splits batch_size evenly (TrainConfig's rule), if any.
        more = next((g for g in range(c.grad_accum + 1, c.batch_size + 1) if c.batch_size % (g * self.dist.world) == 0), None)
        change = (
            f"raise train.grad_accum to {more} (the same batch_size per optimizer step, in smaller micro-batches) "
            "or lower train.batch_size"
            if more is not None
            else "lower train.batch_size (micro-batches are already 1 image)"
        )
        return (
            f"{self.device} ran out of memory ({first}) training micro-batches of {micro} images at "
            f"{self.dataset.resolution} px (batch_size {c.batch_size} / grad_accum {c.grad_accum} / "
            f"{self.dist.world} process(es)): {change}. The checkpoints so far are kept; the run resumes from the last one"
        )

    def _run(self) -> TrainResult:
        c = self.config
        data = self._load_data()  # all input validation happens before anything else is written
        self._prepare_run_dir()
        _seed_everything(c.seed)
        self._build()
        step = self._resume()
        self.tracker = _Tracker.start(self) if self.dist.is_main and self.mlflow_experiment else _NullTracker()

        self.data = _place_data(data, self.device)
        self.sampler = EpochSampler(len(data), c.seed, self.data.images.device)
        self.generator = torch.Generator(self.device)
        self.sample_captions = _pick_sample_captions(data, c.sample_captions)

        old_handler = _install_sigterm(self)
        status = "FAILED"
        try:
            step = self._loop(step)
            result = self._finish(step)
            status = "FINISHED"
            return result
        except TrainingInterrupted:
            status = "KILLED"
            raise
        finally:
            _restore_sigterm(old_handler)
            self.tracker.end(status)

    def _loop(self, step: int) -> int:
        c, micro = self.config, self.micro_batch
        loss_sum = torch.zeros((), device=self.device)
        gnorm_sum = torch.zeros((), device=self.device)
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        last_log_step, last_log_time = step, time.perf_counter()
        bar = _progress_bar(self.progress and self.dist.is_main, step, c.steps)
        if self.on_progress is not None:
            self.on_progress(step, c.steps)
        self.model.train()

        while step < c.steps:
            loss, gnorm = self._train_step(step, micro)
            step += 1
            loss_sum += loss
            gnorm_sum += gnorm
            # Remember the first step whose loss or gradient is not finite, without a host sync.
            bad = ~(torch.isfinite(loss) & torch.isfinite(gnorm))
            first_bad = torch.where(bad & (first_bad < 0), step, first_bad)
            if bar is not None:
                bar.update(1)

            at_end = step == c.steps
            stopping = self._stop_agreed(step, at_end)
            if step % c.log_every == 0 or at_end or stopping:
                n = step - last_log_step
                loss_mean, gnorm_mean = _reduce_mean(torch.stack([loss_sum, gnorm_sum]) / n, self.dist)
                self._raise_if_bad(first_bad)
                now = time.perf_counter()
                metrics = {
                    "loss": loss_mean,
                    "grad_norm": gnorm_mean,
                    "lr": self.lr_scheduler.get_last_lr()[0],
                    "images_per_s": n * c.batch_size / max(now - last_log_time, 1e-9),
                }
                self._log(step, metrics)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_mean:.4f}")
                loss_sum.zero_()
                gnorm_sum.zero_()
                last_log_step, last_log_time = step, now
                self.last_metrics = metrics
            if step % c.checkpoint_every == 0 or at_end or stopping:
                self._raise_if_bad(first_bad)
                self._checkpoint(step)
            if c.sample_every and step % c.sample_every == 0 and not at_end:
                self._sample_grid(step)
            if stopping:
                raise TrainingInterrupted(
                    f"SIGTERM received: stopped after step {step} of {c.steps} and wrote a checkpoint to "
                    f"{self.run_dir / CHECKPOINTS_DIR}; run the same training again to resume"
                )
        if bar is not None:
            bar.close()
        return step

    def _train_step(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on the global batch of `step`. Returns (loss, grad norm) as device scalars."""
        c, d = self.config, self.data
        B = c.batch_size
        T = self.schedule.num_train_timesteps
        res = d.images.shape[-1]
        dev = self.device

        # All randomness of the step, for the whole global batch, from (seed, step) alone: every
        # process draws the same numbers and takes its slice, so results do not depend on how the
        # batch is split across processes and micro-batches, and a resumed run repeats them exactly.
        g = self.generator.manual_seed(mix_seed(c.seed, step))
        idx_all = self.sampler.indices(step * B, B)  # (B,) dataset rows, on the data's device
        t_all = torch.randint(0, T, (B,), generator=g, device=dev)  # (B,)
        eps_all = torch.randn((B, 3, res, res), generator=g, device=dev)  # (B, 3, H, W)
        drop_all = torch.rand((B,), generator=g, device=dev) < c.caption_dropout  # (B,)
        flip_all = torch.rand((B,), generator=g, device=dev) < 0.5  # (B,)

        loss_total = torch.zeros((), device=dev)
        for k in range(c.grad_accum):
            lo = (k * self.dist.world + self.dist.rank) * micro
            sl = slice(lo, lo + micro)
            idx = idx_all[sl]
            cidx = d.caption_index(idx)  # (b,) rows of the caption tables
            flip = flip_all[sl] & d.flippable[idx].to(dev, non_blocking=True)
            x0 = _images_to_model(d.images[idx].to(dev, non_blocking=True), flip)  # (b, 3, H, W) in [-1, 1]
            drop = drop_all[sl]
            context = torch.where(drop[:, None, None], d.uncond_tokens, d.tokens[cidx].to(dev, non_blocking=True))  # (b, L, D)
            context_mask = torch.where(drop[:, None], d.uncond_mask, d.mask[cidx].to(dev, non_blocking=True))  # (b, L)
            pooled = None
            if self.unet_config.pooled_dim is not None:  # a dropped caption drops its pooled embedding too
                pooled = torch.where(drop[:, None], d.uncond_pooled, d.pooled[cidx].to(dev, non_blocking=True))  # (b, E)
            sync = k == c.grad_accum - 1 or self.dist.world == 1
            with contextlib.nullcontext() if sync else self.model.no_sync():
                loss = diffusion_loss(
                    self.model, self.schedule, x0, eps_all[sl], t_all[sl], context.float(), context_mask,
                    c.min_snr_gamma, self.amp_dtype, self.channels_last, pooled, loss_weight_floor=c.loss_weight_floor,
                )
                (loss / c.grad_accum).backward()
            loss_total += loss.detach() / c.grad_accum

        params = [p for p in self.unet.parameters() if p.grad is not None]
        if c.grad_clip is not None:
            gnorm = torch.nn.utils.clip_grad_norm_(params, c.grad_clip, foreach=self.device.type == "cuda" or None)
        else:
            gnorm = torch.nn.utils.get_total_norm([p.grad for p in params])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.unet)
        return loss_total, gnorm.detach()

    # -- checks, logs, checkpoints -----------------------------------------------------------

    def _stop_agreed(self, step: int, at_end: bool) -> bool:
        """SIGTERM seen? All processes must stop after the same step, so under DDP the flag is
        reduced across them, at log steps only (a host sync)."""
        if at_end:
            return False
        if self.dist.world == 1:
            return self.stop_requested
        if step % self.config.log_every:
            return False
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _raise_if_bad(self, first_bad: torch.Tensor) -> None:
        bad_step = int(first_bad.item())
        if bad_step >= 0:
            latest = _latest_checkpoint(self.run_dir / CHECKPOINTS_DIR)
            kept = f"the last good checkpoint, {latest}, is kept" if latest else "no checkpoint had been written yet"
            raise NonFiniteLossError(
                f"the loss or gradient norm became NaN/inf at step {bad_step} of run {self.key}; {kept}. "
                "Lower train.lr, keep train.grad_clip set, or check the data; no checkpoint was written after it.",
                bad_step,
            )

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.dist.is_main:
            return
        line = json.dumps({"step": step, **metrics, "time": time.time()})
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        if not self.progress:
            log.info("step %d/%d loss %.4f lr %.2e grad_norm %.3f %.1f img/s", step, self.config.steps,
                     metrics["loss"], metrics["lr"], metrics["grad_norm"], metrics["images_per_s"])
        self.tracker.log_metrics(step, metrics)
        if self.on_progress is not None:
            self.on_progress(step, self.config.steps)

    def _checkpoint(self, step: int) -> None:
        if self.dist.is_main:
            state = {
                "format": CHECKPOINT_FORMAT,
                "run_key": self.key,
                "step": step,
                "samples_seen": step * self.config.batch_size,  # the data position: EpochSampler restarts here
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "ema_n_averaged": self.ema.n_averaged.detach().cpu(),
                "rng": _rng_state(),
                "metrics": self.last_metrics,
                "config": self.config.model_dump_json(),
            }
            write_checkpoint(
                self.run_dir / CHECKPOINTS_DIR, step, self.unet.state_dict(), self.ema.module.state_dict(), state,
                self.config.keep_last,
            )
        if self.dist.world > 1:
            dist.barrier()

    def _resume(self) -> int:
        ckpt = _latest_checkpoint(self.run_dir / CHECKPOINTS_DIR)
        if ckpt is None:
            return 0
        state = load_state(ckpt / "state.pt")
        if state.get("format") != CHECKPOINT_FORMAT or state.get("run_key") != self.key:
            raise TrainingError(
                f"{ckpt} belongs to run {state.get('run_key')} (format {state.get('format')}), not {self.key}; "
                "pass another run_dir"
            )
        self.unet.load_state_dict(load_weights(ckpt / "unet.safetensors", self.device))
        if self.ema is not None:
            self.ema.module.load_state_dict(load_weights(ckpt / "ema.safetensors", self.device))
            self.ema.n_averaged.copy_(state["ema_n_averaged"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        _set_rng_state(state["rng"])
        self.last_metrics = state.get("metrics", {})  # checkpoints written before metrics were kept have none
        step = int(state["step"])
        if state["samples_seen"] != step * self.config.batch_size:
            raise TrainingError(f"{ckpt}: data position {state['samples_seen']} does not match step {step}")
        log.info("resuming run %s from %s (step %d)", self.key, ckpt, step)
        return step

    def _prepare_run_dir(self) -> None:
        """Claim the run directory (rank 0 writes run.json) or check that it holds this run.
        Every rank passes the same barrier, whichever way it goes."""
        run_file = self.run_dir / RUN_FILE
        if self.dist.is_main and not run_file.is_file():
            write_json_atomic(
                run_file,
                {
                    "run_key": self.key,
                    "dataset": self.dataset.model_dump(mode="json"),
                    "embeddings": self.embeddings.model_dump(mode="json"),
                    "config": self.config.model_dump(mode="json"),
                    "unet": self.unet_config.to_dict(),
                    "mlflow_run_id": None,
                },
            )
        if self.dist.world > 1:
            dist.barrier()
        self.run_info = json.loads(run_file.read_text(encoding="utf-8"))
        if self.run_info.get("run_key") != self.key:
            raise TrainingError(
                f"{self.run_dir} holds run {self.run_info.get('run_key')}, not {self.key}; pass another run_dir "
                "(nothing there was changed)"
            )

    # -- samples and the final model ---------------------------------------------------------

    @torch.no_grad()
    def _sample_images(self, seed: int = 0) -> torch.Tensor:
        """EMA model, fixed training captions: (n, 3, H, W) in [-1, 1]."""
        from models.samplers import make_sampler, sample
        from models.samplers.guidance import guided_model_fn

        c, d = self.config, self.data
        rows = d.caption_index(torch.tensor(self.sample_captions[1], device=d.images.device))
        context = d.tokens[rows].to(self.device).float()
        mask = d.mask[rows].to(self.device)
        unet = self.ema.module.eval()
        pooled = {}
        if self.unet_config.pooled_dim is not None:
            pooled = {"pooled": d.pooled[rows].to(self.device), "uncond_pooled": d.uncond_pooled.to(self.device)}
        denoise = guided_model_fn(
            unet, context, mask, d.uncond_tokens.to(self.device).float(), d.uncond_mask.to(self.device), c.sample_guidance,
            **pooled,
        )
        schedule = NoiseSchedule(self.schedule.config)  # tables on the CPU: the samplers read floats from them
        res = d.images.shape[-1]
        x_T = torch.randn((len(rows), 3, res, res), generator=torch.Generator().manual_seed(seed))
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            x0 = sample(denoise, make_sampler("ddim", schedule, c.sample_steps), tuple(x_T.shape), device=self.device, x_T=x_T)
        return x0.float().clamp(-1, 1).cpu()

    def _sample_grid(self, step: int) -> Path | None:
        if not self.dist.is_main:
            return None
        from models.pipeline import to_pil

        images = to_pil(self._sample_images())
        path = self.run_dir / "samples" / f"step-{step:08d}.png"
        grid = _grid(images, scale=max(1, 128 // images[0].size[0]))
        atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
        captions = path.with_suffix(".txt")  # the grid's captions, left to right, top to bottom
        write_text_atomic(captions, "\n".join(self.sample_captions[0]) + "\n")
        self.tracker.log_artifact(path, "samples")
        self.tracker.log_artifact(captions, "samples")
        return path

    def _finish(self, step: int) -> TrainResult:
        result = None
        if self.dist.is_main:
            grid = self._sample_grid(step)
            model_dir = self._save_model(step)
            self.tracker.log_artifacts(model_dir, MODEL_DIR)
            result = TrainResult(
                run_dir=str(self.run_dir),
                checkpoint=str(model_dir),
                step=step,
                mlflow_run_id=self.tracker.run_id,
                metrics={k: float(v) for k, v in self.last_metrics.items()},
            )
            write_json_atomic(
                self.run_dir / RESULT_FILE,
                {"run_key": self.key, "result": result.model_dump(mode="json"), "grid": str(grid) if grid else None},
            )
        if self.dist.world > 1:
            dist.barrier()
        return result if result is not None else _finished_result(self.run_dir, self.key)

    def _save_model(self, step: int) -> Path:
        """Write the EMA weights as a `TextToImage` to <run_dir>/model (temp dir, then rename)."""
        from models.pipeline import TextToImage
        from models.text_encoder import TextEncoder, TextEncoderConfig

        encoder = TextEncoder(TextEncoderConfig.from_dict(encoder_config_fields(self.embeddings)))
        if encoder.identity_id != self.embeddings.encoder_id:
            raise TrainingError(
                f"the text encoder rebuilt from the embedding set is {encoder.identity_id}, but the embeddings were "
                f"made by {self.embeddings.encoder_id}; the saved model would not match its training"
            )
        ema_unet = UNet(self.unet_config)
        ema_unet.load_state_dict({k: v.detach().cpu() for k, v in self.ema.module.state_dict().items()})
        pipe = TextToImage(
            ema_unet,
            NoiseSchedule(self.schedule.config),
            encoder,
            self.dataset.resolution,
            extra={
                "step": step,
                "run_key": self.key,
                "dataset": f"{self.dataset.name}@{self.dataset.version}",
                "max_length": self.config.max_length,
                "mlflow_run_id": self.tracker.run_id,
            },
        )
        final = self.run_dir / MODEL_DIR
        tmp = self.run_dir / f".{MODEL_DIR}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save(tmp)
        _replace_dir(tmp, final)
        return final


def diffusion_loss(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    context: torch.Tensor,
    context_mask: torch.Tensor,
    min_snr_gamma: float | None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    pooled: torch.Tensor | None = None,
    loss_weight_floor: float = 0.0,
) -> torch.Tensor:
    """Weighted MSE between the UNet's prediction and the schedule's target (eps or v), a scalar.

    x0, eps (B, 3, H, W); t (B,); context (B, L, D); context_mask (B, L); pooled (B, E) or None."""
    x_t = schedule.add_noise(x0, eps, t)  # q(x_t | x0), Ho et al. 2020 eq. 4
    target = schedule.training_target(x0, eps, t)  # eps, or v (Salimans & Ho 2022)
    if channels_last:
        x_t = x_t.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x0.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        out = model(x_t, t, context, context_mask, pooled=pooled)  # (B, 3, H, W)
    per_sample = F.mse_loss(out.float(), target, reduction="none").mean(dim=(1, 2, 3))  # (B,)
    weights = schedule.loss_weight(t, min_snr_gamma, loss_weight_floor)  # (B,) Min-SNR-gamma (floored), or ones
    return (per_sample * weights).mean()


def _images_to_model(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1], mirrored left-right where `flip` (B,) is True."""
    x = images.float() / 127.5 - 1.0
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def _warmup_cosine(warmup: int, total: int, min_ratio: float):
    """LR multiplier at optimizer step s: linear warmup to 1 over `warmup` steps, then a half
    cosine down to `min_ratio` at `total` (Loshchilov & Hutter 2017, without restarts)."""

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# ---- checkpoints on disk ------------------------------------------------------------------


def write_checkpoint(
    directory: Path,
    step: int,
    unet_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write `<directory>/step-<step>/` (unet + EMA safetensors, state.pt) into a temporary
    sibling and rename it into place, so a crash leaves the previous checkpoints untouched
    and never a partial `step-*` directory; then drop all but the newest `keep_last`."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:08d}"
    tmp = directory / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_weights(unet_state, tmp / "unet.safetensors", metadata={"step": step})
        save_weights(ema_state, tmp / "ema.safetensors", metadata={"step": step})
        save_state(state, tmp / "state.pt")
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in _checkpoints(directory)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (temporaries start with a dot)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("step-*") if p.is_dir() and (p / "state.pt").is_file())


def _latest_checkpoint(directory: Path) -> Path | None:
    found = _checkpoints(directory)
    return found[-1] if found else None


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final` atomically; an existing `final` is moved aside first and then removed."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- RNG, devices, signals ----------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """Every global RNG, in types `torch.load(weights_only=True)` accepts."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _resolve_device(requested: str | None, local_rank: int) -> torch.device:
    from models.pipeline import fast_cuda_backends

    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError(f"train.device is {requested!r} but CUDA is not available here; use device: cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        fast_cuda_backends()  # fp32 parts (optimizer, loss) may use TF32
    return device


def _resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _auto_storage(dataset: DatasetVersion, embeddings: EmbeddingSet) -> str:
    """"disk" when the decoded train split (images + padded token states, an upper bound) would
    take more than half of the RAM available now, else "memory"."""
    n, res, width = int(dataset.counts.get("train", 0)), dataset.resolution, embeddings.width
    need = n * (3 * res * res + embeddings.num_tokens * width * 2 + embeddings.num_tokens + 4 * width)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): assume it fits
        return "memory"
    return "disk" if need > available // 2 else "memory"


def _place_data(data: TrainData, device: torch.device) -> TrainData:
    """Everything on the device when it fits in half of the free memory; otherwise the images and
    token states stay in pinned host memory and each step copies its rows over. Memory-mapped
    data stays where it is (pinning would read it all into RAM); only the small tables move."""
    small = {
        "uncond_tokens": data.uncond_tokens.to(device),
        "uncond_mask": data.uncond_mask.to(device),
        "uncond_pooled": data.uncond_pooled.to(device),
    }
    if data.on_disk:
        return replace(data, **small)
    if device.type != "cuda":
        return data.to(device)
    free, _ = torch.cuda.mem_get_info(device)
    if data.nbytes() < free // 2:
        return data.to(device)
    log.warning("training data (%.1f GiB) does not fit on %s; keeping it in pinned host memory", data.nbytes() / 2**30, device)
    pinned = {
        name: getattr(data, name).pin_memory()
        for name in ("images", "tokens", "mask", "pooled", "flippable", "caption_rows")
        if getattr(data, name) is not None
    }
    return replace(data, **pinned, **small)


def _pick_sample_captions(data: TrainData, n: int) -> tuple[list[str], list[int]]:
    """Up to n distinct training captions (first occurrences, in dataset order) and their rows."""
    captions, rows, seen = [], [], set()
    for i, caption in enumerate(data.captions):
        if caption not in seen:
            seen.add(caption)
            captions.append(caption)
            rows.append(i)
            if len(rows) == n:
                break
    return captions, rows


def _grid(images: list, scale: int = 1, columns: int | None = None):
    from PIL import Image

    w, h = images[0].size
    columns = columns or min(len(images), 8)
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * w * scale, rows * h * scale), "white")
    for i, im in enumerate(images):
        grid.paste(im.resize((w * scale, h * scale), Image.NEAREST), ((i % columns) * w * scale, (i // columns) * h * scale))
    return grid


def _install_sigterm(trainer: _Trainer):
    """SIGTERM sets a flag; the loop finishes its step, checkpoints and raises TrainingInterrupted.
    Signal handlers can only be set from the main thread (Prefect may run tasks elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        trainer.stop_requested = True

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(old_handler) -> None:
    if old_handler is not None:
        signal.signal(signal.SIGTERM, old_handler)


def _progress_bar(enabled: bool, start: int, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


# ---- distributed ----------------------------------------------------------------------------


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def _reduce_mean(values: torch.Tensor, d: _Dist) -> list[float]:
    if d.world > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values = values / d.world
    return [float(v) for v in values.tolist()]


def resolved_nnodes(config: TrainConfig) -> int:
    """Machines in the run: `config.nnodes`, else $PET_NNODES (torchrun's own variable), else 1."""
    if config.nnodes is not None:
        return config.nnodes
    raw = os.environ.get("PET_NNODES", "").strip() or "1"
    if not raw.isdigit() or int(raw) < 1:
        raise TrainingError(f"PET_NNODES={raw!r}: expected a whole number of machines >= 1 (elastic ranges are not supported)")
    return int(raw)


def torchrun_command(config: TrainConfig, key: str) -> list[str]:
    """`python -m torch.distributed.run` and its topology flags, up to the module to run.

    One machine: `--standalone` (a local rendezvous). Several: every machine runs the same
    command and they meet at the c10d rendezvous `rdzv_endpoint` under one id (the run key
    unless set), so the same task started on each node of a Kubernetes job forms one world.
    """
    nnodes = resolved_nnodes(config)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={config.nproc}", f"--nnodes={nnodes}"]
    if nnodes == 1:
        return [*cmd, "--standalone"]
    endpoint = config.rdzv_endpoint or os.environ.get("PET_RDZV_ENDPOINT", "").strip()
    if not endpoint:
        raise TrainingError(
            f"train.nnodes is {nnodes} but no rendezvous endpoint is set: set train.rdzv_endpoint (or "
            "$PET_RDZV_ENDPOINT) to host:port of a machine every node can reach, e.g. the first node's address"
        )
    return [*cmd, "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={config.rdzv_id or key}"]


def _launch_torchrun(
    dataset: DatasetVersion,
    embeddings: EmbeddingSet,
    config: TrainConfig,
    run_dir: Path,
    key: str,
    mlflow_experiment: str | None,
    progress: bool,
) -> TrainResult:
    """Run this module under torchrun (see `torchrun_command`) and return rank 0's result.

    torchrun exits 1 whatever its workers' exit codes, so a worker that fails on bad input or a
    NaN loss says so in the error file; any other failure is a TorchrunFailed, which is retried."""
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = run_dir / f".launch-{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}.json"
    error_file = spec.with_suffix(".error")
    write_json_atomic(
        spec,
        {
            "dataset": dataset.model_dump(mode="json"),
            "embeddings": embeddings.model_dump(mode="json"),
            "config": config.model_dump(mode="json"),
        },
    )
    cmd = [*torchrun_command(config, key), "-m", "tasks.train", "--spec", str(spec), "--error-file", str(error_file)]
    cmd += ["--run-dir", str(run_dir)]
    cmd += ["--experiment", mlflow_experiment] if mlflow_experiment else ["--no-mlflow"]
    if not progress:
        cmd.append("--no-progress")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run(cmd, env=env)
        worker_error = error_file.read_text(encoding="utf-8") if error_file.is_file() else None
    finally:
        spec.unlink(missing_ok=True)
        error_file.unlink(missing_ok=True)
    if proc.returncode != 0:
        nnodes = resolved_nnodes(config)
        failed = f"torchrun ({config.nproc} processes x {nnodes} machines) exited with code {proc.returncode}"
        if worker_error is not None:
            raise TrainingError(f"{failed}: {worker_error}")
        raise TorchrunFailed(
            f"{failed}; see its output above. Run the same training again to resume from the last checkpoint"
        )
    result = _finished_result(run_dir, key)
    if result is None:
        raise TrainingError(f"torchrun finished but {run_dir / RESULT_FILE} was not written")
    return result


# ---- the text encoder behind an embedding set ----------------------------------------------


def encoder_config_fields(embeddings: EmbeddingSet) -> dict[str, Any]:
    """The TextEncoderConfig fields recorded in the embedding set (it also holds identity fields)."""
    from models.text_encoder import TextEncoderConfig

    names = set(TextEncoderConfig.__dataclass_fields__)
    source = embeddings.encoder.get("config", embeddings.encoder)
    return {k: v for k, v in source.items() if k in names}


# ---- MLflow -------------------------------------------------------------------------------


class _NullTracker:
    run_id: str | None = None

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str) -> None: ...
    def log_artifacts(self, path: Path, artifact_path: str) -> None: ...
    def end(self, status: str) -> None: ...


class _Tracker(_NullTracker):
    """One MLflow run per training run (reused on resume), through an explicit client: no
    global active-run state that would clash with a caller's own MLflow runs."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    @classmethod
    def start(cls, trainer: _Trainer) -> _Tracker:
        from mlflow import MlflowClient

        from tasks.tracking import ensure_experiment

        settings = get_settings()
        uri = settings.mlflow_tracking_uri
        client = MlflowClient(tracking_uri=uri)
        experiment_id = ensure_experiment(client, trainer.mlflow_experiment)

        run_id = trainer.run_info.get("mlflow_run_id")
        if run_id is not None and trainer.run_info.get("mlflow_tracking_uri") == uri:
            with contextlib.suppress(Exception):
                client.update_run(run_id, status="RUNNING")
                return cls(client, run_id)
        run = client.create_run(
            experiment_id,
            run_name=f"train-{trainer.key}",
            tags={"t2i.stage": "train", "t2i.run_key": trainer.key, "t2i.dataset": trainer.dataset.name},
        )
        tracker = cls(client, run.info.run_id)
        tracker._log_params(trainer)
        trainer.run_info = {**trainer.run_info, "mlflow_run_id": run.info.run_id, "mlflow_tracking_uri": uri}
        write_json_atomic(trainer.run_dir / RUN_FILE, trainer.run_info)
        return tracker

    def _log_params(self, trainer: _Trainer) -> None:
        from mlflow.entities import Param

        resolved = trainer.config.model_dump(mode="json")
        resolved["unet"] = trainer.unet_config.to_dict()
        resolved["schedule"] = trainer.schedule.config.to_dict()
        params = {f"train.{k}": v for k, v in _flatten(resolved).items()}
        params.update({
            "dataset.name": trainer.dataset.name,
            "dataset.version": trainer.dataset.version,
            "dataset.train_rows": trainer.dataset.counts.get("train"),
            "dataset.resolution": trainer.dataset.resolution,
            "encoder.id": trainer.embeddings.encoder_id,
            **{f"encoder.{k}": v for k, v in _flatten(trainer.embeddings.encoder).items()},
            "run_key": trainer.key,
            "git_commit": _git_commit(),
            "torch_version": torch.__version__,
            "device": str(trainer.device),
            "precision": str(trainer.amp_dtype or "fp32"),
            "unet.parameters": sum(p.numel() for p in trainer.unet.parameters()),
        })
        items = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        self.client.log_dict(self.run_id, {"train": resolved, "dataset": trainer.dataset.model_dump(mode="json"),
                                           "embeddings": trainer.embeddings.model_dump(mode="json")}, "config.json")

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(v)]
        )

    def log_artifact(self, path: Path, artifact_path: str) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, path: Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(path), artifact_path)

    def end(self, status: str) -> None:
        with contextlib.suppress(Exception):  # never mask the training error with a tracking one
            self.client.set_terminated(self.run_id, status=status)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


# ---- command line ---------------------------------------------------------------------------


def _read_model(path: str, model: type[BaseModel]) -> BaseModel:
    """`model` from a YAML/JSON file; a TrainConfig also from a preset's `train` section. A file
    that cannot be read or parsed is a ValueError naming it."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))  # YAML is a superset of JSON
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if model is TrainConfig and isinstance(data, dict) and "train" in data:
        data = data["train"]  # a preset file (TrainConfig has no field `train`): take its train section
    return model.model_validate(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", help="DatasetVersion JSON file")
    parser.add_argument("--embeddings", help="EmbeddingSet JSON file")
    parser.add_argument("--config", help="TrainConfig YAML/JSON file (or a preset with a train section)")
    parser.add_argument("--spec", help=argparse.SUPPRESS)  # {dataset, embeddings, config} in one file, from _launch_torchrun
    parser.add_argument("--error-file", type=Path, help=argparse.SUPPRESS)  # from _launch_torchrun: a worker writes its bad-input error here
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--experiment", default="t2i")
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    # force: importing Prefect already put a WARNING-level handler on the root logger
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)

    if not args.spec and not (args.dataset and args.embeddings and args.config):
        parser.error("--dataset, --embeddings and --config are required")

    world = _world_size()
    try:
        if args.spec:
            spec = json.loads(Path(args.spec).read_text(encoding="utf-8"))
            dataset = DatasetVersion.model_validate(spec["dataset"])
            embeddings = EmbeddingSet.model_validate(spec["embeddings"])
            config = TrainConfig.model_validate(spec["config"])
        else:
            dataset = _read_model(args.dataset, DatasetVersion)
            embeddings = _read_model(args.embeddings, EmbeddingSet)
            config = _read_model(args.config, TrainConfig)
        if world > 1:
            backend = "nccl" if torch.cuda.is_available() and (config.device or "cuda").startswith("cuda") else "gloo"
            dist.init_process_group(backend, timeout=timedelta(minutes=30))
        result = train_model(
            dataset, embeddings, config, run_dir=args.run_dir,
            mlflow_experiment=None if args.no_mlflow else args.experiment, progress=not args.no_progress,
        )
    except TrainingInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except (TrainingError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.error_file is not None:
            write_text_atomic(args.error_file, str(exc))
        return 1
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        print(result.model_dump_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
