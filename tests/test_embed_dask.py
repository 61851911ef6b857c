"""Embed on a Dask cluster writes the same caption shards as this machine.

A real `LocalCluster` (two worker processes on 127.0.0.1) stands in for GPU workers: the
encoder is scattered to them once, the shards travel pickled, and the workers write the
shards into the shared data root.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from distributed import get_task_stream
from test_embed import TRAIN, VAL, write_dataset

import tasks.embed as embed_module
from tasks.embed import EmbedConfig, EmbedError, embed_dataset, load_embeddings, read_manifest


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
