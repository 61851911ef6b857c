"""Samplers against diffusers' schedulers (the oracle), the sampling loop, and classifier-free guidance.

Each oracle test feeds the same deterministic fake model to our sampler and to a diffusers
scheduler configured equivalently, and compares the whole trajectory step by step.
"""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from models.samplers import SAMPLERS, DDIMSampler, DDPMSampler, DPMSolverPP2MSampler, make_sampler, sample
from models.samplers.ddpm import spaced_timesteps
from models.samplers.dpm_solver import dpm_solver_timesteps
from models.samplers.guidance import guided_model_fn
from models.schedule import NoiseSchedule, ScheduleConfig

# diffusers' DPM-Solver turns our torch alphas_cumprod into numpy with a numpy-2 deprecation notice
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SHAPE = (2, 3, 8, 8)
DIFFUSERS_NAME = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


def make_config(prediction_type="epsilon", beta_schedule="linear", zero_snr=False, T=1000) -> ScheduleConfig:
    return ScheduleConfig(
        num_train_timesteps=T,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        rescale_zero_terminal_snr=zero_snr,
    )


def schedule_kwargs(config: ScheduleConfig) -> dict:
    return dict(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=DIFFUSERS_NAME[config.beta_schedule],
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        prediction_type=config.prediction_type,
        rescale_betas_zero_snr=config.rescale_zero_terminal_snr,
    )


def oracle(scheduler_cls, schedule: NoiseSchedule, **kwargs):
    """A diffusers scheduler configured like `schedule`, sharing its alphas_cumprod table.

    Sharing the table isolates the step math: diffusers accumulates its cumprod in float32, which
    moves 1 - abar by ~1e-3 relative near t = 0 (ours is float64, checked against closed forms and
    against diffusers' own table in test_schedule.py)."""
    scheduler = scheduler_cls(**schedule_kwargs(schedule.config), **kwargs)
    scheduler.alphas_cumprod = schedule.alphas_cumprod.double()
    return scheduler


def fake_model(config: ScheduleConfig):
    """A deterministic stand-in for a trained UNet: it predicts x0_hat = x0_star + 0.3 softsign(x_t) plus a
    per-t wobble and returns the matching eps or v for x_t. It depends on x (so diverging trajectories,
    or different seeds, show) and stays bounded (so trajectories stay O(1)). abar in float64 from
    diffusers' betas, independent of models/."""
    betas = DDPMScheduler(**schedule_kwargs(config)).betas.double()  # built independently of models/
    abar = torch.cumprod(1 - betas, 0)
    x0_star = torch.rand(SHAPE, generator=torch.Generator().manual_seed(123)) * 2 - 1

    def model_fn(x: torch.Tensor, t) -> torch.Tensor:
        t = int(t.flatten()[0]) if torch.is_tensor(t) else int(t)
        wobble = torch.randn(SHAPE, generator=torch.Generator().manual_seed(10_000 + t), dtype=torch.float64)
        x = x.double()
        x0_hat = x0_star.double() + 0.3 * x / (1 + x.abs()) + 0.1 * wobble  # softsign: plain arithmetic, fast on CPU
        a = abar[t]
        eps_hat = (x - a.sqrt() * x0_hat) / (1 - a).sqrt()
        out = eps_hat if config.prediction_type == "epsilon" else a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat
        return out.float()

    return model_fn


def x_T() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))


def run_ours(sampler, model_fn, seed=None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    x, trajectory = x_T(), []
    for t in sampler.timesteps:
        x = sampler.step(model_fn(x, t), int(t), x, generator)
        trajectory.append(x)
    return torch.stack(trajectory)  # (N, B, C, H, W)


def run_diffusers(scheduler, model_fn, seed=None, **step_kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    x, trajectory = x_T(), []
    for t in scheduler.timesteps:
        x = scheduler.step(model_fn(x, t), t, x, generator=generator, **step_kwargs).prev_sample
        trajectory.append(x)
    return torch.stack(trajectory)


def assert_trajectories_match(ours, theirs, atol=1e-5):
    assert ours.shape == theirs.shape
    assert torch.isfinite(ours).all()
    worst = (ours - theirs).abs().amax(dim=(1, 2, 3, 4))  # (N,) per step
    assert worst.max() <= atol, f"step {int(worst.argmax())} of {len(worst)} differs by {worst.max():.2e}"


# ---------------------------------------------------------------- DDPM


@pytest.mark.parametrize(
    "prediction_type,T,num_inference_steps,spacing,zero_snr,clip",
    [
        ("epsilon", 1000, None, "trailing", False, False),  # all T steps
        ("v_prediction", 1000, None, "trailing", False, False),
        ("epsilon", 1000, None, "trailing", False, True),
        ("epsilon", 1000, 50, "leading", False, False),
        ("epsilon", 1000, 50, "trailing", False, False),
        ("v_prediction", 1000, 37, "linspace", False, False),
        ("v_prediction", 1000, 50, "trailing", True, False),
    ],
)
def test_ddpm_matches_diffusers(prediction_type, T, num_inference_steps, spacing, zero_snr, clip):
    config = make_config(prediction_type, zero_snr=zero_snr, T=T)
    schedule = NoiseSchedule(config)
    ours = DDPMSampler(schedule, num_inference_steps, timestep_spacing=spacing, clip_sample=clip)
    theirs = oracle(DDPMScheduler, schedule, timestep_spacing=spacing, clip_sample=clip)
    if num_inference_steps is not None:
        theirs.set_timesteps(num_inference_steps)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    model_fn = fake_model(config)
    assert_trajectories_match(run_ours(ours, model_fn, seed=0), run_diffusers(theirs, model_fn, seed=0))


def test_ddpm_needs_its_noise():
    """Guard against an oracle test that passes because no noise is drawn: different seeds differ."""
    config = make_config()
    sampler = DDPMSampler(NoiseSchedule(config), 20)
    model_fn = fake_model(config)
    assert (run_ours(sampler, model_fn, seed=0)[-1] - run_ours(sampler, model_fn, seed=1)[-1]).abs().max() > 1e-2


# ---------------------------------------------------------------- DDIM


@pytest.mark.parametrize(
    "prediction_type,num_inference_steps,spacing,eta,beta_schedule,zero_snr",
    [
        ("epsilon", 10, "trailing", 0.0, "linear", False),
        ("v_prediction", 10, "trailing", 0.0, "linear", False),
        ("epsilon", 50, "leading", 0.0, "scaled_linear", False),
        ("v_prediction", 7, "leading", 0.0, "cosine", False),
        ("epsilon", 25, "trailing", 0.5, "linear", False),
        ("v_prediction", 20, "leading", 1.0, "linear", False),
        ("v_prediction", 20, "trailing", 0.0, "linear", True),
        ("v_prediction", 20, "trailing", 0.7, "scaled_linear", True),
    ],
)
def test_ddim_matches_diffusers(prediction_type, num_inference_steps, spacing, eta, beta_schedule, zero_snr):
    # "leading", and "trailing" with N dividing T: diffusers' t - T // N is the next timestep, as ours
    config = make_config(prediction_type, beta_schedule, zero_snr)
    schedule = NoiseSchedule(config)
    ours = DDIMSampler(schedule, num_inference_steps, eta=eta, timestep_spacing=spacing)
    theirs = oracle(DDIMScheduler, schedule, timestep_spacing=spacing, clip_sample=False, set_alpha_to_one=True)
    theirs.set_timesteps(num_inference_steps)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    model_fn = fake_model(config)
    seed = 0 if eta > 0 else None
    assert_trajectories_match(run_ours(ours, model_fn, seed), run_diffusers(theirs, model_fn, seed, eta=eta))
    if eta > 0:  # the noise matters, so the agreement above is about the same noise
        assert (run_ours(ours, model_fn, 0)[-1] - run_ours(ours, model_fn, 1)[-1]).abs().max() > 1e-2


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("num_inference_steps,spacing", [(10, "linspace"), (7, "trailing"), (30, "linspace")])
def test_ddim_eta0_on_uneven_timesteps_matches_first_order_dpm_solver(prediction_type, num_inference_steps, spacing):
    """Where diffusers' DDIM steps to t - T//N instead of the next timestep, use another oracle:
    first-order DPM-Solver++ on the same timesteps is DDIM with eta = 0 (Lu et al. 2022b)."""
    config = make_config(prediction_type)
    schedule = NoiseSchedule(config)
    ours = DDIMSampler(schedule, num_inference_steps, timestep_spacing=spacing)
    theirs = oracle(DPMSolverMultistepScheduler, schedule, algorithm_type="dpmsolver++", solver_order=1)
    theirs.set_timesteps(timesteps=ours.timesteps.tolist())
    model_fn = fake_model(config)
    assert_trajectories_match(run_ours(ours, model_fn), run_diffusers(theirs, model_fn))


@pytest.mark.parametrize("num_inference_steps,spacing", [(10, "linspace"), (7, "trailing")])
def test_ddim_eta1_on_uneven_timesteps_matches_ddpm(num_inference_steps, spacing):
    """DDIM with eta = 1 is the DDPM posterior (Song et al. 2021, Sec. 4.1); diffusers' DDPM steps to the next timestep."""
    config = make_config("v_prediction")
    schedule = NoiseSchedule(config)
    ours = DDIMSampler(schedule, num_inference_steps, eta=1.0, timestep_spacing=spacing)
    theirs = oracle(DDPMScheduler, schedule, timestep_spacing=spacing, clip_sample=False)
    theirs.set_timesteps(num_inference_steps)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    model_fn = fake_model(config)
    assert_trajectories_match(run_ours(ours, model_fn, seed=3), run_diffusers(theirs, model_fn, seed=3))


# ---------------------------------------------------------------- DPM-Solver++(2M)


@pytest.mark.parametrize(
    "prediction_type,num_inference_steps,spacing,beta_schedule",
    [
        ("epsilon", 20, "trailing", "linear"),
        ("v_prediction", 20, "trailing", "linear"),
        ("epsilon", 25, "linspace", "scaled_linear"),
        ("v_prediction", 10, "leading", "linear"),
        ("epsilon", 15, "leading", "cosine"),
        ("v_prediction", 2, "trailing", "linear"),
        ("epsilon", 1, "linspace", "linear"),
    ],
)
def test_dpm_solver_matches_diffusers(prediction_type, num_inference_steps, spacing, beta_schedule):
    config = make_config(prediction_type, beta_schedule)
    schedule = NoiseSchedule(config)
    ours = DPMSolverPP2MSampler(schedule, num_inference_steps, timestep_spacing=spacing)
    theirs = oracle(
        DPMSolverMultistepScheduler,
        schedule,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
        timestep_spacing=spacing,
    )
    theirs.set_timesteps(num_inference_steps)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    model_fn = fake_model(config)
    assert_trajectories_match(run_ours(ours, model_fn), run_diffusers(theirs, model_fn))


def test_dpm_solver_is_second_order_in_the_middle():
    """A first-order-only solver would also be close to diffusers' at tolerance 1e-2 but not at 1e-5:
    check our 2M really differs from DDIM (its first-order special case) on the same timesteps."""
    config = make_config()
    schedule = NoiseSchedule(config)
    model_fn = fake_model(config)
    dpm = run_ours(DPMSolverPP2MSampler(schedule, 10), model_fn)
    ddim = run_ours(DDIMSampler(schedule, 10), model_fn)
    torch.testing.assert_close(dpm[0], ddim[0], atol=1e-5, rtol=0)  # step 1 is first order
    assert (dpm[1] - ddim[1]).abs().max() > 1e-3


def test_dpm_solver_at_zero_terminal_snr():
    """We take the first step at abar = 0 in its exact limit; diffusers clips abar_{T-1} to 2**-24
    (so alpha = 2**-12), which moves x0_hat by ~2.4e-4 |x_T|: compare at that tolerance, and the
    first step exactly against DDIM (DPM-Solver++ first order = DDIM)."""
    config = make_config("v_prediction", zero_snr=True)
    schedule = NoiseSchedule(config)
    model_fn = fake_model(config)
    ours = run_ours(DPMSolverPP2MSampler(schedule, 20), model_fn)
    # diffusers' own table here: ours has abar_{T-1} = 0, which its solver cannot take
    theirs_scheduler = DPMSolverMultistepScheduler(**schedule_kwargs(config), timestep_spacing="trailing")
    theirs_scheduler.set_timesteps(20)
    assert_trajectories_match(ours, run_diffusers(theirs_scheduler, model_fn), atol=3e-3)
    torch.testing.assert_close(ours[0], run_ours(DDIMSampler(schedule, 20), model_fn)[0], atol=1e-6, rtol=0)


# ---------------------------------------------------------------- the sampling loop


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sample_is_reproducible_by_seed(name):
    config = make_config("v_prediction")
    schedule = NoiseSchedule(config)
    model_fn = fake_model(config)
    calls = []

    def recording_model_fn(x, t):
        calls.append((tuple(x.shape), t.dtype, tuple(t.shape)))
        return model_fn(x, t)

    steps = 100 if name == "ddpm" else 8
    kwargs = {"eta": 0.5} if name == "ddim" else {}

    def run(seed):
        sampler = make_sampler(name, schedule, steps, **kwargs)
        return sample(recording_model_fn, sampler, SHAPE, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2
    assert calls[0] == (SHAPE, torch.long, (SHAPE[0],)) and len(calls) == 3 * steps


def test_sample_draws_x_T_with_the_generator_and_is_the_visible_loop():
    config = make_config()
    schedule = NoiseSchedule(config)
    model_fn = fake_model(config)
    sampler = DDIMSampler(schedule, 5)
    out = sample(model_fn, sampler, SHAPE, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, run_ours(DDIMSampler(schedule, 5), model_fn)[-1], atol=0, rtol=0)
    given = sample(model_fn, DDIMSampler(schedule, 5), SHAPE, x_T=x_T())
    assert torch.equal(given, out)
    with pytest.raises(ValueError, match="x_T has shape"):
        sample(model_fn, sampler, (1, 3, 8, 8), x_T=x_T())


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_one_generator_per_sample_makes_each_sample_independent_of_the_batch(name):
    """diffusers' randn_tensor convention: with a list of generators, sample i's x_T and step noise
    come from generator i alone (the same image whatever else shares the batch)."""
    schedule = NoiseSchedule(make_config())
    kwargs = {"eta": 1.0} if name == "ddim" else {}

    def model_fn(x, t):
        return 0.5 * x + 0.01 * t.float().view(-1, 1, 1, 1)  # per-sample, bounded enough for a few steps

    def run(seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return sample(model_fn, make_sampler(name, schedule, 5, **kwargs), (len(seeds), 3, 8, 8), generator=generators)

    both, alone = run([3, 4]), run([4])
    torch.testing.assert_close(both[1:], alone, atol=1e-6, rtol=0)
    assert (run([5]) - alone).abs().max() > 1e-2  # the seed matters
    with pytest.raises(ValueError, match="one per sample"):
        sample(model_fn, make_sampler(name, schedule, 5, **kwargs), (2, 3, 8, 8), generator=[torch.Generator()])


# ---------------------------------------------------------------- classifier-free guidance


class ToyDenoiser:
    """Output depends on x, t and the masked mean of the context; counts its calls."""

    def __init__(self, channels=3, width=4):
        g = torch.Generator().manual_seed(5)
        self.proj = torch.randn(width, channels, generator=g)
        self.calls = []

    def __call__(self, x, t, context, context_mask):
        self.calls.append(x.shape[0])
        m = context_mask.unsqueeze(-1).float()  # (B, L, 1)
        pooled = (context * m).sum(1) / m.sum(1).clamp(min=1)  # (B, D)
        return x * torch.cos(t.float() / 100).view(-1, 1, 1, 1) + (pooled @ self.proj).view(-1, x.shape[1], 1, 1)


def guidance_inputs(B=2, L=5, D=4):
    g = torch.Generator().manual_seed(9)
    context = torch.randn(B, L, D, generator=g)
    context_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])[:B]
    uncond = torch.randn(1, L, D, generator=g)
    uncond_mask = torch.tensor([[True, True, False, False, False]])
    x = torch.randn(B, 3, 8, 8, generator=g)
    t = torch.tensor([10, 500])[:B]
    return x, t, context, context_mask, uncond, uncond_mask


def test_guidance_scale_one_is_the_conditional_prediction():
    x, t, context, mask, uncond, umask = guidance_inputs()
    denoiser = ToyDenoiser()
    out = guided_model_fn(denoiser, context, mask, uncond, umask, 1.0)(x, t)
    torch.testing.assert_close(out, denoiser(x, t, context, mask), atol=0, rtol=0)
    assert denoiser.calls == [2, 2]  # one conditional call, then our reference call


@pytest.mark.parametrize("scale", [0.0, 3.0, 7.5])
def test_guidance_mixes_as_the_formula_in_one_batched_call(scale):
    x, t, context, mask, uncond, umask = guidance_inputs()
    denoiser = ToyDenoiser()
    out = guided_model_fn(denoiser, context, mask, uncond, umask, scale)(x, t)
    assert denoiser.calls == [4]  # cat[uncond, cond]: one call of batch 2B
    cond = denoiser(x, t, context, mask)
    unc = denoiser(x, t, uncond.expand(2, -1, -1), umask.expand(2, -1))
    assert (cond - unc).abs().max() > 1e-2  # the toy model does see the caption
    torch.testing.assert_close(out, unc + scale * (cond - unc), atol=1e-6, rtol=1e-6)
    # a per-sample (B, L, D) unconditional context gives the same result
    per_sample = guided_model_fn(denoiser, context, mask, uncond.expand(2, -1, -1), umask.expand(2, -1), scale)(x, t)
    torch.testing.assert_close(per_sample, out, atol=0, rtol=0)


def test_guided_sampling_runs_end_to_end():
    x, t, context, mask, uncond, umask = guidance_inputs()
    model_fn = guided_model_fn(ToyDenoiser(), context, mask, uncond, umask, 3.0)
    out = sample(model_fn, make_sampler("dpmpp_2m", NoiseSchedule(make_config("v_prediction")), 5), (2, 3, 8, 8))
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()


# ---------------------------------------------------------------- errors that teach


def test_bad_names_and_values_raise_helpful_errors():
    schedule = NoiseSchedule()
    with pytest.raises(ValueError, match=r"unknown sampler 'euler'; choose one of \['ddim', 'ddpm', 'dpmpp_2m'\]"):
        make_sampler("euler", schedule, 10)
    with pytest.raises(ValueError, match="needs num_inference_steps"):
        make_sampler("ddim", schedule, None)
    with pytest.raises(ValueError, match="unknown timestep_spacing 'even'.*'leading', 'trailing', 'linspace'"):
        DDIMSampler(schedule, 10, timestep_spacing="even")
    with pytest.raises(ValueError, match="unknown timestep_spacing"):
        DPMSolverPP2MSampler(schedule, 10, timestep_spacing="even")
    with pytest.raises(ValueError, match="eta must be a number in"):
        DDIMSampler(schedule, 10, eta=1.5)
    for bad_steps in (0, 1001, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps must be an integer"):
            DDIMSampler(schedule, bad_steps)
    with pytest.raises(ValueError, match="num_inference_steps must be an integer"):
        DPMSolverPP2MSampler(schedule, 1000)
    with pytest.raises(TypeError, match="NoiseSchedule"):
        DDPMSampler(ScheduleConfig())

    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="not one of this sampler's timesteps"):
        DDIMSampler(schedule, 10).step(x, 500, x)
    dpm = DPMSolverPP2MSampler(schedule, 10)
    dpm.step(x, int(dpm.timesteps[0]), x)
    with pytest.raises(ValueError, match="in order"):
        dpm.step(x, int(dpm.timesteps[2]), x)

    _, _, context, mask, uncond, umask = guidance_inputs()
    for scale in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="guidance_scale"):
            guided_model_fn(ToyDenoiser(), context, mask, uncond, umask, scale)
    with pytest.raises(ValueError, match="uncond_context must be"):
        guided_model_fn(ToyDenoiser(), context, mask, uncond[:, :3], umask[:, :3], 2.0)
    with pytest.raises(ValueError, match="batch size"):
        guided_model_fn(ToyDenoiser(), context, mask, uncond, umask, 2.0)(torch.zeros(3, 3, 8, 8), torch.zeros(3).long())


def test_timesteps_are_valid_for_every_step_count():
    T = 1000
    for spacing in ("leading", "trailing", "linspace"):
        for make, max_steps in ((spaced_timesteps, T), (dpm_solver_timesteps, T - 1)):
            for N in range(1, max_steps + 1):
                ts = np.array(make(T, N, spacing))
                assert len(ts) == N and (np.diff(ts) < 0).all() and ts[0] <= T - 1 and ts[-1] >= 0, (make, N, spacing)


class PooledToyDenoiser(ToyDenoiser):
    """ToyDenoiser that also requires a pooled (B, E) embedding, as a UNet with pooled_dim does."""

    def __init__(self, pooled_dim=6):
        super().__init__()
        self.pooled_proj = torch.randn(pooled_dim, 3, generator=torch.Generator().manual_seed(6))

    def __call__(self, x, t, context, context_mask, *, pooled):
        return super().__call__(x, t, context, context_mask) + (pooled @ self.pooled_proj).view(-1, x.shape[1], 1, 1)


def pooled_inputs(B=2, E=6):
    g = torch.Generator().manual_seed(11)
    return torch.randn(B, E, generator=g), torch.randn(1, E, generator=g)


def test_guidance_with_pooled_scale_one_is_the_conditional_prediction():
    x, t, context, mask, uncond, umask = guidance_inputs()
    pooled, uncond_pooled = pooled_inputs()
    denoiser = PooledToyDenoiser()
    out = guided_model_fn(denoiser, context, mask, uncond, umask, 1.0, pooled=pooled, uncond_pooled=uncond_pooled)(x, t)
    torch.testing.assert_close(out, denoiser(x, t, context, mask, pooled=pooled), atol=0, rtol=0)
    assert denoiser.calls == [2, 2]


@pytest.mark.parametrize("scale", [0.0, 4.0])
def test_guidance_with_pooled_pairs_each_half_with_its_pooled_embedding(scale):
    x, t, context, mask, uncond, umask = guidance_inputs()
    pooled, uncond_pooled = pooled_inputs()
    denoiser = PooledToyDenoiser()
    out = guided_model_fn(denoiser, context, mask, uncond, umask, scale, pooled=pooled, uncond_pooled=uncond_pooled)(x, t)
    assert denoiser.calls == [4]  # still one batched call
    cond = denoiser(x, t, context, mask, pooled=pooled)
    unc = denoiser(x, t, uncond.expand(2, -1, -1), umask.expand(2, -1), pooled=uncond_pooled.expand(2, -1))
    torch.testing.assert_close(out, unc + scale * (cond - unc), atol=1e-6, rtol=1e-6)


def test_guidance_pooled_errors_teach():
    _, _, context, mask, uncond, umask = guidance_inputs()
    pooled, uncond_pooled = pooled_inputs()
    with pytest.raises(ValueError, match="both pooled and uncond_pooled"):
        guided_model_fn(PooledToyDenoiser(), context, mask, uncond, umask, 2.0, pooled=pooled)
    with pytest.raises(ValueError, match=r"pooled must be \(2, E\)"):
        guided_model_fn(PooledToyDenoiser(), context, mask, uncond, umask, 2.0, pooled=pooled[:1], uncond_pooled=uncond_pooled)
    with pytest.raises(ValueError, match=r"uncond_pooled must be \(1, 6\) or \(2, 6\)"):
        guided_model_fn(PooledToyDenoiser(), context, mask, uncond, umask, 2.0, pooled=pooled, uncond_pooled=uncond_pooled[:, :5])
