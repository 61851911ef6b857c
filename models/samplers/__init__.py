"""Samplers for the reverse diffusion process and the loop that drives them.

    sampler = make_sampler("dpmpp_2m", schedule, num_inference_steps=20)
    x0 = sample(model_fn, sampler, (4, 3, 32, 32), generator=torch.Generator().manual_seed(0))

`model_fn(x_t (B, C, H, W), t (B,) long) -> (B, C, H, W)` predicts what the schedule's
prediction_type says (eps or v); wrap a text-conditioned UNet with `guidance.guided_model_fn`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from models.samplers.ddim import DDIMSampler
from models.samplers.ddpm import DDPMSampler, draw_noise
from models.samplers.dpm_solver import DPMSolverPP2MSampler
from models.schedule import NoiseSchedule

SAMPLERS = {"ddpm": DDPMSampler, "ddim": DDIMSampler, "dpmpp_2m": DPMSolverPP2MSampler}

__all__ = ["SAMPLERS", "DDIMSampler", "DDPMSampler", "DPMSolverPP2MSampler", "make_sampler", "sample"]


def make_sampler(name: str, schedule: NoiseSchedule, num_inference_steps: int | None, **kw):
    """SAMPLERS[name](schedule, num_inference_steps, **kw); num_inference_steps=None is "all T" for ddpm only."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    if num_inference_steps is None and name != "ddpm":
        raise ValueError(
            f"sampler {name!r} needs num_inference_steps (e.g. 20-50); only 'ddpm' defaults to all T steps"
        )
    return SAMPLERS[name](schedule, num_inference_steps, **kw)


@torch.no_grad()
def sample(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sampler,
    shape: tuple[int, ...],
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    x_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the reverse process (under no_grad) from x_T ~ N(0, I); return x_0 (B, C, H, W), not clamped.

    x_T is drawn with `generator` on its device (the CPU for a CPU generator) and then moved, so a
    seed gives the same image on any device; pass `x_T` to start from given noise instead.
    A list of generators, one per sample, makes each sample's noise (x_T and a stochastic
    sampler's per-step noise) independent of the rest of the batch.
    """
    shape = tuple(shape)
    if x_T is None:
        x = draw_noise(shape, generator, device, dtype)  # (B, C, H, W)
    elif tuple(x_T.shape) != shape:
        raise ValueError(f"x_T has shape {tuple(x_T.shape)} but shape={shape}")
    else:
        x = x_T.to(device=device, dtype=dtype)
    timesteps = sampler.timesteps.tolist()
    for i, t in enumerate(timesteps):
        t_batch = torch.full((shape[0],), t, dtype=torch.long, device=device)  # (B,)
        x = sampler.step(model_fn(x, t_batch), t, x, generator)
        if progress:
            end = "\n" if i + 1 == len(timesteps) else ""
            print(f"\rsampling: step {i + 1}/{len(timesteps)}", end=end, file=sys.stderr)
    return x
