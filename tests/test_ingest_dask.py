"""Ingest staged on a Dask cluster publishes the same dataset as the local process pool.

A real `LocalCluster` (two worker processes on 127.0.0.1) stands in for a remote one:
the work units travel to the workers pickled, as they would over the network, and the
workers write the staged parts into the shared data root.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
from distributed import Client, get_task_stream

from tasks import ingest as ingest_module
from tasks.contracts import DatasetVersion
from tasks.ingest import FILES_PER_UNIT, IngestConfig, ingest_dataset
from tasks.shapes import ShapesConfig, generate_shapes

N_IMAGES = 300  # three work units of FILES_PER_UNIT


def refuse_local_pool(*args, **kwargs):
    raise AssertionError("ingest started its local process pool although a Dask address was given")


def row_digests(dv: DatasetVersion, relative: str) -> list[str]:
    """sha256 of every row (all columns, bytes included), in file order."""
    table = pq.read_table(Path(dv.root) / relative)
    return [
        hashlib.sha256(json.dumps(row, sort_keys=True, default=lambda b: b.hex()).encode()).hexdigest()
        for row in table.to_pylist()
    ]


def manifest(dv: DatasetVersion) -> dict:
    return json.loads(Path(dv.manifest).read_text())


def test_dask_cluster_ingest_equals_local_pool(tmp_path, dask_cluster, monkeypatch):
    source = generate_shapes(tmp_path / "shapes", ShapesConfig(n_images=N_IMAGES, seed=5))
    config = IngestConfig(workers=2)
    local = ingest_dataset(source, "shapes", config, data_root=tmp_path / "local", progress=False)

    with (
        monkeypatch.context() as patch,
        Client(dask_cluster.scheduler_address, set_as_default=False) as client,
        get_task_stream(client) as stream,
    ):
        patch.setattr(ingest_module, "ProcessPoolExecutor", refuse_local_pool)
        on_dask = ingest_dataset(
            source, "shapes", config, data_root=tmp_path / "dask", progress=False,
            dask_address=dask_cluster.scheduler_address,
        )  # fmt: skip
    units = [t for t in stream.data if str(t["key"]).startswith("stage_unit-")]
    assert len(units) == -(-N_IMAGES // FILES_PER_UNIT), "every work unit ran once, on the cluster"
    assert {t["worker"] for t in units} <= set(dask_cluster.scheduler_info["workers"])

    assert on_dask.version == local.version and on_dask.counts == local.counts
    assert local.counts["train"] + local.counts["val"] > 250
    for relative in ("train", "val", "rejects.parquet"):
        assert row_digests(on_dask, relative) == row_digests(local, relative), relative  # same rows, same order
    for key in ("counts", "files", "schema", "split", "statistics", "config"):
        assert manifest(on_dask)[key] == manifest(local)[key], key


def test_dask_address_comes_from_the_setting(tmp_path, dask_cluster, monkeypatch):
    source = generate_shapes(tmp_path / "shapes", ShapesConfig(n_images=40, seed=1))
    monkeypatch.setattr(ingest_module, "ProcessPoolExecutor", refuse_local_pool)
    monkeypatch.setenv("T2I_DASK_ADDRESS", dask_cluster.scheduler_address)
    dv = ingest_dataset(source, "small", IngestConfig(workers=2), progress=False)
    assert dv.counts["train"] + dv.counts["val"] + dv.counts["rejects"] == 40
