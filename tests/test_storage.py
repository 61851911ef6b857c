"""An s3:// data root against a real S3 API (moto's server on 127.0.0.1): push, pull, the flow."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import console_script, free_port, running_server

from tasks import storage
from tasks.settings import get_settings

BUCKET = "t2i-test"


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 with an empty bucket; its endpoint URL."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    cmd = [console_script("moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with running_server(cmd, None, f"{endpoint}/moto-api/", tmp_path_factory.mktemp("moto"), timeout_s=60):
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                          region_name="us-east-1")  # fmt: skip
        s3.create_bucket(Bucket=BUCKET)
        yield endpoint


@pytest.fixture
def s3_root(s3_server, tmp_path, monkeypatch):
    """T2I_DATA_ROOT on the bucket; machine A's local cache. Returns a function that switches machines."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("T2I_S3_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("T2I_DATA_ROOT", f"s3://{BUCKET}/{tmp_path.name}")

    def machine(name: str) -> Path:
        monkeypatch.setenv("T2I_LOCAL_DATA_ROOT", str(tmp_path / name))
        return tmp_path / name

    machine("machine-a")
    return machine


def _objects(endpoint: str, prefix: str) -> dict[str, bytes]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                      region_name="us-east-1")  # fmt: skip
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            for o in page.get("Contents", [])]  # fmt: skip
    return {k[len(prefix) :]: s3.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}


def test_settings_split_an_s3_root_into_uri_and_local_cache(s3_root, tmp_path, monkeypatch):
    settings = get_settings()
    assert settings.data_uri == f"s3://{BUCKET}/{tmp_path.name}"
    assert settings.data_root == tmp_path / "machine-a" and settings.datasets_dir == tmp_path / "machine-a" / "datasets"
    monkeypatch.setenv("T2I_DATA_ROOT", "gs://elsewhere")
    with pytest.raises(ValueError, match="s3://bucket"):
        get_settings()


def test_push_then_pull_on_another_machine(s3_root, s3_server, tmp_path):
    a = s3_root("machine-a")
    local = a / "datasets" / "toy" / "v1"
    (local / "train").mkdir(parents=True)
    (local / "train" / "part-0.parquet").write_bytes(os.urandom(3000))
    (local / "manifest.json").write_text('{"rows": 3}')
    uri = storage.push(local)
    assert uri == f"s3://{BUCKET}/{tmp_path.name}/datasets/toy/v1"
    objects = _objects(s3_server, f"{tmp_path.name}/datasets/toy/v1/")
    assert set(objects) == {"train/part-0.parquet", "manifest.json", storage.MARKER}
    assert objects["train/part-0.parquet"] == (local / "train" / "part-0.parquet").read_bytes()

    b = s3_root("machine-b")
    there = b / "datasets" / "toy" / "v1"
    assert storage.pull(there) is True
    assert sorted(p.relative_to(there).as_posix() for p in there.rglob("*") if p.is_file()) == [
        "manifest.json", "train/part-0.parquet"
    ]  # fmt: skip
    assert (there / "train" / "part-0.parquet").read_bytes() == objects["train/part-0.parquet"]
    assert storage.pull(there) is False  # a local copy is used as it is
    assert not list((b / "datasets" / "toy").glob(".pull-*"))

    # not published (no marker): refused, and nothing appears locally
    with pytest.raises(storage.StorageError, match="not published"):
        storage.pull(b / "datasets" / "toy" / "v2")
    assert not (b / "datasets" / "toy" / "v2").exists()
    with pytest.raises(storage.StorageError, match="outside the local data root"):
        storage.pull(tmp_path / "elsewhere")


def test_without_a_remote_root_push_and_pull_do_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("T2I_DATA_ROOT", str(tmp_path / "data"))
    assert storage.push(tmp_path / "data" / "datasets" / "x") is None
    assert storage.pull(tmp_path / "data" / "datasets" / "x") is False


@pytest.mark.slow
def test_flow_on_an_s3_data_root_and_a_second_machine(prefect_api, tiny_pipeline_params, s3_root, s3_server, tmp_path):
    from flows.pipeline import text_to_image_pipeline
    from models.pipeline import GenerationParams, TextToImage

    summary = text_to_image_pipeline(tiny_pipeline_params.model_copy(update={"model_name": "t2i-s3"}))
    a = tmp_path / "machine-a"
    prefix = f"{tmp_path.name}/"
    objects = _objects(s3_server, prefix)
    for local in (summary.dataset.root, summary.embeddings.path, summary.train.run_dir):
        key = Path(local).resolve().relative_to(a.resolve()).as_posix()
        assert f"{key}/{storage.MARKER}" in objects, key  # each stage's output, published whole
    run_key = Path(summary.train.run_dir).resolve().relative_to(a.resolve()).as_posix()
    assert f"{run_key}/eval/{storage.MARKER}" in objects
    assert f"{run_key}/model/unet.safetensors" in objects

    # another machine with an empty cache gets the trained model from the bucket
    b = s3_root("machine-b")
    run_dir = b / Path(summary.train.run_dir).resolve().relative_to(a.resolve())
    assert storage.pull(run_dir)
    pipe = TextToImage.load(run_dir / "model")
    images = pipe.generate(["a red circle"], seeds=0, params=GenerationParams(steps=2))
    res = summary.dataset.resolution
    assert images.shape == (1, 3, res, res) and bool(images.isfinite().all())


@pytest.fixture
def local_remote(tmp_path, monkeypatch):
    """An s3:// data root whose bucket is the folder tmp_path/remote, holding the published dataset
    x/v1. Returns (the filesystem class, whose `fail_on` and `on_open` break downloads; where v1
    is pulled to)."""
    from pyarrow import fs as pafs

    class Flaky(pafs.LocalFileSystem):
        opened = 0
        fail_on: int | None = None  # the nth file opened raises OSError
        on_open = None  # called before each file is opened

        def open_input_stream(self, path):
            Flaky.opened += 1
            if Flaky.on_open is not None:
                Flaky.on_open()
            if Flaky.opened == Flaky.fail_on:
                raise OSError("connection reset by peer")
            return super().open_input_stream(path)

    remote = tmp_path / "remote" / "datasets" / "x" / "v1"
    (remote / "train").mkdir(parents=True)
    for i in range(3):
        (remote / "train" / f"part-{i}.parquet").write_bytes(b"remote %d" % i)
    (remote / storage.MARKER).write_text("3\n")
    monkeypatch.setenv("T2I_DATA_ROOT", "s3://bucket/p")
    monkeypatch.setenv("T2I_LOCAL_DATA_ROOT", str(tmp_path / "local"))
    bucket = str(tmp_path / "remote")
    monkeypatch.setattr(storage, "_filesystem", lambda uri, settings: (Flaky(), bucket + uri[len("s3://bucket/p") :]))
    return Flaky, tmp_path / "local" / "datasets" / "x" / "v1"


def test_failed_pull_leaves_no_partial_download(local_remote):
    flaky, local = local_remote
    flaky.fail_on = 2
    with pytest.raises(storage.StorageError, match="connection reset"):
        storage.pull(local)
    assert not local.exists() and list(local.parent.iterdir()) == []

    flaky.fail_on = None
    assert storage.pull(local) is True
    assert sorted(p.name for p in (local / "train").iterdir()) == ["part-0.parquet", "part-1.parquet", "part-2.parquet"]
    assert [p.name for p in local.parent.iterdir()] == ["v1"]


def test_pull_that_loses_the_race_keeps_the_winners_copy(local_remote):
    flaky, local = local_remote

    def another_process_pulls_first():
        (local / "train").mkdir(parents=True, exist_ok=True)
        (local / "train" / "part-0.parquet").write_bytes(b"winner")

    flaky.on_open = another_process_pulls_first
    assert storage.pull(local) is False  # not ours: the other process put it in place
    assert (local / "train" / "part-0.parquet").read_bytes() == b"winner"
    assert [p.name for p in local.parent.iterdir()] == ["v1"]


def test_push_leaves_out_the_temporaries_of_killed_writes(local_remote, caplog):
    _, local = local_remote
    published = local.parent / "v2"
    (published / "train").mkdir(parents=True)
    (published / "train" / "part-0.parquet").write_bytes(b"rows")
    (published / "manifest.json").write_text("{}")
    # What a SIGKILL leaves: atomic_write's sibling before its rename, a stage's build directory.
    (published / ".manifest.json.0123456789abcdef0123456789abcdef.tmp").write_text("{")
    (published / ".tmp-step-00000100-77").mkdir()
    (published / ".tmp-step-00000100-77" / "unet.safetensors").write_bytes(b"half")
    remote = local.parents[3] / "remote" / "datasets" / "x" / "v2"
    (remote / "train").mkdir(parents=True)  # a bucket has no folders; the local stand-in needs them
    uri = storage.push(published)
    assert uri == "s3://bucket/p/datasets/x/v2"
    assert sorted(p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()) == [
        storage.MARKER, "manifest.json", "train/part-0.parquet"
    ]  # fmt: skip
    assert (remote / storage.MARKER).read_text() == "2\n"
    assert "not uploading 2 dot-named temporary file(s)" in caplog.text
