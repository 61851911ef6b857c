"""DDIM sampling (Song et al. 2021): few steps, deterministic at eta = 0, DDPM-like at eta = 1.

Matches diffusers' `DDIMScheduler` with set_alpha_to_one=True (the last step lands on abar = 1, i.e.
returns x0_hat), clip_sample=False, use_clipped_model_output=False. One deliberate difference:
each step goes to the *next timestep in `self.timesteps`*, while diffusers' DDIM always steps to
t - T // N. The two agree for "leading" spacing and for "trailing" when N divides T; for "linspace"
(and uneven "trailing") diffusers lands on a timestep it never evaluates the model at.
"""

from __future__ import annotations

import math

import torch

from models.samplers.ddpm import draw_noise, spaced_timesteps
from models.schedule import NoiseSchedule


class DDIMSampler:
    """x_{t-1} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_t^2) eps_hat + sigma_t z (Song et al. eq. 12)."""

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_inference_steps: int,
        eta: float = 0.0,
        timestep_spacing: str = "trailing",
        clip_sample: bool = False,
    ):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a models.schedule.NoiseSchedule, got {type(schedule).__name__}")
        if isinstance(eta, bool) or not isinstance(eta, int | float) or not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be a number in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise), got {eta!r}")
        self.schedule = schedule
        self.num_inference_steps = num_inference_steps
        self.eta = float(eta)
        self.clip_sample = clip_sample  # clamp x0_hat to [-1, 1]; eps_hat is kept as predicted
        timesteps = spaced_timesteps(schedule.num_train_timesteps, num_inference_steps, timestep_spacing)
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
        abar_prev = float(alphas_cumprod[prev_t]) if prev_t >= 0 else 1.0  # set_alpha_to_one=True

        x0, eps = self.schedule.predict_x0_and_eps(model_output, x_t, t)
        if self.clip_sample:
            x0 = x0.clamp(-1.0, 1.0)

        # sigma_t(eta), Song et al. eq. 16
        sigma = self.eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
        # max(., 0): at eta = 1 the difference is >= 0 exactly but can round to -1e-17
        direction = math.sqrt(max(1 - abar_prev - sigma**2, 0.0))
        x_prev = math.sqrt(abar_prev) * x0 + direction * eps  # Song et al. eq. 12
        if sigma > 0:
            x_prev = x_prev + sigma * draw_noise(x_t.shape, generator, x_t.device, x_t.dtype)
        return x_prev
