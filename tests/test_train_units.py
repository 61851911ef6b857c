"""Unit tests of the training stage's parts: config, sampler, flips, LR schedule, EMA, checkpoints."""

import math
import os

import pytest
import torch
from pydantic import ValidationError

from models.checkpoint import load_state, load_weights
from models.ema import EMA
from tasks.data import EpochSampler, flippable_mask
from tasks.train import TrainConfig, _checkpoints, _latest_checkpoint, _warmup_cosine, write_checkpoint


def test_config_rejects_unknown_and_bad_keys():
    with pytest.raises(ValidationError, match="stpes"):
        TrainConfig(stpes=10)
    with pytest.raises(ValidationError, match="chanels"):
        TrainConfig(unet={"chanels": [32, 64]})
    with pytest.raises(ValidationError, match="beta_schedule"):
        TrainConfig(schedule={"beta_schedule": "sigmoid"})
    with pytest.raises(ValidationError, match="divisible by grad_accum"):
        TrainConfig(batch_size=10, grad_accum=4)
    with pytest.raises(ValidationError, match="warmup_steps"):
        TrainConfig(steps=10, warmup_steps=20)
    with pytest.raises(ValidationError, match="downsample factor"):
        TrainConfig(resolution=10, unet={"channels": [32, 64, 128], "norm_groups": 8})
    with pytest.raises(ValidationError, match="set min_snr_gamma"):
        TrainConfig(min_snr_gamma=None, loss_weight_floor=0.5)
    with pytest.raises(ValidationError, match="loss_weight_floor"):
        TrainConfig(loss_weight_floor=1.5)
    # a preset's YAML lists arrive as lists and are fine
    cfg = TrainConfig(unet={"channels": [32, 64], "attention_levels": [False, True], "norm_groups": 8}, betas=[0.9, 0.99])
    assert cfg.betas == (0.9, 0.99)


def test_epoch_sampler_positions_are_a_pure_function():
    s = EpochSampler(10, seed=3)
    stream = s.indices(0, 35)  # three and a half epochs
    for e in range(3):
        assert sorted(stream[e * 10 : (e + 1) * 10].tolist()) == list(range(10))  # each epoch: every row once
    assert not torch.equal(stream[:10], stream[10:20])  # a new order per epoch
    fresh = EpochSampler(10, seed=3)  # what a resumed run builds
    assert torch.equal(fresh.indices(17, 9), stream[17:26])  # any slice, across an epoch boundary
    assert not torch.equal(EpochSampler(10, seed=4).indices(0, 10), stream[:10])


def test_flip_only_captions_without_sides():
    caps = ["a red circle in the top left", "a blue square", "green triangle, right", "Left-most star", "a bright light"]
    assert flippable_mask(caps, "auto").tolist() == [False, True, False, False, True]
    assert flippable_mask(caps, "always").all() and not flippable_mask(caps, "never").any()


def test_warmup_then_cosine():
    f = _warmup_cosine(warmup=10, total=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_ema_matches_averaged_model_math():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = [p.detach().clone() for p in model.parameters()]
    expected = [p.clone() for p in start]
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update_parameters(model)
        expected = [0.9 * e + 0.1 * p.detach() for e, p in zip(expected, model.parameters())]
    for e, a in zip(expected, ema.module.parameters()):
        torch.testing.assert_close(a, e)
    assert int(ema.n_averaged) == 3
    assert set(ema.state_dict()) == {"n_averaged", "module.weight", "module.bias"}  # AveragedModel's layout


def _state(step):
    return {"step": step, "rng": torch.get_rng_state(), "samples_seen": step * 4}


def test_checkpoints_rotate_and_crash_keeps_previous(tmp_path, monkeypatch):
    directory = tmp_path / "checkpoints"
    w = {"w": torch.ones(3)}
    for step in (10, 20, 30):
        write_checkpoint(directory, step, w, w, _state(step), keep_last=2)
    assert [p.name for p in _checkpoints(directory)] == ["step-00000020", "step-00000030"]

    # a crash in the middle of writing step 40 (after the weights, inside the state file)
    import tasks.train as train_module

    def exploding_save_state(state, path):
        path.write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(train_module, "save_state", exploding_save_state)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(directory, 40, w, w, _state(40), keep_last=2)
    latest = _latest_checkpoint(directory)
    assert latest.name == "step-00000030"
    assert load_state(latest / "state.pt")["step"] == 30
    assert torch.equal(load_weights(latest / "unet.safetensors")["w"], w["w"])
    assert sorted(os.listdir(directory)) == ["step-00000020", "step-00000030"]  # no partial directory left


def test_lr_schedule_is_a_real_torch_scheduler():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(2, 10, 0.0))
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))


def test_run_key_changes_with_a_loss_weight_floor_only_when_one_is_set():
    from types import SimpleNamespace

    from models.unet import UNetConfig
    from tasks.train import run_key

    dataset = SimpleNamespace(version="v1")
    embeddings = SimpleNamespace(encoder_id="enc", dataset_version="v1")
    key = lambda cfg: run_key(dataset, embeddings, cfg, UNetConfig())  # noqa: E731
    base = key(TrainConfig())
    assert key(TrainConfig(loss_weight_floor=0.0)) == base  # keys of runs from before the field: resumable
    assert key(TrainConfig(loss_weight_floor=0.5)) != base


def test_sample_steps_beyond_the_schedules_time_steps_are_refused_at_config_time():
    from models.samplers import make_sampler
    from models.schedule import NoiseSchedule, ScheduleConfig

    # the grids sample with DDIM, which takes 1..T steps (the oracle: the sampler itself)
    short = NoiseSchedule(ScheduleConfig(num_train_timesteps=20))
    assert len(make_sampler("ddim", short, 20).timesteps) == 20
    with pytest.raises(ValueError):
        make_sampler("ddim", short, 21)
    assert TrainConfig(schedule={"num_train_timesteps": 20}, sample_steps=20).sample_steps == 20
    with pytest.raises(ValidationError, match="sample_steps 21 .*schedule.num_train_timesteps 20"):
        TrainConfig(schedule={"num_train_timesteps": 20}, sample_steps=21)
    with pytest.raises(ValidationError, match="sample_steps 25 .*schedule.num_train_timesteps 20"):
        TrainConfig(schedule={"num_train_timesteps": 20})  # the default 25 steps
