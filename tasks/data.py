"""Training data: a dataset version's images and its caption embeddings, as tensors.

`load_train_data` decodes the Parquet images once into a uint8 tensor `(N, 3, H, W)`
and joins them by `id` with the embedding set's token states and pooled embeddings, so a training step
is only an index into tensors that already sit on the device (no data loader, no
host work per step). For a dataset larger than memory, `storage="disk"` streams the
Parquet row groups into memory-mapped files instead (images, and the token states once per
distinct caption): RAM then holds one row group at a time while loading, and a step reads
its rows from the page cache or the disk. `EpochSampler` turns a global sample position into dataset
indices: the position is the whole data state of a run, which is what makes a
resumed run draw exactly the batches the uninterrupted one would have drawn.
"""

from __future__ import annotations

import io
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from tasks.contracts import DatasetVersion, EmbeddingSet

# A caption that names a side must not be mirrored: "a circle on the left" would become a lie.
LEFT_RIGHT_WORDS = re.compile(r"\b(left|right|leftmost|rightmost|lefthand|righthand)\b", re.IGNORECASE)

FLIP_MODES = ("auto", "always", "never")
_DECODE_ROWS = 4096  # images decoded per Parquet read


class TrainDataError(ValueError):
    """The dataset or the embedding set cannot be trained on as given."""


@dataclass
class TrainData:
    """Everything a training step reads, row-aligned; `.to(device)` once, then index per step."""

    ids: list[str]
    captions: list[str]
    images: torch.Tensor  # (N, 3, H, W) uint8
    tokens: torch.Tensor  # (N, L, D) caption token states (float16 as stored)
    mask: torch.Tensor  # (N, L) bool, True = real token
    pooled: torch.Tensor  # (N, E) float32 pooled caption embeddings (the UNet's global conditioning)
    uncond_tokens: torch.Tensor  # (1, L, D) the empty caption, for caption dropout
    uncond_mask: torch.Tensor  # (1, L) bool
    uncond_pooled: torch.Tensor  # (1, E) float32
    flippable: torch.Tensor  # (N,) bool: may this sample be mirrored left-right
    # None: tokens, mask and pooled are row-aligned with images. Else they hold one row per
    # distinct caption and sample i's caption row is caption_rows[i] (see `caption_index`).
    caption_rows: torch.Tensor | None = None  # (N,) long
    on_disk: bool = False  # images and tokens are memory-mapped files: index them, never copy them whole

    def __len__(self) -> int:
        return self.images.shape[0]

    def caption_index(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows of tokens / mask / pooled for the samples `idx`."""
        return idx if self.caption_rows is None else self.caption_rows[idx]

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    def to(self, device: str | torch.device) -> TrainData:
        moved = {
            f.name: getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), torch.Tensor) else getattr(self, f.name)
            for f in fields(self)
        }
        return replace(self, **moved)

    def nbytes(self) -> int:
        tensors = (self.images, self.tokens, self.mask, self.pooled, self.flippable, self.caption_rows)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def flippable_mask(captions: list[str], flip: str) -> torch.Tensor:
    """(N,) bool. "auto": captions without left/right words; "always"/"never": all/none."""
    if flip not in FLIP_MODES:
        raise ValueError(f"flip must be one of {FLIP_MODES}, got {flip!r}")
    if flip == "never":
        return torch.zeros(len(captions), dtype=torch.bool)
    if flip == "always":
        return torch.ones(len(captions), dtype=torch.bool)
    return torch.tensor([LEFT_RIGHT_WORDS.search(c) is None for c in captions], dtype=torch.bool)


def split_files(dataset: DatasetVersion, split: str) -> list[Path]:
    files = sorted((Path(dataset.root) / split).glob("*.parquet"))
    if not files:
        raise TrainDataError(
            f"dataset {dataset.name}@{dataset.version} has no Parquet files in {Path(dataset.root) / split}; "
            "was it ingested completely (ingest_dataset publishes atomically)?"
        )
    return files


def read_images(
    dataset: DatasetVersion, split: str = "train", workers: int = 4, out_file: Path | None = None
) -> tuple[list[str], list[str], torch.Tensor]:
    """(ids, captions, images (N, 3, H, W) uint8) of one split, every image checked to be
    `dataset.resolution` square RGB. With `out_file` the images go to a memory-mapped file
    there, one Parquet row group at a time, so the split never has to fit in memory."""
    files = split_files(dataset, split)
    n = sum(pq.ParquetFile(path).metadata.num_rows for path in files)
    if not n:
        raise TrainDataError(
            f"dataset {dataset.name}@{dataset.version} has no rows in its {split!r} split "
            f"(counts: {dataset.counts}); check the ingest filters and rejects.parquet"
        )
    res = dataset.resolution
    if out_file is None:
        images = np.empty((n, 3, res, res), dtype=np.uint8)
    else:
        out_file.unlink(missing_ok=True)
        images = np.memmap(out_file, np.uint8, "w+", shape=(n, 3, res, res))
    ids: list[str] = []
    captions: list[str] = []

    def decode(item: tuple[int, str, bytes]) -> None:
        i, id_, blob = item
        with Image.open(io.BytesIO(blob)) as im:
            if im.size != (res, res):
                raise TrainDataError(
                    f"image {id_} of {dataset.name}@{dataset.version} is {im.size[0]}x{im.size[1]}, but training "
                    f"needs {res}x{res} images (the dataset's resolution); an ingest with resize_mode keep_ratio "
                    "keeps the aspect: re-ingest with resize_mode center_crop or pad"
                )
            images[i] = np.asarray(im.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)  # (3, H, W)

    # PIL releases the GIL while decoding, so threads do help here.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for path in files:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=_DECODE_ROWS, columns=["id", "caption", "image"]):
                batch_ids = batch.column("id").to_pylist()
                start = len(ids)
                list(pool.map(decode, zip(range(start, start + len(batch_ids)), batch_ids, batch.column("image").to_pylist())))
                ids += batch_ids
                captions += batch.column("caption").to_pylist()
    if isinstance(images, np.memmap):
        images.flush()
    return ids, captions, torch.from_numpy(images)


def load_train_data(
    dataset: DatasetVersion,
    embeddings: EmbeddingSet,
    split: str = "train",
    max_length: int | None = None,
    flip: str = "auto",
    storage: Literal["memory", "disk"] = "memory",
    cache_dir: Path | None = None,
) -> TrainData:
    """Join a split's decoded images with its caption embeddings by row `id` and caption (one
    image may have several captions, each its own row: `dedupe` other than "image"); validate
    on the way.

    `storage="disk"` memory-maps the images and the per-caption token states into files in
    `cache_dir` (required then); the samples and their order are the same either way."""
    from tasks.embed import caption_id, load_embeddings  # the embed stage owns the on-disk embedding format

    if storage not in ("memory", "disk"):
        raise ValueError(f"storage must be 'memory' or 'disk', got {storage!r}")
    if storage == "disk":
        if cache_dir is None:
            raise ValueError("storage='disk' needs a cache_dir for the memory-mapped files")
        cache_dir.mkdir(parents=True, exist_ok=True)
    check_pair(dataset, embeddings)
    on_disk = storage == "disk"
    ids, captions, images = read_images(dataset, split, out_file=cache_dir / f"{split}-images.u8" if on_disk else None)
    emb = load_embeddings(
        embeddings, split=split, max_length=max_length, per_caption=on_disk,
        tokens_file=cache_dir / f"{split}-tokens.f16" if on_disk else None,
    )  # fmt: skip
    row_of = {key: i for i, key in enumerate(zip(emb.ids, emb.caption_ids))}
    keys = [(id_, caption_id(caption)) for id_, caption in zip(ids, captions)]
    missing = [id_ for id_, key in zip(ids, keys) if key not in row_of]
    if missing:
        raise TrainDataError(
            f"{len(missing)} of {len(ids)} {split!r} rows of {dataset.name}@{dataset.version} have no embedding of "
            f"their caption in {embeddings.path} (first ids: {missing[:3]}); re-run the embed stage for this dataset version"
        )
    rows = torch.tensor([row_of[key] for key in keys], dtype=torch.long)
    # In memory: caption tables gathered row-aligned with the images. On disk: one token-state
    # row per distinct caption, left in its file, and each sample's row in caption_rows.
    per_row = slice(None) if on_disk else rows
    return TrainData(
        ids=ids,
        captions=captions,
        images=images,
        tokens=emb.tokens[per_row],
        mask=emb.mask[per_row].bool(),
        pooled=emb.pooled[per_row].float(),
        uncond_tokens=emb.uncond_tokens,
        uncond_mask=emb.uncond_mask.bool(),
        uncond_pooled=emb.uncond_pooled.float(),
        flippable=flippable_mask(captions, flip),
        caption_rows=emb.caption_rows[rows] if on_disk else None,
        on_disk=on_disk,
    )


def check_pair(dataset: DatasetVersion, embeddings: EmbeddingSet) -> None:
    """The embedding set must have been computed from this very dataset version."""
    if embeddings.dataset_version != dataset.version:
        raise TrainDataError(
            f"embedding set {embeddings.path} covers dataset version {embeddings.dataset_version}, not "
            f"{dataset.name}@{dataset.version}; embed this dataset version first (embed_dataset(dataset, ...))"
        )
    n = dataset.counts.get("train", 0)
    if n <= 0:
        raise TrainDataError(
            f"dataset {dataset.name}@{dataset.version} has no training rows (counts: {dataset.counts}); "
            "check the source and the ingest filters (rejects.parquet says why rows were dropped)"
        )


class EpochSampler:
    """Sample position p (0, 1, 2, ... over the whole run) -> dataset index.

    The stream is a concatenation of epochs, each a permutation of range(N) drawn from
    (seed, epoch) alone, so any slice of the stream can be recomputed from its position:
    no sampler state to save beyond the position itself. Permutations live on `device`.
    """

    def __init__(self, n: int, seed: int, device: torch.device | str = "cpu"):
        self.n = n
        self.seed = seed
        self.device = torch.device(device)
        self._cache: dict[int, torch.Tensor] = {}

    def _epoch(self, epoch: int) -> torch.Tensor:
        perm = self._cache.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(mix_seed(self.seed, 0x5EED, epoch))
            perm = torch.randperm(self.n, generator=g)
            if self.device.type == "cuda":  # pinned + non_blocking: no host sync in the step that crosses an epoch
                perm = perm.pin_memory().to(self.device, non_blocking=True)
            else:
                perm = perm.to(self.device)
            self._cache = {e: p for e, p in self._cache.items() if e >= epoch - 1}
            self._cache[epoch] = perm
        return perm

    def indices(self, start: int, count: int) -> torch.Tensor:
        """(count,) long: dataset indices at positions [start, start + count)."""
        parts = []
        pos, end = start, start + count
        while pos < end:
            epoch, offset = divmod(pos, self.n)
            take = min(end - pos, self.n - offset)
            parts.append(self._epoch(epoch)[offset : offset + take])
            pos += take
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def mix_seed(*values: int) -> int:
    """A 63-bit seed from a few ints (splitmix64-style), so nearby (seed, step) pairs are unrelated."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h ^= (v + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF

