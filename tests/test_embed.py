"""Embed stage: round trip, deduplication, publication, offline weights, truncation, errors.

Everything runs a tiny open_clip architecture (conftest's `tiny_clip`) on the CPU; the
oracle for stored embeddings is a fresh `TextEncoder.encode` (or open_clip's own
`encode_text`) of the same captions, never an earlier output of the stage.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import tasks.embed as embed_module
from models.checkpoint import save_weights
from models.text_encoder import TextEncoder, TextEncoderConfig
from tasks.contracts import DatasetVersion
from tasks.embed import (
    EmbedConfig,
    build_encoder,
    EmbedError,
    embed_dataset,
    embed_from_path,
    embed_task,
    find_published,
    load_embeddings,
    read_manifest,
    write_caption_shard,
    write_caption_shards,
)

REPO = Path(__file__).resolve().parents[1]
TRAIN = [
    "a red circle in the top left",
    "two blue squares!",  # "!" is token id 0, the padding id: lengths must not count non-zero ids
    "a red circle in the top left",
    "!!!",
    "a small green star",
    "two blue squares!",
    "x",
    "a yellow triangle on a black background, bottom right",
]
VAL = ["a red circle in the top left", "a purple star"]


def _png(i: int, size: int = 8) -> bytes:
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = i % 256, i // 256, (37 * i) % 256
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(root: Path, splits: dict[str, list[str]], version: str = "v1", parts: int = 1) -> DatasetVersion:
    """A dataset version laid out as ingest publishes it: <split>/part-*.parquet + manifest.json."""
    counts, n = {}, 0
    for split, captions in splits.items():
        images = [_png(n + i) for i in range(len(captions))]
        n += len(captions)
        table = pa.table(
            {
                "id": [hashlib.sha256(b).hexdigest() for b in images],
                "caption": captions,
                "image": images,
                "width": [8] * len(captions),
                "height": [8] * len(captions),
                "source": [f"mem://{split}/{i}" for i in range(len(captions))],
            }
        )
        (root / split).mkdir(parents=True, exist_ok=True)
        step = -(-len(captions) // parts) if captions else 1
        for k, start in enumerate(range(0, len(captions), step)):
            pq.write_table(table.slice(start, step), root / split / f"part-{k:05d}.parquet")
        counts[split] = len(captions)
    (root / "manifest.json").write_text(json.dumps({"name": "toy", "version": version, "counts": counts}))
    return DatasetVersion(
        name="toy",
        version=version,
        root=str(root),
        counts={"train": counts.get("train", 0), "val": counts.get("val", 0), "rejects": 0},
        resolution=8,
        manifest=str(root / "manifest.json"),
    )


def dataset_rows(dataset: DatasetVersion, split: str) -> tuple[list[str], list[str]]:
    table = pa.concat_tables(pq.read_table(p) for p in sorted((Path(dataset.root) / split).glob("*.parquet")))
    return table.column("id").to_pylist(), table.column("caption").to_pylist()


@pytest.fixture
def toy(tmp_path: Path) -> DatasetVersion:
    return write_dataset(tmp_path / "dataset", {"train": TRAIN, "val": VAL}, parts=2)


@pytest.fixture
def config(tiny_clip: str) -> EmbedConfig:
    return EmbedConfig(encoder={"model_name": tiny_clip, "allow_random_init": True}, batch_size=2, captions_per_shard=3)


@pytest.fixture
def encoded(monkeypatch) -> list[str]:
    """Every caption the stage sends to the encoder, in order."""
    seen: list[str] = []
    original = embed_module._encode_batch

    def counting(encoder, captions, *args):
        seen.extend(captions)
        return original(encoder, captions, *args)

    monkeypatch.setattr(embed_module, "_encode_batch", counting)
    return seen


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in [root, *sorted(root.rglob("*"))]}


def assert_fp16_close(stored: torch.Tensor, fresh: torch.Tensor) -> None:
    # Stored values are float16; the fresh ones came from another batch composition, which
    # may move the float32 result by an ulp and so flip the float16 rounding.
    torch.testing.assert_close(stored.float(), fresh.float(), rtol=2e-3, atol=2e-3)


# --- round trip ------------------------------------------------------------------------------------


def test_round_trip_padding_mask_and_one_encode_per_distinct_caption(toy, config, encoded):
    es = embed_dataset(toy, config, progress=False)

    assert Counter(encoded) == Counter(set(TRAIN) | set(VAL) | {""})  # each distinct caption once, "" included
    assert es.dataset_version == toy.version and es.width == 32
    assert es.counts == {"train": 8, "val": 2, "captions": 8, "val_images": 0}
    assert es.encoder["weights"] == "random-init-0" and es.encoder["config"]["allow_random_init"] is True

    encoder = TextEncoder(config.text_encoder_config())
    for split, captions in (("train", TRAIN), ("val", VAL)):
        loaded = load_embeddings(es, split)
        ids, dataset_captions = dataset_rows(toy, split)
        assert loaded.ids == ids and dataset_captions == captions  # dataset row order
        fresh = encoder.encode(captions)
        L = es.num_tokens
        assert L == max(int(encoder.encode([c]).lengths) for c in TRAIN + VAL)  # longest of the set
        assert loaded.tokens.shape == (len(captions), L, 32) and loaded.tokens.dtype == torch.float16
        assert torch.equal(loaded.lengths, fresh.lengths)
        assert torch.equal(loaded.mask, fresh.mask[:, :L])
        assert_fp16_close(loaded.tokens[loaded.mask], fresh.tokens[fresh.mask])
        assert not loaded.tokens[~loaded.mask].any()  # padding is zeros
        torch.testing.assert_close(loaded.pooled, fresh.pooled, rtol=1e-5, atol=1e-5)

        uncond = encoder.encode([""])
        assert loaded.uncond_tokens.shape == (1, L, 32) and loaded.uncond_mask.sum() == 2  # start + end token
        assert_fp16_close(loaded.uncond_tokens[loaded.uncond_mask], uncond.tokens[uncond.mask])

    train = load_embeddings(es, "train")
    assert torch.equal(train.tokens[0], train.tokens[2])  # duplicate captions share one stored embedding


def test_graphs_that_fail_mid_stage_leave_a_whole_set_and_the_reason_in_the_manifest(toy, config, cpu_graphs, caplog):
    cpu_graphs(failing=True)  # what a GPU's cache does when a capture fails, on the CPU
    es = embed_dataset(toy, config.model_copy(update={"cuda_graphs": True}), progress=False)
    compute = read_manifest(es.path)["compute"]
    assert compute["cuda_graphs"] is False and "capture failed: operation not permitted" in compute["cuda_graphs_error"]
    assert sum("CUDA graphs turned off" in r.getMessage() for r in caplog.records) == 1
    loaded, fresh = load_embeddings(es, "train"), build_encoder(config).encode(TRAIN)  # every row, as without graphs
    assert_fp16_close(loaded.tokens[loaded.mask], fresh.tokens[fresh.mask])
    torch.testing.assert_close(loaded.pooled, fresh.pooled, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_an_image_with_two_captions_trains_on_each_captions_embedding(tmp_path, config, storage):
    from tasks.data import load_train_data

    dataset = write_dataset(tmp_path / "dataset", {"train": TRAIN, "val": VAL})
    part = Path(dataset.root) / "train" / "part-00000.parquet"
    table = pq.read_table(part).to_pydict()
    for column in ("id", "image"):  # row 1 is row 0's image with its own caption, as dedupe="image_caption" keeps
        table[column][1] = table[column][0]
    pq.write_table(pa.table(table), part)
    es = embed_dataset(dataset, config, data_root=tmp_path, progress=False)
    data = load_train_data(dataset, es, storage=storage, cache_dir=tmp_path / "cache")
    fresh = build_encoder(config).encode(TRAIN)
    assert data.ids[0] == data.ids[1] and data.captions == TRAIN
    pooled = data.pooled[data.caption_rows] if storage == "disk" else data.pooled
    torch.testing.assert_close(pooled, fresh.pooled, rtol=1e-5, atol=1e-5)  # each row its own caption's


def test_a_dataset_of_images_not_square_at_its_resolution_names_the_resize_mode(tmp_path):
    from tasks.data import TrainDataError, read_images

    dataset = write_dataset(tmp_path / "dataset", {"train": TRAIN[:2]})
    part = Path(dataset.root) / "train" / "part-00000.parquet"
    table = pq.read_table(part).to_pydict()
    buf = io.BytesIO()
    Image.new("RGB", (11, 8)).save(buf, format="PNG")  # what resize_mode keep_ratio gives a wide image
    table["image"][1] = buf.getvalue()
    pq.write_table(pa.table(table), part)
    with pytest.raises(TrainDataError, match=r"is 11x8, but training needs 8x8 images .* resize_mode center_crop or pad"):
        read_images(dataset, "train", workers=1)


def test_streamed_shards_batch_alike_captions_and_padding_length_is_the_callers(toy, config, monkeypatch):
    calls: list[list[str]] = []
    original = embed_module._encode_batch

    def recording(encoder, captions, *args):
        calls.append(list(captions))
        return original(encoder, captions, *args)

    monkeypatch.setattr(embed_module, "_encode_batch", recording)
    es = embed_dataset(toy, config, progress=False)
    manifest = read_manifest(es.path)
    assert len(manifest["files"]["captions"]) == 3  # 8 distinct captions, 3 per shard
    tokenizer = build_encoder(config).tokenizer

    def ids(caption: str) -> tuple[int, ...]:
        row = tokenizer.ids([caption], context_length=77)[0].tolist()
        return tuple(row[: row.index(tokenizer.eot_token_id) + 1])

    for name in manifest["files"]["captions"]:
        in_shard = set(pq.read_table(Path(es.path) / name).column("caption").to_pylist())
        shard = [batch for batch in calls if set(batch) <= in_shard]  # its encoder calls, in order
        assert sorted(c for batch in shard for c in batch) == sorted(in_shard)
        assert all([ids(c) for c in batch] == sorted(ids(c) for c in batch) for batch in shard)  # shared prefixes meet
        assert max(len(ids(c)) for c in shard[0]) == max(len(ids(c)) for c in in_shard)  # the longest batch first

    default = load_embeddings(es, "train")
    full = load_embeddings(es, "train", max_length=77)
    assert full.tokens.shape[1] == 77 and full.uncond_tokens.shape[1] == 77
    assert torch.equal(full.tokens[:, : es.num_tokens], default.tokens) and not full.tokens[:, es.num_tokens :].any()
    assert torch.equal(full.mask.sum(1), default.lengths)

    longest_val = int(load_embeddings(es, "val").lengths.max())
    assert load_embeddings(es, "val", max_length=longest_val).tokens.shape[1] == longest_val
    with pytest.raises(EmbedError, match="shorter than the longest 'val' caption"):
        load_embeddings(es, "val", max_length=longest_val - 1)
    with pytest.raises(EmbedError, match=r"max_length must be in \[1, 77\]"):
        load_embeddings(es, "train", max_length=78)
    with pytest.raises(EmbedError, match="split must be one of"):
        load_embeddings(es, "test")


def test_tokenizer_workers_and_write_thread_give_the_serial_bytes(toy, config, tmp_path, monkeypatch):
    # 8 distinct captions + "", 3 per shard; chunks of 2 so each shard goes to the 2 workers,
    # the next shard tokenizing while this one encodes
    serial = embed_dataset(toy, config.model_copy(update={"tokenize_workers": 0}), data_root=tmp_path / "serial", progress=False)
    monkeypatch.setattr(embed_module, "TOKENIZE_CHUNK", 2)
    calls: list[int] = []
    original = embed_module.TokenizerPool.submit

    def counting(self, captions):
        calls.append(self.workers)
        return original(self, captions)

    monkeypatch.setattr(embed_module.TokenizerPool, "submit", counting)
    pooled = embed_dataset(toy, config.model_copy(update={"tokenize_workers": 2}), data_root=tmp_path / "pool", progress=False)
    assert calls == [2, 2, 2]  # three shards, all through the worker pool
    for name in read_manifest(serial.path)["files"]["captions"]:
        a, b = pq.read_table(Path(serial.path) / name), pq.read_table(Path(pooled.path) / name)
        assert a.equals(b), name


def test_encoding_thread_never_waits_for_the_device(config, tmp_path):
    # The thread that feeds the encoder only queues device work: the real tokens are
    # gathered at positions the host knows (a boolean mask, aten::nonzero, would sync a GPU
    # to size its output), no scalar is read back (aten::_local_scalar_dense), and the
    # copies to the host are waited for in the arrow thread. The profiler sees this thread.
    from torch.profiler import profile

    encoder = build_encoder(config)
    captions = sorted(set(TRAIN))
    with profile() as prof:
        write_caption_shard(encoder, captions, tmp_path / "shard.parquet", batch_size=2)
    syncing = {"aten::nonzero", "aten::_local_scalar_dense", "aten::item", "aten::index", "aten::masked_select"}
    assert not {e.key for e in prof.key_averages()} & syncing
    # The gather and check the GPU path queues in this thread (on the CPU the arrow thread runs them).
    encoding = encoder.encode(captions)
    with profile() as prof:
        host = embed_module._to_host(encoding, encoding.lengths.numpy())
    assert not {e.key for e in prof.key_averages()} & syncing
    assert torch.equal(host.tokens, encoding.tokens[encoding.mask].half()) and bool(host.finite) and host.landed is None
    table = pq.read_table(tmp_path / "shard.parquet")
    fresh = encoder.encode(table.column("caption").to_pylist())
    stored = np.frombuffer(b"".join(table.column("tokens").to_pylist()), dtype="<f2").reshape(-1, 32)
    assert_fp16_close(torch.from_numpy(stored.copy()), fresh.tokens[fresh.mask])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_cuda_shard_holds_the_encoders_states(config, tmp_path, monkeypatch, cuda_graphs):
    # The pinned copies, queued without waiting and read after their event: the stored bytes
    # are the device's float16 states of the same batch.
    encoder = build_encoder(config.model_copy(update={"cuda_graphs": cuda_graphs}), "cuda")
    captions = sorted(set(TRAIN)) * 50  # repeats: one batch, many equal rows
    captions = [f"{c} {i}" for i, c in enumerate(captions)]
    original = embed_module._to_host

    def copies_behind_a_busy_device(encoding, lengths):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of device work queued first: a read that does not wait gets stale bytes
        return original(encoding, lengths)

    monkeypatch.setattr(embed_module, "_to_host", copies_behind_a_busy_device)
    write_caption_shard(encoder, captions, tmp_path / "shard.parquet", batch_size=len(captions))
    table = pq.read_table(tmp_path / "shard.parquet")
    stored_captions = table.column("caption").to_pylist()  # in the batch's prefix order
    assert sorted(stored_captions) == sorted(captions)
    with embed_module._autocast(encoder.device):
        fresh = encoder.encode(stored_captions)  # the same batch: the same trie
    stored = np.frombuffer(b"".join(table.column("tokens").to_pylist()), dtype="<f2").reshape(-1, 32)
    torch.testing.assert_close(torch.from_numpy(stored.copy()), fresh.tokens[fresh.mask].half().cpu(), rtol=1e-3, atol=1e-3)
    pooled = np.frombuffer(b"".join(table.column("pooled").to_pylist()), dtype="<f4").reshape(len(captions), -1)
    torch.testing.assert_close(torch.from_numpy(pooled.copy()), fresh.pooled.float().cpu(), rtol=1e-3, atol=1e-3)
    if cuda_graphs:  # the stage's batch and `fresh` had one shape: one capture; writing again replays it
        assert encoder._graphs.captures == 1 and encoder.graphs_error is None  # its first replay matched eager
        write_caption_shard(encoder, captions, tmp_path / "again.parquet", batch_size=len(captions))
        again = pq.read_table(tmp_path / "again.parquet")
        assert encoder._graphs.captures == 1 and again.column("caption").equals(table.column("caption"))
        replayed = np.frombuffer(b"".join(again.column("tokens").to_pylist()), dtype="<f2").reshape(-1, 32)
        # The first shard came from the run before the capture, this one from the graph: other
        # streams and workspaces, so equal within rounding, not necessarily in every bit.
        torch.testing.assert_close(torch.from_numpy(replayed.copy()), torch.from_numpy(stored.copy()), rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_stage_runs_graphs_by_default_and_stores_what_eager_stores(toy, config, tmp_path):
    # The whole stage on the GPU with the default cuda_graphs, against the same stage with them off.
    assert EmbedConfig().cuda_graphs
    on = config.model_copy(update={"device": "cuda", "batch_size": 4})
    graphed = embed_dataset(toy, on, data_root=tmp_path / "graphs", progress=False)
    compute = read_manifest(graphed.path)["compute"]
    assert compute["cuda_graphs"] is True and compute["cuda_graphs_error"] is None
    eager = embed_dataset(toy, on.model_copy(update={"cuda_graphs": False}), data_root=tmp_path / "eager", progress=False)
    assert read_manifest(eager.path)["compute"]["cuda_graphs"] is False
    for split in ("train", "val"):
        a, b = load_embeddings(graphed, split), load_embeddings(eager, split)
        assert torch.equal(a.lengths, b.lengths) and torch.equal(a.mask, b.mask)
        torch.testing.assert_close(a.tokens, b.tokens, rtol=1e-2, atol=1e-2)  # bf16 autocast both ways
        torch.testing.assert_close(a.pooled, b.pooled, rtol=1e-2, atol=1e-2)


def test_shards_are_fsynced_off_the_encoding_thread_before_the_loop_returns(config, tmp_path, monkeypatch):
    import threading

    from models.text_encoder import TokenizerPool

    synced, original_fsync = [], embed_module._fsync_file

    def record_fsync(path):
        assert pq.ParquetFile(path).metadata.num_rows > 0  # a finished file: its footer written
        original_fsync(path)
        synced.append((path, threading.current_thread().name))

    monkeypatch.setattr(embed_module, "_fsync_file", record_fsync)
    encoder = build_encoder(config)
    shards = [["a red circle", "two blue squares"], ["a green star"], ["x", "y", "z"]]
    with TokenizerPool(encoder, 0) as tokenize:
        names, longest = write_caption_shards(encoder, shards, tmp_path, 2, tokenize)
    paths = [tmp_path / name for name in names]
    assert names == [f"captions/part-{k:05d}.parquet" for k in range(3)] and longest == 5  # "two blue squares"
    assert sorted(p for p, _ in synced) == paths  # each file once, all before the loop returned
    assert {thread for _, thread in synced} == {"embed-fsync_0"}  # never on the thread that feeds the encoder
    assert [pq.read_table(p).column("caption").to_pylist() for p in paths] == shards


def test_next_shard_encodes_while_the_last_batches_of_the_one_before_are_written(config, tmp_path, monkeypatch):
    # The arrow thread holds shard 0's first batch until the encoder has started shard 1. A
    # loop that finished each file before encoding the next would stall here until the timeout.
    # Shard 0's two batches stay within the writer's bound of queued batches, so the encoding
    # thread itself never waits for them here.
    import threading

    from models.text_encoder import TokenizerPool

    next_shard_started, stalled = threading.Event(), []
    original_encode, original_record_batch = embed_module._encode_batch, embed_module._caption_record_batch

    def encode(encoder, captions, *args):
        if "a green star" in captions:  # shard 1
            next_shard_started.set()
        return original_encode(encoder, captions, *args)

    def slow_record_batch(captions, *args):
        if "a red circle" in captions and not next_shard_started.wait(timeout=20):
            stalled.append(captions)
        return original_record_batch(captions, *args)

    monkeypatch.setattr(embed_module, "_encode_batch", encode)
    monkeypatch.setattr(embed_module, "_caption_record_batch", slow_record_batch)
    encoder = build_encoder(config)
    shards = [["a red circle", "two blue squares", "x"], ["a green star"]]
    with TokenizerPool(encoder, 0) as tokenize:
        names, _ = write_caption_shards(encoder, shards, tmp_path, 2, tokenize)
    assert not stalled
    assert [sorted(pq.read_table(tmp_path / n).column("caption").to_pylist()) for n in names] == [sorted(s) for s in shards]


def test_a_failed_background_fsync_fails_the_run_and_publishes_nothing(toy, config, tmp_path, monkeypatch):
    from models.text_encoder import TokenizerPool

    original = embed_module._fsync_file

    def full_disk_for_the_first_caption_shard(path):
        if Path(path).name == "part-00000.parquet":
            raise OSError(28, "No space left on device", str(path))
        original(path)

    monkeypatch.setattr(embed_module, "_fsync_file", full_disk_for_the_first_caption_shard)
    encoder = build_encoder(config)
    with TokenizerPool(encoder, 0) as tokenize, pytest.raises(OSError, match="No space left"):
        write_caption_shards(encoder, [["a"], ["b"], ["c"]], tmp_path / "direct", 2, tokenize)
    # The stage: row shards fsync as before, the first caption shard's fsync fails in the background.
    with pytest.raises(OSError, match="No space left"):
        embed_dataset(toy, config, progress=False)
    assert list((Path(os.environ["T2I_DATA_ROOT"]) / "embeddings" / toy.version).iterdir()) == []


@pytest.fixture
def writers(monkeypatch):
    """Every ParquetWriter the stage opens, kept alive: pyarrow closes a collected writer
    itself, which would hide a file the stage failed to release."""
    made = []

    class Recorded(pq.ParquetWriter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(pq, "ParquetWriter", Recorded)
    return made


def _assert_released(root: Path, writers: list) -> None:
    """No thread of the stage is left running and no file it opened under `root` is still open."""
    import threading

    assert writers and not [w for w in writers if w.is_open]
    assert not [t.name for t in threading.enumerate() if t.name.startswith("embed-")]
    assert not [path for path in _open_files() if path.startswith(str(root.resolve()))]


def _open_files() -> list[str]:
    """The paths this process's descriptors are open on (Linux: /proc/self/fd; none elsewhere)."""
    if not os.path.isdir("/proc/self/fd"):
        return []
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # closed since the listing
            pass
    return held


# Shard 1 holds the run's last batch: when it fails, the loop has queued everything, so only
# the final waits (for writes, closes and fsyncs) can see it.
TWO_SHARDS = [["a red circle", "two blue squares", "x"], ["a green star"]]


@pytest.mark.parametrize("stage", ["conversion", "write", "close", "fsync"])
def test_a_failure_in_the_last_shards_last_batch_fails_the_run(stage, config, tmp_path, monkeypatch, writers):
    from models.text_encoder import TokenizerPool

    broken, last = OSError(5, f"Input/output error in the {stage}"), "a green star"
    original_record_batch, original_fsync = embed_module._caption_record_batch, embed_module._fsync_file

    def convert(captions, *args):
        if stage == "conversion" and last in captions:
            raise broken
        return original_record_batch(captions, *args)

    def fsync(path):
        if stage == "fsync" and Path(path).name == "part-00001.parquet":
            raise broken
        original_fsync(path)

    class Writer(pq.ParquetWriter):  # the `writers` fixture's recording class
        def __init__(self, where, *args, **kwargs):
            self.path, self.closes = Path(where), 0
            super().__init__(where, *args, **kwargs)

        def write_batch(self, batch, *args, **kwargs):
            if stage == "write" and last in batch.column("caption").to_pylist():
                raise broken
            super().write_batch(batch, *args, **kwargs)

        def close(self):
            self.closes += 1
            if stage != "close" or self.path.name != "part-00001.parquet":
                super().close()
            elif self.closes == 1:
                raise broken  # in the write thread; the file stays open, released on the way out
            else:
                super().close()
                raise OSError(5, "an echo while releasing the file")  # must not mask the cause

    monkeypatch.setattr(embed_module, "_caption_record_batch", convert)
    monkeypatch.setattr(embed_module, "_fsync_file", fsync)
    monkeypatch.setattr(pq, "ParquetWriter", Writer)
    encoder = build_encoder(config)
    with TokenizerPool(encoder, 0) as tokenize, pytest.raises(OSError, match=f"error in the {stage}"):
        write_caption_shards(encoder, TWO_SHARDS, tmp_path, 2, tokenize)
    _assert_released(tmp_path, writers)


def test_an_encode_failure_stops_the_threads_and_releases_the_files(config, tmp_path, monkeypatch, writers):
    # Shard 0's conversions wait until the writer has dropped its queues, so its second batch
    # and its close are still queued when shard 1's encode fails: they are dropped, the file
    # released and never fsynced.
    import threading

    from models.text_encoder import TokenizerPool

    class DeviceLost(RuntimeError):
        pass

    dropped = threading.Event()

    class Executor(embed_module.ThreadPoolExecutor):
        def shutdown(self, wait=True, *, cancel_futures=False):
            super().shutdown(wait=wait, cancel_futures=cancel_futures)
            if cancel_futures:
                dropped.set()

    original_encode, original_record_batch = embed_module._encode_batch, embed_module._caption_record_batch
    synced, late = [], []

    def encode(encoder, captions, *args):
        if "a green star" in captions:
            raise DeviceLost("CUDA error: an illegal memory access was encountered")
        return original_encode(encoder, captions, *args)

    def held_record_batch(*args):
        if not dropped.wait(timeout=20):
            late.append(args[0])
        return original_record_batch(*args)

    monkeypatch.setattr(embed_module, "ThreadPoolExecutor", Executor)
    monkeypatch.setattr(embed_module, "_encode_batch", encode)
    monkeypatch.setattr(embed_module, "_caption_record_batch", held_record_batch)
    monkeypatch.setattr(embed_module, "_fsync_file", synced.append)
    encoder = build_encoder(config)
    with TokenizerPool(encoder, 0) as tokenize, pytest.raises(DeviceLost):  # the cause, not an echo of the cleanup
        write_caption_shards(encoder, TWO_SHARDS, tmp_path, 2, tokenize)
    _assert_released(tmp_path, writers)
    assert synced == [] and late == []


def test_each_shard_is_sent_to_disk_while_it_is_written(config, tmp_path, monkeypatch, writers):
    # Every WRITEBACK_BYTES written, the write thread advises the kernel to write the file's
    # pages back (posix_fadvise DONTNEED), so its fsync after the close has little left to do.
    from models.text_encoder import TokenizerPool

    hints = []

    def advise(fd, offset, length, advice):
        hints.append((os.fstat(fd).st_ino, offset, length, advice))

    monkeypatch.setattr(os, "posix_fadvise", advise, raising=False)
    monkeypatch.setattr(os, "POSIX_FADV_DONTNEED", getattr(os, "POSIX_FADV_DONTNEED", 4), raising=False)
    monkeypatch.setattr(embed_module, "WRITEBACK_BYTES", 1)  # after every batch
    held_at_fsync, original_fsync = [], embed_module._fsync_file

    def fsync(path):  # a file's own descriptors are closed with it, not at the end of the run
        held_at_fsync.append(_open_files().count(str(path)))
        original_fsync(path)

    monkeypatch.setattr(embed_module, "_fsync_file", fsync)
    encoder = build_encoder(config)
    with TokenizerPool(encoder, 0) as tokenize:
        names, _ = write_caption_shards(encoder, TWO_SHARDS, tmp_path, 2, tokenize)
    if os.path.isdir("/proc/self/fd"):
        assert held_at_fsync == [0, 0]
    inode = {os.stat(tmp_path / name).st_ino: name for name in names}
    advised = [(inode[ino], offset, length, advice) for ino, offset, length, advice in hints]
    whole_file = (0, 0, os.POSIX_FADV_DONTNEED)
    assert advised == [(names[0], *whole_file)] * 2 + [(names[1], *whole_file)]  # batches of 2: 2 + 1
    _assert_released(tmp_path, writers)  # the descriptors the hints used are closed too

    # Advice only: a platform that refuses it costs the hints, not the run.
    def refuse(fd, offset, length, advice):
        hints.append(fd)
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "posix_fadvise", refuse)
    hints.clear()
    with TokenizerPool(encoder, 0) as tokenize:
        write_caption_shards(encoder, TWO_SHARDS, tmp_path / "refused", 2, tokenize)
    assert len(hints) == 2  # one per file, then none for it
    _assert_released(tmp_path, writers)  # before reading: pyarrow may close a read file's descriptor late
    for name in names:
        assert pq.read_table(tmp_path / "refused" / name).equals(pq.read_table(tmp_path / name))

    # Without a descriptor for the hints (out of them, say), the files are written all the same.
    def no_descriptor(*args, **kwargs):
        raise OSError(24, "Too many open files")

    with monkeypatch.context() as m, TokenizerPool(encoder, 0) as tokenize:
        m.setattr(embed_module.os, "open", no_descriptor)
        write_caption_shards(encoder, TWO_SHARDS, tmp_path / "no-fd", 2, tokenize)
    _assert_released(tmp_path / "no-fd", writers)  # (the files read above may be closed late)
    for name in names:
        assert pq.read_table(tmp_path / "no-fd" / name).equals(pq.read_table(tmp_path / "refused" / name))


def test_queuing_a_files_close_never_waits_for_its_batches(tmp_path):
    # Three batches fill the bound of queued writes; the close behind them takes no slot.
    import threading

    from tasks.embed import _BatchWriter, caption_schema

    schema = caption_schema(4, 4)
    written, returned, late = threading.Event(), [], []

    def held_batch():  # until the close has been queued
        if not written.wait(timeout=10):
            late.append("a batch waited out its timeout: queuing the close waited for it")
        return pa.RecordBatch.from_pylist([], schema=schema)

    with _BatchWriter() as threads:
        writer = threads.open(tmp_path / "part.parquet", schema)
        for _ in range(3):
            threads.add(writer, held_batch, 0, None)
        closed = threads.close(writer)
        returned.append(closed.done())
        written.set()
    assert late == [] and returned == [False]
    assert closed.done() and pq.read_table(tmp_path / "part.parquet").num_rows == 0


def test_a_batch_of_token_states_past_int32_offsets_is_refused_naming_batch_size():
    # Binary offsets are int32: 300 captions of 77 tokens at width 65,536 are ~3 GB, past 2**31 - 1.
    # The lengths alone decide it, so the token states need not be that big here.
    from tasks.embed import _caption_record_batch, _HostBatch, caption_schema

    width, n = 65536, 300
    host = _HostBatch(torch.zeros(1, width, dtype=torch.float16), torch.zeros(n, 4), torch.tensor(True), None)
    with pytest.raises(EmbedError, match=r"2\*\*31.*embed.batch_size"):
        _caption_record_batch([f"c{i}" for i in range(n)], np.full(n, 77), host, caption_schema(width, 4))


def test_caption_longer_than_the_context_is_truncated_as_open_clip_does(tmp_path, config, tiny_clip):
    long = " ".join(f"shape{i} colour{i}" for i in range(100))
    dataset = write_dataset(tmp_path / "long", {"train": [long, "short"], "val": []})
    es = embed_dataset(dataset, config, progress=False)
    loaded = load_embeddings(es, "train")
    assert es.num_tokens == 77 and loaded.lengths.tolist()[0] == 77

    # Oracle: open_clip's own tokenizer and encode_text on the same weights.
    encoder = TextEncoder(config.text_encoder_config())
    ids = open_clip.get_tokenizer(tiny_clip)([long])  # (1, 77): cut, end-of-text token kept last
    assert ids[0, -1] == encoder.tokenizer.eot_token_id
    with torch.no_grad():
        pooled = encoder.clip.encode_text(ids)  # (1, E)
    torch.testing.assert_close(loaded.pooled[:1], pooled, rtol=1e-5, atol=1e-5)
    fresh = encoder.encode([long])
    assert_fp16_close(loaded.tokens[0], fresh.tokens[0])


def test_weights_file_loaded_by_path_gives_the_in_memory_models_embeddings(toy, tmp_path, tiny_clip):
    in_memory = TextEncoder(TextEncoderConfig(tiny_clip, allow_random_init=True, random_init_seed=3))
    weights = save_weights(in_memory.clip.state_dict(), tmp_path / "tiny-clip.safetensors")
    config = EmbedConfig(encoder={"model_name": tiny_clip, "weights": str(weights)})

    es = embed_dataset(toy, config, progress=False)
    assert es.encoder["weights"].startswith("sha256:") and "random-init" not in es.encoder_id
    assert es.encoder["config"]["weights"] == str(weights)
    loaded = load_embeddings(es, "train")
    fresh = in_memory.encode(TRAIN)
    assert_fp16_close(loaded.tokens[loaded.mask], fresh.tokens[fresh.mask])
    torch.testing.assert_close(loaded.pooled, fresh.pooled, rtol=1e-5, atol=1e-5)

    # The Prefect cache finds the set without building the encoder, until the weights file changes.
    assert find_published(toy.version, config.text_encoder_config()) == Path(es.path)
    os.utime(weights, ns=(0, 0))
    assert find_published(toy.version, config.text_encoder_config()) is None


# --- idempotence and atomic publication ----------------------------------------------------------


def test_rerun_returns_the_published_set_untouched(toy, config, encoded):
    es = embed_dataset(toy, config, progress=False)
    before = snapshot(Path(es.path))
    encoded.clear()
    assert embed_dataset(toy, config, progress=False) == es
    assert encoded == []  # nothing encoded
    assert snapshot(Path(es.path)) == before  # same inodes and mtimes: nothing rewritten
    assert sorted(p.name for p in Path(es.path).parent.iterdir()) == [Path(es.path).name]


def test_failed_run_publishes_nothing(toy, config, monkeypatch):
    original, calls = embed_module._encode_batch, []

    def fail_second_batch(encoder, captions, *args):
        calls.append(captions)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return original(encoder, captions, *args)

    monkeypatch.setattr(embed_module, "_encode_batch", fail_second_batch)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        embed_dataset(toy, config, progress=False)
    assert list((Path(os.environ["T2I_DATA_ROOT"]) / "embeddings" / toy.version).iterdir()) == []


def test_non_finite_states_fail_in_the_arrow_thread_and_publish_nothing(toy, config, monkeypatch):
    original = embed_module._encode_batch

    def overflow(encoder, captions, *args):
        encoding = original(encoder, captions, *args)
        encoding.tokens[-1, 0, 0] = float("inf")  # e.g. float16 overflow in a broken weights file
        return encoding

    monkeypatch.setattr(embed_module, "_encode_batch", overflow)
    with pytest.raises(EmbedError, match="non-finite token states"):
        embed_dataset(toy, config, progress=False)
    assert list((Path(os.environ["T2I_DATA_ROOT"]) / "embeddings" / toy.version).iterdir()) == []


def test_killed_run_leaves_no_published_set(toy, config, tiny_clip, tmp_path):
    data_root = tmp_path / "killed"
    cfg_file = tmp_path / f"{tiny_clip}.json"
    cfg_file.write_text(json.dumps(open_clip.get_model_config(tiny_clip)))
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        import open_clip
        open_clip.add_model_config(Path({str(cfg_file)!r}))
        from tasks import embed

        original, calls = embed._encode_batch, []

        def encode_then_die(encoder, captions, *args):  # one batch written, the next one in flight
            calls.append(captions)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(encoder, captions, *args)

        embed._encode_batch = encode_then_die
        embed.embed_dataset(
            embed.DatasetVersion.model_validate_json({toy.model_dump_json()!r}),
            embed.EmbedConfig.model_validate_json({config.model_dump_json()!r}),
            data_root=Path({str(data_root)!r}),
            progress=False,
        )
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    parent = data_root / "embeddings" / toy.version
    (leftover,) = parent.iterdir()
    assert leftover.name.startswith(".partial-") and not (leftover / "manifest.json").exists()
    assert (leftover / "captions" / "part-00000.parquet").exists()  # it died mid-encode

    es = embed_dataset(toy, config, data_root=data_root, progress=False)
    assert [p.name for p in parent.iterdir()] == [Path(es.path).name]  # published; the dead run's partial is gone
    assert len(load_embeddings(es, "train")) == len(TRAIN)


def test_val_image_embeddings_can_be_added_to_a_published_set(toy, config):
    es = embed_dataset(toy, config, progress=False)
    assert load_embeddings(es, "val").image_embeds is None
    captions_before = snapshot(Path(es.path) / "captions")

    with_images = embed_dataset(toy, config.model_copy(update={"encode_val_images": True}), progress=False)
    assert with_images.path == es.path and with_images.counts["val_images"] == 2
    assert snapshot(Path(es.path) / "captions") == captions_before  # text embeddings untouched
    val = load_embeddings(with_images, "val")

    encoder = TextEncoder(config.text_encoder_config())
    table = pa.concat_tables(pq.read_table(p) for p in sorted((Path(toy.root) / "val").glob("*.parquet")))
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in table.column("image").to_pylist()])
    expected = encoder.encode_images(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255)
    assert val.ids == table.column("id").to_pylist()
    torch.testing.assert_close(val.image_embeds, expected, rtol=1e-5, atol=1e-5)

    before = snapshot(Path(es.path))
    assert embed_dataset(toy, config.model_copy(update={"encode_val_images": True}), progress=False) == with_images
    assert snapshot(Path(es.path)) == before


def test_a_run_killed_while_adding_val_images_leaves_the_manifest_whole(toy, config, monkeypatch):
    es = embed_dataset(toy, config, progress=False)
    manifest = read_manifest(es.path)
    import models.checkpoint

    write, manifest_path = models.checkpoint.Path.write_text, Path(es.path) / "manifest.json"

    def killed_halfway(self, text, *args, **kwargs):  # the new manifest's first half on disk, then SIGINT
        if self.parent == manifest_path.parent and '"val_images": true' in text:
            write(self, text[: len(text) // 2], *args, **kwargs)
            raise KeyboardInterrupt
        return write(self, text, *args, **kwargs)

    with_images = config.model_copy(update={"encode_val_images": True})
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(models.checkpoint.Path, "write_text", killed_halfway)
        embed_dataset(toy, with_images, progress=False)
    assert read_manifest(es.path) == manifest  # the old manifest, whole
    assert len(load_embeddings(es, "train")) == len(TRAIN)
    assert embed_dataset(toy, with_images, progress=False).counts["val_images"] == 2
    assert sorted(p.name for p in Path(es.path).iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_an_unreadable_manifest_says_to_delete_the_set(toy, config):
    es = embed_dataset(toy, config, progress=False)
    manifest_path = Path(es.path) / "manifest.json"
    manifest_path.write_text("")
    with pytest.raises(EmbedError, match=rf"{re.escape(str(manifest_path))}.*delete"):
        load_embeddings(es, "train")
    with pytest.raises(EmbedError, match=rf"{re.escape(str(manifest_path))}.*delete"):
        embed_dataset(toy, config, progress=False)


def test_a_set_directory_without_a_manifest_is_refused_before_encoding(toy, config, encoded):
    es = embed_dataset(toy, config, progress=False)
    (Path(es.path) / "manifest.json").unlink()
    encoded.clear()
    with pytest.raises(EmbedError, match=rf"{re.escape(es.path)} exists but holds no manifest.json.*delete it"):
        embed_dataset(toy, config, progress=False)
    assert encoded == []


def test_the_set_directory_is_fsynced_before_its_rename(toy, config, monkeypatch):
    import models.checkpoint

    synced = []
    monkeypatch.setattr(embed_module, "fsync_dir", synced.append)
    monkeypatch.setattr(models.checkpoint, "fsync_dir", synced.append)
    es = embed_dataset(toy, config, progress=False)
    partial = [p for p in synced if p.name.startswith(".partial-")]
    assert partial and all(p.parent == Path(es.path).parent for p in partial)  # its entries: the manifest, the folders
    assert synced[-1] == Path(es.path).parent  # then the rename


def test_a_data_root_with_a_quote_in_its_path(toy, config, tmp_path):
    es = embed_dataset(toy, config, data_root=tmp_path / "o'brien", progress=False)
    assert len(load_embeddings(es, "train")) == len(TRAIN)


def test_tokens_file_needs_per_caption(toy, config, tmp_path):
    # Per dataset row the token states are gathered into RAM, whatever backs the table.
    es = embed_dataset(toy, config, progress=False)
    with pytest.raises(EmbedError, match="tokens_file.*per_caption=True"):
        load_embeddings(es, "train", tokens_file=tmp_path / "tokens.f16")
    assert not (tmp_path / "tokens.f16").exists()
    loaded = load_embeddings(es, "train", per_caption=True, tokens_file=tmp_path / "tokens.f16")
    assert loaded.tokens.shape[0] == len(set(TRAIN)) + 1  # one row per distinct caption, "" first


def test_shapes_dataset_ingested_and_embedded_end_to_end(tmp_path, config):
    from tasks.ingest import IngestConfig, ingest_dataset
    from tasks.shapes import ShapesConfig, generate_shapes

    source = generate_shapes(tmp_path / "shapes", ShapesConfig(n_images=40, seed=2))
    dataset = ingest_dataset(source, "shapes", IngestConfig(resolution=16, workers=1), progress=False)
    es = embed_dataset(dataset, config.model_copy(update={"encode_val_images": True}), progress=False)
    for split in ("train", "val"):
        ids, captions = dataset_rows(dataset, split)
        loaded = load_embeddings(es, split)
        assert loaded.ids == ids and len(ids) == dataset.counts[split] > 0
    _, train_captions = dataset_rows(dataset, "train")
    _, val_captions = dataset_rows(dataset, "val")
    assert es.counts["captions"] == len(set(train_captions) | set(val_captions) | {""})
    assert load_embeddings(es, "val").image_embeds.shape == (dataset.counts["val"], 32)
    assert embed_from_path(Path(dataset.root) / "manifest.json", config.model_dump(), progress=False) == es  # the CLI's way in


# --- errors that teach ---------------------------------------------------------------------------


def test_empty_dataset_is_refused(tmp_path, config):
    empty = write_dataset(tmp_path / "empty", {"train": [], "val": []})
    with pytest.raises(EmbedError, match=r"is empty.*no captions to embed"):
        embed_dataset(empty, config, progress=False)


def test_missing_weights_name_the_option_to_set(toy, tiny_clip):
    with pytest.raises(EmbedError, match=r"embed.encoder=.*Set `weights`.*allow_random_init=True"):
        embed_dataset(toy, EmbedConfig(encoder={"model_name": tiny_clip}), progress=False)
    with pytest.raises(EmbedError, match="weights file not found"):
        embed_dataset(toy, EmbedConfig(encoder={"model_name": tiny_clip, "weights": "/nowhere/w.safetensors"}), progress=False)


def test_config_and_device_errors(toy, config):
    with pytest.raises(ValueError, match="unknown TextEncoderConfig keys"):
        EmbedConfig(encoder={"wieghts": "x"})
    with pytest.raises(ValueError, match="extra"):
        EmbedConfig(batch_sise=4)
    if not torch.cuda.is_available():
        with pytest.raises(EmbedError, match="no CUDA device"):
            embed_dataset(toy, config.model_copy(update={"device": "cuda"}), progress=False)


def test_stored_set_of_another_format_is_refused(toy, config):
    es = embed_dataset(toy, config, progress=False)
    manifest_path = Path(es.path) / "manifest.json"
    manifest_path.write_text(json.dumps({**json.loads(manifest_path.read_text()), "format": 0}))
    with pytest.raises(EmbedError, match="format 0"):
        load_embeddings(es, "train")


# --- the Prefect task wrapper ----------------------------------------------------------------------


def test_task_wrapper_retries_and_cache_key(toy, config, tmp_path):
    from prefect.states import Failed

    assert embed_task.retries == 2
    assert embed_task.retry_condition_fn(None, None, Failed(data=OSError("flaky disk"))) is True
    assert embed_task.retry_condition_fn(None, None, Failed(data=EmbedError("empty dataset"))) is False

    key_fn = embed_task.cache_policy.cache_key_fn
    params = {"dataset": toy, "config": config, "data_root": str(tmp_path / "c")}
    key = key_fn(None, params)  # known before the first run, so that run's result is what later runs reuse
    embed_task.fn(**params)
    assert key and key == key_fn(None, params)
    assert key == key_fn(None, {**params, "config": config.model_dump(), "dataset": toy.model_dump()})
    assert key == key_fn(None, {**params, "config": config.model_copy(update={"batch_size": 7})})  # speed knob
    assert key != key_fn(None, {**params, "config": config.model_copy(update={"encoder": {**config.encoder, "layer": "last"}})})
    assert key != key_fn(None, {**params, "config": config.model_copy(update={"encode_val_images": True})})
    assert key != key_fn(None, {**params, "data_root": str(tmp_path / "other")})


def test_cache_key_follows_the_weights_file_behind_the_path(toy, tmp_path, tiny_clip, monkeypatch):
    key_fn = embed_task.cache_policy.cache_key_fn
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    clip = TextEncoder(TextEncoderConfig(tiny_clip, allow_random_init=True)).clip
    weights = save_weights(clip.state_dict(), here / "w.safetensors")
    params = {"dataset": toy, "config": EmbedConfig(encoder={"model_name": tiny_clip, "weights": "w.safetensors"})}

    monkeypatch.chdir(here)
    key = key_fn(None, params)
    assert key == key_fn(None, params)
    os.utime(weights, ns=(0, 0))  # new weights written to the same path
    rewritten = key_fn(None, params)
    assert rewritten != key

    (there / "w.safetensors").write_bytes(weights.read_bytes())  # the same relative path from another cwd
    os.utime(there / "w.safetensors", ns=(0, 0))
    monkeypatch.chdir(there)
    assert key_fn(None, params) not in (key, rewritten)
