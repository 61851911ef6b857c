"""Evaluate stage: metric functions against closed forms, the grid layout, the gate, and
evaluate_model on tiny runs (a random tiny model, and an oracle that draws what it is asked)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

import tasks.evaluate as evaluate
from models.pipeline import GenerationParams, TextToImage
from models.schedule import NoiseSchedule, ScheduleConfig
from models.text_encoder import TextEncoder, TextEncoderConfig
from models.unet import UNet, UNetConfig
from tasks.attributes import parse_caption
from tasks.contracts import DatasetVersion, EvalReport, TrainResult
from tasks.evaluate import (
    EvalConfig,
    attribute_prompts,
    eval_key,
    evaluate_model,
    frechet_distance,
    gate,
    grid_layout,
    is_better_or_equal,
    make_grid,
    resolve_gate,
    save_grid,
    shapes_source,
)
from tasks.ingest import IngestConfig, ingest_dataset
from tasks.settings import get_settings
from tasks.shapes import ShapesConfig, ShapeSpec, generate_shapes, render_shapes

RES = 16


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Sampling here is many tiny forward passes: on a shared 2-core box two threads per process
    # oversubscribe the cores and each pass takes 50x longer than with one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shapes_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes-data")
    source = generate_shapes(root / "source", ShapesConfig(n_images=48, resolution=32, seed=3))
    config = IngestConfig(workers=1, resolution=RES, val_fraction=0.3)
    return ingest_dataset(source, "shapes", config, data_root=root / "data", progress=False)


@pytest.fixture(scope="module")
def checkpoint(tiny_clip, tmp_path_factory) -> Path:
    """A tiny random TextToImage (16 px, T = 20), saved as the train stage saves one."""
    torch.manual_seed(0)
    encoder = TextEncoder(TextEncoderConfig(model_name=tiny_clip, allow_random_init=True, random_init_seed=3))
    unet = UNet(
        UNetConfig(channels=(16, 32), attention_levels=(False, True), layers_per_block=1, head_dim=8,
                   norm_groups=8, context_dim=encoder.width)
    )
    with torch.no_grad():  # conv_out is zero-initialised; perturb so outputs depend on the prompt
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pipe = TextToImage(unet, NoiseSchedule(ScheduleConfig(num_train_timesteps=20)), encoder, resolution=RES)
    return pipe.save(tmp_path_factory.mktemp("run") / "model")


def _train_result(tmp_path: Path, checkpoint: Path, run_id: str | None = None) -> TrainResult:
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    return TrainResult(run_dir=str(run_dir), checkpoint=str(checkpoint), step=7, mlflow_run_id=run_id)


TINY = dict(
    prompts=["a large red circle in the centre", "a small blue square in the top left"],
    n_val_captions=2,
    seeds=[0, 1],
    steps=3,
    n_attribute_prompts=6,
    n_fd_samples=8,
    steps_table_runs=[("ddpm", 1000), ("ddim", 3), ("ddim", 2), ("dpmpp_2m", 2)],
    steps_table_prompts=3,
    batch_size=8,
    device="cpu",
)


# --- direction rule and gate --------------------------------------------------------------------------


def test_is_better_or_equal_knows_each_metrics_direction():
    assert is_better_or_equal("attr_accuracy", 0.8, 0.7) and not is_better_or_equal("attr_accuracy", 0.6, 0.7)
    assert is_better_or_equal("clip_score", 0.3, 0.3)
    assert is_better_or_equal("fd_clip", 1.0, 2.0) and not is_better_or_equal("fd_clip", 3.0, 2.0)
    assert is_better_or_equal("fd_clip", 2.0, 2.0)
    assert not is_better_or_equal("attr_accuracy", math.nan, 0.0)
    assert not is_better_or_equal("fd_clip", math.nan, 1e9) and not is_better_or_equal("fd_clip", math.inf, 1e9)
    assert is_better_or_equal("FD_dinov2", 1.0, 2.0) and not is_better_or_equal("FD_dinov2", 3.0, 2.0)
    assert is_better_or_equal("attr_accuracy", 0.1, math.nan) and is_better_or_equal("fd_clip", 9.0, math.nan)
    assert not is_better_or_equal("attr_accuracy", math.nan, math.nan)


def test_gate_needs_the_threshold_and_no_regression_against_the_champion():
    m = {"attr_accuracy": 0.8, "fd_clip": 5.0}
    assert gate(m, "attr_accuracy", 0.7, None)[0]
    passed, why = gate(m, "attr_accuracy", 0.9, None)
    assert not passed and "threshold" in why
    assert gate(m, "attr_accuracy", 0.7, {"attr_accuracy": 0.8})[0]  # equal to the champion: passes
    passed, why = gate(m, "attr_accuracy", 0.7, {"attr_accuracy": 0.85})
    assert not passed and "champion" in why
    assert gate(m, "attr_accuracy", 0.7, {"fd_clip": 1.0})[0]  # the champion has no attr_accuracy
    passed, why = gate(m, "attr_accuracy", 0.7, {})  # a champion registered without eval metrics
    assert passed and "the champion has no attr_accuracy" in why and "no champion" not in why
    assert gate(m, "fd_clip", 10.0, {"fd_clip": 6.0})[0]  # lower is better
    assert not gate(m, "fd_clip", 10.0, {"fd_clip": 4.0})[0]
    assert not gate(m, "fd_clip", 4.0, None)[0]
    assert not gate(m, "heldout_accuracy", 0.0, None)[0]  # not measured: fails, does not crash
    for bad in (math.nan, math.inf, -math.inf):  # a NaN threshold would pass every model
        with pytest.raises(ValueError, match="finite"):
            gate(m, "attr_accuracy", bad, None)


def test_gate_config_errors_teach():
    with pytest.raises(ValidationError, match="extra"):
        EvalConfig(stepz=3)
    with pytest.raises(ValidationError, match="threshold"):
        EvalConfig(primary_metric="fd_clip")
    for bad in (math.nan, math.inf):
        with pytest.raises(ValidationError, match="finite"):
            EvalConfig(threshold=bad)
    assert resolve_gate(EvalConfig(), is_shapes=True) == ("attr_accuracy", 0.5)
    assert resolve_gate(EvalConfig(threshold=12.0), is_shapes=False) == ("fd_clip", 12.0)
    with pytest.raises(ValueError, match="no default threshold"):
        resolve_gate(EvalConfig(), is_shapes=False)
    with pytest.raises(ValueError, match="shapes dataset"):
        resolve_gate(EvalConfig(primary_metric="attr_accuracy"), is_shapes=False)


# --- FD and CLIP score -------------------------------------------------------------------------------------


def test_fd_of_a_set_against_itself_is_zero_and_grows_with_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))  # correlated dimensions
    assert frechet_distance(x, x) < 1e-8
    noise = rng.normal(size=x.shape)
    fds = [frechet_distance(x, x + s * noise) for s in (0.1, 0.5, 1.0, 2.0)]
    assert 0 < fds[0] < fds[1] < fds[2] < fds[3]


def test_fd_matches_the_closed_form_for_an_affine_copy():
    # b = 2a + 3: S_b = 4 S_a, (S_a S_b)^(1/2) = 2 S_a, so FD = |mu_a + 3|^2 + Tr S_a.
    rng = np.random.default_rng(1)
    a = rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8)) + rng.normal(size=8)
    expected = np.sum((a.mean(0) + 3) ** 2) + np.trace(np.cov(a, rowvar=False))
    assert frechet_distance(a, 2 * a + 3) == pytest.approx(expected, rel=1e-8)


def test_fd_matches_scipy_sqrtm_and_handles_fewer_samples_than_dims():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(100, 6)), rng.normal(size=(80, 6)) * 1.5 + 0.3
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    oracle = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(oracle, rel=1e-6)
    few = frechet_distance(rng.normal(size=(10, 32)), rng.normal(size=(10, 32)))  # singular covariances
    assert math.isfinite(few) and few > 0
    with pytest.raises(ValueError, match="2 samples"):
        frechet_distance(a[:1], b)


def test_fd_of_non_finite_embeddings_is_nan_not_a_crash():
    # A diverged model samples NaN images; its FD must fail the gate, not crash the stage (LinAlgError).
    rng = np.random.default_rng(3)
    a = rng.normal(size=(20, 4))
    for bad in (math.nan, math.inf):
        b = a.copy()
        b[0, 0] = bad
        assert math.isnan(frechet_distance(a, b)) and math.isnan(frechet_distance(b, a))
    assert not gate({"fd_clip": frechet_distance(a, np.full_like(a, math.nan))}, "fd_clip", 1e9, None)[0]
    # The report of such a model reads back from its JSON (`t2i evaluate` writes it, `t2i register` reads it).
    report = EvalReport(grid_path="g.png", metrics={"fd_clip": math.nan, "attr_accuracy": 0.5}, primary_metric="fd_clip",
                        threshold=1.0, passed=False, reason="fd_clip nan misses the threshold")  # fmt: skip
    again = EvalReport.model_validate_json(report.model_dump_json())
    assert math.isnan(again.metrics["fd_clip"]) and again.metrics["attr_accuracy"] == 0.5


def test_clip_score_is_the_mean_cosine():
    t = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    i = torch.tensor([[3.0, 0.0], [1.0, 0.0]])
    assert evaluate.clip_score(t, i) == pytest.approx(0.5)


# --- grid ------------------------------------------------------------------------------------------------------


def test_grid_has_a_cell_per_prompt_and_seed_and_a_label_under_each_row(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    labels = ["red row", "green row " + "with a very long caption " * 6, "blue row"]
    images = [Image.new("RGB", (RES, RES), c) for c in colours for _ in range(2)]
    grid = make_grid(images, labels, n_cols=2)
    layout = grid_layout(labels, 2, RES)
    assert grid.size == layout.size
    assert layout.cell == 96 and grid.width == 2 * 96 + 3 * evaluate.GRID_PAD
    assert len(layout.lines[1]) > 1 and len(layout.lines[0]) == 1  # long captions wrap
    pixels = np.asarray(grid)
    for row, colour in enumerate(colours):
        for col in range(2):
            x = evaluate.GRID_PAD + col * (layout.cell + evaluate.GRID_PAD) + layout.cell // 2
            assert tuple(pixels[layout.row_tops[row] + layout.cell // 2, x]) == colour
        left, top, right, bottom = layout.label_boxes[row]
        band = pixels[top:bottom, left:right]
        assert (band.min(axis=-1) < 100).sum() > 20  # text was written there
        assert top >= layout.row_tops[row] + layout.cell
    path = save_grid(grid, tmp_path / "grid.png", labels, [0, 1], GenerationParams(steps=3))
    with Image.open(path) as saved:
        assert json.loads(saved.text["t2i.prompts"]) == labels and saved.size == grid.size
    (tmp_path / "plain").touch()  # the grid is readable as any file the process writes is, not 0o600
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode
    with pytest.raises(ValueError, match="rows"):
        make_grid(images[:5], labels, n_cols=2)


# --- prompts from the shapes source -----------------------------------------------------------------------------


def test_shapes_source_reads_the_generator_heldout_list_and_falls_back_to_the_rows(shapes_dataset, tmp_path):
    source = shapes_source(shapes_dataset)
    manifest = json.loads(Path(shapes_dataset.manifest).read_text())
    heldout = json.loads((Path(manifest["source"]["root"]) / "heldout.json").read_text())
    assert source.heldout_pairs == tuple(tuple(p) for p in heldout["colour_shape"])
    assert [p for p, _ in source.heldout_prompts] == [p["text"] for p in heldout["prompts"]]

    # source folder gone: the rows' ground truth still says it is shapes data, and which pairs it lacks
    manifest["source"]["root"] = str(tmp_path / "moved")
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    fallback = shapes_source(shapes_dataset.model_copy(update={"manifest": str(tmp_path / "manifest.json")}))
    assert set(source.heldout_pairs) <= set(fallback.heldout_pairs)
    assert all(parse_caption(p).objects == objs for p, objs in fallback.heldout_prompts)

    prompts = attribute_prompts(source, 40)
    assert prompts == attribute_prompts(source, 40) and len(prompts) == 40
    assert len(set(prompts)) == 40
    for text, (attrs,) in prompts:
        assert (attrs.colour, attrs.shape) not in source.heldout_pairs
        assert parse_caption(text).objects == (attrs,)


# --- evaluate_model -------------------------------------------------------------------------------------------


def test_a_deleted_training_run_gets_a_new_evaluation_run(shapes_dataset, checkpoint, tmp_path):
    # MLflow refuses to log into a deleted run (cleaned up in the UI): evaluate logs into a new one.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=get_settings().mlflow_tracking_uri)
    deleted = client.create_run(client.create_experiment("train-deleted")).info.run_id
    client.delete_run(deleted)
    out_dir = tmp_path / "eval" / "k1"
    out_dir.mkdir(parents=True)
    for name in (evaluate.GRID_FILE, evaluate.STEPS_TABLE_FILE):
        (out_dir / name).write_bytes(b"x")
    train = _train_result(tmp_path, checkpoint, deleted)
    run_id = evaluate._log_to_mlflow(train, shapes_dataset, EvalConfig(**TINY), {"attr_accuracy": 0.5},
                                     {"fd_clip": "n/a"}, out_dir, "t2i-eval")  # fmt: skip
    run = client.get_run(run_id)
    assert run_id != deleted and run.info.lifecycle_stage == "active" and run.data.metrics["attr_accuracy"] == 0.5


def test_evaluate_tiny_run_logs_metrics_and_grid_to_the_training_run(shapes_dataset, checkpoint, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=get_settings().mlflow_tracking_uri)
    run_id = client.create_run(client.create_experiment("t2i")).info.run_id
    train = _train_result(tmp_path, checkpoint, run_id)
    config = EvalConfig(**TINY, threshold=0.0)
    report = evaluate_model(train, shapes_dataset, config, progress=False)

    m = report.metrics
    for prefix in ("attr", "heldout"):
        for name in ("colour_acc", "shape_acc", "position_acc", "size_acc", "accuracy", "all_correct"):
            assert 0.0 <= m[f"{prefix}_{name}"] <= 1.0
    assert m["attr_n"] == 6 and m["heldout_n"] == len(shapes_source(shapes_dataset).heldout_prompts)
    assert m["fd_clip"] > 0 and m["fd_clip_n"] == 8 and m["fd_clip_uncalibrated"] == 1.0
    assert -1 <= m["clip_score"] <= 1 and m["images_per_s"] > 0
    for tag in ("ddpm_1000", "ddim_3", "ddim_2", "dpmpp_2"):
        assert 0.0 <= m[f"acc_{tag}"] <= 1.0 and m[f"images_per_s_{tag}"] > 0
    assert report.passed and report.primary_metric == "attr_accuracy" and report.threshold == 0.0
    assert "random-init" in report.reason and "8 generated" in report.reason

    labels = TINY["prompts"] + evaluate.read_rows(shapes_dataset, "val", 2)[0]
    with Image.open(report.grid_path) as grid:
        assert grid.size == grid_layout(labels, 2, RES).size
        assert json.loads(grid.text["t2i.prompts"]) == labels
    assert Path(report.grid_path).parent.parent == Path(train.run_dir) / "eval"

    run = client.get_run(run_id)
    assert run.data.metrics["attr_accuracy"] == pytest.approx(m["attr_accuracy"])
    assert run.data.metrics["acc_ddpm_1000"] == pytest.approx(m["acc_ddpm_1000"])
    assert run.data.tags["t2i.eval.sampler"] == "ddim"
    artifact_dir = f"eval/{Path(report.grid_path).parent.name}"
    logged = {Path(a.path).name for a in client.list_artifacts(run_id, artifact_dir)}
    assert logged >= {"grid.png", "steps_table.json", "eval.json"}

    # Again (a retried task): metrics come from the run directory; the gate is decided anew.
    start = time.perf_counter()
    again = evaluate_model(train, shapes_dataset, config, champion_metrics={"attr_accuracy": 2.0}, progress=False)
    assert time.perf_counter() - start < 5
    assert again.metrics == m and not again.passed and "champion" in again.reason
    assert len(client.get_metric_history(run_id, "attr_accuracy")) == 1  # not logged twice


def test_evaluating_again_against_another_tracking_store_logs_there(shapes_dataset, checkpoint, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    real = TextToImage.load(checkpoint)
    monkeypatch.setattr(evaluate.TextToImage, "load", classmethod(lambda cls, d, device="cpu": OraclePipe(real)))
    train = _train_result(tmp_path, checkpoint)
    config = EvalConfig(**{**TINY, "steps_table": False})
    first = evaluate_model(train, shapes_dataset, config, progress=False)
    record = Path(first.grid_path).parent / evaluate.MLFLOW_FILE
    first_run = json.loads(record.read_text())["run_id"]

    other = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("T2I_MLFLOW_TRACKING_URI", other)
    for _ in range(2):  # the second time against the same store: nothing logged again
        evaluate_model(train, shapes_dataset, config, progress=False)
    logged = json.loads(record.read_text())
    assert logged["tracking_uri"] == other and logged["run_id"] != first_run  # the grid link follows the new store
    client = MlflowClient(tracking_uri=other)
    runs = client.search_runs([client.get_experiment_by_name("t2i").experiment_id])
    assert [r.info.run_id for r in runs] == [logged["run_id"]]
    assert runs[0].data.metrics["attr_accuracy"] == first.metrics["attr_accuracy"]
    assert len(client.get_metric_history(logged["run_id"], "attr_accuracy")) == 1


def test_each_sampler_gets_its_own_step_bound_before_any_sampling(shapes_dataset, checkpoint, tmp_path):
    pipe = TextToImage.load(checkpoint)  # T = 20
    evaluate._check_steps(pipe, EvalConfig(**{**TINY, "steps_table_runs": [("ddpm", 1000), ("ddim", 20), ("dpmpp_2m", 19)]}))
    for run, most in ((("ddim", 21), 20), (("dpmpp_2m", 20), 19)):
        with pytest.raises(ValueError, match=rf"{run[0]} with {run[1]} steps: .* integer in \[1, {most}\]"):
            evaluate._check_steps(pipe, EvalConfig(**{**TINY, "steps_table_runs": [("ddim", 2), run]}))
    with pytest.raises(ValueError, match="dpmpp_2m with 20 steps"):
        evaluate._check_steps(pipe, EvalConfig(**{**TINY, "sampler": "dpmpp_2m", "steps": 20, "steps_table": False}))
    train = _train_result(tmp_path, checkpoint)
    with pytest.raises(ValueError, match=r"\[1, 19\]"):  # the last row of the table, found before the grid is drawn
        evaluate_model(train, shapes_dataset, EvalConfig(**{**TINY, "steps_table_runs": [("ddim", 2), ("dpmpp_2m", 20)]}),
                       progress=False, mlflow_experiment=None)
    assert not list(Path(train.run_dir).rglob("*.png"))


class OraclePipe:
    """Draws exactly what a shapes prompt asks for: every attribute metric must be 1."""

    def __init__(self, real: TextToImage):
        self.schedule, self.text_encoder, self.resolution = real.schedule, real.text_encoder, real.resolution
        self.sampler = real.sampler

    def generate(self, prompts, seeds, params=None, progress=False):
        out = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            parsed = parse_caption(prompt)
            if parsed is None:
                out.append(torch.rand((3, RES, RES), generator=torch.Generator().manual_seed(seed)) * 2 - 1)
                continue
            specs = [ShapeSpec(o.colour, o.shape, o.size or "small", o.position) for o in parsed.objects]
            pixels = np.asarray(render_shapes(specs, RES * 2, parsed.background or "black").resize((RES, RES), Image.LANCZOS))
            out.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1)
        return torch.stack(out)


def test_an_oracle_model_scores_perfect_attribute_accuracy(shapes_dataset, checkpoint, tmp_path, monkeypatch):
    real = TextToImage.load(checkpoint)
    monkeypatch.setattr(evaluate.TextToImage, "load", classmethod(lambda cls, d, device="cpu": OraclePipe(real)))
    config = EvalConfig(**{**TINY, "n_attribute_prompts": 30, "steps_table_prompts": 8})
    report = evaluate_model(_train_result(tmp_path, checkpoint), shapes_dataset, config, progress=False, mlflow_experiment=None)
    m = report.metrics
    assert m["attr_accuracy"] == 1.0 and m["attr_all_correct"] == 1.0
    assert m["heldout_accuracy"] == 1.0 and m["heldout_all_correct"] == 1.0
    assert all(m[f"acc_{tag}"] == 1.0 for tag in ("ddpm_1000", "ddim_3", "ddim_2", "dpmpp_2"))
    assert report.passed  # default threshold 0.5


def test_heldout_prompts_are_sampled_with_heldout_seeds_each(shapes_dataset, checkpoint, tmp_path, monkeypatch):
    real = TextToImage.load(checkpoint)
    oracle, calls = OraclePipe(real), []
    draw = oracle.generate
    oracle.generate = lambda prompts, seeds, params=None, progress=False: calls.append(list(zip(prompts, seeds))) or draw(
        prompts, seeds, params, progress
    )
    monkeypatch.setattr(evaluate.TextToImage, "load", classmethod(lambda cls, d, device="cpu": oracle))
    base = {**TINY, "steps_table": False, "n_attribute_prompts": 4}
    held = [p for p, _ in shapes_source(shapes_dataset).heldout_prompts]
    train = _train_result(tmp_path, checkpoint)

    def heldout_call():  # the (prompt, seed) pairs drawn for held-out prompts, over all batches
        pairs = [pair for batch in calls for pair in batch if pair[0] in held]
        calls.clear()
        return pairs

    one = evaluate_model(train, shapes_dataset, EvalConfig(**base), progress=False, mlflow_experiment=None)
    assert heldout_call() == list(zip(held, range(len(held))))  # as before the option: seed = prompt index
    three = evaluate_model(train, shapes_dataset, EvalConfig(**base, heldout_seeds=3), progress=False, mlflow_experiment=None)
    pairs = heldout_call()
    assert len(pairs) == len(set(pairs)) == 3 * len(held) and {p for p, _ in pairs} == set(held)
    assert all(sum(p == prompt for p, _ in pairs) == 3 for prompt in held)
    assert three.metrics["heldout_n"] == 3 * one.metrics["heldout_n"] and three.metrics["heldout_accuracy"] == 1.0
    assert "x 3 seeds" in json.loads((Path(three.grid_path).parent / evaluate.METRICS_FILE).read_text())["notes"]["heldout"]
    # The default stays out of the key, so evaluations from before the option are found again.
    assert eval_key(train, shapes_dataset, EvalConfig(**base)) != eval_key(train, shapes_dataset, EvalConfig(**base, heldout_seeds=3))


class ClockedPipe:
    """Takes `per_step` seconds of a fake clock per image and sampling step, plus `first_call`
    once per batch size (what a GPU's first call pays: algorithm search, kernel loading)."""

    def __init__(self, per_step: float = 0.001, first_call: float = 5.0):
        self.now, self.per_step, self.first_call, self.seen = 0.0, per_step, first_call, set()
        self.calls: list[tuple[int, GenerationParams]] = []

    def generate(self, prompts, seeds, params=None, progress=False):
        self.calls.append((len(prompts), params))
        self.now += self.per_step * params.steps * len(prompts) + (0.0 if len(prompts) in self.seen else self.first_call)
        self.seen.add(len(prompts))
        return torch.stack([torch.rand((3, RES, RES), generator=torch.Generator().manual_seed(s)) * 2 - 1 for s in seeds])


def test_steps_table_times_each_row_on_its_own_warm_run(monkeypatch):
    pipe = ClockedPipe()
    monkeypatch.setattr(evaluate, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: pipe.now)}))
    sampler = evaluate._Sampling(pipe, batch_size=4, progress=False)
    prompts = [f"a large red circle in the {p}" for p in ("centre", "top left", "top right", "bottom left", "bottom right")]
    objects = [parse_caption(p).objects for p in prompts]
    config = EvalConfig(**{**TINY, "steps_table_runs": [("ddpm", 1000), ("ddim", 50), ("ddim", 20), ("dpmpp_2m", 20)]})
    # Earlier in an evaluation: the configured sampler on other batches (here a grid of 3 images)
    # and on the table's own prompts, whose deterministic images are then cached.
    ddim_50 = GenerationParams(steps=50, guidance_scale=config.guidance_scale, sampler="ddim")
    sampler.generate(["a small blue square in the top left"] * 3, [0, 1, 2], ddim_50)
    sampler.generate(prompts, list(range(len(prompts))), ddim_50)
    table = evaluate._steps_table(pipe, sampler, prompts, objects, config, "fp32")
    rates = {f"{row['sampler']}-{row['steps']}": row["metrics"] for row in table}
    for name, steps in config.steps_table_runs:
        tag = f"{evaluate.SAMPLER_SHORT[name]}_{steps}"
        # Each row drew its 5 images anew (batches of 4 and 1, both already warm): 1 / (per_step * steps).
        assert rates[f"{name}-{steps}"][f"images_per_s_{tag}"] == pytest.approx(1 / (pipe.per_step * steps))
    assert rates["ddim-50"]["images_per_s_ddim_50"] / rates["ddpm-1000"]["images_per_s_ddpm_1000"] == pytest.approx(20)
    # Warm-ups: one untimed DDIM step per new batch size (3, 4, 1), on empty prompts.
    warm = [(n, p.steps, p.sampler) for n, p in pipe.calls if p.steps == 1]
    assert warm == [(3, 1, "ddim"), (4, 1, "ddim"), (1, 1, "ddim")]
    assert sampler.images_per_s(ddim_50) == pytest.approx(1 / (pipe.per_step * 50))  # no first call's cost in it


def test_images_of_every_sampler_are_reused_for_the_same_prompt_seed_and_setting():
    # Stochastic samplers too: their step noise comes from each prompt's own seed.
    pipe = ClockedPipe()
    sampler = evaluate._Sampling(pipe, batch_size=4, progress=False)
    for params in (GenerationParams(steps=3, sampler="ddpm"), GenerationParams(steps=3, sampler="ddim", eta=1.0)):
        first = sampler.generate(["a red circle", "a blue square"], [0, 1], params)
        drawn = len(pipe.calls)
        again = sampler.generate(["a blue square", "a red circle", "a red circle"], [1, 0, 2], params)
        assert [n for n, _ in pipe.calls[drawn:] if _.steps == 3] == [1]  # only the new (prompt, seed)
        assert torch.equal(again[0], first[1]) and torch.equal(again[1], first[0])


def test_evaluate_task_reads_the_champion_from_the_registry(shapes_dataset, checkpoint, tmp_path, monkeypatch):
    import tasks.register

    real = TextToImage.load(checkpoint)
    monkeypatch.setattr(evaluate.TextToImage, "load", classmethod(lambda cls, d, device="cpu": OraclePipe(real)))
    asked = []
    monkeypatch.setattr(tasks.register, "champion_metrics", lambda name: asked.append(name) or {"attr_accuracy": 1.0})
    config = EvalConfig(**{**TINY, "steps_table": False})
    train = _train_result(tmp_path, checkpoint)
    report = evaluate.evaluate_task.fn(train, shapes_dataset, config, model_name="t2i-shapes", mlflow_experiment=None)
    assert asked == ["t2i-shapes"] and report.passed and "no worse than the champion" in report.reason
    report = evaluate.evaluate_task.fn(train, shapes_dataset, config, champion_metrics={"attr_accuracy": 1.5},
                                       model_name="t2i-shapes", mlflow_experiment=None)
    assert asked == ["t2i-shapes"] and not report.passed


def test_other_data_is_gated_on_fd_clip(checkpoint, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a photo of thing number {i}")
    dataset = ingest_dataset(folder, "photos", IngestConfig(workers=1, resolution=RES, val_fraction=0.5), progress=False)
    assert shapes_source(dataset) is None
    train = _train_result(tmp_path, checkpoint)
    with pytest.raises(ValueError, match="threshold"):
        evaluate_model(train, dataset, EvalConfig(**TINY), progress=False, mlflow_experiment=None)
    config = EvalConfig(**{**TINY, "steps_table_runs": [("ddim", 2)]}, threshold=1e6)
    report = evaluate_model(train, dataset, config, progress=False)  # MLflow on: a new run in experiment t2i
    assert report.primary_metric == "fd_clip" and report.passed and "uncalibrated" in report.reason
    assert not any(k.startswith(("attr_", "heldout_", "acc_")) for k in report.metrics)
    assert "clip_score_ddim_2" in report.metrics
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=get_settings().mlflow_tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("t2i").experiment_id])
    assert len(runs) == 1 and runs[0].data.metrics["fd_clip"] == pytest.approx(report.metrics["fd_clip"])


def test_eval_key_follows_the_sampling_precision_not_the_device():
    train = TrainResult(run_dir="/r", checkpoint="/r/model", step=1)
    dataset = DatasetVersion(name="d", version="v", root="/d", counts={"train": 1}, resolution=16, manifest="/d/m")
    key = {name: eval_key(train, dataset, EvalConfig(device="cpu", precision=name)) for name in ("auto", "fp32", "bf16")}
    assert key["auto"] == key["fp32"] != key["bf16"]  # auto is fp32 on a CPU
    assert eval_key(train, dataset, EvalConfig(device="cuda:1", precision="bf16")) == key["bf16"]
