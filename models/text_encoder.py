"""The frozen open_clip text encoder that turns captions into conditioning.

`TextEncoder(config).encode(captions)` gives per-token hidden states `(B, L, D)`
of the last or penultimate transformer block after `ln_final` (the penultimate
choice is Stable Diffusion 2's), a padding mask, and CLIP's pooled embedding. The tower is
causal, so captions that begin alike share their first tokens' states: a batch runs through
it once per distinct token prefix (`PrefixTrie`), not once per padded position.
`encode_images` gives CLIP image embeddings for FD_CLIP / CLIP score.

Weights come from a local file or an open_clip pretrained tag that is already
in the local cache; nothing here ever touches the network. A tag that is not
cached fails fast and says how to provide the weights.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import logging
import multiprocessing
import os
import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, TextTransformer, text_global_pool
from safetensors import SafetensorError
from safetensors.torch import load_file

from .checkpoint import UnsafeCheckpointError
from .graphs import GraphCache, GraphError
from .tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

LAYERS = ("last", "penultimate")
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")
_SCHEMA_PREFIXES = ("hf-hub:", "local-dir:")


@dataclass(frozen=True)
class TextEncoderConfig:
    model_name: str = "ViT-B-32"  # an open_clip model config name (open_clip.list_models())
    weights: str | None = None  # local file path, or an open_clip pretrained tag already in the local cache
    layer: str = "penultimate"  # "last" | "penultimate" block output, then ln_final (as SD2 does)
    allow_random_init: bool = False  # with weights None: random init (logged loudly) instead of an error
    random_init_seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ValueError(f"model_name must be a non-empty open_clip model name, got {self.model_name!r}")
        if self.weights is not None and (not isinstance(self.weights, str) or not self.weights):
            raise ValueError(f"weights must be a file path, a pretrained tag or None, got {self.weights!r}")
        if self.layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, got {self.layer!r}")
        if not isinstance(self.allow_random_init, bool):
            raise ValueError(f"allow_random_init must be a bool, got {self.allow_random_init!r}")
        if isinstance(self.random_init_seed, bool) or not isinstance(self.random_init_seed, int):
            raise ValueError(f"random_init_seed must be an int, got {self.random_init_seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextEncoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TextEncoderConfig keys {unknown}; valid keys are {sorted(known)}")
        return cls(**d)


@dataclass
class TextEncoding:
    tokens: torch.Tensor  # (B, L, D) per-token hidden states after ln_final
    mask: torch.Tensor  # (B, L) bool, True from the start token to the end-of-text token inclusive
    pooled: torch.Tensor  # (B, E) CLIP pooled text embedding (text_projection applied, unnormalised)
    lengths: torch.Tensor  # (B,) long, number of real tokens


class _TextModules(NamedTuple):
    """The pieces of an open_clip text tower that `encode` runs itself."""

    token_embedding: torch.nn.Embedding
    positional_embedding: torch.nn.Parameter
    transformer: torch.nn.Module  # open_clip.transformer.Transformer (.resblocks, .batch_first)
    ln_final: torch.nn.Module
    attn_mask: torch.Tensor | None  # additive causal mask (L, L)
    pool_type: str
    eos_id: int | None
    text_projection: torch.nn.Module | torch.Tensor | None


class TextEncoder(torch.nn.Module):
    """A frozen open_clip model whose text tower yields conditioning for the UNet."""

    def __init__(self, config: TextEncoderConfig, device: str | torch.device = "cpu", cuda_graphs: bool = False):
        super().__init__()
        self.config = config
        model_cfg = _model_config(config.model_name)
        _check_tokenizer_supported(config.model_name, model_cfg)

        # Resolve the weights before building anything, so a missing file or an
        # uncached tag fails in milliseconds, not after a large model is initialised.
        preprocess_overrides: dict[str, Any] = {}
        if config.weights is None:
            if not config.allow_random_init:
                raise ValueError(
                    f"TextEncoderConfig(model_name={config.model_name!r}) has weights=None. Set `weights` to a "
                    "local weights file (.safetensors/.bin/.pt/.pth) or to a cached open_clip pretrained tag "
                    f"(for {config.model_name}: {_tags_hint(config.model_name)}), or set allow_random_init=True "
                    "for a seeded random encoder (tests and toy runs only: its embeddings carry no meaning)."
                )
            weights_path, weights_id = None, f"random-init-{config.random_init_seed}"
        else:
            weights_path, weights_id, preprocess_overrides = _resolve_weights(
                config.model_name, config.weights, model_cfg
            )

        # A fixed seed on a private CPU RNG stream: the same seed gives the same
        # weights in every process and on every device, and the caller's RNG is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.random_init_seed)
            clip = open_clip.create_model(
                config.model_name,
                pretrained=None,
                pretrained_image=False,
                pretrained_text=False,
                device="cpu",
                force_preprocess_cfg=preprocess_overrides or None,
            )
        if weights_path is not None:
            _load_weights_strict(clip, weights_path)
            log.info("text encoder %s: loaded weights %s (%s)", config.model_name, weights_path, weights_id)
        else:
            log.warning(
                "TEXT ENCODER IS RANDOMLY INITIALISED (model %s, seed %d, allow_random_init=True): caption "
                "embeddings carry no language meaning. Set `weights` for a real model.",
                config.model_name,
                config.random_init_seed,
            )

        self.clip = clip.to(device)
        self.clip.requires_grad_(False)
        self.clip.eval()
        text = _text_modules(self.clip, config.model_name)
        n_blocks = len(text.transformer.resblocks)
        if config.layer == "penultimate" and n_blocks < 2:
            raise ValueError(f"layer='penultimate' needs >= 2 text blocks; {config.model_name} has {n_blocks}")

        # open_clip's own tokenizer, wrapped: the same ids at several times the speed.
        self.tokenizer = ClipTokenizer(open_clip.get_tokenizer(config.model_name, context_length=self.clip.context_length))
        self.context_length: int = int(self.clip.context_length)
        self.width: int = int(text.transformer.width)
        self.pooled_dim: int = _projected_dim(text.text_projection, self.width)
        self.is_random_init: bool = weights_path is None
        # Whether encode_tokens can run the tower once per distinct token prefix (open_clip's plain blocks).
        self.shares_prefixes: bool = _shares_prefixes(text, self.tokenizer.eot_token_id)
        self.identity: dict[str, Any] = {
            "model_name": config.model_name,
            "weights": weights_id,
            "layer": config.layer,
            "width": self.width,
            "context_length": self.context_length,
        }
        self.identity_id: str = _safe_id(f"{config.model_name}__{weights_id}__{config.layer}")
        # The text blocks with their matmul weights cast once for autocast (see `_autocast_blocks`):
        # (the dtype, what they were cast from and its state, the copy). A tuple, so not a
        # submodule: not in state_dict.
        self._cast_blocks: tuple[torch.dtype, list[tuple[weakref.ref, tuple]], torch.nn.ModuleList] | None = None
        # Run the prefix path on a GPU through CUDA graphs, one per padded plan shape (see
        # `models.graphs`): a launch per batch instead of one per op. Ignored on the CPU. Turned
        # off, with `graphs_error` saying why, when a capture fails or a replay disagrees with
        # the tower run eagerly.
        self.cuda_graphs = cuda_graphs
        self.graphs_error: str | None = None
        self._graphs: GraphCache | None = None
        self._warned_graphs_full = False

    def train(self, mode: bool = True) -> TextEncoder:
        # Frozen by design: a parent module's .train() must not flip it out of eval.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self._text().positional_embedding.device

    def _text(self) -> _TextModules:
        # Looked up per call, not cached: Module.to() replaces buffers (attn_mask) with new tensors.
        return _text_modules(self.clip, self.config.model_name)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """open_clip's tokenizer: (B, L) long; too-long captions are cut to L keeping the EOT token last."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError("captions must be a list of str")
        return self.tokenizer(list(captions), context_length=self.context_length)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextEncoding:
        return self.encode_tokens(self.tokenize(captions))

    def token_lengths(self, text: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids from `tokenize` -> (B,) real lengths on the host: up to and including
        the end-of-text token, which every row holds once (the tokenizer puts it back after
        truncation). Not `text != 0`: 0 is also the id of "!"."""
        return torch.from_numpy(_token_lengths(host_ids(text), self.tokenizer.eot_token_id))

    @torch.no_grad()
    def encode_tokens(self, text: torch.Tensor, share_prefixes: bool = True) -> TextEncoding:
        """Token ids from `tokenize`, (B, L') with L' <= context_length -> an encoding of length L'.

        Cutting padding columns off (L' < context_length) is exact as long as every row keeps
        its end-of-text token: the tower is causal, so a token never attends to a later
        position, and the pooled embedding is read at the end-of-text token. Token states past
        a caption's end are zero (as `tasks.embed.load_embeddings` pads them).

        For the same reason a token's states depend only on the tokens up to it, so captions
        that begin alike share those states: with `share_prefixes` (and open_clip's plain
        residual blocks) the tower's projections and MLPs run once per distinct token prefix
        of the batch (a prefix trie), not once per padded position; attention, cheap at
        caption lengths, still runs per caption. Under `layer="penultimate"` the last block's
        output projection and MLP run only at the end-of-text tokens, the one place its output
        (the pooled embedding) is read.
        """
        t = self._text()
        if text.ndim != 2 or not 1 <= text.shape[1] <= self.context_length:
            raise ValueError(f"text must be (B, L) token ids with L <= {self.context_length}, got {tuple(text.shape)}")
        ids = host_ids(text)  # (B, L') the host work below in numpy, none of it on torch's intra-op threads
        lengths = _token_lengths(ids, self.tokenizer.eot_token_id)  # (B,)
        if text.shape[1] < self.context_length and (t.pool_type not in ("argmax", "eos", "first") or t.attn_mask is None):
            raise ValueError(
                f"this text tower (pool_type {t.pool_type!r}, causal mask: {t.attn_mask is not None}) reads "
                "positions past a caption's end; encode at the full context length"
            )
        mask = torch.from_numpy(np.arange(ids.shape[1])[None, :] < lengths[:, None])  # (B, L')
        # All host work before the first copy to the device: a copy from pageable memory waits
        # for the device to finish the work queued before it (the previous batch).
        device = t.positional_embedding.device
        # An empty batch takes the padded path: a trie of no rows has no longest row.
        trie = _prefix_trie(ids, lengths) if share_prefixes and self.shares_prefixes and len(ids) else None
        graphs = self._graph_cache(device) if trie is not None else None
        bucket = self._graph_bucket if graphs is not None else None
        arrays = None if trie is None else _plan_arrays(ids, lengths, bucket, trie)
        mask, device_lengths = to_device(mask, device), to_device(torch.from_numpy(lengths), device)
        if arrays is not None:
            results = self._encode_prefix_trie(t, arrays, graphs)  # (rows >= B, cols, D), (rows, E)
            if results is None:  # no graph for this shape: the plan as it is, not padded for one
                results = self._encode_prefix_trie(t, _plan_arrays(ids, lengths, None, trie), None)
            tokens, pooled = results
            tokens, pooled = tokens[: len(ids), : ids.shape[1]], pooled[: len(ids)]
            if tokens.shape[1] < ids.shape[1]:
                tokens = F.pad(tokens, (0, 0, 0, ids.shape[1] - tokens.shape[1]))  # (B, L', D)
        else:
            tokens, pooled = self._encode_padded(t, text)
        tokens = tokens.masked_fill(~mask[:, :, None], 0)  # (B, L', D)
        return TextEncoding(tokens=tokens, mask=mask, pooled=pooled, lengths=device_lengths)

    def _encode_padded(self, t: _TextModules, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """open_clip's CLIP.encode_text over (B, L) padded rows, keeping the configured layer's
        token states -> (tokens (B, L, D) after ln_final, pooled (B, E))."""
        length = text.shape[1]
        text = to_device(text, t.positional_embedding.device)  # (B, L)
        cast_dtype = t.transformer.get_cast_dtype()
        x = t.token_embedding(text).to(cast_dtype)  # (B, L, D)
        x = x + t.positional_embedding[:length].to(cast_dtype)
        attn_mask = None if t.attn_mask is None else t.attn_mask[:length, :length]
        batch_first = getattr(t.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)  # (L, B, D)
        blocks = t.transformer.resblocks
        keep_after = len(blocks) - (1 if self.config.layer == "penultimate" else 0)
        hidden = x
        for i, block in enumerate(blocks):
            x = block(x, attn_mask=attn_mask)
            if i + 1 == keep_after:
                hidden = x
        if not batch_first:
            x, hidden = x.transpose(0, 1), hidden.transpose(0, 1)  # (B, L, D)
        tokens = t.ln_final(hidden)  # (B, L, D)
        final = tokens if keep_after == len(blocks) else t.ln_final(x)  # (B, L, D)
        return tokens, _project(t, text_global_pool(final, text, t.pool_type, eos_token_id=t.eos_id))  # (B, E)

    def _encode_prefix_trie(
        self, t: _TextModules, arrays: list[np.ndarray], graphs: GraphCache | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The tower over a batch's plan (`_plan_arrays`) -> (tokens (rows, cols, D) after ln_final,
        garbage past each end and in padding rows; pooled (rows, E)). With `graphs`, through
        the CUDA graph of the plan's shapes, or None when there is none and `graphs` is full,
        or when the graphs failed (then turned off for good)."""
        blocks = self._autocast_blocks(t.transformer.resblocks)  # before any capture: it may copy the blocks
        flat, shapes = _flattened(arrays)

        def tower(on_device: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self._tower_over_prefixes(t, _TriePlan.from_flat(on_device, shapes), blocks)

        if graphs is not None:
            device_type = graphs.device.type
            autocast = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
            # A graph replays this memory as these tensors laid it out.
            weights = tuple((p.data_ptr(), p.dtype, p.shape) for p in _tower_tensors(t, blocks))
            try:
                results = graphs.run((tuple(shapes), autocast), weights, flat, tower)
            except GraphError as error:
                self._give_up_graphs(error)
                return None
            if results is None and not self._warned_graphs_full:
                self._warned_graphs_full = True
                log.warning("text encoder: %d CUDA graphs held, the most; batch shapes beyond them run without one",
                            len(graphs))
            return results
        return tower(to_device(flat, t.positional_embedding.device))

    def _tower_over_prefixes(
        self, t: _TextModules, plan: _TriePlan, blocks: torch.nn.ModuleList
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`_encode_prefix_trie`'s tower on a plan on the device; sync-free, so a CUDA graph can
        record it. Equal captions get equal bits."""
        cast_dtype = t.transformer.get_cast_dtype()
        x = t.token_embedding(plan.node_token).to(cast_dtype)  # (N, D)
        x = x + t.positional_embedding.index_select(0, plan.node_col).to(cast_dtype)
        penultimate = self.config.layer == "penultimate"
        for block in blocks[:-1] if penultimate else blocks:
            x = _block_over_prefixes(block, x, plan)  # (N, D)
        states = t.ln_final(x)  # (N, D) the kept layer's token states
        if penultimate:  # the last block's output projection and MLP only where they are read: the EOT tokens
            final = t.ln_final(_block_over_prefixes(blocks[-1], x, plan, eot_only=True))  # (U, D)
        else:
            final = states.index_select(0, plan.eot_node)  # (U, D)
        B, longest = plan.caption_nodes.shape
        tokens = states.index_select(0, plan.caption_nodes.view(-1)).view(B, longest, -1)  # (B, longest, D)
        return tokens, _project(t, final).index_select(0, plan.caption_eot)  # (B, E)

    def _autocast_blocks(self, blocks: torch.nn.ModuleList) -> torch.nn.ModuleList:
        """`blocks` as the prefix path runs them: under autocast to a lower precision on their
        device, a copy whose attention and MLP matmul weights and biases are already in that
        precision. Autocast would cast each of them again on every call (it caches casts only
        of weights that require grad, and these are frozen): 8 cast kernels per block per batch,
        ~40% of the tower's launches on a GPU, where the host's launches bound the stage. The
        results are the same bits: the copy casts what autocast casts (float32, float16 and
        bfloat16 weights, not float64) to the same dtype, and layer norms and layer scales keep
        their own weights.

        Made on first use, and again when any block parameter is another tensor, lives on another
        device or in another dtype, or was changed in place (its version counter). An edit through
        `.data` bypasses the version counter: after one, call `forget_cast_blocks()`."""
        device_type = blocks[0].ln_1.weight.device.type
        if not torch.is_autocast_enabled(device_type):
            return blocks
        dtype = torch.get_autocast_dtype(device_type)
        source = list(blocks.parameters())
        state = [_parameter_state(p) for p in source]
        made = self._cast_blocks
        if made is not None and made[0] == dtype and len(made[1]) == len(source) and all(
            ref() is p and seen == now for (ref, seen), p, now in zip(made[1], source, state)
        ):
            return made[2]
        self._cast_blocks = None  # the old copy's memory back before the new one is made
        cast = {
            id(weight): torch.nn.Parameter(weight.detach().to(dtype), requires_grad=False)
            for block in blocks
            for weight in _matmul_weights(block)
            if weight.dtype in _AUTOCAST_ELIGIBLE
        }
        if not cast:  # nothing autocast would cast (float64 weights): the blocks as they are
            return blocks
        copied = copy.deepcopy(blocks, memo=dict(cast))  # the cast weights go in as they are, not copied first
        self._cast_blocks = (dtype, [(weakref.ref(p), now) for p, now in zip(source, state)], copied)
        return copied

    def forget_cast_blocks(self) -> None:
        """Drop the autocast copy of the blocks (see `_autocast_blocks`); the next call makes a new one."""
        self._cast_blocks = None

    def _graph_cache(self, device: torch.device) -> GraphCache | None:
        """The prefix path's CUDA graphs on `device`, when `cuda_graphs` is on and it is a GPU."""
        if not self.cuda_graphs:
            return None
        if self._graphs is None or self._graphs.device != device:
            self._graphs = GraphCache(device) if device.type == "cuda" else None
        return self._graphs

    def _give_up_graphs(self, error: GraphError) -> None:
        """Turn CUDA graphs off for this encoder after `error`: the batch and the ones after it
        run eagerly. Batches replayed before passed the first replay's check."""
        log.warning("text encoder: CUDA graphs turned off, batches run without them: %s", error)
        self.cuda_graphs, self.graphs_error, self._graphs = False, str(error), None

    def _graph_bucket(self, rows: int, cols: int, nodes: int) -> tuple[int, int, int]:
        """A plan's shape (rows B, columns L, trie nodes N) -> the padded shape its graph runs,
        from a few per batch size: rows a power of two (>= 64), columns a multiple of 8 (at most
        the context length), nodes a multiple of 1/32 of rows x columns (>= 256). Padding costs
        the device a little work; the device is not what bounds the stage."""
        rows = max(64, 1 << (rows - 1).bit_length())
        cols = min(-(-cols // 8) * 8, self.context_length)
        step = max(256, rows * cols // 32)
        return rows, cols, min(-(-nodes // step) * step, rows * cols)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # a pickled encoder (a Dask worker's) makes its own copy
        return {**state, "_cast_blocks": None, "_graphs": None}

    @property
    def image_preprocess(self) -> dict[str, Any]:
        """How `encode_images` prepares images (size, resize_mode, mean, std, ...): the model
        config's, or a pretrained tag's where the tag sets its own. A weights file alone does not
        carry it, so a saved model stores it beside the copied weights (`use_image_preprocess`)."""
        return dict(self.clip.visual.preprocess_cfg)

    def use_image_preprocess(self, preprocess: dict[str, Any]) -> None:
        """Prepare images as `preprocess` (an `image_preprocess` saved before) says."""
        self.clip.visual.preprocess_cfg = {**self.clip.visual.preprocess_cfg, **preprocess}

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, E) unnormalised CLIP image embeddings.

        Preprocessing is open_clip's eval transform on tensors: resize with the preprocess
        config's interpolation ("shortest": shorter side to the tower's size, then centre crop;
        "squash": straight to the size), sizes and crop offsets rounded as its torchvision
        transforms round them, then the tower's mean/std.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be float in [0, 1], got dtype {images.dtype}")
        lo, hi = float(images.min()), float(images.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"images must be in [0, 1], got values in [{lo:.3f}, {hi:.3f}] (from [-1, 1]? use (x + 1) / 2)"
            )

        visual = self.clip.visual
        pp = visual.preprocess_cfg
        out_h, out_w = _to_2tuple(pp["size"])
        x = images.to(self.device, torch.float32)
        h, w = x.shape[-2:]
        mode = "bilinear" if pp.get("interpolation") == "bilinear" else "bicubic"  # open_clip's choice ("random" too)
        if pp["resize_mode"] == "shortest":
            if out_h == out_w:  # torchvision's Resize(size): the shorter side to size, the longer one truncated
                rh, rw = (int(out_h * h / w), out_w) if w <= h else (out_h, int(out_w * w / h))
            else:  # open_clip's ResizeKeepRatio for a non-square size: both sides rounded
                ratio = min(h / out_h, w / out_w)
                rh, rw = round(h / ratio), round(w / ratio)
            if (rh, rw) != (h, w):
                x = F.interpolate(x, size=(rh, rw), mode=mode, align_corners=False, antialias=True)
            top, left = round((rh - out_h) / 2), round((rw - out_w) / 2)  # torchvision's CenterCrop (half to even)
            x = x[:, :, top : top + out_h, left : left + out_w]  # (B, 3, out_h, out_w)
        elif pp["resize_mode"] == "squash":
            if (h, w) != (out_h, out_w):
                x = F.interpolate(x, size=(out_h, out_w), mode=mode, align_corners=False, antialias=True)
        else:
            raise ValueError(f"resize_mode {pp['resize_mode']!r} of {self.config.model_name} is not supported here")
        # Bicubic overshoots; open_clip's PIL path clips to uint8 range, so clip likewise.
        x = x.clamp(0.0, 1.0)
        mean = torch.tensor(pp["mean"], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(pp["std"], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return self.clip.encode_image((x - mean) / std)  # (B, E)


# --- the tower once per distinct token prefix ------------------------------------------------


class PrefixTrie(NamedTuple):
    """The distinct token prefixes of a batch: one node per prefix, each node a token whose
    tower states every caption starting with that prefix shares (the tower is causal)."""

    order: torch.Tensor  # (B,) the input rows in lexicographic order of their real tokens
    node_of: torch.Tensor  # (B, L) node of each real token of the sorted rows; -1 past the end
    first_row: torch.Tensor  # (N,) node n is token first_col[n] of sorted row first_row[n]
    first_col: torch.Tensor  # (N,) = the node's position (its prefix length - 1)

    @classmethod
    def build(cls, text: torch.Tensor, lengths: torch.Tensor) -> PrefixTrie:
        """`text` (B, L) ids, `lengths` (B,) real tokens per row (through the EOT token)."""
        return cls(*(torch.from_numpy(a) for a in _prefix_trie(host_ids(text), host_ids(lengths))))


class _TriePlan(NamedTuple):
    """A batch's prefix trie as the index tensors `_encode_prefix_trie` runs on, all of them
    on the device in one copy. Rows are the sorted rows; "flat" positions index a (B, longest)
    layout flattened (row * longest + position), so the tower gathers with `index_select`."""

    node_token: torch.Tensor  # (N,) each node's own token id
    node_col: torch.Tensor  # (N,) its position (its prefix length - 1)
    node_at: torch.Tensor  # (N,) flat position in the sorted rows where the node first appears
    node_of: torch.Tensor  # (B, longest) node at each position of the sorted rows; past the end: node 0
    eot_node: torch.Tensor  # (U,) the distinct EOT nodes (equal captions share one)
    eot_at: torch.Tensor  # (U,) = node_at[eot_node]
    caption_eot: torch.Tensor  # (B,) input row -> its index in eot_node
    caption_nodes: torch.Tensor  # (B, longest) node_of in the input rows' order

    @classmethod
    def from_ids(cls, ids: np.ndarray, lengths: np.ndarray, device: torch.device | str = "cpu") -> _TriePlan:
        """`ids` (B, L) and `lengths` (B,) int64 host arrays -> the plan on `device`."""
        flat, shapes = _flattened(_plan_arrays(ids, lengths))
        return cls.from_flat(to_device(flat, torch.device(device)), shapes)

    @classmethod
    def from_flat(cls, flat: torch.Tensor, shapes: Sequence[tuple[int, ...]]) -> _TriePlan:
        """The plan as views of `flat`, `_plan_arrays` concatenated, its arrays of `shapes`."""
        parts = flat.split([int(np.prod(shape)) for shape in shapes])
        return cls(*(part.view(shape) for part, shape in zip(parts, shapes)))


def _plan_arrays(
    ids: np.ndarray, lengths: np.ndarray, bucket: Callable[[int, int, int], tuple[int, int, int]] | None = None,
    trie: tuple[np.ndarray, ...] | None = None,
) -> list[np.ndarray]:
    """`ids` (B, L) and `lengths` (B,) int64 host arrays (and their `_prefix_trie`, when made
    already) -> `_TriePlan`'s arrays (int64, in its field order). With `bucket`,
    (B, longest, N) -> (rows, cols, nodes) no smaller: the arrays are padded to that shape (a
    CUDA graph's; the U distinct EOT nodes to `rows`), and what the padding adds computes
    garbage no real caption reads: extra nodes are token 0 at position 0, extra rows and
    columns read node 0 (past a caption's end is never attended to from within it: the tower
    is causal)."""
    order, node_of, first_row, first_col = _prefix_trie(ids, lengths) if trie is None else trie
    B, longest = node_of.shape
    rows, cols, nodes = (B, longest, len(first_row)) if bucket is None else bucket(B, longest, len(first_row))
    sorted_lengths = lengths[order]  # (B,)
    eot_node, caption_eot = np.unique(node_of[np.arange(B), sorted_lengths - 1], return_inverse=True)
    eots = len(eot_node) if bucket is None else rows
    unsort = np.empty_like(order)
    unsort[order] = np.arange(B)  # (B,) input row -> its sorted row
    node_of = np.maximum(node_of, 0)
    node_at = first_row * cols + first_col  # (N,) flat positions in a (rows, cols) layout
    arrays = [
        (ids[order[first_row], first_col], (nodes,)), (first_col, (nodes,)), (node_at, (nodes,)),
        (node_of, (rows, cols)), (eot_node, (eots,)), (node_at[eot_node], (eots,)),
        (caption_eot.reshape(-1)[unsort], (rows,)), (node_of[unsort], (rows, cols)),
    ]  # fmt: skip
    return [_padded(np.asarray(a, dtype=np.int64), shape) for a, shape in arrays]


def _flattened(arrays: list[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """A plan's arrays as one host tensor and their shapes (`_TriePlan.from_flat` undoes it):
    one buffer, one copy to the device (a pinned copy each would cost a launch and a pin)."""
    return torch.from_numpy(np.concatenate([a.reshape(-1) for a in arrays])), [a.shape for a in arrays]


def _padded(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`a` with zeros after its end along each axis up to `shape` (`a` itself when it fits)."""
    if a.shape == shape:
        return a
    out = np.zeros(shape, dtype=a.dtype)  # np.pad costs ~10x this for these small arrays
    out[tuple(slice(0, n) for n in a.shape)] = a
    return out


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, the copy queued without waiting: from pinned memory a copy
    is queued behind the device's work, from pageable memory it waits for that work first."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def prefix_order(text: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B,) the rows of `text` (B, L) ids in lexicographic order of their first `lengths` (B,)
    tokens, a prefix before its extensions: captions that begin alike become neighbours."""
    if len(text) == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.from_numpy(_lexicographic(_real_tokens(host_ids(text), host_ids(lengths))))


# The host-side index work (lengths, masks, the trie) runs in numpy: these are small ops, and
# torch's CPU ops would each start a parallel region on its intra-op threads. On a GPU
# machine those threads compete with the stage's writer threads and tokenizer workers, and
# an op of microseconds then waits milliseconds: on an H100 (16 cores) one 16,384-caption
# shard spent ~0.3 s in such ops while the GPU was busy 0.18 s of its 1.4 s.


def host_ids(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Token ids or lengths as an int64 host array (no copy when they already are one)."""
    a = x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return a.astype(np.int64, copy=False)


def _token_lengths(ids: np.ndarray, eot_token_id: int) -> np.ndarray:
    """(B, L) ids -> (B,) tokens through the end-of-text token (see `TextEncoder.token_lengths`)."""
    eot = ids == eot_token_id  # (B, L)
    if not eot.any(axis=1).all():
        raise ValueError("every row needs its end-of-text token: cut no shorter than the longest caption")
    return eot.argmax(axis=1) + 1  # (B,) int64


def _prefix_trie(ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(B, L) ids, (B,) lengths -> `PrefixTrie`'s (order, node_of, first_row, first_col) as arrays."""
    keyed = _real_tokens(ids, lengths)  # (B, L) with L the longest, -1 past the end
    B, L = keyed.shape
    differs = _differs_from_above(keyed)
    # The embed stage's batches come in prefix order already (`tasks.embed.caption_batches`):
    # then the sort is the identity (np.lexsort is stable), and is skipped.
    if _in_lexicographic_order(keyed, differs):
        order = np.arange(B)
    else:
        order = _lexicographic(keyed)  # (B,)
        keyed = keyed[order]
        differs = _differs_from_above(keyed)
    real = keyed >= 0  # (B, L)
    # Sorted so, the rows that share a prefix are neighbours: a row shares with the row
    # above it up to their first differing position, and starts new nodes from there.
    shared = np.where(differs.any(axis=1), differs.argmax(axis=1), L)  # (B,)
    new = real & (np.arange(L)[None, :] >= shared[:, None])  # (B, L) positions that start a node
    new_id = new.reshape(-1).cumsum().reshape(B, L) - 1  # (B, L) row-major node numbering
    # A shared position's node is the one the nearest row above started at that position.
    made_by = np.maximum.accumulate(np.where(new, np.arange(B)[:, None], -1), axis=0)  # (B, L)
    node_of = np.where(real, np.take_along_axis(new_id, np.maximum(made_by, 0), axis=0), -1)  # (B, L)
    first_row, first_col = np.nonzero(new)  # (N,) each, in node order (row-major)
    return order, node_of, first_row.astype(np.int64), first_col.astype(np.int64)


def _real_tokens(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(B, L) ids -> (B, longest), -1 past each row's `lengths`."""
    ids = ids[:, : int(lengths.max())]
    return np.where(np.arange(ids.shape[1])[None, :] < lengths[:, None], ids, -1)


def _lexicographic(keyed: np.ndarray) -> np.ndarray:
    # np.lexsort's last key is the primary one: reverse the columns; -1 sorts a prefix first.
    return np.lexsort(keyed[:, ::-1].T).astype(np.int64)


def _differs_from_above(keyed: np.ndarray) -> np.ndarray:
    """(B, L) -> (B, L) bool: where each row differs from the row above (all of row 0)."""
    differs = np.ones(keyed.shape, dtype=bool)
    differs[1:] = keyed[1:] != keyed[:-1]
    return differs


def _in_lexicographic_order(keyed: np.ndarray, differs: np.ndarray) -> bool:
    """Whether the rows of `keyed` are in `_lexicographic`'s order: each row is no smaller
    than the row above at the first position where they differ (equal rows are in order)."""
    at = differs[1:].argmax(axis=1)  # (B-1,) 0 for a row equal to the one above: equal there too
    rows = np.arange(1, len(keyed))
    return bool((keyed[rows, at] >= keyed[rows - 1, at]).all())


def _block_over_prefixes(block: torch.nn.Module, x: torch.Tensor, plan: _TriePlan, eot_only: bool = False) -> torch.Tensor:
    """One open_clip `ResidualAttentionBlock` over prefix-trie nodes: x (N, D) node states ->
    the states after the block of every node in order (N, D), or with `eot_only` of the EOT
    nodes `plan.eot_node` (U, D).

    The projections and the MLP run on the nodes; causal attention runs per caption, its
    queries, keys and values gathered from the nodes along the caption (`plan.node_of`), its
    output read where each wanted node first appears (`plan.node_at`). Gathers are
    `index_select`s over flat positions: no advanced indexing, no device sync."""
    attn = block.attn
    B, L = plan.node_of.shape
    D, heads = x.shape[1], attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).index_select(0, plan.node_of.view(-1))  # (B*L, 3D)
    q, k, v = qkv.view(B, L, 3, heads, D // heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, D/H)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B * L, D)  # (B*L, D)
    o = o.index_select(0, plan.eot_at if eot_only else plan.node_at)  # (M, D)
    h = (x.index_select(0, plan.eot_node) if eot_only else x) + block.ls_1(attn.out_proj(o))  # (M, D)
    return h + block.ls_2(block.mlp(block.ln_2(h)))


# The dtypes autocast casts (it leaves float64 alone).
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def _matmul_weights(block: torch.nn.Module) -> list[torch.Tensor]:
    """The matmul weights and biases of a plain open_clip block (see `_shares_prefixes`)."""
    attn, mlp = block.attn, block.mlp
    pairs = [(attn.in_proj_weight, attn.in_proj_bias), (attn.out_proj.weight, attn.out_proj.bias),
             (mlp.c_fc.weight, mlp.c_fc.bias), (mlp.c_proj.weight, mlp.c_proj.bias)]  # fmt: skip
    return [t for pair in pairs for t in pair if t is not None]  # a block built without biases has none


def _parameter_state(p: torch.Tensor) -> tuple:
    """What `_autocast_blocks` compares to tell a parameter unchanged: where its data is, its
    dtype, and its version counter (inference tensors have none; they cannot change in place
    outside inference mode)."""
    return (p.device, p.dtype, p.data_ptr(), None if p.is_inference() else p._version)


def _tower_tensors(t: _TextModules, blocks: torch.nn.ModuleList) -> list[torch.Tensor]:
    """Every parameter the prefix path reads (`blocks` may be the autocast copy)."""
    projection = t.text_projection
    extra = list(projection.parameters()) if isinstance(projection, torch.nn.Module) else [projection]
    return [t.token_embedding.weight, t.positional_embedding, *blocks.parameters(), *t.ln_final.parameters(),
            *(p for p in extra if p is not None)]  # fmt: skip


def _project(t: _TextModules, pooled: torch.Tensor) -> torch.Tensor:
    """CLIP's text projection of pooled states (B, D) -> (B, E)."""
    if isinstance(t.text_projection, torch.nn.Linear):
        return t.text_projection(pooled)
    if t.text_projection is not None:
        return pooled @ t.text_projection
    return pooled


def _shares_prefixes(t: _TextModules, eot_token_id: int) -> bool:
    """Whether `_block_over_prefixes` computes this tower's blocks: open_clip's plain residual
    blocks (one packed in-projection, no extra key/value bias) under a plain causal mask,
    pooled at the EOT token. Other towers take the padded path."""

    def plain(block: torch.nn.Module) -> bool:
        attn = getattr(block, "attn", None)
        return (
            type(block) is ResidualAttentionBlock
            and isinstance(attn, torch.nn.MultiheadAttention)
            and attn._qkv_same_embed_dim
            and attn.bias_k is None
            and not attn.add_zero_attn
            and not hasattr(block, "ln_1_kv")
        )

    if t.attn_mask is None:
        return False
    n = t.attn_mask.shape[-1]
    causal = torch.full((n, n), float("-inf")).triu(1)  # 0 on and below the diagonal: is_causal's mask
    if t.attn_mask.shape != (n, n) or not torch.equal(t.attn_mask.detach().float().cpu(), causal):
        return False
    pooled_at_eot = t.pool_type == "argmax" or (t.pool_type == "eos" and t.eos_id == eot_token_id)
    return pooled_at_eot and all(plain(b) for b in t.transformer.resblocks)


# --- model config and tokenizer -------------------------------------------------------------


class TokenizerPool:
    """`encoder.tokenize` spread over worker processes, for feeding a GPU.

    Even the faster `ClipTokenizer` (BPE in Python) is one core's work: ~52,000
    shapes-style captions/s on the CPU machine, fewer on varied real captions, while a
    GPU encodes more. So for a GPU a large batch is cut into chunks tokenized in
    parallel and put back in order: the ids equal the serial call's. With `workers=0`, or a
    batch of at most one chunk, it is the serial call. Workers start once and are reused;
    close the pool, or use it as a context manager. On Linux they are forked, as
    DataLoader workers are (they only run the tokenizer, never CUDA): spawned workers
    would each import torch and open_clip again, which took 89 s for 8 workers on a
    16-core GPU machine.
    """

    def __init__(self, encoder: TextEncoder, workers: int, chunk_size: int = 2048):
        if workers < 0 or chunk_size < 1:
            raise ValueError(f"workers must be >= 0 and chunk_size >= 1, got {workers} and {chunk_size}")
        self.encoder = encoder
        self.workers = workers
        self.chunk_size = chunk_size
        self._pool = None
        if workers > 0:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            self._pool = multiprocessing.get_context(method).Pool(
                workers, initializer=_init_tokenizer_worker, initargs=(encoder.tokenizer, encoder.context_length)
            )

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        """(B, context_length) long, as `TextEncoder.tokenize`."""
        return self.submit(captions)()

    def submit(self, captions: Sequence[str]) -> Callable[[], torch.Tensor]:
        """Start tokenizing `captions` in the workers and return at once; calling the result waits
        for the ids. Without workers the work happens in that call instead."""
        captions = list(captions)
        if self._pool is None or len(captions) <= self.chunk_size:
            return lambda: self.encoder.tokenize(captions)
        if not all(isinstance(c, str) for c in captions):
            raise TypeError("captions must be a list of str")
        chunks = [captions[i : i + self.chunk_size] for i in range(0, len(captions), self.chunk_size)]
        pending = self._pool.map_async(_tokenize_chunk, chunks)
        return lambda: torch.from_numpy(np.concatenate(pending.get())).long()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> TokenizerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_worker_tokenizer: ClipTokenizer | None = None
_worker_context_length = 0


def _init_tokenizer_worker(tokenizer: ClipTokenizer, context_length: int) -> None:
    global _worker_tokenizer, _worker_context_length
    torch.set_num_threads(1)
    _worker_tokenizer = tokenizer
    _worker_context_length = context_length


def _tokenize_chunk(captions: list[str]) -> np.ndarray:
    return _worker_tokenizer.ids(captions, _worker_context_length)  # (n, C) int32: half the bytes of long through the pipe


def _model_config(model_name: str) -> dict[str, Any]:
    if model_name.startswith(_SCHEMA_PREFIXES):
        raise ValueError(
            f"model_name {model_name!r}: hf-hub:/local-dir: sources are not supported (they load or download "
            "weights on their own). Use an open_clip config name (open_clip.list_models(), or one registered "
            "with open_clip.add_model_config) and pass the weights file as `weights`."
        )
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        names = open_clip.list_models()
        close = difflib.get_close_matches(model_name, names, n=5)
        hint = f"did you mean {close}? " if close else ""
        raise ValueError(
            f"unknown open_clip model_name {model_name!r}: {hint}valid names include {names[:8]} "
            f"... ({len(names)} in all, see open_clip.list_models()); custom configs can be registered "
            "with open_clip.add_model_config(path)."
        )
    return cfg


def _check_tokenizer_supported(model_name: str, model_cfg: dict[str, Any]) -> None:
    # Models with a Hugging Face or SigLIP tokenizer would fetch it from the hub and
    # use different special tokens; only open_clip's bundled BPE tokenizer is offline.
    text_cfg = model_cfg.get("text_cfg", {})
    if text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name") or "siglip" in model_name.lower():
        raise ValueError(
            f"model_name {model_name!r} uses a Hugging Face text tower or tokenizer; only open_clip models with "
            "its built-in CLIP tokenizer and text transformer are supported (e.g. ViT-B-32, ViT-L-14, ViT-H-14)."
        )


def _text_modules(model: torch.nn.Module, model_name: str) -> _TextModules:
    if isinstance(model, open_clip.CLIP):
        return _TextModules(
            model.token_embedding,
            model.positional_embedding,
            model.transformer,
            model.ln_final,
            model.attn_mask,
            model.text_pool_type,
            getattr(model, "text_eos_id", None),
            model.text_projection,
        )
    text = getattr(model, "text", None)
    if isinstance(text, TextTransformer) and text.cls_emb is None and not text.use_pad_mask:
        return _TextModules(
            text.token_embedding,
            text.positional_embedding,
            text.transformer,
            text.ln_final,
            text.attn_mask,
            text.pool_type,
            text.eos_id,
            text.text_projection,
        )
    raise ValueError(
        f"model_name {model_name!r} builds a {type(model).__name__} whose text tower is not open_clip's plain "
        "TextTransformer (e.g. CoCa's class token or a padding mask); it is not supported."
    )


def _projected_dim(projection: torch.nn.Module | torch.Tensor | None, width: int) -> int:
    if projection is None:
        return width
    if isinstance(projection, torch.nn.Linear):
        return int(projection.out_features)
    return int(projection.shape[1])


# --- weights: local files and cached tags ----------------------------------------------------


def local_weights_file(model_name: str, weights: str | None) -> Path | None:
    """The local file that `weights` names for `model_name`; None for no weights, a pretrained tag
    (a tag wins over a file of the same name) or a path with no file."""
    if weights is None or open_clip.get_pretrained_cfg(model_name, weights):
        return None
    path = Path(weights).expanduser()
    return path if path.is_file() else None


def _resolve_weights(model_name: str, weights: str, model_cfg: dict[str, Any]) -> tuple[Path, str, dict[str, Any]]:
    """-> (file, identity string, preprocess overrides) for a local path or a cached pretrained tag."""
    path = local_weights_file(model_name, weights)
    if path is not None:
        return path, f"sha256:{_sha256_prefix(path)}", {}
    path = Path(weights).expanduser()
    tag_cfg = open_clip.get_pretrained_cfg(model_name, weights)
    if not tag_cfg:
        looks_like_path = os.sep in weights or weights.endswith((".safetensors", *_TORCH_SUFFIXES))
        if looks_like_path:
            raise FileNotFoundError(f"weights file not found: {path}")
        raise ValueError(
            f"weights {weights!r} is neither an existing file nor an open_clip pretrained tag for {model_name} "
            f"(tags: {_tags_hint(model_name)})."
        )

    tag = _clean_tag(weights)
    model_quick_gelu = bool(model_cfg.get("quick_gelu", False))
    tag_quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    if model_quick_gelu != tag_quick_gelu:
        # The activation is not in the state dict, so a mismatch would load fine and encode wrongly.
        fix = f"{model_name}-quickgelu" if tag_quick_gelu else model_name.removesuffix("-quickgelu")
        raise ValueError(
            f"pretrained tag {tag!r} was trained with quick_gelu={tag_quick_gelu} but model {model_name!r} has "
            f"quick_gelu={model_quick_gelu}; use model_name={fix!r}."
        )
    cached = _find_cached_tag_file(tag_cfg)
    if cached is None:
        raise FileNotFoundError(
            f"pretrained tag {tag!r} of {model_name} is not in the local cache, and this encoder never downloads "
            f"(looked for: {'; '.join(_tag_sources(tag_cfg)) or 'no source listed'}). Either download it on a "
            f"connected machine (open_clip.create_model({model_name!r}, pretrained={tag!r}) fills the same cache) "
            "and copy the cache over, or pass the weights file path as `weights`, or set allow_random_init=True "
            "with weights=None for a toy encoder."
        )
    overrides = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
    return cached, f"tag:{tag}", overrides


def _clean_tag(tag: str) -> str:
    # open_clip's own tag normalisation (pretrained._clean_tag), so "a-b" and "a_b" are one identity.
    return tag.lower().replace("-", "_")


def _tags_hint(model_name: str) -> str:
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    return ", ".join(tags) if tags else "none listed by open_clip"


def _hf_candidates(hf_hub: str) -> tuple[str, list[str]]:
    # Mirrors open_clip.pretrained.download_pretrained: "org/repo/file" or "org/repo/"
    # (default file), preferring a .safetensors sibling of a pickle file.
    repo_id, filename = os.path.split(hf_hub)
    filename = filename or "open_clip_pytorch_model.bin"
    names = []
    if filename == "open_clip_pytorch_model.bin":
        names.append("open_clip_model.safetensors")
    elif filename.endswith((".bin", ".pth")):
        names.append(filename[:-4] + ".safetensors")
    return repo_id, names + [filename]


def _url_cache_file(url: str) -> Path:
    # open_clip.pretrained.download_pretrained_from_url's default cache location.
    return Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)


def _tag_sources(tag_cfg: dict[str, Any]) -> list[str]:
    sources = []
    if tag_cfg.get("file"):
        sources.append(str(tag_cfg["file"]))
    if tag_cfg.get("hf_hub"):
        repo_id, names = _hf_candidates(tag_cfg["hf_hub"])
        sources.append(f"Hugging Face cache {repo_id}/{{{', '.join(names)}}}")
    if tag_cfg.get("url"):
        sources.append(str(_url_cache_file(tag_cfg["url"])))
    return sources


def _find_cached_tag_file(tag_cfg: dict[str, Any]) -> Path | None:
    """The tag's weights file if already on disk; looks only at local caches, never the network."""
    if tag_cfg.get("file"):
        p = Path(tag_cfg["file"]).expanduser()
        return p if p.is_file() else None
    # open_clip's handle on huggingface_hub.hf_hub_download (a dependency of open_clip);
    # local_files_only=True reads the cache directory only and makes no HTTP call.
    hf_hub_download = getattr(open_clip.pretrained, "hf_hub_download", None)
    if tag_cfg.get("hf_hub") and hf_hub_download is not None:
        repo_id, names = _hf_candidates(tag_cfg["hf_hub"])
        for name in names:
            try:
                return Path(hf_hub_download(repo_id=repo_id, filename=name, local_files_only=True))
            except Exception:  # LocalEntryNotFoundError and friends: not cached
                continue
    if tag_cfg.get("url"):
        p = _url_cache_file(tag_cfg["url"])
        if p.is_file():
            return p
    return None


def _sha256_prefix(path: Path, n: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a pickle read with weights_only=True (refuses code)."""
    if path.suffix == ".safetensors":
        try:
            sd = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise UnsafeCheckpointError(f"{path} is not a valid safetensors file ({exc})") from exc
    elif path.suffix in _TORCH_SUFFIXES:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError for code, RuntimeError for TorchScript archives
            raise UnsafeCheckpointError(
                f"refused to load {path}: torch.load(weights_only=True) accepts plain tensors only, and this file "
                f"is not that ({type(exc).__name__}: {exc}). Convert it to .safetensors on a trusted machine."
            ) from exc
    else:
        raise ValueError(f"weights file {path} must end in .safetensors, .bin, .pt or .pth")

    # Same unwrapping as open_clip.factory.load_state_dict: a "state_dict" key, a DDP "module." prefix.
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    if next(iter(sd)).startswith("module."):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return sd


def _load_weights_strict(model: torch.nn.Module, path: Path) -> None:
    sd = _read_state_dict(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"weights {path} do not match {type(model).__name__} of this model_name: "
            f"missing {len(missing)} keys {missing[:10]}, unexpected {len(unexpected)} keys {unexpected[:10]}. "
            "Is it a checkpoint of a different open_clip architecture?"
        )
    mismatched = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if sd[k].shape != v.shape
    ]
    if mismatched:
        raise ValueError(f"weights {path} have shapes that do not fit the model: {mismatched[:10]}")
    model.load_state_dict(sd, strict=True)


def _safe_id(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s.replace("sha256:", "sha256-").replace("tag:", ""))


def _to_2tuple(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)
