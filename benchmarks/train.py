"""Training throughput: the project's UNet against diffusers' `UNet2DConditionModel`, same run.

Both models get the same widths, depths, attention levels, head size, cross-attention width,
batch, caption length and mask, optimizer (AdamW, fused on CUDA), precision and memory
format; each trains `--steps` timed steps of random data after `--warmup` untimed ones.
Prints one JSON line: images/s, step time, peak memory, model FLOPs per step and model FLOP
utilisation (MFU) for each, and `speedup` = project images/s / diffusers images/s in the same
mode. With `--modes eager,compiled` each model runs both ways in the one process, and
`speedup_compiled_vs_diffusers_eager` compares the project as its GPU presets train it
(`torch.compile` on) with diffusers as it runs out of the box.

    python benchmarks/train.py                                             # CPU, toy size
    python benchmarks/train.py --device cuda --resolution 64 --channels 128,256,384,512 \
        --attention 0,1,1,1 --batch 128 --precision bf16 --modes eager,compiled

Imports only torch, the project's `models` package and diffusers (no prefect, no mlflow).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.unet import UNet, UNetConfig  # noqa: E402

# Dense bf16 / TF32 tensor-core peaks (FLOP/s) from the vendors' data sheets, for MFU.
PEAK_FLOPS = {
    "H100": {"bf16": 989.4e12, "fp32": 494.7e12},  # SXM; TF32 for fp32 matmuls
    "H200": {"bf16": 989.4e12, "fp32": 494.7e12},
    "A100": {"bf16": 312e12, "fp32": 156e12},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--channels", default="32,64,128", help="width per level, comma-separated")
    p.add_argument("--attention", default=None, help="attention per level as 0/1, default: all but the first level")
    p.add_argument("--layers-per-block", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--norm-groups", type=int, default=32)
    p.add_argument("--context-dim", type=int, default=512)
    p.add_argument("--context-len", type=int, default=77)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3, 10 with --compile)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="same as --modes compiled")
    p.add_argument("--modes", default=None, help="eager, compiled or both comma-separated (default: eager)")
    p.add_argument("--channels-last", type=int, choices=[0, 1], default=None, help="default: on for CUDA")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s of the device in TFLOP/s, for MFU")
    p.add_argument("--only", choices=["project", "diffusers"], default=None)
    return p.parse_args(argv)


def unet_config(args: argparse.Namespace) -> UNetConfig:
    channels = tuple(int(c) for c in args.channels.split(","))
    attention = (
        tuple(bool(int(a)) for a in args.attention.split(","))
        if args.attention
        else tuple(i > 0 for i in range(len(channels)))
    )
    return UNetConfig(
        channels=channels,
        attention_levels=attention,
        layers_per_block=args.layers_per_block,
        head_dim=args.head_dim,
        norm_groups=args.norm_groups,
        context_dim=args.context_dim,
    )


def build_project(cfg: UNetConfig) -> torch.nn.Module:
    return UNet(cfg)


def build_diffusers(cfg: UNetConfig, resolution: int) -> torch.nn.Module:
    """UNet2DConditionModel with the same architecture choices as `cfg`: widths, ResNet blocks per
    level, cross-attention levels (self-attn + cross-attn + GEGLU per transformer), heads of size
    head_dim, linear projections, FiLM (scale_shift) time conditioning, 4 * ch0 time embedding."""
    from diffusers import UNet2DConditionModel

    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels))
    return UNet2DConditionModel(
        sample_size=resolution,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=cfg.channels,
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_groups,
        cross_attention_dim=cfg.context_dim,
        transformer_layers_per_block=cfg.transformer_depth,
        # diffusers' UNet2DConditionModel reads `attention_head_dim` as the number of heads per level
        attention_head_dim=tuple(max(1, w // cfg.head_dim) for w in cfg.channels),
        use_linear_projection=True,
        resnet_time_scale_shift="scale_shift",
        time_embedding_dim=cfg.time_dim,
    )


class _DiffusersAdapter(torch.nn.Module):
    """Same call signature as the project's UNet: (x, t, context, mask) -> prediction."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, t, context, context_mask):
        return self.model(x, t, encoder_hidden_states=context, encoder_attention_mask=context_mask, return_dict=False)[0]


def make_batch(args, cfg: UNetConfig, device: torch.device, generator: torch.Generator):
    B, R, L = args.batch, args.resolution, args.context_len
    x = torch.randn((B, cfg.in_channels, R, R), generator=generator).to(device)
    target = torch.randn((B, cfg.out_channels, R, R), generator=generator).to(device)
    t = torch.randint(0, 1000, (B,), generator=generator).to(device)
    context = torch.randn((B, L, cfg.context_dim), generator=generator).to(device)
    lengths = torch.randint(2, L + 1, (B,), generator=generator)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).to(device)  # (B, L) like real captions
    return x, t, context, mask, target


def bench_model(name: str, model: torch.nn.Module, args, cfg: UNetConfig, device: torch.device, compiled: bool) -> dict:
    amp = torch.bfloat16 if args.precision == "bf16" else None
    channels_last = args.channels_last
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = sum(p.numel() for p in model.parameters())
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda or None, foreach=None if cuda else True)
    step_model = torch.compile(model) if compiled else model
    x, t, context, mask, target = make_batch(args, cfg, device, torch.Generator().manual_seed(0))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = step_model(x, t, context, mask)
        loss = F.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    warmup = args.warmup if args.warmup is not None else (10 if compiled else 3)
    for _ in range(warmup):
        step()
    flops = count_flops(model, x, t, context, mask, target, amp, device)
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(device)
    elapsed = time.perf_counter() - start
    if not math.isfinite(float(loss)):
        raise RuntimeError(f"{name}: loss is not finite")
    step_s = elapsed / args.steps
    result = {
        "images_per_s": round(args.batch / step_s, 2),
        "step_ms": round(step_s * 1000, 3),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if cuda else None,
        "params_m": round(params / 1e6, 3),
        "tflop_per_step": round(flops / 1e12, 4) if flops else None,
        "achieved_tflops": round(flops / step_s / 1e12, 2) if flops else None,
    }
    peak = peak_flops(args, device)
    result["mfu"] = round(flops / step_s / peak, 4) if flops and peak else None
    return result


def count_flops(model, x, t, context, mask, target, amp, device) -> float | None:
    """Matmul/conv/attention FLOPs of one forward + backward (torch.utils.flop_counter), eager."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                out = model(x, t, context, mask)
            F.mse_loss(out.float(), target).backward()
        model.zero_grad(set_to_none=True)
        return float(counter.get_total_flops())
    except Exception:  # a counting failure must not lose the timing
        return None


def peak_flops(args, device: torch.device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_FLOPS.items():
        if key in name:
            return peaks[args.precision]
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    args.channels_last = bool(args.channels_last) if args.channels_last is not None else device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    cfg = unet_config(args)
    if args.resolution % cfg.downsample_factor:
        raise SystemExit(f"--resolution {args.resolution} must be divisible by {cfg.downsample_factor}")

    modes = [m.strip() for m in (args.modes or ("compiled" if args.compile else "eager")).split(",")]
    if not modes or any(m not in ("eager", "compiled") for m in modes):
        raise SystemExit(f"--modes takes eager and/or compiled, got {args.modes!r}")
    results: dict[str, dict] = {}
    builders = {
        "project": lambda: build_project(cfg),
        "diffusers": lambda: _DiffusersAdapter(build_diffusers(cfg, args.resolution)),
    }
    for mode in modes:
        for name, build in builders.items():
            if args.only and name != args.only:
                continue
            torch.manual_seed(0)
            key = name if len(modes) == 1 else f"{name}_{mode}"
            results[key] = bench_model(name, build(), args, cfg, device, compiled=mode == "compiled")
            print(f"# {key}: {results[key]['images_per_s']} images/s", file=sys.stderr, flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if mode == "compiled":
                torch._dynamo.reset()

    out = {
        "benchmark": "train",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "config": {
            "resolution": args.resolution,
            "channels": list(cfg.channels),
            "attention_levels": list(cfg.attention_levels),
            "layers_per_block": cfg.layers_per_block,
            "head_dim": cfg.head_dim,
            "context": [args.context_len, cfg.context_dim],
            "batch": args.batch,
            "precision": args.precision,
            "modes": modes,
            "channels_last": args.channels_last,
            "steps": args.steps,
        },
        **results,
    }
    def ratio(a: str, b: str) -> float | None:
        if a in results and b in results:
            return round(results[a]["images_per_s"] / results[b]["images_per_s"], 3)
        return None

    if len(modes) == 1:
        out["speedup"] = ratio("project", "diffusers")
    else:
        for mode in modes:
            out[f"speedup_{mode}"] = ratio(f"project_{mode}", f"diffusers_{mode}")
        out["speedup_compiled_vs_diffusers_eager"] = ratio("project_compiled", "diffusers_eager")
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
