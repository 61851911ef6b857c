"""The training stage end to end on toy data: learning, publishing, resume after SIGKILL / SIGTERM /
a crash while checkpointing, bad input, MLflow tracking, and DDP on CPU (gloo).

Toy size: 8 px shapes, a 2-level UNet of width 16/32, a 32-wide random text encoder. Processes
that get killed are real subprocesses running `tasks.train`'s command line.
"""

import json
import logging
import os
import signal
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

from models.checkpoint import load_state, load_weights
from models.pipeline import TextToImage
from tasks.contracts import DatasetVersion, EmbeddingSet
from tasks.data import TrainDataError
from tasks.train import (
    CHECKPOINTS_DIR,
    INTERRUPTED_EXIT_CODE,
    METRICS_FILE,
    NonFiniteLossError,
    TrainConfig,
    TrainingError,
    _latest_checkpoint,
    _retry_unless_deterministic,
    main,
    resolve_unet_config,
    run_key,
    train_model,
)

REPO = Path(__file__).resolve().parents[1]
N = 6  # checkpoint interval of the resume tests; they train 2N steps


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_clip) -> tuple[DatasetVersion, EmbeddingSet]:
    """~45 training images of shapes at 8 px and their embeddings from the tiny random encoder."""
    from tasks.embed import EmbedConfig, embed_dataset
    from tasks.ingest import IngestConfig, ingest_dataset
    from tasks.shapes import ShapesConfig, generate_shapes

    root = tmp_path_factory.mktemp("toy")
    source = generate_shapes(root / "raw", ShapesConfig(n_images=48, resolution=8, seed=0))
    dataset = ingest_dataset(
        source, "shapes", IngestConfig(resolution=8, workers=1, val_fraction=0.1), data_root=root / "data", progress=False
    )
    embeddings = embed_dataset(
        dataset, EmbedConfig(encoder={"model_name": tiny_clip, "allow_random_init": True}), data_root=root / "data",
        progress=False,
    )
    return dataset, embeddings


def tiny(**overrides) -> TrainConfig:
    base = dict(
        unet=dict(channels=[16, 32], attention_levels=[False, True], layers_per_block=1, head_dim=8, norm_groups=8),
        steps=2 * N, batch_size=8, lr=1e-3, warmup_steps=2, ema_decay=0.9, device="cpu",
        log_every=1, checkpoint_every=N, keep_last=2, sample_captions=2, sample_steps=2,
    )
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread, here and in the subprocesses: runs compared bit for bit need the same
    thread count, and a toy UNet only loses time to thread synchronisation."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (by a killed run and by its resume) keeps the last value."""
    out = {}
    for line in (run_dir / METRICS_FILE).read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["loss"]
    return out


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    wa, wb = load_weights(a), load_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


# ---- a run that learns and publishes --------------------------------------------------------


def test_tiny_run_learns_publishes_and_is_idempotent(toy, tmp_path):
    dataset, embeddings = toy
    cfg = tiny(steps=60, batch_size=16, lr=3e-3, warmup_steps=5, checkpoint_every=30, sample_every=30)
    result = train_model(dataset, embeddings, cfg, mlflow_experiment=None, progress=False)

    run_dir = Path(result.run_dir)
    key = run_key(dataset, embeddings, cfg, resolve_unet_config(cfg, embeddings))
    assert run_dir.name == key and run_dir.parent.name == "runs"  # <data_root>/runs/<run key>
    assert result.step == 60 and result.mlflow_run_id is None
    loss = losses(run_dir)
    first, last = sum(loss[s] for s in range(1, 11)) / 10, sum(loss[s] for s in range(51, 61)) / 10
    assert last < 0.7 * first, (first, last)
    assert [p.name for p in (run_dir / CHECKPOINTS_DIR).iterdir()] == ["step-00000030", "step-00000060"]
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == ["step-00000030.png", "step-00000060.png"]

    # the published model: EMA weights, loadable without the project, rebuilds the encoder
    pipe = TextToImage.load(result.checkpoint)
    ema = load_weights(run_dir / CHECKPOINTS_DIR / "step-00000060" / "ema.safetensors")
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, ema[k])
    assert pipe.extra["step"] == 60 and pipe.resolution == 8
    images = pipe(["a red circle"], seed=0, steps=2)
    assert images[0].size == (8, 8)

    from flows.cli import load_train_result  # what `t2i evaluate` and `t2i register RUN_DIR` read

    assert load_train_result(run_dir) == result

    # same inputs again: the finished run comes back at once, nothing is retrained
    lines = (run_dir / METRICS_FILE).read_text()
    assert train_model(dataset, embeddings, cfg, mlflow_experiment=None, progress=False) == result
    assert (run_dir / METRICS_FILE).read_text() == lines


# ---- resume ---------------------------------------------------------------------------------

HELPER = """
import os, sys, time
import torch
torch.set_num_threads(1)
import open_clip
open_clip.add_model_config(os.environ["T2I_TEST_CLIP_DIR"])  # the tiny test encoder, for the final save
import tasks.train as train

slow_after = int(os.environ.get("SLOW_AFTER", "0"))
if slow_after:  # leave the test time to kill us mid-run, after the checkpoint of step `slow_after`
    step_fn = train._Trainer._train_step
    def slow_step(self, step, micro):
        if step >= slow_after:
            time.sleep(0.3)
        return step_fn(self, step, micro)
    train._Trainer._train_step = slow_step
sys.exit(train.main(sys.argv[1:]))
"""


def start_cli(tmp_path: Path, dataset, embeddings, cfg: TrainConfig, run_dir: Path, **env) -> subprocess.Popen:
    (tmp_path / "ds.json").write_text(dataset.model_dump_json())
    (tmp_path / "emb.json").write_text(embeddings.model_dump_json())
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    (tmp_path / "helper.py").write_text(textwrap.dedent(HELPER))
    import open_clip.factory

    clip_dirs = [p for p in open_clip.factory._MODEL_CONFIG_PATHS if (Path(p) / "t2i-test-tiny-clip.json").is_file()]
    cmd = [sys.executable, str(tmp_path / "helper.py"), "--dataset", str(tmp_path / "ds.json"),
           "--embeddings", str(tmp_path / "emb.json"), "--config", str(tmp_path / "cfg.json"),
           "--run-dir", str(run_dir), "--no-mlflow", "--no-progress"]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "T2I_TEST_CLIP_DIR": str(clip_dirs[0]), "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / METRICS_FILE).is_file() and max(losses(run_dir), default=0) >= step:
            return
        if proc.poll() is not None:
            pytest.fail(f"training exited early ({proc.returncode}):\n{proc.stdout.read()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no step {step} within {timeout} s")


@pytest.mark.slow
def test_sigkill_then_restart_equals_uninterrupted_run(toy, tmp_path):
    dataset, embeddings = toy
    cfg = tiny()
    reference = Path(train_model(dataset, embeddings, cfg, run_dir=tmp_path / "reference", mlflow_experiment=None,
                                 progress=False).run_dir)

    run_dir = tmp_path / "killed"
    proc = start_cli(tmp_path, dataset, embeddings, cfg, run_dir, SLOW_AFTER=str(N))
    wait_for_step(run_dir, proc, N + 2)  # past the checkpoint of step N, inside step N + 3
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert _latest_checkpoint(run_dir / CHECKPOINTS_DIR).name == f"step-{N:08d}"
    assert not (run_dir / "model").exists()

    proc = start_cli(tmp_path, dataset, embeddings, cfg, run_dir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "resuming run" in out and f"(step {N})" in out

    # per-step losses after the resume (and those the killed run logged past its checkpoint)
    ref_losses, got = losses(reference), losses(run_dir)
    assert sorted(got) == list(range(1, 2 * N + 1))
    for step in range(N + 1, 2 * N + 1):
        assert got[step] == pytest.approx(ref_losses[step], abs=1e-6), step
    final = f"{CHECKPOINTS_DIR}/step-{2 * N:08d}"
    assert_same_weights(reference / final / "unet.safetensors", run_dir / final / "unet.safetensors", atol=1e-6)
    assert_same_weights(reference / final / "ema.safetensors", run_dir / final / "ema.safetensors", atol=1e-6)
    assert_same_weights(reference / "model" / "unet.safetensors", run_dir / "model" / "unet.safetensors", atol=1e-6)


def test_disk_storage_streams_the_same_samples_as_memory(toy, tmp_path):
    from tasks.data import load_train_data

    dataset, embeddings = toy
    mem = load_train_data(dataset, embeddings)
    disk = load_train_data(dataset, embeddings, storage="disk", cache_dir=tmp_path / "cache")
    assert disk.on_disk and disk.caption_rows is not None and disk.ids == mem.ids
    n, res = len(mem), dataset.resolution
    assert (tmp_path / "cache" / "train-images.u8").stat().st_size == n * 3 * res * res  # images live in the file
    assert (tmp_path / "cache" / "train-tokens.f16").stat().st_size == disk.tokens.numel() * 2
    assert torch.equal(disk.images, mem.images)
    rows = disk.caption_index(torch.arange(n))
    assert torch.equal(disk.tokens[rows], mem.tokens) and torch.equal(disk.mask[rows], mem.mask)
    assert torch.equal(disk.pooled[rows], mem.pooled) and torch.equal(disk.uncond_tokens, mem.uncond_tokens)
    assert disk.tokens.shape[0] == len(set(mem.captions)) + 1  # one row per distinct caption, plus the empty one
    with pytest.raises(ValueError, match="cache_dir"):
        load_train_data(dataset, embeddings, storage="disk")

    # a run on disk-backed data draws the same batches: identical losses and weights
    ref = train_model(dataset, embeddings, tiny(data_storage="memory"), run_dir=tmp_path / "mem", mlflow_experiment=None, progress=False)
    got = train_model(dataset, embeddings, tiny(data_storage="disk"), run_dir=tmp_path / "disk", mlflow_experiment=None, progress=False)
    assert losses(Path(got.run_dir)) == losses(Path(ref.run_dir))
    assert_same_weights(Path(ref.checkpoint) / "unet.safetensors", Path(got.checkpoint) / "unet.safetensors")
    assert not (tmp_path / "disk" / "data-cache").exists()  # the memory-mapped copy is removed at the end


@pytest.mark.slow
def test_sigterm_finishes_the_step_checkpoints_and_exits_nonzero(toy, tmp_path):
    dataset, embeddings = toy
    cfg = tiny(steps=1000, checkpoint_every=500)
    run_dir = tmp_path / "run"
    proc = start_cli(tmp_path, dataset, embeddings, cfg, run_dir, SLOW_AFTER="1")
    wait_for_step(run_dir, proc, 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == INTERRUPTED_EXIT_CODE, out
    assert "SIGTERM" in out and "run the same training again to resume" in out
    last_logged = max(losses(run_dir))
    checkpoint = _latest_checkpoint(run_dir / CHECKPOINTS_DIR)
    assert checkpoint.name == f"step-{last_logged:08d}"  # the step it was in, not a scheduled one
    assert 3 <= last_logged < 500
    assert load_state(checkpoint / "state.pt")["step"] == last_logged


def test_crash_while_checkpointing_keeps_previous_and_resume_is_exact(toy, tmp_path, monkeypatch):
    dataset, embeddings = toy
    cfg = tiny()
    reference = Path(train_model(dataset, embeddings, cfg, run_dir=tmp_path / "reference", mlflow_experiment=None,
                                 progress=False).run_dir)

    import tasks.train as train_module

    real_save_state = train_module.save_state

    def crash_at_final_checkpoint(state, path):
        if state["step"] == 2 * N:
            Path(path).write_bytes(b"\x80half a pickle")
            raise OSError("No space left on device")
        return real_save_state(state, path)

    run_dir = tmp_path / "crashed"
    monkeypatch.setattr(train_module, "save_state", crash_at_final_checkpoint)
    with pytest.raises(OSError, match="No space left"):
        train_model(dataset, embeddings, cfg, run_dir=run_dir, mlflow_experiment=None, progress=False)
    latest = _latest_checkpoint(run_dir / CHECKPOINTS_DIR)
    assert latest.name == f"step-{N:08d}" and load_state(latest / "state.pt")["step"] == N
    assert [p.name for p in (run_dir / CHECKPOINTS_DIR).iterdir()] == [latest.name]  # no partial directory

    monkeypatch.setattr(train_module, "save_state", real_save_state)
    result = train_model(dataset, embeddings, cfg, run_dir=run_dir, mlflow_experiment=None, progress=False)
    assert result.step == 2 * N
    final = f"{CHECKPOINTS_DIR}/step-{2 * N:08d}"
    assert_same_weights(reference / final / "unet.safetensors", run_dir / final / "unet.safetensors")
    assert_same_weights(reference / final / "ema.safetensors", run_dir / final / "ema.safetensors")
    assert losses(run_dir) == pytest.approx(losses(reference), abs=0)


def test_a_run_killed_while_finishing_resumes_with_its_metrics_and_leaves_no_partial_grid(toy, tmp_path, monkeypatch):
    from PIL import Image

    dataset, embeddings = toy
    run_dir = tmp_path / "run"
    real_save = Image.Image.save

    def killed_mid_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half a grid")
        raise OSError("killed while saving the sample grid")

    monkeypatch.setattr(Image.Image, "save", killed_mid_save)
    with pytest.raises(OSError, match="sample grid"):
        train_model(dataset, embeddings, tiny(), run_dir=run_dir, mlflow_experiment=None, progress=False)
    assert _latest_checkpoint(run_dir / CHECKPOINTS_DIR).name == f"step-{2 * N:08d}"  # after the final checkpoint
    assert list((run_dir / "samples").iterdir()) == []  # nothing half-written under a published name

    monkeypatch.setattr(Image.Image, "save", real_save)
    result = train_model(dataset, embeddings, tiny(), run_dir=run_dir, mlflow_experiment=None, progress=False)
    last = json.loads((run_dir / METRICS_FILE).read_text().splitlines()[-1])
    assert result.step == last["step"] == 2 * N
    assert result.metrics == {k: last[k] for k in ("loss", "grad_norm", "lr", "images_per_s")}  # as if never killed
    assert Image.open(run_dir / "samples" / f"step-{2 * N:08d}.png").size == (2 * 8 * 16, 8 * 16)


# ---- bad input --------------------------------------------------------------------------------


def test_bad_inputs_fail_clearly_and_write_nothing(toy, tmp_path):
    from tasks.settings import get_settings

    dataset, embeddings = toy
    runs = get_settings().runs_dir
    empty_root = tmp_path / "empty"
    (empty_root / "train").mkdir(parents=True)
    empty = dataset.model_copy(update={"root": str(empty_root), "counts": {"train": 0, "val": 0, "rejects": 3}})
    cases = [
        (empty, embeddings.model_copy(update={"dataset_version": empty.version}), tiny(), TrainDataError, "no training rows"),
        (dataset, embeddings.model_copy(update={"dataset_version": "0123456789abcdef"}), tiny(), TrainDataError,
         "covers dataset version 0123456789abcdef"),
        (dataset, embeddings, tiny(resolution=16), TrainingError, "ingested at 8 px"),
        (dataset, embeddings, tiny(batch_size=64), TrainingError, f"larger than the {dataset.counts['train']} training images"),
        (dataset, embeddings, tiny(unet={"channels": [16, 32], "norm_groups": 8, "attention_levels": [False, True],
                                         "head_dim": 8, "context_dim": 64}), TrainingError, "token width 32"),
    ]
    for ds, es, cfg, error, message in cases:
        with pytest.raises(error, match=message):
            train_model(ds, es, cfg, mlflow_experiment=None, progress=False)
    assert not runs.exists()


def test_run_dir_of_another_run_is_refused(toy, tmp_path):
    dataset, embeddings = toy
    run_dir = tmp_path / "run"
    train_model(dataset, embeddings, tiny(steps=2, checkpoint_every=1), run_dir=run_dir, mlflow_experiment=None, progress=False)
    before = sorted(str(p) for p in run_dir.rglob("*"))
    with pytest.raises(TrainingError, match="pass another run_dir"):
        train_model(dataset, embeddings, tiny(steps=3, checkpoint_every=1), run_dir=run_dir, mlflow_experiment=None,
                    progress=False)
    assert sorted(str(p) for p in run_dir.rglob("*")) == before


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(toy, tmp_path, monkeypatch):
    import tasks.train as train_module

    dataset, embeddings = toy
    real_loss = train_module.diffusion_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss  # the 5th step's loss

    monkeypatch.setattr(train_module, "diffusion_loss", poisoned)
    run_dir = tmp_path / "run"
    cfg = tiny(steps=10, checkpoint_every=3, log_every=4)
    with pytest.raises(NonFiniteLossError, match="at step 5 .*step-00000003") as info:
        train_model(dataset, embeddings, cfg, run_dir=run_dir, mlflow_experiment=None, progress=False)
    assert info.value.step == 5
    checkpoints = [p.name for p in (run_dir / CHECKPOINTS_DIR).iterdir()]
    assert checkpoints == ["step-00000003"]  # step 6's checkpoint was never written
    weights = load_weights(run_dir / CHECKPOINTS_DIR / "step-00000003" / "unet.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (run_dir / "model").exists()


def test_out_of_gpu_memory_names_the_micro_batch_and_what_to_change_and_is_not_retried(toy, tmp_path, monkeypatch):
    import tasks.train as train_module

    dataset, embeddings = toy
    real_step = train_module._Trainer._train_step

    def runs_out_at_step_4(self, step, micro):
        if step == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return real_step(self, step, micro)

    monkeypatch.setattr(train_module._Trainer, "_train_step", runs_out_at_step_4)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingError) as info:
        train_model(dataset, embeddings, tiny(checkpoint_every=2, grad_accum=2), run_dir=run_dir, mlflow_experiment=None, progress=False)
    message = str(info.value)
    assert "ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)" in message
    assert "micro-batches of 4 images at 8 px (batch_size 8 / grad_accum 2 / 1 process(es))" in message
    assert "raise train.grad_accum to 4 " in message and isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert [p.name for p in (run_dir / CHECKPOINTS_DIR).iterdir()] == ["step-00000002"]  # kept for a resume

    class Failed:
        def result(self):
            raise info.value

    assert train_module._retry_unless_deterministic(None, None, Failed()) is False

    # The advice names a grad_accum TrainConfig takes (it must split batch_size), or none left.
    advice = {}
    for batch_size, grad_accum in ((12, 4), (8, 8)):
        shutil.rmtree(run_dir)
        with pytest.raises(TrainingError) as info:
            train_model(dataset, embeddings, tiny(batch_size=batch_size, grad_accum=grad_accum, checkpoint_every=2),
                        run_dir=run_dir, mlflow_experiment=None, progress=False)  # fmt: skip
        advice[batch_size, grad_accum] = str(info.value)
    assert "raise train.grad_accum to 6 " in advice[12, 4]
    assert "lower train.batch_size (micro-batches are already 1 image)" in advice[8, 8]


# ---- tracking ---------------------------------------------------------------------------------


def test_mlflow_run_has_config_metrics_samples_and_model(toy):
    from mlflow import MlflowClient

    from tasks.settings import get_settings

    dataset, embeddings = toy
    cfg = tiny(steps=4, log_every=2, checkpoint_every=4, sample_every=2)
    result = train_model(dataset, embeddings, cfg, mlflow_experiment="t2i-test", progress=False)
    client = MlflowClient(get_settings().mlflow_tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.steps"] == "4" and params["train.unet.context_dim"] == "32"
    assert params["dataset.version"] == dataset.version and params["encoder.id"] == embeddings.encoder_id
    assert len(params["git_commit"]) in (40, 7) or params["git_commit"] == "unknown"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4]
    assert {"lr", "grad_norm", "images_per_s"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "samples", "config.json"} <= artifacts
    assert "model/model_config.json" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert len(client.list_artifacts(run.info.run_id, "samples")) == 4  # 2 grids, each with its captions


# ---- command line --------------------------------------------------------------------------------


@pytest.fixture
def cli_args(toy, tmp_path, monkeypatch) -> list[str]:
    """`main`'s arguments for the toy inputs, up to --config; `main` runs in this process and
    its logging setup is undone afterwards."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    dataset, embeddings = toy
    (tmp_path / "ds.json").write_text(dataset.model_dump_json())
    (tmp_path / "emb.json").write_text(embeddings.model_dump_json())
    return ["--dataset", str(tmp_path / "ds.json"), "--embeddings", str(tmp_path / "emb.json"),
            "--run-dir", str(tmp_path / "run"), "--no-mlflow", "--no-progress"]  # fmt: skip


def test_cli_reads_a_presets_train_section_and_reports_bad_input_in_one_line(toy, tmp_path, cli_args, capsys):
    dataset, _ = toy
    n_train = dataset.counts["train"]
    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml.safe_dump({"train": tiny(batch_size=64).model_dump(mode="json")}))  # a train section only
    assert main([*cli_args, "--config", str(preset)]) == 1
    err = capsys.readouterr().err
    assert f"error: batch_size 64 is larger than the {n_train} training images" in err  # its values were read

    preset.write_text("train:\n  stpes: 2\n")
    assert main([*cli_args, "--config", str(preset)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "stpes" in err and "Traceback" not in err
    assert main([*cli_args, "--config", str(tmp_path / "missing.yaml")]) == 1
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "run").exists()


def test_a_failed_torchrun_is_retried_unless_a_worker_reports_bad_input(toy, tmp_path, cli_args, monkeypatch):
    import tasks.train as train_module

    dataset, embeddings = toy
    run_dir = tmp_path / "ddp"

    def retried(exc: Exception) -> bool:
        class State:
            def result(self):
                raise exc

        return _retry_unless_deterministic(None, None, State())

    def torchrun(returncode: int):
        """A torchrun that exits with `returncode`; its workers never start."""
        return lambda cmd, env: subprocess.CompletedProcess(cmd, returncode)

    for returncode in (1, -signal.SIGKILL):  # a worker OOM-killed or out of NCCL peers; torchrun itself killed
        monkeypatch.setattr(train_module.subprocess, "run", torchrun(returncode))
        with pytest.raises(TrainingError, match=f"exited with code {returncode}") as info:
            train_model(dataset, embeddings, tiny(nproc=2), run_dir=run_dir, mlflow_experiment=None, progress=False)
        assert retried(info.value)

    def torchrun_with_a_bad_input_worker(cmd, env):
        """The worker runs `main` on the launch's inputs and fails; torchrun exits 1 whatever the worker's code."""
        spec = json.loads(Path(cmd[cmd.index("--spec") + 1]).read_text())
        config = tmp_path / "worker.json"
        config.write_text(json.dumps({**spec["config"], "nproc": 1}))  # one process here, not a process group
        worker = [*cli_args, "--config", str(config), "--error-file", cmd[cmd.index("--error-file") + 1]]
        return subprocess.CompletedProcess(cmd, 1 if main(worker) else 0)

    monkeypatch.setattr(train_module.subprocess, "run", torchrun_with_a_bad_input_worker)
    with pytest.raises(TrainingError, match="batch_size 64 is larger than") as info:
        train_model(dataset, embeddings, tiny(nproc=2, batch_size=64), run_dir=run_dir, mlflow_experiment=None,
                    progress=False)
    assert not retried(info.value)
    assert [p.name for p in run_dir.iterdir()] == []  # the launch's spec and error files are gone


# ---- DDP ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one(toy, tmp_path, monkeypatch):
    dataset, embeddings = toy
    single = train_model(dataset, embeddings, tiny(), run_dir=tmp_path / "single", mlflow_experiment=None, progress=False)

    # torchrun's workers build the final TextToImage, so they must know the tiny test encoder too
    import open_clip.factory

    clip_dir = next(p for p in open_clip.factory._MODEL_CONFIG_PATHS if (Path(p) / "t2i-test-tiny-clip.json").is_file())
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import open_clip\nopen_clip.add_model_config({str(clip_dir)!r})\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(REPO)]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    ddp = train_model(dataset, embeddings, tiny(nproc=2), run_dir=tmp_path / "ddp", mlflow_experiment=None, progress=False)
    assert ddp.step == single.step == 2 * N
    one, two = losses(Path(single.run_dir)), losses(Path(ddp.run_dir))
    assert sorted(two) == sorted(one)
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5), step
    final = f"{CHECKPOINTS_DIR}/step-{2 * N:08d}"
    for name in ("unet.safetensors", "ema.safetensors"):
        assert_same_weights(Path(single.run_dir) / final / name, Path(ddp.run_dir) / final / name, atol=1e-5)
    assert_same_weights(Path(single.checkpoint) / "unet.safetensors", Path(ddp.checkpoint) / "unet.safetensors", atol=1e-5)

    # Two "machines" (one process each) meeting at a c10d rendezvous, as the nodes of a
    # multi-node job do: each runs the same task on shared storage; the world is the same 2.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    nodes = tiny(nproc=1, nnodes=2, rdzv_endpoint=f"127.0.0.1:{port}")
    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(train_model, dataset, embeddings, nodes, run_dir=tmp_path / "nodes", mlflow_experiment=None, progress=False)
            for _ in range(2)
        ]
        results = [f.result(timeout=300) for f in futures]
    assert results[0] == results[1] and results[0].step == 2 * N
    assert losses(Path(results[0].run_dir)) == pytest.approx(one, abs=1e-5)
    assert_same_weights(Path(single.checkpoint) / "unet.safetensors", Path(results[0].checkpoint) / "unet.safetensors", atol=1e-5)


def test_torchrun_topology(monkeypatch):
    from tasks.train import torchrun_command

    monkeypatch.delenv("PET_NNODES", raising=False)
    monkeypatch.delenv("PET_RDZV_ENDPOINT", raising=False)
    cmd = torchrun_command(tiny(nproc=2), "key1")
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1", "--standalone"]
    cmd = torchrun_command(tiny(nnodes=2, rdzv_endpoint="10.0.0.5:29400"), "key1")
    assert cmd[-3:] == ["--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.5:29400", "--rdzv-id=key1"]
    with pytest.raises(TrainingError, match="rdzv_endpoint"):
        torchrun_command(tiny(nnodes=2), "key1")
    # the Kubernetes job template's variables, torchrun's own names
    monkeypatch.setenv("PET_NNODES", "3")
    monkeypatch.setenv("PET_RDZV_ENDPOINT", "head:29400")
    assert torchrun_command(tiny(batch_size=6), "k")[4:] == ["--nnodes=3", "--rdzv-backend=c10d", "--rdzv-endpoint=head:29400", "--rdzv-id=k"]
    assert torchrun_command(tiny(nnodes=1), "k")[-1] == "--standalone"  # the config wins over the environment
    monkeypatch.setenv("PET_NNODES", "1:4")
    with pytest.raises(TrainingError, match="elastic"):
        torchrun_command(tiny(), "k")
    with pytest.raises(ValueError, match="nproc \\* nnodes"):
        tiny(batch_size=6, nproc=2, nnodes=2)


# ---- global text conditioning ---------------------------------------------------------------


def test_pooled_conditioning_feeds_each_samples_pooled_embedding_and_drops_it_with_the_caption(toy, tmp_path, monkeypatch):
    import tasks.train as train_module
    from tasks.embed import load_embeddings, read_manifest

    dataset, embeddings = toy
    pooled_dim = read_manifest(embeddings.path)["pooled_dim"]
    assert resolve_unet_config(tiny(), embeddings).pooled_dim == pooled_dim  # on by default
    assert resolve_unet_config(tiny(pooled_conditioning=False), embeddings).pooled_dim is None
    with pytest.raises(TrainingError, match="pooled_conditioning is false"):
        resolve_unet_config(tiny(pooled_conditioning=False, unet={**tiny().unet, "pooled_dim": pooled_dim}), embeddings)
    with pytest.raises(TrainingError, match="remove pooled_dim"):
        resolve_unet_config(tiny(unet={**tiny().unet, "pooled_dim": pooled_dim + 1}), embeddings)

    emb = load_embeddings(embeddings, "train")
    pooled_of = {tuple(p.tolist()) for p in emb.pooled.float()}
    uncond_pooled = emb.uncond_pooled.float()[0]
    real_loss = train_module.diffusion_loss
    seen = []

    def spy(model, schedule, x0, eps, t, context, context_mask, *args, **kwargs):
        seen.append((context_mask.clone(), args[-1].clone()))
        return real_loss(model, schedule, x0, eps, t, context, context_mask, *args, **kwargs)

    monkeypatch.setattr(train_module, "diffusion_loss", spy)
    cfg = tiny(steps=6, caption_dropout=0.5, checkpoint_every=6)
    result = train_model(dataset, embeddings, cfg, run_dir=tmp_path / "run", mlflow_experiment=None, progress=False)
    n_dropped = 0
    for mask, pooled in seen:
        assert pooled.shape == (cfg.batch_size, pooled_dim)
        dropped = (mask == emb.uncond_mask).all(dim=1)  # the empty caption's mask: this sample was dropped
        for row, was_dropped in zip(pooled, dropped):
            if was_dropped:
                torch.testing.assert_close(row, uncond_pooled)
                n_dropped += 1
            else:
                assert tuple(row.tolist()) in pooled_of
    assert 0 < n_dropped < len(seen) * cfg.batch_size

    pipe = TextToImage.load(result.checkpoint)  # the published model takes the pooled embedding too
    assert pipe.unet.config.pooled_dim == pooled_dim
    assert pipe(["a red circle"], seed=0, steps=2)[0].size == (8, 8)
