"""Evaluate stage: a trained model (`TrainResult`) and its dataset in, an `EvalReport` with a gate verdict out.

    report = evaluate_model(train_result, dataset, EvalConfig(threshold=0.6))
    report.passed, report.metrics["attr_accuracy"], report.grid_path

Everything is sampled with the EMA weights the train stage saved (`TrainResult.checkpoint`),
with fixed prompts and seeds (image i of a prompt list gets seed i), by the configured sampler
(default DDIM, 50 steps, guidance 3.0). Metrics (MLflow metric names, and `eval.<name>` tags
of a registered version):

- sample grid: prompts (config plus validation captions) x seeds, each prompt written under its
  row, saved as `<run_dir>/eval/<key>/grid.png` and logged to MLflow.
- shapes data, read back from the pixels by `tasks/attributes.py` (no learned model):
  `attr_{colour,shape,position,size}_acc` on `n_attribute_prompts` seeded single-shape prompts
  over the training (colour, shape) combinations; `attr_accuracy` = the mean of those four
  (not the all-correct rate, logged as `attr_all_correct`: the mean moves smoothly while a small
  model learns one attribute after another); `heldout_*` the same on the held-out combinations
  (compositional generalisation), each prompt sampled with `heldout_seeds` seeds; `attr_n`,
  `heldout_n` the image counts.
- any data: `fd_clip`, the Fréchet distance between the CLIP image embeddings of generated and
  reference (validation) images, one generated image per reference caption, `fd_clip_n` of each;
  `clip_score`, the mean cosine between a caption's pooled text embedding and its generated
  image's embedding (`clip_score_real`: the same for the real images, a reference). The CLIP is
  the model's own text encoder's (its image tower); `fd_clip_uncalibrated` = 1 when that encoder
  is random-init, and then both numbers carry no meaning.
- `images_per_s`: images per second of the configured sampler over all its batches of the
  evaluation, guidance included (each batch size warmed up untimed first).
- quality against steps (`steps_table`): DDPM-1000, DDIM-50, DDIM-20, DPM-Solver++(2M)-20 on the
  same prompts and seeds: `acc_<sampler>_<steps>` (attribute accuracy; `clip_score_*` on other
  data) and `images_per_s_<sampler>_<steps>`, each row's speed timed on its own run of those
  prompts (no image reused from earlier in the evaluation), also as `steps_table.json`.

The gate passes when the primary metric (attribute accuracy on shapes data, FD_CLIP otherwise)
meets the threshold and is no worse than the current champion's (lower is better for `fd*`,
higher for the rest). Results live in `<run_dir>/eval/<key>/` (key: the model, the dataset
version and the sampling config), so a retried task reuses finished metrics and only decides the
gate again.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tqdm.auto import tqdm

from models.checkpoint import atomic_write, write_json_atomic
from models.pipeline import GenerationParams, TextToImage, fast_cuda_backends, to_pil
from tasks import storage
from tasks.attributes import ShapeAttributes, prompt_for, score_prompts
from tasks.contracts import DatasetVersion, EvalReport, TrainResult
from tasks.prefect_compat import task
from tasks.settings import get_settings
from tasks.shapes import COLOURS, POSITIONS, SHAPES, SIZES, ShapesConfig, heldout_pairs

# Bump when a metric's definition changes: old cached results are then recomputed.
# 2: steps-table speeds timed per row, warm-ups untimed.
# 3: the attribute checker reads black apart from the palette and matches colours before the rest.
EVAL_FORMAT = 3
EVAL_DIR = "eval"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.json"
GRID_FILE = "grid.png"
STEPS_TABLE_FILE = "steps_table.json"
MLFLOW_FILE = "mlflow.json"  # written once the metrics are in MLflow: the run id and tracking URI

Sampler = Literal["ddpm", "ddim", "dpmpp_2m"]
PrimaryMetric = Literal["attr_accuracy", "attr_all_correct", "heldout_accuracy", "fd_clip", "clip_score"]
ATTRIBUTE_METRICS = ("attr_accuracy", "attr_all_correct", "heldout_accuracy")
# Chance level of attr_accuracy is ~0.27 (1/7 colours, 1/3 shapes, 1/9 positions, 1/2 sizes).
# FD_CLIP and CLIP score have no default: their scale depends on the encoder.
DEFAULT_THRESHOLDS = {"attr_accuracy": 0.5, "attr_all_correct": 0.25, "heldout_accuracy": 0.4}
SAMPLER_SHORT = {"ddpm": "ddpm", "ddim": "ddim", "dpmpp_2m": "dpmpp"}
DEFAULT_PROMPTS = (
    "a large red circle in the centre",
    "a small blue square in the top left",
    "a large green triangle in the bottom right",
    "a small yellow circle in the top right",
    "a large white square in the bottom left",
    "a small cyan triangle in the top centre",
)
HELDOUT_POSITIONS = ("centre", "top left", "bottom right")  # as the generator's heldout.json prompts
# Grid cells are drawn at least this many pixels across (nearest-neighbour upscaling), so a
# 16 px sample is visible; a caption line is wrapped to the grid's width.
GRID_MIN_CELL = 96
GRID_PAD = 4


class EvalConfig(BaseModel):
    """How to evaluate. Presets (section `evaluate`) list only what differs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), description="grid rows")
    n_val_captions: int = Field(4, ge=0, description="validation captions added as grid rows")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3], min_length=1, description="grid columns")
    sampler: Sampler = "ddim"
    steps: int = Field(50, ge=1, le=1000)
    guidance_scale: float = Field(3.0, ge=0.0, le=50.0)
    primary_metric: PrimaryMetric | None = Field(None, description="None: attr_accuracy on shapes data, else fd_clip")
    threshold: float | None = Field(
        None, allow_inf_nan=False, description=f"None: the default of the primary metric {DEFAULT_THRESHOLDS}"
    )
    n_attribute_prompts: int = Field(64, ge=0, description="seeded prompts over the training combinations")
    heldout_seeds: int = Field(
        1, ge=1, description="seeds per held-out prompt (prompt i gets seeds i, i + n, ...); the generator writes few prompts"
    )
    n_fd_samples: int = Field(64, ge=2, description="validation images (and captions) for FD_CLIP and CLIP score")
    steps_table: bool = True
    steps_table_runs: list[tuple[Sampler, int]] = Field(
        default_factory=lambda: [("ddpm", 1000), ("ddim", 50), ("ddim", 20), ("dpmpp_2m", 20)],
        description="(sampler, steps) rows of the quality-against-steps table",
    )
    steps_table_prompts: int = Field(16, ge=1, description="the first N attribute prompts (DDPM-1000 is slow on CPU)")
    batch_size: int = Field(32, ge=1)
    device: str = Field("auto", description="auto: cuda when available, else cpu")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="the UNet's precision while sampling (bf16 autocast); auto: bf16 on CUDA, else fp32"
    )

    @field_validator("prompts")
    @classmethod
    def _non_empty_prompts(cls, v: list[str]) -> list[str]:
        if not v or not all(isinstance(p, str) and p.strip() for p in v):
            raise ValueError("prompts must be a non-empty list of non-empty captions")
        return v

    @field_validator("steps_table_runs")
    @classmethod
    def _valid_runs(cls, v: list[tuple[str, int]]) -> list[tuple[str, int]]:
        for _, steps in v:
            if not 1 <= steps <= 1000:
                raise ValueError(f"steps_table_runs: steps must be in [1, 1000], got {steps}")
        return v

    @model_validator(mode="after")
    def _threshold_known(self) -> EvalConfig:
        if self.primary_metric is not None and self.threshold is None and self.primary_metric not in DEFAULT_THRESHOLDS:
            raise ValueError(
                f"primary_metric={self.primary_metric!r} has no default threshold (its scale depends on the "
                "encoder); set `threshold`, e.g. from an earlier run's value"
            )
        return self


# ---------------------------------------------------------------------------------------------
# The gate


def higher_is_better(metric: str) -> bool:
    """Fréchet distances (`fd*`, e.g. fd_clip) are lower-better; accuracies and the CLIP score higher-better."""
    return not metric.lower().startswith("fd")


def is_better_or_equal(metric: str, value: float, reference: float) -> bool:
    """`value` is at least as good as `reference` on `metric`; a non-finite value never is, and a NaN
    reference (a champion whose metric was never measured) holds nothing back."""
    if not math.isfinite(value):
        return False
    if math.isnan(reference):
        return True
    return value >= reference if higher_is_better(metric) else value <= reference


def gate(
    metrics: dict[str, float], primary: str, threshold: float, champion_metrics: dict[str, float] | None
) -> tuple[bool, str]:
    """(passed, why): the primary metric meets the threshold and is no worse than the champion's."""
    if not math.isfinite(threshold):  # a NaN threshold would hold nothing back, so every model would pass
        raise ValueError(f"the gate threshold must be a finite number, got {threshold}; set evaluate.threshold")
    if primary not in metrics:
        return False, f"no {primary} was measured"
    value = metrics[primary]
    relation = ">=" if higher_is_better(primary) else "<="
    if not is_better_or_equal(primary, value, threshold):
        return False, f"{primary} {value:.4g} misses the threshold ({relation} {threshold:.4g})"
    reason = f"{primary} {value:.4g} meets the threshold ({relation} {threshold:.4g})"
    if champion_metrics is None:  # {}: a champion without eval metrics, said below
        return True, reason + "; no champion to compare"
    if primary not in champion_metrics:
        return True, reason + f"; the champion has no {primary} to compare"
    best = champion_metrics[primary]
    if not is_better_or_equal(primary, value, best):
        return False, reason + f", but is worse than the champion's {best:.4g}"
    return True, reason + f" and is no worse than the champion's {best:.4g}"


def resolve_gate(config: EvalConfig, is_shapes: bool) -> tuple[str, float]:
    """(primary metric, threshold) for this dataset; a clear error where they cannot work."""
    primary = config.primary_metric or ("attr_accuracy" if is_shapes else "fd_clip")
    if primary in ATTRIBUTE_METRICS and not is_shapes:
        raise ValueError(
            f"primary_metric={primary!r} needs the shapes dataset (its captions name the attributes the checker "
            "reads back); for other data use fd_clip or clip_score"
        )
    threshold = config.threshold if config.threshold is not None else DEFAULT_THRESHOLDS.get(primary)
    if threshold is None:
        raise ValueError(
            f"this dataset is evaluated on {primary}, which has no default threshold (its scale depends on the "
            "encoder); set evaluate.threshold in the preset, e.g. to an earlier run's value"
        )
    return primary, float(threshold)


# ---------------------------------------------------------------------------------------------
# Metrics


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two sets of embeddings (N, E) and (M, E).

    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))   (Dowson & Landau 1982; FID, Heusel et al. 2017)
    Tr (S_a S_b)^(1/2) = Tr (S_a^(1/2) S_b S_a^(1/2))^(1/2): a symmetric PSD matrix, so both roots
    come from eigendecompositions (stable, and no scipy.linalg.sqrtm).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two (N, E) arrays of the same width, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a covariance needs at least 2 samples per set, got {len(a)} and {len(b)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")  # e.g. a diverged model's NaN samples: the gate fails it (eigh would raise)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)  # (E, E)
    root_a = _psd_sqrt(cov_a)
    tr_cross = np.sqrt(np.clip(np.linalg.eigvalsh(_sym(root_a @ cov_b @ root_a)), 0.0, None)).sum()
    fd = float((mu_a - mu_b) @ (mu_a - mu_b) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_cross)
    return max(fd, 0.0)  # a set against itself gives ~-1e-12 in floating point


def _sym(m: np.ndarray) -> np.ndarray:
    return (m + m.T) / 2


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    eigvals, eigvecs = np.linalg.eigh(_sym(m))
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def clip_score(text_embeddings: torch.Tensor, image_embeddings: torch.Tensor) -> float:
    """Mean cosine between each prompt's pooled text embedding and its image's embedding, (B, E) each.
    (Reported as the raw cosine in [-1, 1], not the 100 * max(cos, 0) of Hessel et al. 2021.)"""
    cos = torch.nn.functional.cosine_similarity(text_embeddings.float(), image_embeddings.float(), dim=-1)  # (B,)
    return float(cos.mean())


# ---------------------------------------------------------------------------------------------
# The shapes source: prompts with known attributes


@dataclass(frozen=True)
class ShapesSource:
    """What evaluation knows about a shapes dataset: its vocabulary and held-out combinations."""

    colours: tuple[str, ...]
    shapes: tuple[str, ...]
    sizes: tuple[str, ...]
    positions: tuple[str, ...]
    heldout_pairs: tuple[tuple[str, str], ...]
    heldout_prompts: tuple[tuple[str, tuple[ShapeAttributes, ...]], ...]
    heldout_from: str  # where the held-out pairs came from


def shapes_source(dataset: DatasetVersion) -> ShapesSource | None:
    """The shapes vocabulary and held-out pairs of `dataset`, or None if it is not shapes data.

    Read from the generator's `shapes.json` / `heldout.json` in the source folder the manifest
    names; when that folder is gone, from the rows' ground-truth `meta` (held out = the
    vocabulary's (colour, shape) pairs no training row shows).
    """
    manifest = json.loads(Path(dataset.manifest).read_text(encoding="utf-8"))
    source_root = manifest.get("source", {}).get("root")
    if source_root and (Path(source_root) / "shapes.json").is_file():
        root = Path(source_root)
        config = ShapesConfig.model_validate_json((root / "shapes.json").read_text(encoding="utf-8"))
        heldout_file = root / "heldout.json"
        if heldout_file.is_file():
            held = json.loads(heldout_file.read_text(encoding="utf-8"))
            pairs = tuple((c, s) for c, s in held["colour_shape"])
            prompts = tuple(
                (p["text"], tuple(ShapeAttributes.from_spec(o) for o in p["objects"])) for p in held["prompts"]
            )
            return _source(config.colours, config.shapes, config.sizes, config.positions, pairs, prompts, str(heldout_file))
        pairs = tuple(heldout_pairs(config))
        return _source(config.colours, config.shapes, config.sizes, config.positions, pairs, None, str(root / "shapes.json"))

    seen = _objects_in_split(dataset, "train")
    if not seen:
        return None
    colours = tuple(c for c in COLOURS if any(o.colour == c for o in seen))
    shapes = tuple(s for s in SHAPES if any(o.shape == s for o in seen))
    sizes = tuple(z for z in SIZES if any(o.size == z for o in seen))
    positions = tuple(p for p in POSITIONS if any(o.position == p for o in seen))
    shown = {(o.colour, o.shape) for o in seen}
    pairs = tuple((c, s) for c in colours for s in shapes if (c, s) not in shown)
    return _source(colours, shapes, sizes, positions, pairs, None, "pairs absent from the train split")


def _source(colours, shapes, sizes, positions, pairs, prompts, origin) -> ShapesSource:
    if prompts is None:
        where = [p for p in HELDOUT_POSITIONS if p in positions] or [positions[0]]
        objects = [ShapeAttributes(c, s, p, z) for c, s in pairs for z in sizes for p in where]
        prompts = tuple((prompt_for(o), (o,)) for o in objects)
    return ShapesSource(tuple(colours), tuple(shapes), tuple(sizes), tuple(positions), tuple(pairs), prompts, origin)


def _objects_in_split(dataset: DatasetVersion, split: str) -> list[ShapeAttributes]:
    objects: list[ShapeAttributes] = []
    for path in sorted((Path(dataset.root) / split).glob("*.parquet")):
        if "meta" not in pq.read_schema(path).names:
            return []
        for meta in pq.read_table(path, columns=["meta"]).column("meta").to_pylist():
            found = _meta_objects(meta)
            if found is None:
                return []  # not every row carries ground truth: not the shapes generator's data
            objects += found
    return objects


def _meta_objects(meta: str | None) -> list[ShapeAttributes] | None:
    try:
        objs = json.loads(meta or "{}").get("objects")
        return [ShapeAttributes.from_spec(o) for o in objs] if objs else None
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


AttributePrompts = list[tuple[str, tuple[ShapeAttributes, ...]]]  # (prompt, the objects it asks for)


def attribute_sets(source: ShapesSource, config: EvalConfig) -> dict[str, AttributePrompts]:
    """The prompts the attribute metrics read, by metric prefix: `attr`, `n_attribute_prompts` over
    the training combinations; `heldout`, the held-out prompts `heldout_seeds` times each. A
    prompt's seed is its index in its list, so prompt i of n held-out ones gets seeds i, i + n, ..."""
    return {
        "attr": attribute_prompts(source, config.n_attribute_prompts),
        "heldout": list(source.heldout_prompts) * config.heldout_seeds,
    }


def score_attribute_sets(sampler: _Sampling, sets: dict[str, AttributePrompts], params: GenerationParams) -> dict[str, float]:
    """Sample every set of `attribute_sets` and read the images back: `<prefix>_<score>` for each of
    `score_prompts`' scores, and `<prefix>_n`, the image count. Empty sets are skipped."""
    metrics: dict[str, float] = {}
    for prefix, prompts in sets.items():
        if not prompts:
            continue
        images = sampler.generate([p for p, _ in prompts], list(range(len(prompts))), params)
        scores = score_prompts([objs for _, objs in prompts], to_pil(images))
        metrics.update({f"{prefix}_{k}": v for k, v in scores.items()})
        metrics[f"{prefix}_n"] = float(len(prompts))
    return metrics


def attribute_prompts(source: ShapesSource, n: int, seed: int = 0) -> AttributePrompts:
    """`n` single-shape prompts over the training combinations (held-out pairs excluded), seeded."""
    held = set(source.heldout_pairs)
    candidates = [
        ShapeAttributes(c, s, p, z)
        for c in source.colours
        for s in source.shapes
        if (c, s) not in held
        for z in source.sizes
        for p in source.positions
    ]
    rng = random.Random(f"eval-prompts-{seed}")
    picked = rng.sample(candidates, min(n, len(candidates)))
    while len(picked) < n:  # more prompts than combinations: repeat them (with other seeds)
        picked.append(candidates[len(picked) % len(candidates)])
    return [(prompt_for(o), (o,)) for o in picked]


# ---------------------------------------------------------------------------------------------
# Reading the dataset


def read_rows(dataset: DatasetVersion, split: str, n: int) -> tuple[list[str], list[Image.Image]]:
    """The first `n` (caption, image) rows of a split, in the published (id) order."""
    captions: list[str] = []
    images: list[Image.Image] = []
    for path in sorted((Path(dataset.root) / split).glob("*.parquet")):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256, columns=["caption", "image"]):
            for caption, blob in zip(batch.column("caption").to_pylist(), batch.column("image").to_pylist(), strict=True):
                if len(captions) == n:
                    return captions, images
                captions.append(caption)
                with Image.open(io.BytesIO(blob)) as im:
                    images.append(im.convert("RGB"))
    return captions, images


# ---------------------------------------------------------------------------------------------
# The sample grid


def make_grid(images: list[Image.Image], labels: list[str], n_cols: int) -> Image.Image:
    """Rows of `n_cols` images (row-major), each row's label written under it."""
    if len(images) != len(labels) * n_cols:
        raise ValueError(f"{len(images)} images do not fill {len(labels)} rows of {n_cols}")
    layout = grid_layout(labels, n_cols, images[0].width)
    grid = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(grid)
    for row, (top, lines) in enumerate(zip(layout.row_tops, layout.lines, strict=True)):
        for col in range(n_cols):
            image = images[row * n_cols + col].resize((layout.cell, layout.cell), Image.Resampling.NEAREST)
            grid.paste(image, (GRID_PAD + col * (layout.cell + GRID_PAD), top))
        y = layout.label_boxes[row][1]
        for line in lines:
            draw.text((GRID_PAD, y), line, fill="black", font=layout.font)
            y += layout.line_height
    return grid


@dataclass(frozen=True)
class GridLayout:
    size: tuple[int, int]  # (width, height)
    cell: int  # side of an upscaled image
    row_tops: list[int]
    label_boxes: list[tuple[int, int, int, int]]  # (left, top, right, bottom) of each row's label band
    lines: list[list[str]]  # each label wrapped to the grid's width
    line_height: int
    font: object


def grid_layout(labels: list[str], n_cols: int, resolution: int) -> GridLayout:
    """Where `make_grid` puts everything: cells upscaled (nearest) to >= GRID_MIN_CELL px, labels wrapped."""
    cell = resolution * max(1, math.ceil(GRID_MIN_CELL / resolution))
    width = n_cols * cell + (n_cols + 1) * GRID_PAD
    font = ImageFont.load_default()
    line_height = font.getbbox("Ag|")[3] + 2
    lines = [_wrap(label, font, width - 2 * GRID_PAD) for label in labels]
    row_tops, boxes, y = [], [], GRID_PAD
    for wrapped in lines:
        row_tops.append(y)
        y += cell + GRID_PAD
        boxes.append((0, y, width, y + len(wrapped) * line_height))
        y += len(wrapped) * line_height + GRID_PAD
    return GridLayout((width, y), cell, row_tops, boxes, lines, line_height, font)


def _wrap(text: str, font, max_width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > max_width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return [*lines, line] if line else [""]


def save_grid(grid: Image.Image, path: Path, labels: list[str], seeds: list[int], params: GenerationParams) -> Path:
    """Write the grid PNG atomically, with the prompts, seeds and sampler in its text chunks."""
    info = PngInfo()
    info.add_text("t2i.prompts", json.dumps(labels))
    info.add_text("t2i.seeds", json.dumps(seeds))
    info.add_text("t2i.params", json.dumps(asdict(params)))
    return atomic_write(path, lambda tmp: grid.save(tmp, "PNG", pnginfo=info))


# ---------------------------------------------------------------------------------------------
# The stage


def evaluate_model(
    train: TrainResult,
    dataset: DatasetVersion,
    config: EvalConfig | None = None,
    champion_metrics: dict[str, float] | None = None,
    progress: bool = True,
    mlflow_experiment: str | None = "t2i",
) -> EvalReport:
    """Sample, measure, log and judge the model of `train` (see the module docstring).

    `champion_metrics`: the current champion's metrics, for the gate (None: no champion).
    `mlflow_experiment=None` turns tracking off; otherwise metrics, the grid and the steps table
    go to the training run (`train.mlflow_run_id`), or to a new run in this experiment, once per
    tracking store: evaluating again against the same store logs nothing, against another logs there.
    """
    config = config or EvalConfig()
    source = shapes_source(dataset)
    primary, threshold = resolve_gate(config, source is not None)
    out_dir = Path(train.run_dir) / EVAL_DIR / eval_key(train, dataset, config)
    out_dir.mkdir(parents=True, exist_ok=True)

    metrics_file = out_dir / METRICS_FILE
    if metrics_file.is_file():  # finished before (e.g. a retried task): only the gate is re-decided
        saved = json.loads(metrics_file.read_text(encoding="utf-8"))
        metrics, notes = saved["metrics"], saved["notes"]
    else:
        metrics, notes = _measure(train, dataset, config, source, out_dir, progress)
        write_json_atomic(metrics_file, {"metrics": metrics, "notes": notes, "config": config.model_dump(mode="json")})

    tracking_uri = get_settings().mlflow_tracking_uri
    if mlflow_experiment is not None and _logged_to(out_dir) != tracking_uri:
        run_id = _log_to_mlflow(train, dataset, config, metrics, notes, out_dir, mlflow_experiment)
        write_json_atomic(out_dir / MLFLOW_FILE, {"run_id": run_id, "tracking_uri": tracking_uri})

    passed, why = gate(metrics, primary, threshold, champion_metrics)
    if primary in ("fd_clip", "clip_score") and metrics.get("fd_clip_uncalibrated") == 1.0:
        why += " (uncalibrated: the text encoder is random-init, so this metric carries no meaning)"
    report = EvalReport(
        grid_path=str(out_dir / GRID_FILE),
        metrics=metrics,
        primary_metric=primary,
        threshold=threshold,
        passed=passed,
        reason=f"{why}. {notes['fd_clip']}",
    )
    write_json_atomic(out_dir / REPORT_FILE, report.model_dump(mode="json"))
    return report


def eval_key(train: TrainResult, dataset: DatasetVersion, config: EvalConfig) -> str:
    """Hash of what the metrics depend on: the model, the dataset version and the sampling config
    (not the gate's metric and threshold, nor the device; but the precision `auto` gives on it)."""
    measured = config.model_dump(mode="json", exclude={"primary_metric", "threshold", "device", "precision"})
    if measured["heldout_seeds"] == 1:
        del measured["heldout_seeds"]  # added later: evaluations from before it keep their keys
    measured["precision"] = _precision(config.precision, _device(config.device))
    body = {"format": EVAL_FORMAT, "train": train.model_dump(mode="json"), "dataset": dataset.version, "config": measured}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _measure(
    train: TrainResult,
    dataset: DatasetVersion,
    config: EvalConfig,
    source: ShapesSource | None,
    out_dir: Path,
    progress: bool,
) -> tuple[dict[str, float], dict[str, str]]:
    device = _device(config.device)
    if device.startswith("cuda"):
        fast_cuda_backends()  # as training set them, also when this process did not train
    pipe = TextToImage.load(train.checkpoint, device)
    _check_steps(pipe, config)
    precision = _precision(config.precision, device)
    params = GenerationParams(
        steps=config.steps, guidance_scale=config.guidance_scale, sampler=config.sampler, precision=precision
    )
    sampler = _Sampling(pipe, config.batch_size, progress)
    metrics: dict[str, float] = {}
    notes: dict[str, str] = {"precision": f"sampling with the UNet in {precision} on {device}"}

    # Reference rows: validation, or train when the dataset has no validation split.
    split = "val" if dataset.counts.get("val", 0) >= 2 else "train"
    n_ref = max(config.n_fd_samples, config.n_val_captions)
    ref_captions, ref_images = read_rows(dataset, split, n_ref)

    # Grid: fixed prompts plus validation captions, one column per seed.
    labels = list(config.prompts) + ref_captions[: config.n_val_captions]
    grid_prompts = [p for p in labels for _ in config.seeds]
    grid_seeds = [s for _ in labels for s in config.seeds]
    grid_images = to_pil(sampler.generate(grid_prompts, grid_seeds, params))
    save_grid(make_grid(grid_images, labels, len(config.seeds)), out_dir / GRID_FILE, labels, config.seeds, params)

    # FD_CLIP and CLIP score: the first n reference captions, one generated image each (seed = index).
    n_fd = min(config.n_fd_samples, len(ref_captions))
    if n_fd >= 2:
        fd_captions = ref_captions[:n_fd]
        generated = sampler.generate(fd_captions, list(range(n_fd)), params)  # (N, 3, H, W) in [-1, 1]
        real = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in ref_images[:n_fd]])  # (N, 3, H, W)
        encoder = pipe.text_encoder
        with torch.no_grad():
            gen_emb = _batched(encoder.encode_images, (generated + 1) / 2, config.batch_size)  # (N, E)
            real_emb = _batched(encoder.encode_images, real.float() / 255, config.batch_size)  # (N, E)
            text_emb = torch.cat([encoder.encode(fd_captions[i : i + config.batch_size]).pooled
                                  for i in range(0, n_fd, config.batch_size)])  # (N, E)
        metrics["fd_clip"] = frechet_distance(gen_emb.cpu().numpy(), real_emb.cpu().numpy())
        metrics["fd_clip_n"] = float(n_fd)
        metrics["clip_score"] = clip_score(text_emb, gen_emb)
        metrics["clip_score_real"] = clip_score(text_emb, real_emb)  # the same for the real images: a reference
        notes["fd_clip"] = (
            f"FD_CLIP and CLIP score: {n_fd} generated vs {n_fd} {split} images, image embeddings of the model's "
            f"own CLIP {encoder.identity_id}" + (" (random-init: uncalibrated)" if encoder.is_random_init else "")
        )
    else:
        notes["fd_clip"] = f"FD_CLIP not measured: the {split} split has {len(ref_captions)} rows (needs >= 2)"
    metrics["fd_clip_uncalibrated"] = float(pipe.text_encoder.is_random_init)

    table: list[dict] = []
    if source is not None:
        sets = attribute_sets(source, config)
        metrics.update(score_attribute_sets(sampler, sets, params))
        in_dist = sets["attr"]
        notes["heldout"] = (
            f"held-out pairs {source.heldout_pairs} from {source.heldout_from}: "
            f"{len(source.heldout_prompts)} prompts x {config.heldout_seeds} seeds"
        )
        if config.steps_table and in_dist:
            rows = in_dist[: config.steps_table_prompts]
            table = _steps_table(pipe, sampler, [p for p, _ in rows], [o for _, o in rows], config, precision)
    elif config.steps_table and ref_captions:
        table = _steps_table(pipe, sampler, ref_captions[: config.steps_table_prompts], None, config, precision)
    for row in table:
        metrics.update(row["metrics"])
    write_json_atomic(out_dir / STEPS_TABLE_FILE, table)

    metrics["images_per_s"] = sampler.images_per_s(params)
    return metrics, notes


def _steps_table(
    pipe: TextToImage,
    sampler: _Sampling,
    prompts: list[str],
    objects: list[tuple[ShapeAttributes, ...]] | None,
    config: EvalConfig,
    precision: str,
) -> list[dict]:
    """Quality against steps: each (sampler, steps) on the same prompts and seeds. Quality is the
    attribute accuracy where the prompts' attributes are known (`acc_*`), else the CLIP score
    (`clip_score_*`)."""
    table = []
    for name, steps in config.steps_table_runs:
        params = GenerationParams(steps=steps, guidance_scale=config.guidance_scale, sampler=name, precision=precision)
        images, images_per_s = sampler.timed(prompts, list(range(len(prompts))), params)  # (N, 3, H, W) in [-1, 1]
        tag = f"{SAMPLER_SHORT[name]}_{steps}"
        if objects is not None:
            quality_name, quality = f"acc_{tag}", score_prompts(objects, to_pil(images))["accuracy"]
        else:
            with torch.no_grad():
                text_emb = pipe.text_encoder.encode(prompts).pooled
                image_emb = pipe.text_encoder.encode_images((images + 1) / 2)
            quality_name, quality = f"clip_score_{tag}", clip_score(text_emb, image_emb)
        row_metrics = {quality_name: quality, f"images_per_s_{tag}": images_per_s}
        table.append({"sampler": name, "steps": steps, "n_prompts": len(prompts), "metrics": row_metrics})
    return table


class _Sampling:
    """Generates in batches, keeps the wall time per sampling setting (for images/s), and reuses
    images: an image depends on its prompt, seed and setting alone (a stochastic sampler's step
    noise too comes from the prompt's seed, see `TextToImage.generate`).

    No timed batch pays a first call's costs (cuDNN's algorithm search, lazy kernel loading,
    first allocations): each new batch size is run once untimed first, one DDIM step."""

    def __init__(self, pipe: TextToImage, batch_size: int, progress: bool):
        self.pipe, self.batch_size, self.progress = pipe, batch_size, progress
        self.timing: dict[GenerationParams, tuple[int, float]] = {}
        self.cache: dict[tuple[GenerationParams, str, int], torch.Tensor] = {}
        self.warmed: set[tuple[int, float, str]] = set()

    def generate(self, prompts: list[str], seeds: list[int], params: GenerationParams) -> torch.Tensor:
        todo = [i for i in range(len(prompts)) if (params, prompts[i], seeds[i]) not in self.cache]
        images, _ = self._run([prompts[i] for i in todo], [seeds[i] for i in todo], params)
        fresh = dict(zip(todo, images, strict=True))
        return torch.stack([fresh[i] if i in fresh else self.cache[(params, prompts[i], seeds[i])]
                            for i in range(len(prompts))])  # (N, 3, H, W) in [-1, 1]

    def timed(self, prompts: list[str], seeds: list[int], params: GenerationParams) -> tuple[torch.Tensor, float]:
        """Images drawn anew, none taken from the cache, and the images/s of this call alone: rows
        of the steps table compare samplers on the same prompts, batches and warm device."""
        images, seconds = self._run(prompts, seeds, params)
        return torch.stack(images), len(prompts) / seconds  # (N, 3, H, W) in [-1, 1]

    def images_per_s(self, params: GenerationParams) -> float:
        n, seconds = self.timing.get(params, (0, 0.0))
        return n / seconds if seconds > 0 else float("nan")

    def _run(self, prompts: list[str], seeds: list[int], params: GenerationParams) -> tuple[list[torch.Tensor], float]:
        """Each image anew, and the seconds their batches took (also added to `timing`)."""
        out: list[torch.Tensor] = []
        total = 0.0
        bar = tqdm(total=len(prompts), desc=f"eval {params.sampler}-{params.steps}", disable=not self.progress)
        for start in range(0, len(prompts), self.batch_size):
            batch, batch_seeds = prompts[start : start + self.batch_size], seeds[start : start + self.batch_size]
            self._warm_up(len(batch), params)
            begin = time.perf_counter()
            images = self._generate(batch, batch_seeds, params)
            elapsed = time.perf_counter() - begin
            total += elapsed
            n, seconds = self.timing.get(params, (0, 0.0))
            self.timing[params] = (n + len(batch), seconds + elapsed)
            for prompt, seed, image in zip(batch, batch_seeds, images.cpu(), strict=True):
                out.append(image)
                self.cache[(params, prompt, seed)] = image
            bar.update(len(batch))
        bar.close()
        return out, total

    def _warm_up(self, n: int, params: GenerationParams) -> None:
        key = (n, params.guidance_scale, params.precision)
        if key not in self.warmed:
            step = GenerationParams(steps=1, guidance_scale=params.guidance_scale, sampler="ddim", precision=params.precision)
            self._generate([""] * n, list(range(n)), step)
            self.warmed.add(key)

    def _generate(self, prompts: list[str], seeds: list[int], params: GenerationParams) -> torch.Tensor:
        images = self.pipe.generate(prompts, seeds, params)
        if images.device.type == "cuda":
            torch.cuda.synchronize()  # the work done, not only queued, when a timer stops
        return images


def _batched(fn, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _precision(name: str, device: str) -> str:
    if name == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    return name


def _check_steps(pipe: TextToImage, config: EvalConfig) -> None:
    """Every (sampler, steps) of the evaluation fits the model's schedule, as the sampler itself
    judges it (`TextToImage.sampler`), checked before any sampling."""
    runs = [(config.sampler, config.steps)] + (list(config.steps_table_runs) if config.steps_table else [])
    for name, steps in runs:
        try:
            pipe.sampler(GenerationParams(steps=steps, sampler=name))
        except ValueError as exc:
            raise ValueError(
                f"{name} with {steps} steps: the model was trained with {pipe.schedule.num_train_timesteps} time "
                f"steps ({exc}); lower evaluate.steps or that row of evaluate.steps_table_runs"
            ) from exc


# ---------------------------------------------------------------------------------------------
# MLflow


def _logged_to(out_dir: Path) -> str | None:
    """The tracking URI the metrics in `out_dir` were logged to; None if they were not."""
    record = out_dir / MLFLOW_FILE
    if not record.is_file():
        return None
    return json.loads(record.read_text(encoding="utf-8")).get("tracking_uri")


def _log_to_mlflow(
    train: TrainResult,
    dataset: DatasetVersion,
    config: EvalConfig,
    metrics: dict[str, float],
    notes: dict[str, str],
    out_dir: Path,
    experiment: str,
) -> str:
    """Metrics, grid, steps table and config into the training run (or a new run); returns its id.
    Config goes in tags, not params: params are immutable, and a run may be evaluated twice."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from tasks.tracking import ensure_experiment, training_run

    client = MlflowClient(tracking_uri=get_settings().mlflow_tracking_uri)
    run_id, new_run = training_run(client, train.mlflow_run_id), False
    if run_id is None:  # another store's run, a deleted one, or none
        experiment_id = ensure_experiment(client, experiment)
        run = client.create_run(
            experiment_id, run_name=f"eval-{out_dir.name}", tags={"t2i.stage": "evaluate", "t2i.dataset": dataset.name}
        )
        run_id, new_run = run.info.run_id, True

    now = int(time.time() * 1000)
    finite = [Metric(k, float(v), now, train.step) for k, v in sorted(metrics.items()) if math.isfinite(v)]
    for i in range(0, len(finite), 1000):
        client.log_batch(run_id, metrics=finite[i : i + 1000])
    for key, value in {
        "t2i.eval.key": out_dir.name,
        "t2i.eval.sampler": config.sampler,
        "t2i.eval.steps": str(config.steps),
        "t2i.eval.guidance_scale": str(config.guidance_scale),
        "t2i.eval.dataset_version": dataset.version,
        "t2i.eval.fd_clip": notes["fd_clip"][:5000],
    }.items():
        client.set_tag(run_id, key, value)
    artifact_dir = f"{EVAL_DIR}/{out_dir.name}"
    client.log_artifact(run_id, str(out_dir / GRID_FILE), artifact_dir)
    client.log_artifact(run_id, str(out_dir / STEPS_TABLE_FILE), artifact_dir)
    client.log_dict(run_id, {"config": config.model_dump(mode="json"), "metrics": metrics, "notes": notes},
                    f"{artifact_dir}/eval.json")
    if new_run:
        client.set_terminated(run_id)
    return run_id


# ---------------------------------------------------------------------------------------------
# Prefect


def _retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry crashes and tracking-server hiccups; a ValueError (bad config or data) fails the same way again."""
    try:
        state.result()
    except ValueError:
        return False
    except Exception:
        return True
    return True


@task(name="evaluate", retries=2, retry_delay_seconds=10, retry_condition_fn=_retry_unless_bad_input, cache_policy=None)
def evaluate_task(
    train: TrainResult,
    dataset: DatasetVersion,
    config: EvalConfig,
    champion_metrics: dict[str, float] | None = None,
    model_name: str | None = None,
    mlflow_experiment: str | None = "t2i",
) -> EvalReport:
    """Prefect wrapper. Without `champion_metrics`, reads the champion of registered model
    `model_name` from the registry. No result caching: finished metrics are reused from the run
    directory, and the gate must see the champion of now."""
    if champion_metrics is None and model_name is not None:
        from tasks.register import champion_metrics as registry_champion_metrics

        champion_metrics = registry_champion_metrics(model_name)
    storage.pull(Path(train.run_dir))  # with an s3:// data root, when another machine trained it
    storage.pull(Path(dataset.root))
    report = evaluate_model(train, dataset, config, champion_metrics, progress=False, mlflow_experiment=mlflow_experiment)
    storage.push(Path(train.run_dir) / EVAL_DIR)
    return report
