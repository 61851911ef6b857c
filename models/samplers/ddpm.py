"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), plus the timestep spacings and
noise draw that the DDIM sampler shares.

Matches diffusers' `DDPMScheduler` with variance_type="fixed_small", clip_sample=False (our default
too) and the same timestep_spacing (default here "trailing", diffusers' "leading"; with all T
steps they coincide). diffusers adds sigma ~ 1e-10 noise on a last step at t > 0; we add none.
"""

from __future__ import annotations

import math

import torch

from models.schedule import NoiseSchedule

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def spaced_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str) -> list[int]:
    """Descending timesteps as diffusers' DDPMScheduler / DDIMScheduler define them (Lin et al. 2023, Table 2).

    leading:  [0, k, 2k, ...] reversed, k = T // N            (t = T-1 is never visited)
    trailing: round(T - i T/N) - 1 for i = 0..N-1             (always starts at T-1; needed for zero terminal SNR)
    linspace: round(linspace(0, T-1, N)) reversed
    """
    T, N = num_train_timesteps, num_inference_steps
    if isinstance(N, bool) or not isinstance(N, int) or not 1 <= N <= T:
        raise ValueError(f"num_inference_steps must be an integer in [1, {T}] (num_train_timesteps), got {N!r}")
    if spacing == "leading":
        return [i * (T // N) for i in reversed(range(N))]
    if spacing == "trailing":
        return trailing_timesteps(T, N)
    if spacing == "linspace":
        if N == 1:
            return [0]
        step = (T - 1) / (N - 1)
        points = [i * step for i in range(N - 1)] + [T - 1]  # np.linspace(0, T-1, N), same float ops
        return [round(p) for p in reversed(points)]  # round half to even, as np.round
    raise ValueError(f"unknown timestep_spacing {spacing!r}; choose one of {list(TIMESTEP_SPACINGS)}")


def trailing_timesteps(num_train_timesteps: int, num_inference_steps: int) -> list[int]:
    """round(np.arange(T, 0, -T/N)) - 1 with numpy's float64 operations, so ties round as in diffusers.

    For some N (T=1000: N=61, 103, 121, ...) numpy's arange yields one more point that rounds to
    t = -1, and diffusers then visits "timestep -1" (alphas_cumprod[-1], the noisiest step); it is dropped here.
    """
    T, N = num_train_timesteps, num_inference_steps
    step = -(T / N)
    length = math.ceil(-T / step)
    first = float(T)
    delta = (first + step) - first  # numpy fills arange as start + i * (second - start)
    points = [first, first + step] + [first + i * delta for i in range(2, length)]
    return [round(p) - 1 for p in points[:N]]


def draw_noise(
    shape, generator: torch.Generator | list[torch.Generator] | None, device, dtype: torch.dtype
) -> torch.Tensor:
    """N(0, I) drawn on the generator's device (the CPU for a CPU generator) then moved, as diffusers'
    `randn_tensor` does: the same seed gives the same numbers whatever device the sample lives on.
    A list of generators, one per sample (as `randn_tensor` takes): sample i's noise comes from
    generator i alone, so it does not depend on the rest of the batch."""
    if isinstance(generator, list | tuple):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; give one per sample")
        noise = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.cat(noise).to(device)  # (B, ...): one copy to the device, not one per sample
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)


class DDPMSampler:
    """x_{t-1} ~ N(mu~_t(x_t, x0_hat), beta~_t I), Ho et al. 2020 eqs. 6-7 ("fixed_small" variance).

    With `num_inference_steps` < T it jumps t -> prev_t along `spaced_timesteps`, using the effective
    alpha_t = abar_t / abar_prev of that jump (as diffusers does). No noise is added on the last step.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_inference_steps: int | None = None,
        timestep_spacing: str = "trailing",
        clip_sample: bool = False,
    ):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a models.schedule.NoiseSchedule, got {type(schedule).__name__}")
        T = schedule.num_train_timesteps
        self.schedule = schedule
        self.num_inference_steps = T if num_inference_steps is None else num_inference_steps
        self.clip_sample = clip_sample  # clamp x0_hat to [-1, 1] as the original DDPM code did
        timesteps = spaced_timesteps(T, self.num_inference_steps, timestep_spacing)
        self.timesteps = torch.tensor(timesteps, dtype=torch.long)  # (N,) descending
        self._prev_timestep = dict(zip(timesteps, timesteps[1:] + [-1]))

    def step(
        self,
        model_output: torch.Tensor,
        t: int,
        x_t: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """x at the previous timestep. model_output, x_t: (B, C, H, W); generator: one, or one per sample."""
        t = int(t)
        if t not in self._prev_timestep:
            raise ValueError(f"t={t} is not one of this sampler's timesteps; iterate over sampler.timesteps")
        prev_t = self._prev_timestep[t]
        alphas_cumprod = self.schedule.alphas_cumprod
        abar_t = float(alphas_cumprod[t])
        abar_prev = float(alphas_cumprod[prev_t]) if prev_t >= 0 else 1.0
        alpha_t = abar_t / abar_prev  # one-step alpha of the jump t -> prev_t
        beta_t = 1 - alpha_t

        x0, _ = self.schedule.predict_x0_and_eps(model_output, x_t, t)
        if self.clip_sample:
            x0 = x0.clamp(-1.0, 1.0)

        # posterior mean mu~_t(x_t, x0), Ho et al. 2020 eq. 7
        x0_coeff = math.sqrt(abar_prev) * beta_t / (1 - abar_t)
        xt_coeff = math.sqrt(alpha_t) * (1 - abar_prev) / (1 - abar_t)
        mean = x0_coeff * x0 + xt_coeff * x_t
        if prev_t < 0:
            return mean  # x_0: no noise on the last step
        variance = (1 - abar_prev) / (1 - abar_t) * beta_t  # beta~_t, Ho et al. 2020 eq. 7
        noise = draw_noise(x_t.shape, generator, x_t.device, x_t.dtype)
        return mean + math.sqrt(variance) * noise
