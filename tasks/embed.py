"""Embed stage: a dataset version's captions -> CLIP text embeddings on disk (an `EmbeddingSet`).

Training never runs the text encoder. This stage encodes every distinct caption
of the dataset once, plus the empty caption (the unconditional embedding of
classifier-free guidance), and optionally the validation images with the CLIP
image tower (for evaluation metrics):

    es = embed_dataset(dataset, EmbedConfig(encoder={"weights": "/models/vit-b-32.safetensors"}))
    train = load_embeddings(es, "train")  # tokens (N, L, D) float16, mask (N, L), pooled (N, E), uncond_*

Layout of `<data_root>/embeddings/<dataset-version>/<encoder-id>/` (format 1):

    captions/part-00000.parquet  one row per distinct caption, "" included: caption_id (sha256 hex of the
                                 UTF-8 caption), caption, num_tokens (start..end-of-text token), tokens,
                                 pooled; rows in the order they were encoded (by token prefix within
                                 each batch), which no reader relies on: rows are found by caption_id
    train/part-*.parquet         one row per dataset row, in dataset order: id, caption_id
    val/part-*.parquet
    val_images/part-*.parquet    only with encode_val_images: id, image_embed
    manifest.json                encoder identity and config, dataset version, counts, longest caption

`tokens` holds the real tokens only, as raw little-endian float16 bytes of a C-order
`(num_tokens, width)` array; `pooled` and `image_embed` are fixed-size float32 bytes.
Raw bytes rather than Parquet lists, because Parquet writes nested lists value by value
with repetition levels (~30 MB/s here) but binary at ~1.8 GB/s, and float16 hidden
states do not compress (zstd saves ~8%). `load_embeddings` pads them back with a mask.

Publication is one rename of a temporary sibling directory, so a killed run leaves no
partial set, and the same dataset version + encoder identity returns the published set
at once. `embed_dataset` is the plain function, `embed_task` its Prefect wrapper,
`embed_from_path` what the CLI calls. Prefect is optional here: without it (the GPU
benchmark box) `embed_task` is the plain function, and everything else works.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import platform
import re
import shutil
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import duckdb
import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch.profiler import record_function
from tqdm.auto import tqdm

from models.checkpoint import fsync_dir, temp_dir, write_json_atomic
from models.text_encoder import (
    TextEncoder,
    TextEncoderConfig,
    TextEncoding,
    TokenizerPool,
    host_ids,
    local_weights_file,
    prefix_order,
    to_device,
)
from tasks import storage
from tasks.cluster import dask_client, require_distributed
from tasks.contracts import DatasetVersion, EmbeddingSet
from tasks.prefect_compat import task
from tasks.settings import get_settings


log = logging.getLogger(__name__)

# Bump when the layout or the meaning of the files changes; a set of another format is refused.
EMBED_FORMAT = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")
UNCOND_CAPTION = ""  # classifier-free guidance drops captions to this
TOKENS_DTYPE = np.dtype("<f2")
EMBED_DTYPE = np.dtype("<f4")
_ROWS_PER_READ = 65536
TOKENIZE_CHUNK = 2048  # captions per tokenizer-worker task
_PARTIAL = ".partial-"
# A caption shard's pages are sent to the disk every this many bytes written (see `_Writeback`).
WRITEBACK_BYTES = 32 << 20

ROW_SCHEMA = pa.schema([("id", pa.string()), ("caption_id", pa.string())])


class EmbedError(ValueError):
    """The dataset, the config or a stored set cannot give embeddings; the message says what to do."""


class EmbedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    encoder: dict[str, Any] = Field(
        default_factory=dict,
        description="TextEncoderConfig fields: model_name, weights, layer, allow_random_init, random_init_seed",
    )
    batch_size: int = Field(256, ge=1, description="captions per encoder call")
    encode_val_images: bool = Field(False, description="also store CLIP image embeddings of the val split")
    image_batch_size: int = Field(256, ge=1)
    device: str | None = Field(None, description="'cpu', 'cuda', 'cuda:1' ...; None: cuda when available, else cpu")
    captions_per_shard: int = Field(
        65536, ge=1, description="distinct captions per Parquet shard; the prefix order (or length sort) and memory are per shard"
    )
    duckdb_memory_limit: str = Field("1GB", description="the distinct-caption pass spills to disk beyond this")
    cuda_graphs: bool = Field(
        True,
        description="on a GPU, run the text tower through CUDA graphs (one launch per batch instead of one "
        "per op; a graph per padded batch shape, captured on first use; turned off with a warning if a capture "
        "fails or the first replay disagrees with the tower run eagerly; 1.2-1.4x the eager stage on an H100); "
        "ignored on the CPU",
    )
    tokenize_workers: int | None = Field(
        None,
        ge=0,
        description="processes that tokenize captions beside the encoder; None: up to 8 spare cores on a GPU, "
        "0 on the CPU (the encoder uses the cores there)",
    )

    @field_validator("encoder")
    @classmethod
    def _valid_encoder(cls, value: dict[str, Any]) -> dict[str, Any]:
        TextEncoderConfig.from_dict(value)  # unknown keys or bad values fail here, naming the valid ones
        return value

    def text_encoder_config(self) -> TextEncoderConfig:
        return TextEncoderConfig.from_dict(self.encoder)

    def resolved_tokenize_workers(self, device: torch.device) -> int:
        if self.tokenize_workers is not None:
            return self.tokenize_workers
        return min(8, max(0, (os.cpu_count() or 1) - 2)) if device.type == "cuda" else 0


@dataclass
class LoadedEmbeddings:
    """One split's caption embeddings, padded to a common length L, row-aligned with `ids`."""

    split: str
    ids: list[str]  # the dataset rows' ids: an image's sha256, so an image with two captions has two rows of one id
    caption_ids: list[str]  # each row's `caption_id`; with `ids`, what tells such rows apart
    tokens: torch.Tensor  # (N, L, D) float16, zero past each caption's length
    mask: torch.Tensor  # (N, L) bool, True = real token (start..end-of-text)
    lengths: torch.Tensor  # (N,) long, real tokens per caption
    pooled: torch.Tensor  # (N, E) float32, CLIP pooled text embedding
    uncond_tokens: torch.Tensor  # (1, L, D) float16, the empty caption
    uncond_mask: torch.Tensor  # (1, L) bool
    uncond_pooled: torch.Tensor  # (1, E) float32
    image_embeds: torch.Tensor | None = None  # (N, E) float32: val split of a set made with encode_val_images
    # With `load_embeddings(..., per_caption=True)`: tokens, mask, lengths and pooled hold one
    # row per distinct caption (row 0 the empty caption) and row i's caption is caption_rows[i].
    caption_rows: torch.Tensor | None = None  # (N,) long

    def __len__(self) -> int:
        return len(self.ids)


# ---------------------------------------------------------------------------
# Public API


def embed_dataset(
    dataset: DatasetVersion,
    config: EmbedConfig,
    data_root: Path | None = None,
    progress: bool = True,
    dask_address: str | None = None,
) -> EmbeddingSet:
    """Embed `dataset` with the configured encoder; return the published (or already published) set.

    `dask_address` (default: the T2I_DASK_ADDRESS setting) encodes the caption shards on that
    Dask cluster's workers (each on its GPU when it has one) instead of here; they must see
    the data root at the same path. Same shards either way.

    Raises EmbedError for an empty dataset, an encoder that cannot be built (e.g. no
    weights and allow_random_init unset) or a stored set that does not match.
    """
    dask_address = dask_address or get_settings().dask_address or None
    _check_dataset(dataset)
    device = resolve_device(config.device)
    encoder = build_encoder(config, device)
    final = embeddings_dir(data_root) / dataset.version / encoder.identity_id
    if not (final / MANIFEST_NAME).is_file():
        if final.exists():  # publication renames a directory holding its manifest: this one is not a set
            raise EmbedError(
                f"{final} exists but holds no {MANIFEST_NAME}: not a published embedding set; delete it and run again"
            )
        _build_and_publish(dataset, config, encoder, final, progress, dask_address)
    manifest = read_manifest(final)
    _check_published(manifest, dataset, encoder, final)
    if config.encode_val_images and not manifest["val_images"]:
        manifest = _add_val_images(final, manifest, dataset, config, encoder, progress)
    return _descriptor(final, manifest)


def load_embeddings(
    embedding_set: EmbeddingSet,
    split: str = "train",
    max_length: int | None = None,
    per_caption: bool = False,
    tokens_file: Path | None = None,
) -> LoadedEmbeddings:
    """One split's embeddings, token states padded back to `max_length` with a mask.

    `per_caption=True` keeps one row per distinct caption plus `caption_rows` instead of one
    row per dataset row (a caption used k times is stored once). `tokens_file`, with
    `per_caption=True` only, puts the padded token states, the bulk of the bytes, in a
    memory-mapped file there instead of in RAM (per dataset row they are gathered into RAM).

    `max_length` None pads to the longest caption of the whole set (every split and the
    empty caption; `embedding_set.num_tokens`), so train, val and uncond tensors share L
    and training pads only as far as its data needs. An explicit value may be anything
    from the split's longest caption up to the encoder's context length (e.g. the
    context length, to match what `TextEncoder.encode` gives at inference). The UNet's
    cross-attention masks padding out, so L changes cost, not results.
    """
    root = Path(embedding_set.path)
    manifest = read_manifest(root)
    if split not in SPLITS:
        raise EmbedError(f"split must be one of {SPLITS}, got {split!r}")
    if tokens_file is not None and not per_caption:
        raise EmbedError(
            "tokens_file keeps token states out of RAM only with per_caption=True (one row per dataset row "
            "gathers them into RAM); pass per_caption=True, or no tokens_file"
        )
    width, pooled_dim = int(manifest["encoder"]["width"]), int(manifest["pooled_dim"])
    context_length = int(manifest["encoder"]["context_length"])

    ids: list[str] = []
    caption_ids: list[str] = []
    for name in manifest["files"][split]:
        table = pq.read_table(root / name, columns=["id", "caption_id"])
        ids += table.column("id").to_pylist()
        caption_ids += table.column("caption_id").to_pylist()
    if not ids:
        raise EmbedError(f"embedding set {root} has no rows in its {split!r} split (counts: {manifest['counts']})")

    # Gather only the captions this split uses (and the empty one) from the caption shards:
    # their lengths first (two small columns), to check max_length before allocating.
    uncond_id = manifest["uncond_caption_id"]
    slot_of = {cid: i for i, cid in enumerate(dict.fromkeys([uncond_id, *caption_ids]))}  # uncond is slot 0
    lengths_u = torch.zeros(len(slot_of), dtype=torch.long)  # (U,), 0 = not found
    for name in manifest["files"]["captions"]:
        table = pq.read_table(root / name, columns=["caption_id", "num_tokens"])
        for cid, n_tok in zip(table.column("caption_id").to_pylist(), table.column("num_tokens").to_pylist()):
            if (slot := slot_of.get(cid)) is not None:
                lengths_u[slot] = n_tok
    if not bool(lengths_u.all()):
        raise EmbedError(
            f"embedding set {root} is incomplete: {int((lengths_u == 0).sum())} captions of its {split!r} rows are "
            "missing from captions/; delete the directory and run the embed stage again"
        )
    longest = int(manifest["max_num_tokens"])
    length = longest if max_length is None else int(max_length)
    if not 1 <= length <= context_length:
        raise EmbedError(f"max_length must be in [1, {context_length}] (the encoder's context length), got {max_length}")
    if int(lengths_u.max()) > length:
        raise EmbedError(
            f"max_length={max_length} is shorter than the longest {split!r} caption ({int(lengths_u.max())} tokens); "
            f"pass max_length >= {int(lengths_u.max())}, or None to pad to the longest caption of the set ({longest})"
        )

    if tokens_file is None:
        tokens_u = torch.zeros(len(slot_of), length, width, dtype=torch.float16)  # (U, L, D)
    else:  # a new file is all zeros, as the padding needs
        tokens_file.unlink(missing_ok=True)
        tokens_u = torch.from_numpy(np.memmap(tokens_file, TOKENS_DTYPE, "w+", shape=(len(slot_of), length, width)))
    pooled_u = torch.zeros(len(slot_of), pooled_dim, dtype=torch.float32)  # (U, E)
    for name in manifest["files"]["captions"]:
        for batch in pq.ParquetFile(root / name).iter_batches(batch_size=_ROWS_PER_READ):
            rows, slots = [], []
            for r, cid in enumerate(batch.column("caption_id").to_pylist()):
                if (slot := slot_of.get(cid)) is not None:
                    rows.append(r)
                    slots.append(slot)
            if rows:
                n_tok = batch.column("num_tokens").to_numpy().astype(np.int64)
                _fill_tokens(tokens_u, batch.column("tokens"), n_tok, rows, slots, width)
                pooled_u[slots] = torch.from_numpy(_fixed_rows(batch.column("pooled"), pooled_dim, EMBED_DTYPE)[rows])

    index = torch.tensor([slot_of[c] for c in caption_ids], dtype=torch.long)  # (N,)
    positions = torch.arange(length)
    mask_u = positions[None, :] < lengths_u[:, None]  # (U, L)
    image_embeds = None
    if split == "val" and manifest["val_images"]:
        image_embeds = _load_image_embeds(root, manifest, ids, pooled_dim)
    rows = slice(None) if per_caption else index  # per caption: the tables themselves, plus caption_rows
    return LoadedEmbeddings(
        split=split,
        ids=ids,
        caption_ids=caption_ids,
        tokens=tokens_u[rows],
        mask=mask_u[rows],
        lengths=lengths_u[rows],
        pooled=pooled_u[rows],
        uncond_tokens=tokens_u[:1].clone(),
        uncond_mask=mask_u[:1].clone(),
        uncond_pooled=pooled_u[:1].clone(),
        image_embeds=image_embeds,
        caption_rows=index if per_caption else None,
    )


def embed_from_path(
    dataset_root: str | Path,
    config: EmbedConfig | dict[str, Any],
    data_root: Path | None = None,
    progress: bool = True,
    dask_address: str | None = None,
) -> EmbeddingSet:
    """CLI entry: a published dataset version directory (or its manifest.json) -> its embedding set."""
    from tasks.ingest import load_dataset_version  # here: only this CLI path reads a version from disk

    root = Path(dataset_root)
    dataset = load_dataset_version(root.parent if root.name == MANIFEST_NAME else root)
    return embed_dataset(dataset, EmbedConfig.model_validate(config), data_root, progress, dask_address)


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise EmbedError(f"embed.device {device!r} is not a torch device ('cpu', 'cuda', 'cuda:1', or null for auto)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EmbedError(f"embed.device is {device!r} but torch sees no CUDA device; set it to 'cpu' or null (auto)")
    return dev


def build_encoder(config: EmbedConfig, device: torch.device | str = "cpu") -> TextEncoder:
    """The frozen text encoder of `config.encoder`; its construction errors say which option to set."""
    try:
        return TextEncoder(config.text_encoder_config(), device=device, cuda_graphs=config.cuda_graphs)
    except (ValueError, FileNotFoundError) as exc:
        raise EmbedError(f"cannot build the text encoder of embed.encoder={config.encoder}: {exc}") from exc


def embeddings_dir(data_root: str | Path | None = None) -> Path:
    return (Path(data_root) if data_root is not None else get_settings().data_root).absolute() / "embeddings"


def caption_id(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


def read_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise EmbedError(f"{Path(root)} is not a published embedding set (no {MANIFEST_NAME}); run the embed stage")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise EmbedError(
            f"{path} is not valid JSON ({exc}); delete the set {Path(root)} and run the embed stage again"
        ) from exc
    if manifest.get("format") != EMBED_FORMAT:
        raise EmbedError(
            f"{Path(root)} holds embedding format {manifest.get('format')}, this code reads format {EMBED_FORMAT}; "
            "delete the directory and run the embed stage again"
        )
    return manifest


# ---------------------------------------------------------------------------
# Encoding: the batched core (what benchmarks/embed.py measures)


def caption_schema(width: int, pooled_dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("caption_id", pa.string()),
            ("caption", pa.string()),
            ("num_tokens", pa.int16()),
            ("tokens", pa.binary()),  # float16 (num_tokens, width), real tokens only
            ("pooled", pa.binary(pooled_dim * EMBED_DTYPE.itemsize)),  # float32 (pooled_dim,)
        ],
        metadata={
            "tokens": f"little-endian float16, C-order (num_tokens, {width})",
            "pooled": f"little-endian float32, ({pooled_dim},)",
        },
    )


def write_caption_shard(
    encoder: TextEncoder,
    captions: Sequence[str],
    path: Path,
    batch_size: int,
    on_batch: Callable[[int], object] | None = None,
    text: torch.Tensor | None = None,
) -> int:
    """Encode distinct `captions` in batches and write one durable shard -> the longest token
    count. `text`, their token ids (e.g. from a `TokenizerPool`), saves tokenizing them here.
    `path`'s directory must exist: a shard never makes one, so a Dask worker still encoding after
    its run failed cannot bring back the partial set the run deleted.
    See `_queue_caption_shard`; `write_caption_shards` runs many shards back to back."""
    with _BatchWriter() as threads:
        longest, _ = _queue_caption_shard(encoder, captions, path, batch_size, threads, on_batch, text)
    _fsync_file(path)  # leaving the block waited for the file's close
    return longest


class _BatchWriter:
    """The threads behind the encoder: one copies each encoded batch to the host as Arrow while
    another writes the previous one to Parquet (each part alone ran at 58k-70k captions/s on
    an H200, so one thread doing both would cap the stage near 32k/s). One write thread keeps
    each file's batches in order. Consecutive shards share them, so a shard's last batches
    are written while the next shard's first batches encode: the encoder never waits for a
    shard's file to be finished. At most 4 encoded batches are held (bounded memory).

    Leaving the block waits for every queued write and close and raises the first failure;
    leaving it on an error drops the queued batches and releases the open files instead."""

    def __init__(self) -> None:
        self._arrow = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-arrow")
        self._write = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-write")
        self._queued: deque[tuple[Future, bool]] = deque()  # (write or close, is a batch), in order
        self._open: dict[pq.ParquetWriter, _Writeback] = {}  # files not yet seen closed

    def open(self, path: Path, schema: pa.Schema) -> pq.ParquetWriter:
        writer = pq.ParquetWriter(
            path,
            schema,
            compression={"caption_id": "zstd", "caption": "zstd", "num_tokens": "zstd", "tokens": "none", "pooled": "none"},
            use_dictionary=False,
            write_statistics=["caption_id", "num_tokens"],
        )
        self._open = {w: b for w, b in self._open.items() if w.is_open or b.is_open}
        self._open[writer] = _Writeback(path)
        return writer

    def add(self, writer: pq.ParquetWriter, record_batch: Callable[[], pa.RecordBatch], count: int,
            on_batch: Callable[[int], object] | None) -> None:
        """Queue one batch: `record_batch` runs in the arrow thread, its result is written in the write thread."""
        converted = self._arrow.submit(record_batch)
        writeback = self._open[writer]

        def write() -> None:
            batch = converted.result()  # a failed conversion raises here, then in `_wait`
            writer.write_batch(batch)
            writeback.wrote(batch.nbytes)
            if on_batch is not None:
                on_batch(count)

        self._queued.append((self._write.submit(write), True))
        self._wait(keep=3)

    def close(self, writer: pq.ParquetWriter) -> Future:
        """Queue the file's close behind its batches -> a future done when the file is complete.
        Never waits: a close holds no encoded batch."""
        writeback = self._open[writer]

        def close() -> None:
            try:
                writer.close()
            finally:
                writeback.close()

        closed = self._write.submit(close)
        self._queued.append((closed, False))
        return closed

    def _wait(self, keep: int | None) -> None:
        """Until at most `keep` batch writes are queued, or, with None, until everything queued is
        done; raises the first failed write or close in queue order."""
        with record_function("embed: wait for writes"):  # named for `benchmarks/embed.py --profile`
            while self._queued and (keep is None or self._batches() > keep or self._queued[0][0].done()):
                self._queued.popleft()[0].result()

    def _batches(self) -> int:
        """Batch writes queued (the bound counts these; a close holds no batch)."""
        return sum(is_batch for _, is_batch in self._queued)

    def __enter__(self) -> _BatchWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        failed = exc_type is not None
        try:
            if not failed:
                self._wait(keep=None)
        except BaseException:
            failed = True
            raise
        finally:  # after an error, queued batches and closes are dropped (the caller removes the partial set)
            for pool in (self._write, self._arrow):  # both queues emptied before waiting for either
                pool.shutdown(wait=False, cancel_futures=failed)
            for pool in (self._write, self._arrow):
                pool.shutdown(wait=True)
            self._release(raise_error=not failed)

    def _release(self, raise_error: bool) -> None:
        """Close every file a shard cut short left open. Each is tried; a failure is raised only
        when no other error is on its way out (that one is the cause, this one its echo)."""
        errors = []
        for writer, writeback in self._open.items():
            for release in [writeback.close] + ([writer.close] if writer.is_open else []):
                try:
                    release()
                except Exception as error:  # noqa: BLE001 - collected, raised below or superseded
                    errors.append(error)
        self._open.clear()
        if errors and raise_error:
            raise errors[0]


class _Writeback:
    """Sends a file's written pages to the disk while it is still being written, so that its
    fsync finds little left to do. On Linux `posix_fadvise(DONTNEED)` starts the writeback of
    dirty pages without waiting for it (and drops pages already on disk from the cache). On
    the CPU box a 400 MB shard's fsync after its close took 0.16-0.21 s; with a hint every
    32 MiB, 0.001-0.03 s, for 0.05-0.09 s of hints spread over the writes. A hint is advice:
    where the platform has none or it fails, the fsync does all the work, as before."""

    def __init__(self, path: Path) -> None:
        self._fd: int | None = None
        self._pending = 0  # bytes written since the last hint
        if hasattr(os, "posix_fadvise"):
            try:
                self._fd = os.open(path, os.O_RDONLY)
            except OSError as error:  # out of descriptors, say: the file is written all the same
                log.debug("no early writeback for %s (%s); its fsync writes it all", path, error)

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def wrote(self, nbytes: int) -> None:
        self._pending += nbytes
        if self._fd is None or self._pending < WRITEBACK_BYTES:
            return
        self._pending = 0
        try:
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as error:  # advice only: the file's fsync still makes it durable
            log.debug("no early writeback for this file (%s); its fsync writes it all", error)
            self.close()

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _queue_caption_shard(
    encoder: TextEncoder,
    captions: Sequence[str],
    path: Path,
    batch_size: int,
    threads: _BatchWriter,
    on_batch: Callable[[int], object] | None = None,
    text: torch.Tensor | None = None,
) -> tuple[int, Future]:
    """Encode distinct `captions` in batches into one shard, its writes queued on `threads`
    -> (the longest token count, a future done when the file is closed; not fsynced).

    A batch holds captions that begin alike (the encoder runs each distinct token prefix
    once), or, for a tower without prefix sharing, captions of similar length (each batch is
    cut to its longest). The batch with the longest caption goes first: on the padded path
    it needs the most memory, so a batch size too big for the device fails early (on the
    prefix path memory follows the distinct prefixes, no more than the padded path's at the
    same length). This thread only queues work on the device, the copies to the host
    included; it never waits for the device.
    """
    if text is None:
        text = encoder.tokenize(list(captions))  # (n, C), truncated as open_clip does
    lengths = encoder.token_lengths(text)  # (n,)
    batches = caption_batches(encoder, text, lengths, batch_size)
    ids, n_tokens = host_ids(text), host_ids(lengths)  # host slicing in numpy (see models.text_encoder.host_ids)
    schema = caption_schema(encoder.width, encoder.pooled_dim)
    writer = threads.open(path, schema)
    for rows in batches:
        batch = [captions[i] for i in rows.tolist()]
        encoding = _encode_batch(encoder, batch, torch.from_numpy(ids[rows, : n_tokens[rows].max()]))
        # On a GPU the copies to the host are queued here and waited for in the arrow thread;
        # on the CPU the gather and check are real work, which the arrow thread does.
        handoff = encoding if encoding.tokens.device.type == "cpu" else _to_host(encoding, n_tokens[rows])
        threads.add(writer, partial(_caption_record_batch, batch, n_tokens[rows], handoff, schema), len(batch), on_batch)
    return int(n_tokens.max()), threads.close(writer)


def caption_batches(encoder: TextEncoder, text: torch.Tensor, lengths: torch.Tensor, batch_size: int) -> list[np.ndarray]:
    """The rows of `text` (n, C) per encoder call, as `write_caption_shard` runs them: in token
    order when the encoder shares prefixes, by length otherwise; the longest caption's batch first."""
    n_tokens = host_ids(lengths)
    if encoder.shares_prefixes:
        order = prefix_order(text, lengths).numpy()  # (n,)
    else:
        order = np.argsort(-n_tokens, kind="stable")  # (n,) longest first
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches.sort(key=lambda rows: -int(n_tokens[rows].max()))  # stable: length order stays as it was
    return batches


def _encode_batch(encoder: TextEncoder, captions: list[str], text: torch.Tensor) -> TextEncoding:
    # The one place the stage calls the encoder (tests count and interrupt calls here).
    # `text` is cut to the batch's longest caption: exact for the causal tower;
    # `captions` are the same rows, for the record.
    with _autocast(encoder.device):
        return encoder.encode_tokens(text)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    # bf16 on CUDA: the tower's matmuls at tensor-core speed; outputs are stored as float16 anyway.
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _HostBatch(NamedTuple):
    """An encoded batch on its way to host memory."""

    tokens: torch.Tensor  # (K, D) float16: each caption's real token states, row after row
    pooled: torch.Tensor  # (B, E) float32
    finite: torch.Tensor  # () bool: every token state is finite
    landed: torch.cuda.Event | None  # recorded after the copies; None when computed on the host


def _to_host(encoding: TextEncoding, lengths: np.ndarray) -> _HostBatch:
    """Queues the copy of a batch's real token states and pooled embeddings to pinned host
    memory, without waiting for the device. The real tokens are gathered at flat positions
    the host knows from `lengths` (B,): a boolean mask would sync the device to size its
    output, and a copy to pageable memory waits for the device."""
    B, L, D = encoding.tokens.shape
    real_at = np.flatnonzero(np.arange(L)[None, :] < lengths[:, None])  # (K,) row by row
    device = encoding.tokens.device
    real = encoding.tokens.reshape(B * L, D).index_select(0, to_device(torch.from_numpy(real_at), device))
    real = real.to(torch.float16)  # (K, D), as stored: an overflow shows as inf below
    on_device = (real, encoding.pooled.float(), torch.isfinite(real).all())
    if device.type != "cuda":
        return _HostBatch(*(x.cpu() for x in on_device), landed=None)  # no copy on the CPU
    host = [torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x, non_blocking=True) for x in on_device]
    # The copies run on the encoder's device's stream, which need not be the current device's.
    # A blocking event: the arrow thread sleeps while it waits instead of spinning a core.
    landed = torch.cuda.Event(blocking=True)
    landed.record(torch.cuda.current_stream(device))
    return _HostBatch(*host, landed=landed)


def _caption_record_batch(
    captions: list[str], lengths: np.ndarray, host: _HostBatch | TextEncoding, schema: pa.Schema
) -> pa.RecordBatch:
    """Runs in the arrow thread: waits for the batch's copies (or, for an encoding computed on the
    host, makes them), then wraps them as Arrow (no copy)."""
    if isinstance(host, TextEncoding):
        host = _to_host(host, lengths)
    if host.landed is not None:
        host.landed.synchronize()
    if not bool(host.finite):
        raise EmbedError(
            "the text encoder produced non-finite token states (float16 overflow or a broken weights file); "
            "check embed.encoder.weights"
        )
    n = len(captions)
    flat = np.ascontiguousarray(host.tokens.numpy(), dtype=TOKENS_DTYPE)  # (K, D)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths * flat.shape[1] * TOKENS_DTYPE.itemsize, out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:  # a binary column's offsets are int32 (what load_embeddings reads)
        raise EmbedError(
            f"a batch of {n} captions holds {offsets[-1]} bytes of token states, more than one Arrow binary column "
            "addresses (2**31 - 1 bytes); lower embed.batch_size"
        )
    pooled = np.ascontiguousarray(host.pooled.numpy(), dtype=EMBED_DTYPE)  # (B, E)
    return pa.record_batch(
        [
            pa.array([caption_id(c) for c in captions], pa.string()),
            pa.array(captions, pa.string()),
            pa.array(lengths.astype(np.int16)),
            pa.BinaryArray.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(flat)]),
            pa.FixedSizeBinaryArray.from_buffers(schema.field("pooled").type, n, [None, pa.py_buffer(pooled)]),
        ],
        schema=schema,
    )


# ---------------------------------------------------------------------------
# Building and publishing a set


def _check_dataset(dataset: DatasetVersion) -> None:
    rows = sum(int(dataset.counts.get(s, 0)) for s in SPLITS)
    if rows <= 0:
        raise EmbedError(
            f"dataset {dataset.name}@{dataset.version} is empty (counts: {dataset.counts}): there are no captions to "
            "embed; check the source and the ingest filters (rejects.parquet says why rows were dropped)"
        )
    if not Path(dataset.root).is_dir():
        raise EmbedError(f"dataset {dataset.name}@{dataset.version}: root {dataset.root} does not exist; ingest it again")


def _split_files(dataset: DatasetVersion, split: str) -> list[Path]:
    return sorted((Path(dataset.root) / split).glob("*.parquet"))


def _build_and_publish(
    dataset: DatasetVersion, config: EmbedConfig, encoder: TextEncoder, final: Path, progress: bool,
    dask_address: str | None = None,
) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(final.parent)
    tmp = temp_dir(final.parent, f"{_PARTIAL}{final.name}-{os.getpid()}@{_host()}-")
    try:
        files: dict[str, list[str]] = {}
        counts: dict[str, int] = {}
        for split in SPLITS:
            files[split], counts[split] = _write_row_shards(dataset, split, tmp)
        files["captions"], counts["captions"], longest, compute = _write_caption_shards(
            dataset, config, encoder, tmp, progress, dask_address
        )
        files["val_images"], counts["val_images"] = [], 0
        if config.encode_val_images:
            files["val_images"], counts["val_images"] = _write_image_shards(dataset, config, encoder, tmp, progress)
        manifest = {
            "format": EMBED_FORMAT,
            "dataset": {"name": dataset.name, "version": dataset.version, "root": dataset.root},
            "encoder": encoder.identity,
            "encoder_id": encoder.identity_id,
            "encoder_config": encoder.config.to_dict(),
            "weights_file": _weights_stat(encoder.config),
            "pooled_dim": encoder.pooled_dim,
            "max_num_tokens": longest,
            "uncond_caption_id": caption_id(UNCOND_CAPTION),
            "counts": counts,
            "val_images": config.encode_val_images,
            "files": files,
            "storage": {
                "tokens": "little-endian float16 bytes, C-order (num_tokens, width), start..end-of-text tokens only",
                "pooled": "little-endian float32 bytes (pooled_dim,)",
                "image_embed": "little-endian float32 bytes (pooled_dim,)",
            },
            "bytes": _data_bytes(tmp),
            "compute": {**compute, "batch_size": config.batch_size},
            "software": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "open_clip": open_clip.__version__,
                "pyarrow": pa.__version__,
            },
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        for sub in (p for p in tmp.iterdir() if p.is_dir()):
            fsync_dir(sub)  # the data files' names, before the manifest that lists them
        write_json_atomic(tmp / MANIFEST_NAME, manifest)  # fsyncs tmp too: its entries are durable before the rename
        try:
            os.rename(tmp, final)
        except OSError:
            if (final / MANIFEST_NAME).is_file():  # a concurrent run published the same set first
                return
            raise
        fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left after a successful rename


def _write_row_shards(dataset: DatasetVersion, split: str, out: Path) -> tuple[list[str], int]:
    """`<split>/<same part name>.parquet` with (id, caption_id) for each dataset part, in row order."""
    names, total = [], 0
    for src in _split_files(dataset, split):
        name = f"{split}/{src.name}"
        (out / split).mkdir(parents=True, exist_ok=True)
        with pq.ParquetWriter(out / name, ROW_SCHEMA, compression="zstd") as writer:
            for batch in pq.ParquetFile(src).iter_batches(batch_size=_ROWS_PER_READ, columns=["id", "caption"]):
                ids, captions = batch.column("id"), batch.column("caption").to_pylist()
                if ids.null_count or None in captions:
                    raise EmbedError(f"{src} has rows without an id or a caption; re-ingest the dataset")
                cids = pa.array([caption_id(c) for c in captions], pa.string())
                writer.write_batch(pa.record_batch([ids.cast(pa.string()), cids], schema=ROW_SCHEMA))
                total += batch.num_rows
        _fsync_file(out / name)
        names.append(name)
    expected = int(dataset.counts.get(split, 0))
    if total != expected:
        raise EmbedError(
            f"dataset {dataset.name}@{dataset.version} has {total} {split!r} rows in {dataset.root}, but its "
            f"descriptor says {expected}; the directory changed after it was published: ingest it again"
        )
    return names, total


def _write_caption_shards(
    dataset: DatasetVersion, config: EmbedConfig, encoder: TextEncoder, out: Path, progress: bool,
    dask_address: str | None = None,
) -> tuple[list[str], int, int, dict[str, Any]]:
    """Every distinct caption of train + val, and "", encoded once -> (files, count, longest,
    what encoded them: the manifest's `compute`)."""
    sources = [str(p) for s in SPLITS for p in _split_files(dataset, s)]
    spill = out / "_duckdb_spill"
    # Settings as values, not SQL text: a data root may hold any character, a quote included.
    con = duckdb.connect(
        config={"memory_limit": config.duckdb_memory_limit, "temp_directory": str(spill), "preserve_insertion_order": False}
    )
    try:
        # DISTINCT and ORDER BY spill to disk, so the set of captions need not fit in memory;
        # the order makes shard contents reproducible.
        con.execute(
            "CREATE TEMP TABLE captions AS SELECT DISTINCT caption FROM "
            "(SELECT caption FROM read_parquet(?) UNION ALL SELECT ? AS caption)",
            [sources, UNCOND_CAPTION],
        )
        [(n,)] = con.execute("SELECT count(*) FROM captions").fetchall()
        reader = con.sql("SELECT caption FROM captions ORDER BY caption").to_arrow_reader(config.captions_per_shard)
        shards = (c.column(0).to_pylist() for c in reader)
        with tqdm(total=n, unit="caption", desc=f"embed {dataset.name}", disable=not progress) as bar:
            if dask_address:
                names, longest, compute = _encode_shards_on_dask(dask_address, shards, encoder, config, out, bar.update)
            else:
                names, longest = _encode_shards_here(shards, n, encoder, config, out, bar.update)
                compute = _compute_record(encoder)
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)
    return names, n, longest, compute


def _compute_record(encoder: TextEncoder) -> dict[str, Any]:
    """What `encoder` has encoded with: its device, the autocast dtype (see `_autocast`), whether CUDA
    graphs are on (padded shapes: other bf16 rounding) and why they were turned off mid-run, if they were."""
    return {
        "device": str(encoder.device),
        "autocast": "bfloat16" if encoder.device.type == "cuda" else None,
        "cuda_graphs": encoder.cuda_graphs and encoder.device.type == "cuda",
        "cuda_graphs_error": encoder.graphs_error,
    }


def _workers_compute_record(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """The Dask workers' `_compute_record` of each shard, in shard order, as one: their distinct
    devices and autocast dtypes, whether every shard ran CUDA graphs, the first reason one turned them off."""
    return {
        "device": sorted({shard["device"] for shard in shards}),
        "autocast": sorted({shard["autocast"] for shard in shards}, key=str),
        "cuda_graphs": all(shard["cuda_graphs"] for shard in shards),
        "cuda_graphs_error": next((shard["cuda_graphs_error"] for shard in shards if shard["cuda_graphs_error"]), None),
    }


def _shard_name(k: int) -> str:
    return f"captions/part-{k:05d}.parquet"


def _encode_shards_here(
    shards: Iterable[list[str]], n: int, encoder: TextEncoder, config: EmbedConfig, out: Path,
    on_batch: Callable[[int], object],
) -> tuple[list[str], int]:
    chunks = -(-n // TOKENIZE_CHUNK)  # a tokenizer pool pays off only with chunks to share out
    workers = min(config.resolved_tokenize_workers(encoder.device), chunks) if chunks > 1 else 0
    with TokenizerPool(encoder, workers, TOKENIZE_CHUNK) as tokenize:
        return write_caption_shards(encoder, shards, out, config.batch_size, tokenize, on_batch)


def write_caption_shards(
    encoder: TextEncoder, shards: Iterable[list[str]], out: Path, batch_size: int, tokenize: TokenizerPool,
    on_batch: Callable[[int], object] | None = None,
) -> tuple[list[str], int]:
    """The stage's shard loop: each shard of distinct captions to `out / captions/part-K.parquet`
    -> (names relative to `out`, the longest token count). Returns once every file is durable.

    Nothing between shards stops the encoder: a shard's tokenization starts in `tokenize`'s
    workers while the one before it encodes, its first batches encode while the last ones
    of the shard before are still being written (one `_BatchWriter` for all shards), and a
    finished shard is fsynced in a background thread. A shard is ~25 KB per caption
    (~400 MB at 16,384 captions); its pages are sent to disk as it is written (`_Writeback`),
    so the fsync the run ends with waits for little (on an H100: 0.02 s, 0.19 s before).
    """
    names, longest = [], 0
    (out / "captions").mkdir(parents=True, exist_ok=True)
    syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-fsync")
    syncing: deque[Future] = deque()
    try:
        with _BatchWriter() as threads:
            for k, (captions, text) in enumerate(tokenized_ahead(shards, tokenize)):
                names.append(_shard_name(k))
                path = out / names[-1]
                with record_function("embed: wait for tokens"):
                    ids = text()
                n_tokens, closed = _queue_caption_shard(encoder, captions, path, batch_size, threads, on_batch, ids)
                longest = max(longest, n_tokens)
                syncing.append(syncer.submit(_fsync_when_closed, closed, path))
                while syncing and syncing[0].done():
                    syncing.popleft().result()  # a failed write or fsync raises here, not only at the end
        with record_function("embed: wait for fsync"):
            while syncing:
                syncing.popleft().result()
    finally:  # after an error, shards still queued are not fsynced (the caller removes the partial set)
        syncer.shutdown(wait=True, cancel_futures=True)
    return names, longest


def _fsync_when_closed(closed: Future, path: Path) -> None:
    closed.result()  # the write thread finished the file (a failed write raises in the loop too)
    _fsync_file(path)


def _encode_shards_on_dask(
    address: str, shards: Iterable[list[str]], encoder: TextEncoder, config: EmbedConfig, out: Path,
    on_batch: Callable[[int], object],
) -> tuple[list[str], int, dict[str, Any]]:
    """Each shard encoded by a Dask worker into `out` (shared storage); results in shard order,
    with what the workers encoded with (`_workers_compute_record`). The encoder goes to every
    worker once (scattered), not with each shard. After a failure the shards not started are
    cancelled and the running ones waited for (up to `_RELEASE_WAIT_S`); one still running after
    that fails on its own, as it cannot recreate the partial set the caller deletes."""
    require_distributed(address, "embed", EmbedError)
    cpu_copy = copy.deepcopy(encoder).to("cpu")  # workers pick their own device
    (out / "captions").mkdir(exist_ok=True)  # here, never on a worker (see `write_caption_shard`)
    names, longest, used = [], 0, []
    with dask_client(address) as client:
        [remote_encoder] = client.scatter([cpu_copy], broadcast=True, hash=False)
        in_flight: deque[tuple[Any, int]] = deque()  # (distributed.Future, captions)
        limit = 2 * sum(client.nthreads().values())  # bounded: shards wait in memory, not all of them

        def collect() -> None:
            nonlocal longest
            future, count = in_flight.popleft()
            shard_longest, compute = future.result()
            longest = max(longest, shard_longest)
            used.append(compute)
            on_batch(count)

        try:
            for k, captions in enumerate(shards):
                names.append(_shard_name(k))
                future = client.submit(
                    encode_shard_on_worker, remote_encoder, captions, str(out / names[-1]), config.batch_size, pure=False
                )
                in_flight.append((future, len(captions)))
                while len(in_flight) >= limit:
                    collect()
            while in_flight:
                collect()
        except BaseException:
            _cancel_shards(client, [future for future, _ in in_flight])
            raise
    return names, longest, _workers_compute_record(used)


# How long a failed run waits for shards still running on workers before it goes on: they
# cannot recreate the partial set once it is gone (`write_caption_shard` makes no folders).
_RELEASE_WAIT_S = 120.0


def _cancel_shards(client: Any, futures: list[Any]) -> None:
    """Drop the shards no worker has started and wait (a while) for the ones running: Dask cannot
    stop a running task, and these write into the partial set that the caller deletes next.
    Called while an error propagates, so a failure here is logged, never raised over it."""
    try:
        client.cancel(futures)
        client.run(_until_released, {future.key for future in futures}, _RELEASE_WAIT_S)
    except Exception:
        log.warning("embed: could not stop the shards still on the Dask workers", exc_info=True)


async def _until_released(keys: set[Any], wait_s: float, dask_worker: Any) -> None:
    """Runs on each Dask worker's event loop: returns once the worker holds no task of `keys`
    (a cancelled task it is running stays until it returns), or after `wait_s`. It reads the
    worker's task table (`state.tasks`), which distributed does not document as public."""
    deadline = time.monotonic() + wait_s
    while not keys.isdisjoint(dask_worker.state.tasks) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)


_worker_lock = threading.Lock()


def encode_shard_on_worker(
    encoder: TextEncoder, captions: list[str], path: str, batch_size: int
) -> tuple[int, dict[str, Any]]:
    """Runs on a Dask worker: the scattered encoder moves to this worker's GPU (once), then one
    shard -> (its longest token count, what encoded it: `_compute_record`). `path`'s directory
    must exist (see `write_caption_shard`)."""
    with _worker_lock:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if encoder.device != device:
            encoder.to(device)
    longest = write_caption_shard(encoder, captions, Path(path), batch_size)
    return longest, _compute_record(encoder)


def tokenized_ahead(
    shards: Iterable[list[str]], tokenize: TokenizerPool
) -> Iterator[tuple[list[str], Callable[[], torch.Tensor]]]:
    """(captions, ids-when-called) per shard, the next shard's tokenization already started in
    the pool's workers while the caller encodes this one."""
    ahead = None
    for captions in shards:
        job = (captions, tokenize.submit(captions))
        if ahead is not None:
            yield ahead
        ahead = job
    if ahead is not None:
        yield ahead


def _write_image_shards(
    dataset: DatasetVersion, config: EmbedConfig, encoder: TextEncoder, out: Path, progress: bool, prefix: str = "val_images"
) -> tuple[list[str], int]:
    """`<prefix>/<val part name>.parquet` with (id, image_embed) from the CLIP image tower."""
    schema = pa.schema([("id", pa.string()), ("image_embed", pa.binary(encoder.pooled_dim * EMBED_DTYPE.itemsize))])
    names, total = [], 0
    with tqdm(total=int(dataset.counts.get("val", 0)), unit="image", desc="embed val images", disable=not progress) as bar:
        for src in _split_files(dataset, "val"):
            name = f"{prefix}/{src.name}"
            (out / prefix).mkdir(parents=True, exist_ok=True)
            with pq.ParquetWriter(out / name, schema, compression="none") as writer:
                for batch in pq.ParquetFile(src).iter_batches(batch_size=config.image_batch_size, columns=["id", "image"]):
                    images = _decode_images(batch.column("image").to_pylist(), src)  # (B, 3, H, W) in [0, 1]
                    with _autocast(encoder.device):
                        embeds = encoder.encode_images(images)  # (B, E)
                    data = np.ascontiguousarray(embeds.float().cpu().numpy(), dtype=EMBED_DTYPE)
                    column = pa.FixedSizeBinaryArray.from_buffers(schema.field("image_embed").type, len(data), [None, pa.py_buffer(data)])
                    writer.write_batch(pa.record_batch([batch.column("id").cast(pa.string()), column], schema=schema))
                    total += batch.num_rows
                    bar.update(batch.num_rows)
            _fsync_file(out / name)
            names.append(name)
    return names, total


def _decode_images(blobs: list[bytes], src: Path) -> torch.Tensor:
    arrays = []
    for blob in blobs:
        with Image.open(io.BytesIO(blob)) as im:
            arrays.append(np.asarray(im.convert("RGB"), dtype=np.uint8))  # (H, W, 3)
    if len({a.shape for a in arrays}) > 1:
        raise EmbedError(f"{src} holds images of different sizes; re-ingest the dataset (ingest resizes every image)")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)


def _add_val_images(
    final: Path, manifest: dict[str, Any], dataset: DatasetVersion, config: EmbedConfig, encoder: TextEncoder, progress: bool
) -> dict[str, Any]:
    """A published set asked for image embeddings it lacks: add them, published the same way."""
    _remove_stale_partials(final)
    shutil.rmtree(final / "val_images", ignore_errors=True)  # left by a run killed before its manifest update
    tmp = temp_dir(final, f"{_PARTIAL}val_images-{os.getpid()}@{_host()}-")
    try:
        files, count = _write_image_shards(dataset, config, encoder, tmp, progress)
        if files:
            fsync_dir(tmp / "val_images")  # the data files' names, before the manifest that lists them
            os.rename(tmp / "val_images", final / "val_images")
        manifest = {
            **manifest,
            "val_images": True,
            "files": {**manifest["files"], "val_images": files},
            "counts": {**manifest["counts"], "val_images": count},
        }
        manifest["bytes"] = _data_bytes(final)
        write_json_atomic(final / MANIFEST_NAME, manifest)  # a kill leaves the old manifest or the new one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _check_published(manifest: dict[str, Any], dataset: DatasetVersion, encoder: TextEncoder, final: Path) -> None:
    if manifest["dataset"]["version"] != dataset.version or manifest["encoder"] != encoder.identity:
        raise EmbedError(
            f"{final} holds embeddings of dataset {manifest['dataset']['version']} by encoder {manifest['encoder']}, "
            f"not of {dataset.version} by {encoder.identity}; the directory was altered: delete it and run again"
        )


def load_embedding_set(root: str | Path) -> EmbeddingSet:
    """The descriptor of a published embedding set directory, read from its manifest."""
    root = Path(root)
    return _descriptor(root, read_manifest(root))


def _descriptor(final: Path, manifest: dict[str, Any]) -> EmbeddingSet:
    identity = manifest["encoder"]
    return EmbeddingSet(
        path=str(final),
        dataset_version=manifest["dataset"]["version"],
        encoder_id=manifest["encoder_id"],
        # "config" rebuilds the encoder (weights path, random-init seed); the rest is its identity.
        encoder={**identity, "config": manifest["encoder_config"]},
        num_tokens=int(manifest["max_num_tokens"]),
        width=int(identity["width"]),
        counts=dict(manifest["counts"]),
    )


# ---------------------------------------------------------------------------
# Reading stored columns


def _fill_tokens(
    out: torch.Tensor, column: pa.BinaryArray, n_tok: np.ndarray, rows: list[int], slots: list[int], width: int
) -> None:
    """out[slot, :n_tok[row]] = tokens of row, for each (row, slot); out is (U, L, D) float16."""
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)[column.offset : column.offset + len(column) + 1]
    data = np.frombuffer(column.buffers()[2], dtype=TOKENS_DTYPE)
    nbytes = offsets[np.array(rows) + 1] - offsets[rows]
    if np.any(nbytes != n_tok[rows] * width * TOKENS_DTYPE.itemsize):
        raise EmbedError("stored token states do not match their num_tokens; the set is corrupt: delete it and run again")
    starts = offsets[rows] // TOKENS_DTYPE.itemsize  # in float16 elements
    counts = n_tok[rows]
    # One gather for the whole batch: token k of the selection -> (slot, position, source element).
    token_slot = np.repeat(np.asarray(slots), counts)  # (K,)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    position = np.arange(int(counts.sum())) - first  # (K,)
    source = np.repeat(starts, counts) + position * width  # (K,) element offset of each token
    values = data[source[:, None] + np.arange(width)[None, :]]  # (K, D)
    out[torch.from_numpy(token_slot), torch.from_numpy(position)] = torch.from_numpy(values)


def _fixed_rows(column: pa.FixedSizeBinaryArray, size: int, dtype: np.dtype) -> np.ndarray:
    data = np.frombuffer(column.buffers()[1], dtype=dtype)
    return data.reshape(-1, size)[column.offset : column.offset + len(column)]  # (n, size)


def _load_image_embeds(root: Path, manifest: dict[str, Any], ids: list[str], dim: int) -> torch.Tensor:
    by_id: dict[str, np.ndarray] = {}
    for name in manifest["files"]["val_images"]:
        table = pq.read_table(root / name)
        for chunk_ids, chunk in zip(table.column("id").chunks, table.column("image_embed").chunks):
            by_id.update(zip(chunk_ids.to_pylist(), _fixed_rows(chunk, dim, EMBED_DTYPE)))
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise EmbedError(f"embedding set {root} lacks image embeddings of {len(missing)} val rows; delete it and run again")
    return torch.from_numpy(np.stack([by_id[i] for i in ids]))  # (N, E)


# ---------------------------------------------------------------------------
# Files, publication, temporaries


def _weights_stat(config: TextEncoderConfig) -> dict[str, Any] | None:
    """Resolved path, size and mtime of a local weights file (`local_weights_file`: None for no
    weights, a cached tag or a missing file). What stands for the weights' sha256 where hashing
    them would cost too much: in the Prefect cache key and, for `find_published`, in the manifest."""
    path = local_weights_file(config.model_name, config.weights)
    if path is None:
        return None
    path = path.resolve()
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _data_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*.parquet"))


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def _remove_stale_partials(parent: Path) -> None:
    """Delete `.partial-*` directories of runs on this host whose process is gone (killed runs)."""
    for path in parent.glob(f"{_PARTIAL}*"):
        match = re.match(rf"^{re.escape(_PARTIAL)}.+-(\d+)@([A-Za-z0-9_]+)-[^-@]+$", path.name)
        if not match or match.group(2) != _host() or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


# ---------------------------------------------------------------------------
# Prefect task


def find_published(dataset_version: str, encoder_config: TextEncoderConfig, data_root: str | Path | None = None) -> Path | None:
    """The published set of this dataset version made with this encoder config, found without
    building the encoder (a local weights file is matched by path, size and mtime)."""
    wanted = encoder_config.to_dict()
    for manifest_path in sorted((embeddings_dir(data_root) / dataset_version).glob(f"*/{MANIFEST_NAME}")):
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if manifest.get("format") != EMBED_FORMAT or manifest.get("encoder_config") != wanted:
            continue
        stat = manifest.get("weights_file")
        if stat is not None:
            path = Path(stat["path"])
            if not path.is_file() or (path.stat().st_size, path.stat().st_mtime_ns) != (stat["size"], stat["mtime_ns"]):
                continue
        return manifest_path.parent
    return None


def _embed_cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
    """Key on what the set is made of: the dataset version and the encoder identity (a local
    weights file by its resolved path, size and mtime: new weights at the same path, or the same
    relative path from another directory, are another key).

    The first run stores its descriptor under this key, so a later run with unchanged inputs
    is a cache hit. A set deleted from disk after that is not rebuilt from the cache's point of
    view: run with PREFECT_TASKS_REFRESH_CACHE=true (training checks its inputs exist and says so).
    """
    dataset = DatasetVersion.model_validate(parameters["dataset"])
    config = EmbedConfig.model_validate(parameters["config"])
    identity = {"dataset": dataset.version, "encoder": config.encoder, "val_images": config.encode_val_images,
                "data_root": str(parameters.get("data_root") or embeddings_dir())}
    if (weights_file := _weights_stat(config.text_encoder_config())) is not None:
        identity["weights_file"] = weights_file  # only then: keys of other encoders stay as they were
    return "embed-" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def _retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O and device hiccups; an EmbedError (bad dataset or config) fails the same way every time."""
    try:
        state.result()
    except EmbedError:
        return False
    except Exception:
        return True
    return True


@task(
    name="embed",
    retries=2,
    retry_delay_seconds=[10, 60],
    retry_condition_fn=_retry_unless_bad_input,
    cache_key_fn=_embed_cache_key,
    persist_result=True,
)
def embed_task(
    dataset: DatasetVersion, config: EmbedConfig, data_root: str | None = None, dask_address: str | None = None
) -> EmbeddingSet:
    """Prefect wrapper of `embed_dataset` (no progress bar: Prefect logs are not a terminal). With an
    s3:// data root the dataset is pulled first when this machine lacks it, and the set pushed after.
    `dask_address` is not in the cache key: where the shards were encoded does not change the set."""
    storage.pull(Path(dataset.root))
    embeddings = embed_dataset(
        dataset, config, Path(data_root) if data_root else None, progress=False, dask_address=dask_address
    )
    storage.push(Path(embeddings.path))
    return embeddings
