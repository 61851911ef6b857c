"""The DDPM noise schedule: betas, `alphas_cumprod`, the forward process and training targets.

The schedule owns everything about "how much noise at step t"; the UNet only
predicts, and the samplers in `models.samplers` walk the reverse process with it.

    schedule = NoiseSchedule(ScheduleConfig(prediction_type="v_prediction"))
    x_t = schedule.add_noise(x0, eps, t)                  # q(x_t | x_0)
    loss = ((unet(x_t, t, ...) - schedule.training_target(x0, eps, t)) ** 2)

Conventions follow diffusers' `DDPMScheduler` (its test oracle): `t` runs 0..T-1,
`alphas_cumprod[t]` is abar_t after t+1 noising steps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class ScheduleConfig:
    """Hyperparameters of the forward process; saved with every checkpoint."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"  # "linear" | "scaled_linear" | "cosine" (diffusers: "squaredcos_cap_v2")
    beta_start: float = 0.0001  # linear / scaled_linear only
    beta_end: float = 0.02  # linear / scaled_linear only
    rescale_zero_terminal_snr: bool = False  # Lin et al. 2023, Algorithm 1
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction"

    def __post_init__(self) -> None:
        T = self.num_train_timesteps
        if isinstance(T, bool) or not isinstance(T, int) or T < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2 (1000 is usual), got {T!r}")
        if self.beta_schedule not in BETA_SCHEDULES:
            hint = ""
            if self.beta_schedule == "squaredcos_cap_v2":
                hint = " (diffusers calls the cosine schedule 'squaredcos_cap_v2'; here it is 'cosine')"
            raise ValueError(f"unknown beta_schedule {self.beta_schedule!r}; choose one of {list(BETA_SCHEDULES)}{hint}")
        for name in ("beta_start", "beta_end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(
                    f"{name} must be a number, got {value!r} ({type(value).__name__}); "
                    "note that YAML reads 1e-4 as a string, write 1.0e-4"
                )
        if not (0.0 < self.beta_start < self.beta_end < 1.0):
            raise ValueError(
                f"need 0 < beta_start < beta_end < 1, got beta_start={self.beta_start!r}, beta_end={self.beta_end!r} "
                "(DDPM uses 0.0001 and 0.02; Stable Diffusion's scaled_linear uses 0.00085 and 0.012)"
            )
        if not isinstance(self.rescale_zero_terminal_snr, bool):
            raise ValueError(f"rescale_zero_terminal_snr must be true or false, got {self.rescale_zero_terminal_snr!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}; choose one of {list(PREDICTION_TYPES)}")
        if self.rescale_zero_terminal_snr and self.prediction_type == "epsilon":
            # At abar_{T-1} = 0, x_{T-1} is pure noise: predicting eps says nothing about x0, and x0 = (x_t - eps)/0.
            raise ValueError(
                "rescale_zero_terminal_snr=True needs prediction_type='v_prediction' (Lin et al. 2023, Sec. 3.2): "
                "at zero SNR an epsilon prediction carries no information about x0"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ScheduleConfig:
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ValueError(f"unknown ScheduleConfig keys {unknown}; allowed keys are {sorted(allowed)}")
        return cls(**d)


def _betas(config: ScheduleConfig) -> torch.Tensor:
    """(T,) float64 betas, as diffusers builds them but in double precision."""
    T = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float64)  # Ho et al. 2020, Sec. 4
    if config.beta_schedule == "scaled_linear":
        # Latent Diffusion / Stable Diffusion: linear in sqrt(beta)
        return torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float64) ** 2

    # cosine: Nichol & Dhariwal 2021 eq. 17, abar(t) = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) * pi/2), s = 0.008
    def f(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    # beta_t = 1 - abar_t / abar_{t-1}, clipped at 0.999 to avoid a singularity at t = T (eq. 17 and below)
    return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(abar) so sqrt(abar_0) is kept and sqrt(abar_{T-1}) = 0."""
    alphas_bar_sqrt = torch.cumprod(1 - betas, dim=0).sqrt()
    a0, aT = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - aT) * a0 / (a0 - aT)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])  # undo the cumprod
    return 1 - alphas


class NoiseSchedule:
    """Discrete-time DDPM forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""

    def __init__(self, config: ScheduleConfig | None = None):
        self.config = config or ScheduleConfig()
        self.num_train_timesteps = self.config.num_train_timesteps
        betas = _betas(self.config)  # float64 so the cumprod over T steps loses nothing
        if self.config.rescale_zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        alphas = 1 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.betas = betas.float()  # (T,)
        self.alphas = alphas.float()  # (T,)
        self.alphas_cumprod = alphas_cumprod.float()  # (T,) abar_t
        # from float64: near t = 0, 1 - abar ~ 1e-4 needs more digits than a float32 abar keeps
        self._snr = (alphas_cumprod / (1 - alphas_cumprod)).float()  # (T,)

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.config})"

    def _at(self, values: torch.Tensor, t: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor:
        """values[t] shaped (B, 1, 1, 1) (one trailing 1 per dim of x after the first) on x's device and dtype."""
        t = torch.as_tensor(t, device=x.device)
        if t.dim() > 1:
            raise ValueError(f"t must be a (B,) tensor of timesteps or a single int, got shape {tuple(t.shape)}")
        if t.dim() == 1 and t.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"t has {t.shape[0]} timesteps but x has batch size {x.shape[0]}")
        out = values.to(device=x.device)[t.long()].to(x.dtype)
        return out.reshape(-1, *([1] * (x.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4). x0, eps: (B, C, H, W); t: (B,)."""
        abar = self._at(self.alphas_cumprod, t, x0)  # (B, 1, 1, 1)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * eps

    q_sample = add_noise

    def training_target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet regresses: eps, or v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022, Sec. 4)."""
        if self.config.prediction_type == "epsilon":
            return eps
        abar = self._at(self.alphas_cumprod, t, x0)  # (B, 1, 1, 1)
        return abar.sqrt() * eps - (1 - abar).sqrt() * x0

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR(t) = abar_t / (1 - abar_t), (B,) float32 on t's device; 0 at a zero-terminal-SNR last step."""
        return self._snr.to(t.device)[t.long()]

    def loss_weight(self, t: torch.Tensor, min_snr_gamma: float | None, floor: float = 0.0) -> torch.Tensor:
        """(B,) per-sample MSE weights: Min-SNR-gamma (Hang et al. 2023) or ones when `min_snr_gamma` is None.

        eps-loss: min(SNR, gamma) / SNR = min(1, gamma / SNR)
        v-loss:   min(SNR, gamma) / (SNR + 1)
        Both written so that SNR = 0 (zero terminal SNR) and SNR = inf give finite weights.
        `floor` raises the weights of the noisy steps (SNR < gamma) to at least that: the
        v-loss weight there is ~SNR, which on a zero-terminal-SNR schedule (SNR < 0.1 for
        half its steps) leaves the noisiest steps, where the sampler decides the layout,
        all but untrained. The least noisy steps keep Min-SNR's small weights (an eps loss's
        noisy-step weights are 1 already).
        """
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"the loss weight floor must be in [0, 1], got {floor!r}")
        if min_snr_gamma is None:
            return torch.ones(t.shape, dtype=torch.float32, device=t.device)
        if isinstance(min_snr_gamma, bool) or not isinstance(min_snr_gamma, int | float) or not min_snr_gamma > 0:
            raise ValueError(
                f"min_snr_gamma must be a positive number (Hang et al. use 5.0) or None, got {min_snr_gamma!r}"
            )
        snr = self.snr(t)  # (B,)
        gamma = float(min_snr_gamma)
        if self.config.prediction_type == "epsilon":
            weights = torch.clamp(gamma / snr, max=1.0)  # SNR = 0: gamma / 0 = inf -> 1
        else:
            weights = torch.where(snr > gamma, gamma / (snr + 1), snr / (snr + 1))  # SNR = inf: gamma / inf = 0
        return torch.where(snr < gamma, weights.clamp(min=floor), weights)

    def predict_x0_and_eps(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) from the UNet's prediction of the configured type. All (B, C, H, W).

        epsilon:       x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)                  (Ho et al. 2020, eq. 15)
        v_prediction:  x0 = sqrt(abar) x_t - sqrt(1 - abar) v,
                       eps = sqrt(abar) v + sqrt(1 - abar) x_t                          (Salimans & Ho 2022, Sec. 4)
        """
        abar = self._at(self.alphas_cumprod, t, x_t)  # (B, 1, 1, 1)
        if self.config.prediction_type == "epsilon":
            eps = model_output
            x0 = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
        else:
            v = model_output
            x0 = abar.sqrt() * x_t - (1 - abar).sqrt() * v
            eps = abar.sqrt() * v + (1 - abar).sqrt() * x_t
        return x0, eps
