"""Embed on a Dask cluster writes the same caption shards as this machine.

A real `LocalCluster` (two worker processes on 127.0.0.1) stands in for GPU workers: the
encoder is scattered to them once, the shards travel pickled, and the workers write the
shards into the shared data root.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from distributed import get_task_stream
from test_embed import TRAIN, VAL, write_dataset

import tasks.embed as embed_module
from tasks.embed import (
    EmbedConfig,
    EmbedError,
    build_encoder,
    embed_dataset,
    encode_shard_on_worker,
    load_embeddings,
    read_manifest,
)


@pytest.fixture
def threads_cluster():
    """A `LocalCluster` whose workers are threads of this process: what a test patches here, they run."""
    from distributed import LocalCluster

    # ":0": in-process, the HTTP server starts even with None; a free port, not 8787
    with LocalCluster(n_workers=1, threads_per_worker=3, processes=False, dashboard_address=":0") as cluster:
        yield cluster


def test_dask_workers_write_the_same_shards(dask_cluster, tmp_path, tiny_clip, monkeypatch):
    from distributed import Client

    dataset = write_dataset(tmp_path / "dataset", {"train": TRAIN * 3, "val": VAL}, parts=2)
    config = EmbedConfig(encoder={"model_name": tiny_clip, "allow_random_init": True}, batch_size=2, captions_per_shard=3)
    here = embed_dataset(dataset, config, data_root=tmp_path / "here", progress=False)

    def refuse(*args, **kwargs):
        raise AssertionError("embedded on this machine although a Dask address was given")

    monkeypatch.setattr(embed_module, "_encode_shards_here", refuse)
    with Client(dask_cluster.scheduler_address) as watcher, get_task_stream(client=watcher) as stream:
        there = embed_dataset(dataset, config, data_root=tmp_path / "there", progress=False, dask_address=dask_cluster.scheduler_address)
    shard_tasks = [t for t in stream.data if t["key"].startswith("encode_shard_on_worker")]
    files = read_manifest(here.path)["files"]["captions"]
    assert len(files) == 3 and len(shard_tasks) == len(files)  # 8 distinct captions and "", 3 per shard
    assert read_manifest(there.path)["files"]["captions"] == files
    for name in files:
        a, b = pq.read_table(Path(here.path) / name), pq.read_table(Path(there.path) / name)
        for column in ("caption_id", "caption", "num_tokens"):  # same captions, same order, same lengths
            assert a.column(column).equals(b.column(column)), (name, column)
    # the same states, up to float rounding: the workers' BLAS may use another thread count
    a, b = load_embeddings(here, "train"), load_embeddings(there, "train")
    assert a.ids == b.ids and torch.equal(a.mask, b.mask)
    torch.testing.assert_close(b.tokens.float(), a.tokens.float(), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(b.pooled, a.pooled, atol=1e-5, rtol=1e-5)


def test_dask_missing_is_a_clear_error(tmp_path, tiny_clip, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "distributed" else real(name, *a))
    dataset = write_dataset(tmp_path / "dataset", {"train": TRAIN, "val": VAL})
    config = EmbedConfig(encoder={"model_name": tiny_clip, "allow_random_init": True})
    with pytest.raises(EmbedError, match="needs dask.distributed"):
        embed_dataset(dataset, config, data_root=tmp_path / "data", progress=False, dask_address="tcp://127.0.0.1:1")


def test_a_failed_shard_stops_the_others_before_the_partial_set_is_removed(threads_cluster, tmp_path, tiny_clip, monkeypatch):
    dataset = write_dataset(tmp_path / "dataset", {"train": [f"caption {i}" for i in range(12)], "val": ["c"]})
    config = EmbedConfig(encoder={"model_name": tiny_clip, "allow_random_init": True}, captions_per_shard=3)
    original, started, finished = embed_module.write_caption_shard, [], []

    def first_fails_the_others_are_slow(encoder, captions, path, batch_size):
        started.append(path.name)
        if path.name == "part-00000.parquet":
            raise OSError("disk hiccup on shard 0")
        time.sleep(1.0)  # still running when shard 0's error reaches the client
        try:
            return original(encoder, captions, path, batch_size)
        finally:
            finished.append(path.name)

    monkeypatch.setattr(embed_module, "write_caption_shard", first_fails_the_others_are_slow)
    data_root = tmp_path / "data"
    with pytest.raises(OSError, match="disk hiccup"):
        embed_dataset(dataset, config, data_root=data_root, progress=False, dask_address=threads_cluster.scheduler_address)
    assert sorted(finished) == sorted(started[1:])  # the shards that were running, waited for
    assert len(started) == 4  # 14 captions, 5 shards on 3 threads: shard 0's thread took one, the other was cancelled
    deadline = time.monotonic() + 10  # had the run not waited, its running shards would write after the cleanup
    while len(finished) < len(started) - 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list((data_root / "embeddings" / dataset.version).iterdir()) == []  # nothing recreated after the cleanup


def test_a_shard_never_recreates_a_missing_directory(tmp_path, tiny_clip):
    # A worker still running after its run failed must not bring back the deleted partial set.
    encoder = build_encoder(EmbedConfig(encoder={"model_name": tiny_clip, "allow_random_init": True}))
    with pytest.raises(FileNotFoundError):
        encode_shard_on_worker(encoder, ["a red circle"], str(tmp_path / "removed" / "captions" / "part-00000.parquet"), 2)
    assert not (tmp_path / "removed").exists()


def test_the_manifest_records_what_the_workers_encoded_with(threads_cluster, tmp_path, tiny_clip, cpu_graphs):
    cpu_graphs(failing=True)  # what a GPU worker's cache does when a capture fails, on the CPU
    dataset = write_dataset(tmp_path / "dataset", {"train": TRAIN, "val": VAL})
    config = EmbedConfig(encoder={"model_name": tiny_clip, "allow_random_init": True}, batch_size=2, cuda_graphs=True)
    es = embed_dataset(dataset, config, data_root=tmp_path / "data", progress=False, dask_address=threads_cluster.scheduler_address)
    compute = read_manifest(es.path)["compute"]
    assert compute["device"] == ["cpu"] and compute["autocast"] == [None] and compute["batch_size"] == 2
    assert compute["cuda_graphs"] is False and "capture failed: operation not permitted" in compute["cuda_graphs_error"]
