"""DPM-Solver++(2M): second-order multistep solver of the diffusion ODE in data prediction
(Lu et al. 2022b, "DPM-Solver++", Algorithm 2). Deterministic; 15-25 steps are typical.

Matches diffusers' `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero")`: first order on the
first step (no history yet) and on the last step (to sigma = 0), second order in between.

At a zero-terminal-SNR first step (abar = 0, lambda = -inf) the update is taken in its exact
limit (x = sigma_t x_T + alpha_t x0_hat); diffusers instead clips abar_{T-1} to 2**-24.
"""

from __future__ import annotations

import math

import torch

from models.samplers.ddpm import TIMESTEP_SPACINGS, trailing_timesteps
from models.schedule import NoiseSchedule


def dpm_solver_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str) -> list[int]:
    """Descending timesteps as diffusers' DPMSolverMultistepScheduler defines them.

    Unlike DDIM's, "linspace" and "leading" take N+1 points and drop the last (t = 0):
    linspace: round(linspace(0, T-1, N+1))[::-1][:-1];  leading: [k, 2k, ..., N k] reversed, k = T // (N+1)
    trailing: round(T - i T/N) - 1, as for DDIM.
    """
    T, N = num_train_timesteps, num_inference_steps
    if isinstance(N, bool) or not isinstance(N, int) or not 1 <= N < T:
        raise ValueError(
            f"num_inference_steps must be an integer in [1, {T - 1}] (below num_train_timesteps), got {N!r}"
        )
    if spacing == "linspace":
        step = (T - 1) / N
        points = [i * step for i in range(1, N)] + [T - 1]  # np.linspace(0, T-1, N+1)[1:], same float ops
        return [round(p) for p in reversed(points)]  # round half to even, as np.round
    if spacing == "leading":
        return [i * (T // (N + 1)) for i in range(N, 0, -1)]
    if spacing == "trailing":
        return trailing_timesteps(T, N)
    raise ValueError(f"unknown timestep_spacing {spacing!r}; choose one of {list(TIMESTEP_SPACINGS)}")


class DPMSolverPP2MSampler:
    """Stateful: `step` must be called for `self.timesteps` in order (a call at the first timestep restarts)."""

    def __init__(self, schedule: NoiseSchedule, num_inference_steps: int, timestep_spacing: str = "trailing"):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a models.schedule.NoiseSchedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.num_inference_steps = num_inference_steps
        timesteps = dpm_solver_timesteps(schedule.num_train_timesteps, num_inference_steps, timestep_spacing)
        self.timesteps = torch.tensor(timesteps, dtype=torch.long)  # (N,) descending
        self._index = {t: i for i, t in enumerate(timesteps)}

        # alpha_i, sigma_i, lambda_i at each timestep, plus the end point abar = 1 (sigma = 0, lambda = +inf)
        abar = torch.cat([schedule.alphas_cumprod.double()[self.timesteps], torch.ones(1, dtype=torch.float64)])
        self._alpha = abar.sqrt().tolist()
        self._sigma = (1 - abar).sqrt().tolist()
        self._lambda = (0.5 * (abar.log() - torch.log1p(-abar))).tolist()  # lambda = log(alpha / sigma), half log-SNR
        self._x0_prev: torch.Tensor | None = None  # x0_hat of the previous step, the multistep history
        self._last_index = -1

    def step(
        self, model_output: torch.Tensor, t: int, x_t: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """x at the next timestep of `self.timesteps` (x_0 after the last). `generator` is unused (deterministic)."""
        t = int(t)
        if t not in self._index:
            raise ValueError(f"t={t} is not one of this sampler's timesteps; iterate over sampler.timesteps")
        i = self._index[t]
        if i > 0 and self._last_index != i - 1:
            raise ValueError(f"DPM-Solver++(2M) is multistep: call step for sampler.timesteps in order (got t={t})")

        x0, _ = self.schedule.predict_x0_and_eps(model_output, x_t, t)  # data prediction
        alpha_t, sigma_t, sigma_s = self._alpha[i + 1], self._sigma[i + 1], self._sigma[i]
        h = self._lambda[i + 1] - self._lambda[i]
        phi = -math.expm1(-h)  # 1 - e^{-h}

        # first-order DPM-Solver++ (= DDIM, eta 0), Lu et al. 2022b:
        # x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) x0_s
        x_prev = (sigma_t / sigma_s) * x_t + (alpha_t * phi) * x0
        second_order = 0 < i < len(self.timesteps) - 1
        if second_order:
            # D1 = (x0_s - x0_{s-1}) / r, r = h_{i-1} / h_i  (Lu et al. 2022b, Algorithm 2)
            # h / h_prev = 0 when the previous step came from zero SNR (h_prev = inf): first order, exactly
            h_prev = self._lambda[i] - self._lambda[i - 1]
            x_prev = x_prev + (0.5 * alpha_t * phi * (h / h_prev)) * (x0 - self._x0_prev)

        self._x0_prev, self._last_index = x0, i
        return x_prev
