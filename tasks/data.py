"""Training data: a dataset version's images and its caption embeddings, as tensors.

`load_train_data` decodes the Parquet images once into a uint8 tensor `(N, 3, H, W)`
and joins them by `id` with the embedding set's token states and pooled embeddings, so a training step
is only an index into tensors that already sit on the device (no data loader, no
host work per step). `EpochSampler` turns a global sample position into dataset
indices: the position is the whole data state of a run, which is what makes a
resumed run draw exactly the batches the uninterrupted one would have drawn.
"""

from __future__ import annotations

import io
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from tasks.contracts import DatasetVersion, EmbeddingSet

# A caption that names a side must not be mirrored: "a circle on the left" would become a lie.
LEFT_RIGHT_WORDS = re.compile(r"\b(left|right|leftmost|rightmost|lefthand|righthand)\b", re.IGNORECASE)

FLIP_MODES = ("auto", "always", "never")


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

    def __len__(self) -> int:
        return self.images.shape[0]

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
        return sum(
            t.numel() * t.element_size() for t in (self.images, self.tokens, self.mask, self.pooled, self.flippable)
        )


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


def read_images(dataset: DatasetVersion, split: str = "train", workers: int = 4) -> tuple[list[str], list[str], torch.Tensor]:
    """(ids, captions, images (N, 3, H, W) uint8) of one split, every image checked to be
    `dataset.resolution` square RGB."""
    ids: list[str] = []
    captions: list[str] = []
    blobs: list[bytes] = []
    for path in split_files(dataset, split):
        table = pq.read_table(path, columns=["id", "caption", "image"])
        ids += table.column("id").to_pylist()
        captions += table.column("caption").to_pylist()
        blobs += table.column("image").to_pylist()
    if not ids:
        raise TrainDataError(
            f"dataset {dataset.name}@{dataset.version} has no rows in its {split!r} split "
            f"(counts: {dataset.counts}); check the ingest filters and rejects.parquet"
        )
    res = dataset.resolution

    def decode(i: int) -> np.ndarray:
        with Image.open(io.BytesIO(blobs[i])) as im:
            if im.size != (res, res):
                raise TrainDataError(
                    f"image {ids[i]} of {dataset.name}@{dataset.version} is {im.size[0]}x{im.size[1]}, but the "
                    f"dataset version says resolution {res}; re-ingest the dataset at the training resolution"
                )
            return np.asarray(im.convert("RGB"), dtype=np.uint8)  # (H, W, 3)

    # PIL releases the GIL while decoding, so threads do help here.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(pool.map(decode, range(len(blobs))))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
    return ids, captions, images


def load_train_data(
    dataset: DatasetVersion,
    embeddings: EmbeddingSet,
    split: str = "train",
    max_length: int | None = None,
    flip: str = "auto",
) -> TrainData:
    """Join a split's decoded images with its caption embeddings by `id`; validate on the way."""
    from tasks.embed import load_embeddings  # the embed stage owns the on-disk embedding format

    check_pair(dataset, embeddings)
    ids, captions, images = read_images(dataset, split)
    emb = load_embeddings(embeddings, split=split, max_length=max_length)
    row_of = {id_: i for i, id_ in enumerate(emb.ids)}
    missing = [i for i in ids if i not in row_of]
    if missing:
        raise TrainDataError(
            f"{len(missing)} of {len(ids)} {split!r} rows of {dataset.name}@{dataset.version} have no embedding in "
            f"{embeddings.path} (first: {missing[:3]}); re-run the embed stage for this dataset version"
        )
    rows = torch.tensor([row_of[i] for i in ids], dtype=torch.long)
    return TrainData(
        ids=ids,
        captions=captions,
        images=images,
        tokens=emb.tokens[rows],
        mask=emb.mask[rows].bool(),
        pooled=emb.pooled[rows].float(),
        uncond_tokens=emb.uncond_tokens,
        uncond_mask=emb.uncond_mask.bool(),
        uncond_pooled=emb.uncond_pooled.float(),
        flippable=flippable_mask(captions, flip),
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

