"""Sampling speed of a preset's model: images/s of each sampler of the evaluate stage's steps table.

The rows (`evaluate.steps_table_runs`) run one after another in this process on the same
prompts and seeds (`--prompts` of them, the preset's grid prompts in turn), with the batch size,
guidance and precision of the evaluate stage's steps table, each timed on its own run after an
untimed warm-up of each batch size, as the stage times them. Speed does not depend on the weights, so the UNet is the preset's
architecture at random init and the text encoder the preset's (a random-init one needs
`--set embed.encoder.allow_random_init=true`): no data, no training. Prints one JSON line: each
row's images/s and its speedup over the first row (DDPM-1000 in the presets), and the
issue #6 target for DDIM-50 (>= 15x DDPM-1000; its accuracy gap comes from
`benchmarks/quality.py`, which trains).

    python benchmarks/sample.py --preset gpu-32px --set embed.encoder.allow_random_init=true   # on a GPU: bf16

Imports torch, open_clip and the project's `models` and `tasks` (no prefect, no mlflow).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.quality import DDIM_MIN_SPEEDUP, _at_least, _device_name  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpu-32px", help="name in configs/ or a YAML path (default: gpu-32px)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="preset override, repeatable (e.g. evaluate.steps_table_runs='[[ddim,50],[ddim,20]]')")
    p.add_argument("--prompts", type=_at_least(1), default=None,
                   help="prompts per row (default: the preset's evaluate.steps_table_prompts)")
    p.add_argument("--seed", type=int, default=0, help="random init of the UNet (default: 0)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from models.pipeline import GenerationParams, TextToImage, fast_cuda_backends
    from models.schedule import NoiseSchedule, ScheduleConfig
    from models.unet import UNet
    from tasks.embed import build_encoder
    from tasks.evaluate import SAMPLER_SHORT, _device, _precision, _Sampling
    from tasks.presets import load_preset
    from tasks.train import unet_config_for

    preset = load_preset(args.preset, args.overrides)
    config, train = preset.evaluate, preset.train
    device = _device(config.device)
    precision = _precision(config.precision, device)
    if device.startswith("cuda"):
        fast_cuda_backends()  # as the evaluate stage samples
    encoder = build_encoder(preset.embed, device)
    torch.manual_seed(args.seed)
    unet = UNet(unet_config_for(train, encoder.width, encoder.pooled_dim, f"the text encoder {encoder.identity_id}"))
    resolution = train.resolution or preset.ingest.resolution  # the dataset's, as training takes it
    pipe = TextToImage(unet.to(device), NoiseSchedule(ScheduleConfig.from_dict(train.schedule)), encoder, resolution)

    n = args.prompts or config.steps_table_prompts
    prompts = [config.prompts[i % len(config.prompts)] for i in range(n)]
    sampling = _Sampling(pipe, config.batch_size, progress=not args.no_progress)
    measured: list[tuple[str, int, str, float]] = []  # (sampler, steps, tag, images/s unrounded)
    begin = time.perf_counter()
    for name, steps in config.steps_table_runs:
        params = GenerationParams(steps=steps, guidance_scale=config.guidance_scale, sampler=name, precision=precision)
        _, rate = sampling.timed(prompts, list(range(n)), params)
        measured.append((name, steps, f"{SAMPLER_SHORT[name]}_{steps}", rate))
        print(f"# {measured[-1][2]}: {rate:.2f} images/s", file=sys.stderr, flush=True)
    first = measured[0][3]
    rows = [
        {"sampler": name, "steps": steps, "tag": tag, "images_per_s": round(rate, 4), "speedup_over_first": round(rate / first, 2)}
        for name, steps, tag, rate in measured
    ]
    rates = {tag: rate for _, _, tag, rate in measured}

    result: dict[str, Any] = {
        "benchmark": "sample",
        "device": _device_name(),
        "torch": torch.__version__,
        "preset": preset.name,
        "overrides": args.overrides,
        "resolution": resolution,
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "precision": precision,
        "guidance_scale": config.guidance_scale,
        "prompts": n,
        "batch_size": config.batch_size,
        "rows": rows,
        "seconds": round(time.perf_counter() - begin, 1),
    }
    if "ddim_50" in rates and "ddpm_1000" in rates:
        speedup = rates["ddim_50"] / rates["ddpm_1000"]
        result["target"] = {
            "ddim50_vs_ddpm1000": {"target": f">= {DDIM_MIN_SPEEDUP}x", "speedup": round(speedup, 1), "met": speedup >= DDIM_MIN_SPEEDUP}
        }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
