"""The denoiser: a text-conditioned pixel-space UNet (the Stable Diffusion UNet, lean).

    x_t ─► conv_in ─► down levels ─► mid ─► up levels ─► norm, SiLU, conv_out ─► eps
                          └── skips, concatenated ──┘
    down level: [ResNet (+Transformer)] x layers_per_block, then a stride-2 conv (all but the last)
    mid:        ResNet, Transformer, ResNet
    up level:   [ResNet (+Transformer)] x (layers_per_block + 1), then nearest-upsample + conv

Every ResNet block receives the time-step embedding as a scale and shift of its
second normalisation (FiLM; Dhariwal & Nichol 2021, "AdaGN"). With `pooled_dim` set, the
caption's pooled embedding is projected and added to that time embedding (global text
conditioning, as Imagen and SDXL's `add_embedding` do), so every ResNet block also sees the
whole caption at once; the token states still steer the image through cross-attention. Every Transformer
block runs self-attention over the pixels, cross-attention from the pixels to the
caption's token states (keys/values from the text), and a GEGLU feed-forward, as
`UNet2DConditionModel` / ldm's `SpatialTransformer` do.

Run it on a CPU in a second:

    >>> cfg = UNetConfig(channels=(32, 64), attention_levels=(False, True), norm_groups=8, context_dim=16)
    >>> UNet(cfg)(torch.randn(2, 3, 16, 16), torch.tensor([1, 500]), torch.randn(2, 7, 16)).shape
    torch.Size([2, 3, 16, 16])
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class UNetConfig:
    """Everything that rebuilds a `UNet`; saved beside its weights (`to_dict` / `from_dict`)."""

    in_channels: int = 3
    out_channels: int = 3
    channels: tuple[int, ...] = (64, 128, 256)  # width per resolution level; len = number of levels
    layers_per_block: int = 2  # ResNet blocks per level on the down path; the up path has one more
    attention_levels: tuple[bool, ...] = (False, True, True)  # per level; the mid block always attends
    head_dim: int = 32  # heads = width // head_dim
    transformer_depth: int = 1
    context_dim: int = 512  # width D of the caption token states
    norm_groups: int = 32
    dropout: float = 0.0
    time_embed_dim: int | None = None  # default 4 * channels[0], as in DDPM / Stable Diffusion
    pooled_dim: int | None = None  # width E of the pooled caption embedding added to the time embedding; None = off

    def __post_init__(self) -> None:
        # Lists arrive from JSON / YAML; a frozen dataclass needs tuples to stay hashable.
        for name in ("channels", "attention_levels"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)):
                raise TypeError(f"UNetConfig.{name} must be a tuple, got {type(value).__name__} {value!r}.")
            object.__setattr__(self, name, tuple(value))

        for name in ("in_channels", "out_channels", "layers_per_block", "head_dim",
                     "transformer_depth", "context_dim", "norm_groups"):
            _check_positive_int(name, getattr(self, name))
        for name in ("time_embed_dim", "pooled_dim"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if not self.channels:
            raise ValueError("UNetConfig.channels is empty; give one width per resolution level, e.g. (64, 128, 256).")
        for width in self.channels:
            _check_positive_int("channels[...]", width)
        if len(self.attention_levels) != len(self.channels):
            raise ValueError(
                f"UNetConfig.attention_levels has {len(self.attention_levels)} entries but channels has "
                f"{len(self.channels)} levels {self.channels}; give one True/False per level."
            )
        if not all(isinstance(a, bool) for a in self.attention_levels):
            raise TypeError(f"UNetConfig.attention_levels must hold True/False only, got {self.attention_levels}.")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout!r}.")

        bad_groups = [w for w in self.channels if w % self.norm_groups]
        if bad_groups:
            raise ValueError(
                f"UNetConfig.channels {self.channels}: widths {bad_groups} are not divisible by "
                f"norm_groups={self.norm_groups}; GroupNorm splits a width into equal groups. "
                f"Pick widths that are multiples of {self.norm_groups} or lower norm_groups."
            )
        # The mid block (width channels[-1]) always has attention.
        attn_widths = [w for w, a in zip(self.channels, self.attention_levels) if a] + [self.channels[-1]]
        bad_heads = sorted({w for w in attn_widths if w % self.head_dim})
        if bad_heads:
            raise ValueError(
                f"UNetConfig: attention widths {bad_heads} are not divisible by head_dim={self.head_dim} "
                f"(heads = width // head_dim; the mid block at width {self.channels[-1]} always attends). "
                f"Pick a head_dim that divides every attended width."
            )

    @property
    def time_dim(self) -> int:
        """Width of the time-step embedding (`time_embed_dim`, default 4 * channels[0])."""
        return self.time_embed_dim if self.time_embed_dim is not None else 4 * self.channels[0]

    @property
    def downsample_factor(self) -> int:
        """How much the deepest level is smaller than the input; H and W must be multiples of it."""
        return 2 ** (len(self.channels) - 1)

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists); `from_dict` inverts it."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        """Build from a (possibly partial) dict; missing keys take defaults, unknown keys are an error."""
        if not isinstance(d, dict):
            raise TypeError(f"UNetConfig.from_dict expects a dict, got {type(d).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown UNetConfig keys {unknown}; valid keys are {sorted(known)}.")
        return cls(**d)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"UNetConfig.{name} must be a positive int, got {value!r}.")


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim): [cos(t w_i), sin(t w_i)], w_i = max_period^(-i/half).

    Transformer positional encoding (Vaswani et al. 2017) as DDPM uses it; the cos-first
    order matches diffusers' `flip_sin_to_cos=True`. Always float32: bf16 cannot
    resolve t near 1000.
    """
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(max_period) / half))
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb  # (B, dim)


def _zero_(module: nn.Module) -> nn.Module:
    # Zero-init the last layer of every residual branch so each block starts as the
    # identity (ldm's `zero_module`; Goyal et al. 2017). The weights still get gradient.
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv, FiLM by the time embedding, GroupNorm-SiLU-dropout-conv, plus a skip.

    The FiLM projection of the time embedding lives in `UNet.time_proj` (one matmul for
    every block); this block receives its slice, `film` (B, 2 * out_ch).
    """

    def __init__(self, in_ch: int, out_ch: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        # No affine: FiLM's per-sample scale and shift subsume GroupNorm's per-channel ones.
        self.norm2 = nn.GroupNorm(groups, out_ch, affine=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = _zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, film: Tensor) -> Tensor:
        # x (B, Cin, H, W); film (B, 2C)
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C, H, W)
        scale, shift = film[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        h = torch.addcmul(shift, self.norm2(h), 1 + scale)  # FiLM: norm(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


def _split_heads(x: Tensor, heads: int) -> Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, N, C) -> (B, heads, N, d)


def _merge_heads(x: Tensor) -> Tensor:
    return x.transpose(1, 2).flatten(2)  # (B, heads, N, d) -> (B, N, C)


# (attn_mask (B, 1, 1, L) bool, has_token (B, 1, 1)), computed once per forward.
_ContextMask = tuple[Tensor, Tensor]


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)  # one fused matmul for q, k, v
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        # x (B, N, C)
        q, k, v = self.to_qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # (B, heads, N, d) each
        return self.to_out(_merge_heads(F.scaled_dot_product_attention(q, k, v)))


class CrossAttention(nn.Module):
    """Queries from the image, keys/values from the caption tokens."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)  # one fused matmul for k, v
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, mask: _ContextMask | None) -> Tensor:
        # x (B, N, C); context (B, L, D)
        q = _split_heads(self.to_q(x), self.heads)  # (B, heads, N, d)
        k, v = self.to_kv(context).chunk(2, dim=-1)  # (B, L, C) each
        attn_mask = None
        if mask is not None:
            attn_mask, has_token = mask
            # A caption with no valid token attends to nothing: its rows fall back to an
            # all-True mask (no NaN from softmax over an empty set) and zeroed values,
            # so the attention output is exactly 0 there.
            v = v * has_token.to(v.dtype)
        k, v = _split_heads(k, self.heads), _split_heads(v, self.heads)  # (B, heads, L, d)
        return self.to_out(_merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)))


class FeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer 2020, "GLU Variants Improve Transformer"), 4x inner width."""

    def __init__(self, dim: int, dropout: float, mult: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim)  # value and gate in one matmul
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        h, gate = self.proj_in(x).chunk(2, dim=-1)  # (B, N, 4C) each
        return self.proj_out(self.dropout(h * F.gelu(gate)))


class TransformerLayer(nn.Module):
    """Pre-LayerNorm: self-attention, cross-attention to the caption, GEGLU feed-forward."""

    def __init__(self, dim: int, context_dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout)

    def forward(self, x: Tensor, context: Tensor, mask: _ContextMask | None) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, linear proj_in to tokens, `depth` TransformerLayers, zero-init proj_out, residual."""

    def __init__(self, dim: int, context_dim: int, head_dim: int, depth: int, groups: int, dropout: float):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        # Linear rather than 1x1-conv projections (SD 2's `use_linear_projection`): on a
        # channels_last input the (B, C, H, W) -> (B, HW, C) reshape is then a free view.
        self.proj_in = nn.Linear(dim, dim)
        self.layers = nn.ModuleList(
            TransformerLayer(dim, context_dim, dim // head_dim, dropout) for _ in range(depth)
        )
        self.proj_out = _zero_(nn.Linear(dim, dim))

    def forward(self, x: Tensor, context: Tensor, mask: _ContextMask | None) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C)
        h = self.proj_in(h)
        for layer in self.layers:
            h = layer(h, context, mask)
        h = self.proj_out(h).reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W), channels_last strides
        return x + h


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class Level(nn.Module):
    """One resolution level of the down or up path: ResNet blocks, each optionally followed by
    a SpatialTransformer, then an optional resampler."""

    def __init__(self, resnets: list[ResnetBlock], attentions: list[SpatialTransformer] | None,
                 resample: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions is not None else None
        self.resample = resample


class UNet(nn.Module):
    """Predicts eps (or v) from a noisy image x_t, its timestep t and caption token states."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(f"UNet expects a UNetConfig, got {type(config).__name__}; use UNetConfig.from_dict(d).")
        self.config = config
        c = config
        ch0, T, G = c.channels[0], c.time_dim, c.norm_groups

        self.time_embed = nn.Sequential(nn.Linear(ch0, T), nn.SiLU(), nn.Linear(T, T))
        # Global text conditioning (Imagen; SDXL's `add_embedding`): an MLP of the pooled caption
        # embedding, added to the time embedding that FiLMs every ResNet block.
        self.pooled_embed = (
            nn.Sequential(nn.Linear(c.pooled_dim, T), nn.SiLU(), nn.Linear(T, T)) if c.pooled_dim is not None else None
        )
        self.conv_in = nn.Conv2d(c.in_channels, ch0, 3, padding=1)

        film_widths = []  # 2 * width of every ResnetBlock, in the order forward() calls them

        def resnet(i: int, o: int) -> ResnetBlock:
            film_widths.append(2 * o)
            return ResnetBlock(i, o, G, c.dropout)

        def transformer(w: int) -> SpatialTransformer:
            return SpatialTransformer(w, c.context_dim, c.head_dim, c.transformer_depth, G, c.dropout)

        n = len(c.channels)
        skip_widths = [ch0]  # the width of every tensor the down path hands to the up path
        self.down = nn.ModuleList()
        width = ch0
        for level, (out, attn) in enumerate(zip(c.channels, c.attention_levels)):
            resnets, attns = [], []
            for _ in range(c.layers_per_block):
                resnets.append(resnet(width, out))
                if attn:
                    attns.append(transformer(out))
                width = out
                skip_widths.append(width)
            down = Downsample(width) if level < n - 1 else None
            if down is not None:
                skip_widths.append(width)
            self.down.append(Level(resnets, attns if attn else None, down))

        self.mid_resnet1 = resnet(width, width)
        self.mid_attention = transformer(width)
        self.mid_resnet2 = resnet(width, width)

        self.up = nn.ModuleList()
        for level, (out, attn) in reversed(list(enumerate(zip(c.channels, c.attention_levels)))):
            resnets, attns = [], []
            for _ in range(c.layers_per_block + 1):
                resnets.append(resnet(width + skip_widths.pop(), out))
                if attn:
                    attns.append(transformer(out))
                width = out
            self.up.append(Level(resnets, attns if attn else None, Upsample(width) if level > 0 else None))
        assert not skip_widths

        # Every ResnetBlock's time projection (scale and shift) in one matmul: SiLU, then Linear.
        self.film_widths = tuple(film_widths)
        self.time_proj = nn.Linear(T, sum(film_widths))
        self.norm_out = nn.GroupNorm(G, width)
        self.conv_out = _zero_(nn.Conv2d(width, c.out_channels, 3, padding=1))

    def forward(
        self, x: Tensor, t: Tensor, context: Tensor, context_mask: Tensor | None = None, pooled: Tensor | None = None
    ) -> Tensor:
        """x (B, C, H, W) noisy images; t (B,) int or float timesteps (or a 0-d tensor for all);
        context (B, L, D) caption token states; context_mask (B, L) bool, True = real token
        (None: every token is real). Padded tokens have no influence on the output; a caption
        whose mask is all False attends to nothing (zero cross-attention output, never NaN).
        pooled (B, E) the pooled caption embedding: required when `config.pooled_dim` is set,
        refused otherwise. Returns (B, out_channels, H, W). Accepts channels_last inputs and
        keeps that layout."""
        self._check_inputs(x, t, context, context_mask, pooled)
        B = x.shape[0]
        if t.ndim == 0:
            t = t.expand(B)

        emb = timestep_embedding(t, self.config.channels[0]).to(self.conv_in.weight.dtype)  # (B, ch0)
        temb = self.time_embed(emb)  # (B, T)
        if self.pooled_embed is not None:
            temb = temb + self.pooled_embed(pooled.to(temb.dtype))  # (B, T)
        films = iter(self.time_proj(F.silu(temb)).split(self.film_widths, dim=1))  # (B, 2C) per ResnetBlock

        mask: _ContextMask | None = None
        if context_mask is not None:
            has_token = context_mask.any(dim=1)  # (B,)
            attn_mask = context_mask | ~has_token[:, None]  # (B, L); all-False rows -> all-True, see CrossAttention
            mask = (attn_mask[:, None, None, :], has_token[:, None, None])  # (B, 1, 1, L), (B, 1, 1)

        h = self.conv_in(x)  # (B, ch0, H, W)
        skips = [h]
        for level in self.down:
            for j, res in enumerate(level.resnets):
                h = res(h, next(films))
                if level.attentions is not None:
                    h = level.attentions[j](h, context, mask)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)

        h = self.mid_resnet1(h, next(films))
        h = self.mid_attention(h, context, mask)
        h = self.mid_resnet2(h, next(films))

        for level in self.up:
            for j, res in enumerate(level.resnets):
                h = res(torch.cat([h, skips.pop()], dim=1), next(films))
                if level.attentions is not None:
                    h = level.attentions[j](h, context, mask)
            if level.resample is not None:
                h = level.resample(h)

        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels, H, W)

    def _check_inputs(
        self, x: Tensor, t: Tensor, context: Tensor, context_mask: Tensor | None, pooled: Tensor | None
    ) -> None:
        # Shape checks only (no values): no host sync, and torch.compile turns them into guards.
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"x must be (B, {c.in_channels}, H, W), got {tuple(x.shape)}.")
        B, _, H, W = x.shape
        f = c.downsample_factor
        if H % f or W % f:
            raise ValueError(
                f"Input size {H}x{W} is not divisible by {f} (= 2 ** (levels - 1) for channels {c.channels}); "
                f"resize or pad images to a multiple of {f}, e.g. {math.ceil(H / f) * f}x{math.ceil(W / f) * f}."
            )
        if not (t.ndim == 0 or (t.ndim == 1 and t.shape[0] == B)):
            raise ValueError(f"t must be (B,) = ({B},) timesteps or a 0-d tensor, got shape {tuple(t.shape)}.")
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != c.context_dim:
            raise ValueError(
                f"context must be (B, L, D) = ({B}, L, {c.context_dim}) caption token states, got "
                f"{tuple(context.shape)}; UNetConfig.context_dim must equal the text encoder's width."
            )
        if context_mask is not None:
            if context_mask.dtype != torch.bool:
                raise TypeError(f"context_mask must be a bool tensor (True = real token), got {context_mask.dtype}.")
            if tuple(context_mask.shape) != tuple(context.shape[:2]):
                raise ValueError(
                    f"context_mask must be (B, L) = {tuple(context.shape[:2])} to match context, "
                    f"got {tuple(context_mask.shape)}."
                )
        if c.pooled_dim is None:
            if pooled is not None:
                raise ValueError(
                    "this UNet has no pooled-embedding input (UNetConfig.pooled_dim is None) but pooled was given; "
                    "drop the argument, or build the UNet with pooled_dim = the text encoder's pooled width."
                )
        elif pooled is None:
            raise ValueError(
                f"this UNet is conditioned on the pooled caption embedding (UNetConfig.pooled_dim={c.pooled_dim}); "
                f"pass pooled=(B, {c.pooled_dim}), e.g. TextEncoder.encode(...).pooled or the embedding set's pooled."
            )
        elif pooled.ndim != 2 or tuple(pooled.shape) != (B, c.pooled_dim):
            raise ValueError(
                f"pooled must be (B, E) = ({B}, {c.pooled_dim}) pooled caption embeddings, got {tuple(pooled.shape)}; "
                "UNetConfig.pooled_dim must equal the text encoder's pooled width."
            )
