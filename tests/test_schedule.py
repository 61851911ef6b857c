"""models.schedule against closed forms (numpy float64) and diffusers' DDPMScheduler."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from models.schedule import NoiseSchedule, ScheduleConfig

DIFFUSERS_NAME = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
SCHEDULES = [
    ("linear", 0.0001, 0.02),
    ("scaled_linear", 0.00085, 0.012),  # Stable Diffusion's values
    ("cosine", 0.0001, 0.02),
]


def closed_form_alphas_cumprod(beta_schedule: str, T: int, beta_start: float, beta_end: float) -> np.ndarray:
    """cumprod(1 - beta) in float64, written from the papers rather than from models/schedule.py."""
    if beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, T)
    elif beta_schedule == "scaled_linear":
        betas = np.linspace(np.sqrt(beta_start), np.sqrt(beta_end), T) ** 2
    else:  # Nichol & Dhariwal 2021 eq. 17: abar(t) = f(t) / f(0), beta clipped at 0.999
        def f(t):
            return np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2

        i = np.arange(T)
        betas = np.minimum(1 - f(i + 1) / f(i), 0.999)
    return np.cumprod(1 - betas)


def diffusers_schedule(config: ScheduleConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=DIFFUSERS_NAME[config.beta_schedule],
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        rescale_betas_zero_snr=config.rescale_zero_terminal_snr,
        prediction_type=config.prediction_type,
    )


@pytest.mark.parametrize("T", [1000, 64])
@pytest.mark.parametrize("beta_schedule,beta_start,beta_end", SCHEDULES)
def test_alphas_cumprod_matches_closed_form_and_diffusers(beta_schedule, beta_start, beta_end, T):
    config = ScheduleConfig(num_train_timesteps=T, beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end)
    schedule = NoiseSchedule(config)
    expected = closed_form_alphas_cumprod(beta_schedule, T, beta_start, beta_end)

    for name in ("betas", "alphas", "alphas_cumprod"):
        assert getattr(schedule, name).shape == (T,) and getattr(schedule, name).dtype == torch.float32
    # float64 computation cast once to float32: only float32 rounding remains
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), expected, rtol=2e-7, atol=0)
    np.testing.assert_allclose(schedule.alphas.numpy().cumprod(dtype=np.float64), expected, rtol=1e-5)
    # diffusers accumulates its cumprod in float32
    ours, theirs = schedule.alphas_cumprod.numpy(), diffusers_schedule(config).alphas_cumprod.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=5e-5, atol=1e-6)


def test_cosine_is_the_papers_closed_form_before_the_clip():
    T = 1000
    abar = NoiseSchedule(ScheduleConfig(beta_schedule="cosine")).alphas_cumprod.double().numpy()
    t = np.arange(1, T + 1)  # alphas_cumprod[i] is abar after i + 1 steps
    f = np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2 / np.cos(0.008 / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(abar[:-1], f[:-1], rtol=1e-5)  # the last beta is clipped at 0.999
    assert abar[-1] == pytest.approx(abar[-2] * 0.001, rel=1e-5)


@pytest.mark.parametrize("beta_schedule,beta_start,beta_end", SCHEDULES)
def test_zero_terminal_snr(beta_schedule, beta_start, beta_end):
    config = ScheduleConfig(
        beta_schedule=beta_schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        rescale_zero_terminal_snr=True,
        prediction_type="v_prediction",
    )
    schedule = NoiseSchedule(config)
    plain = closed_form_alphas_cumprod(beta_schedule, 1000, beta_start, beta_end)
    abar = schedule.alphas_cumprod.double().numpy()
    assert abar[-1] == 0.0
    assert abar[0] == pytest.approx(plain[0], rel=1e-6)  # Lin et al. Algorithm 1 keeps sqrt(abar_0)
    # Algorithm 1 is an affine map of sqrt(abar): sqrt(abar') = (sqrt(abar) - sqrt(abar_T)) * c
    s, s0, sT = np.sqrt(plain), np.sqrt(plain[0]), np.sqrt(plain[-1])
    np.testing.assert_allclose(np.sqrt(abar), (s - sT) * s0 / (s0 - sT), rtol=1e-5, atol=1e-7)
    theirs = diffusers_schedule(config).alphas_cumprod.numpy()
    assert theirs[-1] == 0.0
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), theirs, rtol=5e-5, atol=1e-6)
    assert torch.isfinite(schedule.snr(torch.arange(1000))).all() and schedule.snr(torch.tensor([999])).item() == 0


def test_add_noise_statistics():
    schedule = NoiseSchedule()
    abar = closed_form_alphas_cumprod("linear", 1000, 0.0001, 0.02)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, 3, 4, 4, generator=g) * 2 - 1
    n = 20_000
    for t in (0, 250, 999):
        eps = torch.randn(n, 3, 4, 4, generator=g)
        x_t = schedule.add_noise(x0.expand(n, -1, -1, -1), eps, torch.full((n,), t))
        mean, var = x_t.double().mean(0), x_t.double().var(0)
        std_err = math.sqrt((1 - abar[t]) / n)
        assert (mean - math.sqrt(abar[t]) * x0[0]).abs().max() < 5 * std_err
        assert (var / (1 - abar[t]) - 1).abs().max() < 0.06  # sd of a variance estimate: sqrt(2 / n) = 0.01
    assert schedule.q_sample == schedule.add_noise


def test_add_noise_and_velocity_match_diffusers_per_sample_t():
    config = ScheduleConfig(prediction_type="v_prediction")
    schedule, theirs = NoiseSchedule(config), diffusers_schedule(config)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    torch.testing.assert_close(schedule.add_noise(x0, eps, t), theirs.add_noise(x0, eps, t), atol=1e-5, rtol=1e-5)
    v = schedule.training_target(x0, eps, t)
    torch.testing.assert_close(v, theirs.get_velocity(x0, eps, t), atol=1e-5, rtol=1e-5)
    eps_schedule = NoiseSchedule(ScheduleConfig(prediction_type="epsilon"))
    assert eps_schedule.training_target(x0, eps, t) is eps


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_and_eps_recovered_from_the_target(prediction_type):
    schedule = NoiseSchedule(ScheduleConfig(prediction_type=prediction_type))
    abar = torch.from_numpy(closed_form_alphas_cumprod("linear", 1000, 0.0001, 0.02))
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g).double(), torch.randn(4, 3, 8, 8, generator=g).double()
    t = torch.tensor([0, 100, 600, 999])
    x_t = schedule.add_noise(x0, eps, t)
    target = schedule.training_target(x0, eps, t)
    if prediction_type == "v_prediction":  # the v identity, with abar from the closed form
        a = abar[t].view(-1, 1, 1, 1)
        # (x_t and v were built with float32 abar, hence 1e-5)
        torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * target, x0, atol=1e-5, rtol=0)
    x0_hat, eps_hat = schedule.predict_x0_and_eps(target, x_t, t)
    assert x0_hat.dtype == torch.float64  # tensors indexed by t take x's dtype
    torch.testing.assert_close(x0_hat, x0, atol=1e-6, rtol=0)
    torch.testing.assert_close(eps_hat, eps, atol=1e-6, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights(prediction_type, gamma):
    schedule = NoiseSchedule(ScheduleConfig(prediction_type=prediction_type))
    t = torch.arange(1000)
    abar = closed_form_alphas_cumprod("linear", 1000, 0.0001, 0.02)
    snr = abar / (1 - abar)
    np.testing.assert_allclose(schedule.snr(t).numpy(), snr, rtol=1e-6)
    # Hang et al. 2023: min(SNR, gamma)/SNR for an eps loss, min(SNR, gamma)/(SNR + 1) for a v loss
    expected = np.minimum(snr, gamma) / (snr if prediction_type == "epsilon" else snr + 1)
    weight = schedule.loss_weight(t, gamma)
    assert weight.shape == (1000,) and weight.dtype == torch.float32
    np.testing.assert_allclose(weight.numpy(), expected, rtol=1e-6)
    assert torch.equal(schedule.loss_weight(t[:7], None), torch.ones(7))


def test_min_snr_weights_at_zero_terminal_snr():
    schedule = NoiseSchedule(ScheduleConfig(rescale_zero_terminal_snr=True, prediction_type="v_prediction"))
    w = schedule.loss_weight(torch.arange(1000), 5.0)
    assert torch.isfinite(w).all()
    assert w[-1] == 0.0  # min(0, 5) / (0 + 1)
    snr = schedule.snr(torch.arange(999)).double()
    torch.testing.assert_close(w[:-1].double(), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1), rtol=2e-5, atol=0)
    assert (w < 0.1).float().mean() > 0.45  # the noisiest half of the steps all but untrained: why there is a floor

    floored = schedule.loss_weight(torch.arange(1000), 5.0, floor=0.1)
    snr_all = schedule.snr(torch.arange(1000))
    noisy = snr_all < 5.0
    torch.testing.assert_close(floored[noisy], torch.clamp(w[noisy], min=0.1))  # max(Min-SNR weight, floor)
    assert torch.equal(floored[~noisy], w[~noisy])  # the least noisy steps keep Min-SNR's small weights
    assert floored[-1] == 0.1 and floored[0] == w[0] < 0.01 and torch.equal(floored[w >= 0.1], w[w >= 0.1])
    eps = NoiseSchedule(ScheduleConfig(prediction_type="epsilon"))
    assert torch.equal(eps.loss_weight(torch.arange(1000), 5.0, floor=0.5), eps.loss_weight(torch.arange(1000), 5.0))
    assert torch.equal(schedule.loss_weight(torch.arange(5), None, floor=0.1), torch.ones(5))  # plain MSE: no floor
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="floor"):
            schedule.loss_weight(torch.arange(3), 5.0, floor=bad)


def test_tensors_follow_x_and_broadcast():
    schedule = NoiseSchedule()
    x = torch.zeros(3, 2, 4, 4, dtype=torch.float64)
    out = schedule.add_noise(x, torch.ones_like(x), torch.tensor([0, 5, 999]))
    assert out.dtype == torch.float64 and out.shape == x.shape
    assert out[2, 0, 0, 0] == pytest.approx(math.sqrt(1 - schedule.alphas_cumprod[999].item()), rel=1e-6)
    with pytest.raises(ValueError, match="batch size"):
        schedule.add_noise(x, x, torch.tensor([1, 2]))


def test_config_round_trip_and_errors():
    config = ScheduleConfig(beta_schedule="cosine", prediction_type="v_prediction", rescale_zero_terminal_snr=True)
    assert ScheduleConfig.from_dict(config.to_dict()) == config
    assert NoiseSchedule().config == ScheduleConfig()

    with pytest.raises(ValueError, match=r"unknown ScheduleConfig keys \['beta_shedule'\]"):
        ScheduleConfig.from_dict({"beta_shedule": "linear"})
    bad = [
        ({"beta_schedule": "quadratic"}, "quadratic.*'linear', 'scaled_linear', 'cosine'"),
        ({"beta_schedule": "squaredcos_cap_v2"}, "here it is 'cosine'"),
        ({"prediction_type": "sample"}, "'sample'.*'epsilon', 'v_prediction'"),
        ({"num_train_timesteps": 0}, "num_train_timesteps"),
        ({"num_train_timesteps": 1000.0}, "num_train_timesteps"),
        ({"beta_start": "1e-4"}, "YAML"),
        ({"beta_start": 0.02, "beta_end": 0.0001}, "beta_start < beta_end"),
        ({"beta_end": 1.5}, "beta_end < 1"),
        ({"rescale_zero_terminal_snr": True}, "v_prediction"),
        ({"rescale_zero_terminal_snr": "yes"}, "true or false"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            ScheduleConfig(**kwargs)
    with pytest.raises(ValueError, match="min_snr_gamma"):
        NoiseSchedule().loss_weight(torch.arange(3), 0.0)
