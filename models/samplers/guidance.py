"""Classifier-free guidance (Ho & Salimans 2022): one batched denoiser call per step.

    model_fn = guided_model_fn(unet, cond_tokens, cond_mask, empty_tokens, empty_mask, guidance_scale=3.0)
    x0 = sample(model_fn, sampler, shape)

A UNet with a pooled-embedding input (`UNetConfig.pooled_dim`) also takes the captions' pooled
embeddings: `pooled=cond.pooled, uncond_pooled=empty.pooled`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# denoiser(x, t, context, context_mask), plus `pooled=` when the guidance was given pooled embeddings
Denoiser = Callable[..., torch.Tensor]


def guided_model_fn(
    denoiser: Denoiser,
    context: torch.Tensor,
    context_mask: torch.Tensor,
    uncond_context: torch.Tensor,
    uncond_mask: torch.Tensor,
    guidance_scale: float,
    pooled: torch.Tensor | None = None,
    uncond_pooled: torch.Tensor | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Returns model_fn(x, t) = uncond + s * (cond - uncond) for `sample`.

    denoiser(x (B, C, H, W), t (B,), context (B, L, D), context_mask (B, L) bool, True = real token).
    uncond_context may be (1, L, D) (the empty caption's tokens, broadcast to the batch).
    pooled (B, E) and uncond_pooled (1 or B, E): the pooled caption embeddings, both or neither;
    when given, the denoiser is called with `pooled=` as well (a UNet with `pooled_dim`).
    s = 0 gives the unconditional prediction, s = 1 the conditional one (computed with a single
    conditional call), s > 1 pushes away from the unconditional prediction.
    """
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, int | float) or not (
        math.isfinite(guidance_scale) and guidance_scale >= 0
    ):
        raise ValueError(
            f"guidance_scale must be a finite number >= 0 (1.0 = no guidance, 3-7 is usual), got {guidance_scale!r}"
        )
    if context.dim() != 3 or context_mask.shape != context.shape[:2]:
        raise ValueError(
            f"context must be (B, L, D) with context_mask (B, L); got {tuple(context.shape)} and {tuple(context_mask.shape)}"
        )
    B, L, D = context.shape
    if uncond_context.dim() != 3 or uncond_context.shape[0] not in (1, B) or uncond_context.shape[1:] != (L, D):
        raise ValueError(
            f"uncond_context must be (1, {L}, {D}) or ({B}, {L}, {D}) to match context; got {tuple(uncond_context.shape)} "
            "(encode the empty caption with the same encoder and token length)"
        )
    if uncond_mask.shape != uncond_context.shape[:2]:
        raise ValueError(f"uncond_mask must be {tuple(uncond_context.shape[:2])}, got {tuple(uncond_mask.shape)}")

    if (pooled is None) != (uncond_pooled is None):
        raise ValueError(
            "give both pooled and uncond_pooled (the empty caption's pooled embedding) or neither; "
            f"got pooled={'None' if pooled is None else tuple(pooled.shape)}, "
            f"uncond_pooled={'None' if uncond_pooled is None else tuple(uncond_pooled.shape)}"
        )
    if pooled is not None:
        if pooled.dim() != 2 or pooled.shape[0] != B:
            raise ValueError(f"pooled must be ({B}, E) to match context, got {tuple(pooled.shape)}")
        E = pooled.shape[1]
        if uncond_pooled.dim() != 2 or uncond_pooled.shape[0] not in (1, B) or uncond_pooled.shape[1] != E:
            raise ValueError(f"uncond_pooled must be (1, {E}) or ({B}, {E}) to match pooled, got {tuple(uncond_pooled.shape)}")

    def check_batch(x: torch.Tensor) -> None:
        if x.shape[0] != B:
            raise ValueError(f"x has batch size {x.shape[0]} but the guidance context was built for {B} captions")

    if guidance_scale == 1.0:
        # uncond + 1 * (cond - uncond) == cond: skip the unconditional half
        cond_extra = {} if pooled is None else {"pooled": pooled}

        def conditional_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            check_batch(x)
            return denoiser(x, t, context, context_mask, **cond_extra)

        return conditional_fn

    both_context = torch.cat([uncond_context.expand(B, L, D), context])  # (2B, L, D)
    both_mask = torch.cat([uncond_mask.expand(B, L), context_mask])  # (2B, L)
    extra = {} if pooled is None else {"pooled": torch.cat([uncond_pooled.expand(B, -1), pooled])}  # (2B, E)

    def guided_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        check_batch(x)
        out = denoiser(torch.cat([x, x]), torch.cat([t, t]), both_context, both_mask, **extra)  # (2B, C, H, W)
        uncond, cond = out.chunk(2)  # (B, C, H, W) each
        return uncond + guidance_scale * (cond - uncond)  # Ho & Salimans 2022, eq. 6 with s = 1 + w

    return guided_fn
