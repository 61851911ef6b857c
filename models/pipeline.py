"""`TextToImage`: prompts in, PIL images out.

Text encoder + UNet + noise schedule + sampler, with classifier-free guidance.
`save(dir)` writes safetensors weights and one JSON config that rebuilds
everything; `load(dir)` reads them back and needs nothing else of the project.

    pipe = TextToImage.load("data/runs/<key>/model")
    images = pipe(["a red circle in the top left"], seed=0, steps=50, guidance_scale=3.0)
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models import __version__
from models.checkpoint import load_weights, save_weights, write_json_atomic
from models.samplers import SAMPLERS, make_sampler, sample
from models.samplers.guidance import guided_model_fn
from models.schedule import NoiseSchedule, ScheduleConfig
from models.text_encoder import TextEncoder, TextEncoderConfig
from models.unet import UNet, UNetConfig

CONFIG_FILE = "model_config.json"
UNET_FILE = "unet.safetensors"
TEXT_ENCODER_FILE = "text_encoder.safetensors"
FORMAT_VERSION = 1
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class GenerationParams:
    """What a caller may vary per request; validated where it enters."""

    steps: int = 50
    guidance_scale: float = 3.0
    sampler: str = "ddim"
    eta: float = 0.0
    # bf16: the UNet runs under bf16 autocast (its output is cast back, so the guidance and the
    # sampler's update stay float32); about twice as fast on a GPU's tensor cores.
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {sorted(SAMPLERS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not (isinstance(self.steps, int) and 1 <= self.steps <= 1000):
            raise ValueError(f"steps must be an integer in [1, 1000], got {self.steps!r}")
        if not (np.isfinite(self.guidance_scale) and 0.0 <= self.guidance_scale <= 50.0):
            raise ValueError(f"guidance_scale must be a finite number in [0, 50], got {self.guidance_scale!r}")
        if not (0.0 <= self.eta <= 1.0):
            raise ValueError(f"eta must be in [0, 1], got {self.eta!r}")
        if self.eta != 0 and self.sampler != "ddim":
            # ddpm always adds its posterior noise and dpmpp_2m none: an eta there would be ignored
            raise ValueError(f"eta applies to the ddim sampler only, got eta={self.eta!r} with sampler {self.sampler!r}")


class TextToImage:
    def __init__(
        self,
        unet: UNet,
        schedule: NoiseSchedule,
        text_encoder: TextEncoder,
        resolution: int,
        extra: dict | None = None,
    ) -> None:
        if resolution % unet.config.downsample_factor:
            raise ValueError(
                f"resolution {resolution} is not divisible by the UNet's downsample factor "
                f"{unet.config.downsample_factor}"
            )
        if text_encoder.width != unet.config.context_dim:
            raise ValueError(
                f"text encoder width {text_encoder.width} != UNet context_dim {unet.config.context_dim}"
            )
        if unet.config.pooled_dim is not None and text_encoder.pooled_dim != unet.config.pooled_dim:
            raise ValueError(
                f"text encoder pooled width {text_encoder.pooled_dim} != UNet pooled_dim {unet.config.pooled_dim}"
            )
        self.unet = unet.eval()
        self.schedule = schedule
        self.text_encoder = text_encoder
        self.resolution = resolution
        self.extra = dict(extra or {})  # provenance: step, dataset version, run id ...

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device: str | torch.device) -> TextToImage:
        self.unet.to(device)
        self.text_encoder.to(device)
        return self

    def sampler(self, params: GenerationParams):
        """The sampler `generate` runs for `params` on this model's schedule; a ValueError says
        why when the two do not fit (e.g. more DDIM steps than the schedule has)."""
        kwargs = {"eta": params.eta} if params.sampler == "ddim" else {}
        steps = None if params.sampler == "ddpm" and params.steps >= self.schedule.num_train_timesteps else params.steps
        return make_sampler(params.sampler, self.schedule, steps, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        seeds: int | list[int] = 0,
        params: GenerationParams | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W). Prompt i's noise (its start and, with a stochastic
        sampler, every step's) comes from seed i alone, so an image does not depend on what
        else is in the batch."""
        params = params or GenerationParams()
        if isinstance(prompts, str) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings")
        seed_list = _seed_list(seeds, len(prompts))
        device = self.device
        cond = self.text_encoder.encode(list(prompts))
        uncond = self.text_encoder.encode([""])
        pooled = {}
        if self.unet.config.pooled_dim is not None:  # global text conditioning: the UNet takes the pooled embedding too
            pooled = {"pooled": cond.pooled.to(device), "uncond_pooled": uncond.pooled.to(device)}
        denoiser = guided_model_fn(
            self.unet if params.precision == "fp32" else _in_bf16(self.unet, device),
            cond.tokens.to(device),
            cond.mask.to(device),
            uncond.tokens.to(device),
            uncond.mask.to(device),
            params.guidance_scale,
            **pooled,
        )
        sampler = self.sampler(params)
        # One CPU generator per prompt, from its seed: prompt i's x_T and a stochastic sampler's step
        # noise (drawn after x_T, never a replay of it) come from generator i alone, so an image does
        # not depend on the batch, and a seed means the same image on any device.
        generators = [torch.Generator().manual_seed(s) for s in seed_list]
        shape = (len(generators), 3, self.resolution, self.resolution)
        x0 = sample(denoiser, sampler, shape, generator=generators, device=device, progress=progress)
        return x0.clamp(-1.0, 1.0)

    def __call__(
        self,
        prompts: list[str],
        seed: int | list[int] = 0,
        steps: int = 50,
        guidance_scale: float = 3.0,
        sampler: str = "ddim",
        eta: float = 0.0,
        progress: bool = False,
    ) -> list[Image.Image]:
        params = GenerationParams(steps=steps, guidance_scale=guidance_scale, sampler=sampler, eta=eta)
        return to_pil(self.generate(prompts, seed, params, progress=progress))

    # ---- persistence -------------------------------------------------------------------------

    def config_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "package_version": __version__,
            "resolution": self.resolution,
            "unet": self.unet.config.to_dict(),
            "schedule": self.schedule.config.to_dict(),
            "text_encoder": self.text_encoder.config.to_dict(),
            "text_encoder_identity": self.text_encoder.identity,
            "extra": self.extra,
        }

    def save(self, directory: str | os.PathLike, unet_state: dict[str, torch.Tensor] | None = None) -> Path:
        """Write `unet.safetensors`, the text encoder weights (unless seeded random init, which the
        config rebuilds exactly) and `model_config.json`. `unet_state` overrides the live weights
        (e.g. the EMA weights)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_weights(unet_state or self.unet.state_dict(), directory / UNET_FILE)
        config = self.config_dict()
        if self.text_encoder.is_random_init:
            # A seeded random encoder is rebuilt from its seed, not stored; the fingerprint proves
            # on load that the rebuild gave the very same weights (a torch upgrade could change init).
            config["text_encoder_fingerprint"] = weights_fingerprint(self.text_encoder.clip.state_dict())
        else:
            save_weights(self.text_encoder.clip.state_dict(), directory / TEXT_ENCODER_FILE)
            config["text_encoder"] = {**config["text_encoder"], "weights": TEXT_ENCODER_FILE}
            # A pretrained tag's image preprocessing (its mean and std) is not in the weights file.
            config["text_encoder_image_preprocess"] = self.text_encoder.image_preprocess
        write_json_atomic(directory / CONFIG_FILE, config)  # written last: its presence marks a complete save
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> TextToImage:
        directory = Path(directory)
        config_path = directory / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"{directory} holds no {CONFIG_FILE}; is it a saved TextToImage?")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{config_path} has format_version {config.get('format_version')!r}; "
                f"this package reads {FORMAT_VERSION}"
            )
        unet = UNet(UNetConfig.from_dict(config["unet"]))
        unet.load_state_dict(load_weights(directory / UNET_FILE))
        te_dict = dict(config["text_encoder"])
        if te_dict.get("weights") == TEXT_ENCODER_FILE:
            te_dict["weights"] = str(directory / TEXT_ENCODER_FILE)
        text_encoder = TextEncoder(TextEncoderConfig.from_dict(te_dict), device=device)
        if "text_encoder_image_preprocess" in config:
            text_encoder.use_image_preprocess(config["text_encoder_image_preprocess"])
        if text_encoder.is_random_init:
            found = weights_fingerprint(text_encoder.clip.state_dict())
            if found != config.get("text_encoder_fingerprint"):
                raise ValueError(
                    f"the seeded random text encoder {text_encoder.identity_id} rebuilt with different weights "
                    f"(fingerprint {found} != saved {config.get('text_encoder_fingerprint')}); the model was "
                    "trained with another torch/open_clip version's initialisation"
                )
        schedule = NoiseSchedule(ScheduleConfig.from_dict(config["schedule"]))
        return cls(unet.to(device), schedule, text_encoder, config["resolution"], extra=config.get("extra"))


def fast_cuda_backends() -> None:
    """TF32 for float32 matmuls and convolutions, and cuDNN's algorithm search per input shape:
    what training runs with, so sampling (and its speed) is the same in a process that trained
    first and in one that only samples."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def weights_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the names and bytes of every tensor, in key order (16 hex chars)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous().reshape(-1)
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _seed_list(seeds: int | Iterable[int], n: int) -> list[int]:
    """One seed per prompt: `seeds` itself, or seeds, seeds + 1, ... for a single int. A seed that is
    not an integer (1.5, True, "3") is an error, never rounded into another image's seed."""

    def as_int(s) -> int:
        if isinstance(s, bool | np.bool_):
            raise ValueError(f"seeds must be integers, got {s!r}")
        try:
            return operator.index(s)  # int and numpy integers; not floats or strings
        except TypeError:
            raise ValueError(f"seeds must be integers, got {s!r} ({type(s).__name__})") from None

    if isinstance(seeds, str | bytes) or not isinstance(seeds, Iterable) or getattr(seeds, "ndim", 1) == 0:
        return [as_int(seeds) + i for i in range(n)]  # one seed (an int, a numpy or 0-d tensor integer)
    seeds = list(seeds)  # a list, tuple, range, array or tensor of them
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} prompts")
    return [as_int(s) for s in seeds]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL RGB images."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, 3, H, W)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    return [Image.fromarray(a, mode="RGB") for a in arr]


def _in_bf16(unet: UNet, device: torch.device):
    """`unet` called under bf16 autocast, its prediction returned as float32."""

    def denoise(*args, **kwargs) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = unet(*args, **kwargs)
        return out.float()

    return denoise
