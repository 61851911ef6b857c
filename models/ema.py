"""Exponential moving average of a model's weights, for evaluation and release.

`EMA` is a `torch.optim.swa_utils.AveragedModel` (same state dict: `module.*` and
`n_averaged`) whose update is one fused `lerp` over all tensors and never reads a
device value on the host, so it can run inside a training step on a GPU without a
sync. (`AveragedModel.update_parameters` branches on `n_averaged` and copies it
between host and device on every call.)

    ema = EMA(unet, decay=0.9999)
    ...; optimizer.step(); ema.update_parameters(unet)
    ema.module  # the averaged UNet
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class EMA(AveragedModel):
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay!r} (0.999 averages over ~1000 steps)")
        # multi_avg_fn is what AveragedModel itself would apply; kept so the object stays a faithful
        # AveragedModel, while update_parameters below does the same math without host syncs.
        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.decay = float(decay)
        device = next(itertools.chain(model.parameters(), model.buffers())).device
        self.n_averaged = self.n_averaged.to(device)  # on the model's device: `+= 1` then needs no copy
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """ema <- decay * ema + (1 - decay) * weights, for every parameter and buffer.

        The average starts from the weights the EMA was built from (a copy of the model at
        step 0) rather than from the first update as AveragedModel's `n_averaged == 0` branch does.
        """
        averaged = list(itertools.chain(self.module.parameters(), self.module.buffers()))
        current = [t.detach() for t in itertools.chain(model.parameters(), model.buffers())]
        if len(averaged) != len(current):
            raise ValueError("EMA.update_parameters got a model with a different set of tensors than it averages")
        floats = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1.0 - self.decay)
        for a, c in zip(averaged, current):
            if not a.is_floating_point():
                a.copy_(c)
        self.n_averaged += 1
