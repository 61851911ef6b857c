"""Ingest from folders and tar shards: every source kind, every kind of bad input, publication.

The run must succeed on bad input, count every input exactly once (accepted or
rejected with a reason), and publish atomically under a content-hash version.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks import ingest as ingest_module
from tasks.contracts import DatasetVersion
from tasks.ingest import (
    IngestConfig,
    IngestError,
    dataset_version,
    detect_source,
    ingest_dataset,
    ingest_task,
    load_dataset_version,
)
from tasks.shapes import ShapesConfig, generate_shapes, heldout_pairs

REPO = Path(__file__).resolve().parents[1]


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (40, 40), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def rows(dv: DatasetVersion, split: str) -> list[dict]:
    return pq.read_table(Path(dv.root) / split).to_pylist()


def reject_reasons(dv: DatasetVersion) -> dict[str, str]:
    table = pq.read_table(Path(dv.root) / "rejects.parquet").to_pylist()
    assert all(r["reason"] and r["detail"] for r in table), "every reject carries a reason and a detail"
    return {r["source_uri"]: r["reason"] for r in table}


def manifest(dv: DatasetVersion) -> dict:
    return json.loads(Path(dv.manifest).read_text())


def assert_accounted(dv: DatasetVersion, n_inputs: int) -> None:
    counts = manifest(dv)["counts"]
    assert counts["inputs"] == n_inputs
    assert dv.counts["train"] + dv.counts["val"] + dv.counts["rejects"] == n_inputs
    assert len(rows(dv, "train")) == dv.counts["train"] and len(rows(dv, "val")) == dv.counts["val"]
    assert len(reject_reasons(dv)) <= dv.counts["rejects"]


# --- Source 1: metadata file, with every kind of bad input ---------------------------------


@pytest.fixture
def messy_folder(tmp_path: Path) -> tuple[Path, dict[str, str | None]]:
    """An imagefolder with good rows and one row per kind of bad input; returns (root, expected reason)."""
    root = tmp_path / "messy"
    (root / "img").mkdir(parents=True)
    (tmp_path / "outside.png").write_bytes(image_bytes(seed=99))
    files = {
        "img/good0.png": image_bytes("PNG", seed=0),
        "img/good1.jpg": image_bytes("JPEG", seed=1),
        "img/good2.webp": image_bytes("WEBP", seed=2),
        "img/good3.png": image_bytes("PNG", (64, 48), seed=3),
        "img/zero.png": b"",
        "img/trunc.png": image_bytes("PNG", (64, 64), seed=4)[:3000],
        "img/trunc.jpg": image_bytes("JPEG", (64, 64), seed=5)[:1500],
        "img/lies.png": image_bytes("JPEG", seed=6),  # a JPEG named .png: fine, the bytes decide
        "img/lies.jpg": b"<html>not an image</html>",
        "img/tiny.png": image_bytes("PNG", (8, 8), seed=7),
        "img/wide.png": image_bytes("PNG", (300, 40), seed=8),
        "img/nocap.png": image_bytes(seed=11),
        "img/empty_caption.png": image_bytes(seed=9),
        "img/long_caption.png": image_bytes(seed=10),
    }
    big = io.BytesIO()
    Image.new("L", (3000, 3000)).save(big, "PNG")  # 9 Mpx in a few kB
    files["img/bomb.png"] = big.getvalue()
    for name, data in files.items():
        (root / name).write_bytes(data)

    lines = [
        ({"file_name": "img/good0.png", "text": "a  red\ncircle", "colour": "red"}, None),
        ({"file_name": "img/good1.jpg", "text": "caf\u00c3\u00a9 sign"}, None),
        ({"file_name": "img/good2.webp", "text": "a webp"}, None),
        ({"file_name": "img/good3.png", "text": "not square"}, None),
        ({"file_name": "img/lies.png", "text": "jpeg in disguise"}, None),
        ({"file_name": "img/zero.png", "text": "zero bytes"}, "undecodable"),
        ({"file_name": "img/trunc.png", "text": "cut png"}, "truncated"),
        ({"file_name": "img/trunc.jpg", "text": "cut jpeg"}, "truncated"),
        ({"file_name": "img/lies.jpg", "text": "html"}, "undecodable"),
        ({"file_name": "img/bomb.png", "text": "bomb"}, "bomb"),
        ({"file_name": "img/tiny.png", "text": "tiny"}, "too_small"),
        ({"file_name": "img/wide.png", "text": "wide"}, "bad_aspect"),
        ({"file_name": "img/empty_caption.png", "text": " \t "}, "empty_caption"),
        ({"file_name": "img/long_caption.png", "text": "x" * 1_000_000}, "caption_too_long"),
        ({"file_name": "img/missing.png", "text": "gone"}, "missing_file"),
        ({"file_name": "img/good0.png", "text": "same image, other caption"}, "duplicate"),
        ({"file_name": "../outside.png", "text": "escape"}, "unsafe_path"),
        ({"file_name": "img/nocap.png"}, "missing_caption"),
    ]
    with open(root / "metadata.jsonl", "w", encoding="utf-8") as f:
        for record, _ in lines:
            f.write(json.dumps(record) + "\n")
        f.write("{not json\n")
    expected: dict[str, str | None] = {}
    for record, reason in lines:
        if reason == "duplicate":
            continue  # same source_uri as good0: checked separately
        expected[record["file_name"]] = reason
    expected[f"metadata.jsonl:{len(lines) + 1}"] = "bad_metadata"
    return root, expected


def test_metadata_source_counts_every_bad_input_with_its_reason(messy_folder):
    root, expected = messy_folder
    dv = ingest_dataset(root, "messy", IngestConfig(workers=1, max_image_pixels=4_000_000), progress=False)

    n_inputs = 19  # 18 metadata rows + 1 line that is not JSON
    assert_accounted(dv, n_inputs)
    reasons = reject_reasons(dv)
    for uri, reason in expected.items():
        if reason is not None:
            assert reasons.get(uri) == reason, uri
    rejects = pq.read_table(Path(dv.root) / "rejects.parquet").to_pylist()
    assert [r["reason"] for r in rejects].count("duplicate") == 1
    duplicate = next(r for r in rejects if r["reason"] == "duplicate")
    assert duplicate["caption"] == "same image, other caption" and "img/good0.png" in duplicate["detail"]
    long_caption = next(r for r in rejects if r["reason"] == "caption_too_long")
    assert len(long_caption["caption"]) == 200  # a preview, not the megabyte

    accepted = rows(dv, "train") + rows(dv, "val")
    assert sorted(r["source_uri"] for r in accepted) == sorted(u for u, reason in expected.items() if reason is None)
    by_uri = {r["source_uri"]: r for r in accepted}
    assert by_uri["img/good0.png"]["caption"] == "a red circle"
    assert json.loads(by_uri["img/good0.png"]["meta"]) == {"colour": "red"}
    assert by_uri["img/good1.jpg"]["caption"] == "café sign"
    assert by_uri["img/lies.png"]["orig_format"] == "JPEG"
    assert (by_uri["img/good3.png"]["orig_width"], by_uri["img/good3.png"]["orig_height"]) == (64, 48)
    for row in accepted:
        assert row["id"] == hashlib.sha256(row["image"]).hexdigest()
        im = Image.open(io.BytesIO(row["image"]))
        assert (im.format, im.size, im.mode) == ("PNG", (32, 32), "RGB")
        assert (row["width"], row["height"]) == (32, 32)

    stats = manifest(dv)["statistics"]
    assert sum(stats["rejects_by_reason"].values()) == dv.counts["rejects"] == n_inputs - 5
    assert stats["rejects_by_reason"]["truncated"] == 2
    assert sum(stats["caption_chars_histogram"].values()) == 5
    assert sum(stats["orig_min_side_histogram"].values()) == 5


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_metadata_csv_and_parquet(tmp_path: Path, fmt: str):
    root = tmp_path / "src"
    root.mkdir()
    records = []
    for i in range(4):
        (root / f"{i}.png").write_bytes(image_bytes(seed=i))
        records.append({"file_name": f"{i}.png", "text": f"image {i}", "label": str(i)})
    records.append({"file_name": "nope.png", "text": "missing"})
    if fmt == "csv":
        import csv

        with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["file_name", "text", "label"])
            writer.writeheader()
            writer.writerows(records)
    else:
        import pyarrow as pa

        pq.write_table(pa.Table.from_pylist(records), root / "metadata.parquet")
    assert detect_source(root).kind == "metadata"
    dv = ingest_dataset(root, "meta", IngestConfig(workers=1, val_fraction=0.0), progress=False)
    assert_accounted(dv, 5)
    assert dv.counts == {"train": 4, "val": 0, "rejects": 1}
    assert reject_reasons(dv) == {"nope.png": "missing_file"}
    assert sorted(r["caption"] for r in rows(dv, "train")) == [f"image {i}" for i in range(4)]


def test_metadata_without_required_columns_is_a_clear_error(tmp_path: Path):
    (tmp_path / "metadata.csv").write_text("path,caption_text\na.png,hello\n")
    (tmp_path / "a.png").write_bytes(image_bytes())
    with pytest.raises(IngestError, match="file_name and a text"):
        ingest_dataset(tmp_path, "bad", IngestConfig(workers=1), progress=False)


# --- Source 2: sidecar captions ----------------------------------------------------------------


def test_sidecar_folder(tmp_path: Path):
    root = tmp_path / "side"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(image_bytes(seed=1))
    (root / "a.txt").write_text("first image\n", encoding="utf-8")
    (root / "sub" / "b.jpg").write_bytes(image_bytes("JPEG", seed=2))
    (root / "sub" / "b.txt").write_bytes("\ufeffsecond image".encode())
    (root / "latin.png").write_bytes(image_bytes(seed=3))
    (root / "latin.txt").write_bytes("café".encode("latin-1"))  # not UTF-8
    (root / "uncaptioned.png").write_bytes(image_bytes(seed=4))
    (root / "orphan.txt").write_text("caption without image")
    (root / "README.md").write_text("not an input")

    assert detect_source(root).kind == "sidecar"
    dv = ingest_dataset(root, "side", IngestConfig(workers=1, val_fraction=0.0), progress=False)
    assert_accounted(dv, 5)
    assert reject_reasons(dv) == {
        "latin.png": "bad_caption_encoding",
        "uncaptioned.png": "missing_caption",
        "orphan.txt": "missing_file",
    }
    assert {(r["source_uri"], r["caption"]) for r in rows(dv, "train")} == {
        ("a.png", "first image"),
        ("sub/b.jpg", "second image"),
    }


# --- Source 3: WebDataset tar shards --------------------------------------------------------------


def add(tf: tarfile.TarFile, name: str, data: bytes = b"", **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    tf.addfile(info, io.BytesIO(data) if data else None)


def write_shards(directory: Path) -> int:
    """Two shards; returns the number of inputs (samples + unsafe members)."""
    directory.mkdir(parents=True)
    with tarfile.open(directory / "shard-000.tar", "w") as tf:
        add(tf, "s000.jpg", image_bytes("JPEG", seed=1))
        add(tf, "s000.txt", b"a jpeg with a txt caption")
        add(tf, "s001.png", image_bytes("PNG", seed=2))
        add(tf, "s001.json", json.dumps({"caption": "a png with a json caption", "width": 40}).encode())
        add(tf, "../../escape.txt", b"outside")  # unsafe
        add(tf, "/tmp/absolute.png", image_bytes(seed=3))  # unsafe
        add(tf, "s002.webp", image_bytes("WEBP", seed=4))  # no caption
    with tarfile.open(directory / "shard-001.tar", "w") as tf:
        add(tf, "s100.png", image_bytes("PNG", seed=5))
        add(tf, "s100.txt", b"second shard")
        add(tf, "s101.png", type=tarfile.SYMTYPE, linkname="/etc/passwd")  # unsafe
        add(tf, "s102.fifo", type=tarfile.FIFOTYPE)  # unsafe
        add(tf, "s103.json", b"{broken")
        add(tf, "s103.png", image_bytes("PNG", seed=6))
        add(tf, "s104.txt", "caption only".encode())
    return (3 + 2) + (3 + 2)  # per shard: samples + unsafe members


def test_tar_shards_reject_unsafe_members_and_extract_nothing(tmp_path: Path):
    n_inputs = write_shards(tmp_path / "shards")
    before = sorted(p for p in tmp_path.rglob("*"))
    assert detect_source(tmp_path / "shards").kind == "tar"
    dv = ingest_dataset(tmp_path / "shards", "tars", IngestConfig(workers=2, val_fraction=0.0), progress=False)
    assert_accounted(dv, n_inputs)
    assert reject_reasons(dv) == {
        "shard-000.tar#../../escape.txt": "unsafe_member",
        "shard-000.tar#/tmp/absolute.png": "unsafe_member",
        "shard-000.tar#s002": "missing_caption",
        "shard-001.tar#s101.png": "unsafe_member",
        "shard-001.tar#s102.fifo": "unsafe_member",
        "shard-001.tar#s103": "bad_metadata",
        "shard-001.tar#s104": "missing_file",
    }
    accepted = {r["source_uri"]: r for r in rows(dv, "train")}
    assert {u: r["caption"] for u, r in accepted.items()} == {
        "shard-000.tar#s000": "a jpeg with a txt caption",
        "shard-000.tar#s001": "a png with a json caption",
        "shard-001.tar#s100": "second shard",
    }
    assert json.loads(accepted["shard-000.tar#s001"]["meta"]) == {"width": 40}
    # Nothing was extracted anywhere near the source.
    assert sorted(p for p in tmp_path.rglob("*") if "data" not in p.parts) == [p for p in before if "data" not in p.parts]

    # A glob over the same shards is the same source: same version, returned at once.
    by_glob = ingest_dataset(str(tmp_path / "shards" / "*.tar"), "tars", IngestConfig(workers=2, val_fraction=0.0), progress=False)
    assert by_glob == dv


# --- Publication: versions, idempotence, atomicity -----------------------------------------------------


@pytest.fixture
def small_folder(tmp_path: Path) -> Path:
    root = tmp_path / "small"
    root.mkdir()
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(6):
            (root / f"{i}.png").write_bytes(image_bytes(seed=i))
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"picture number {i}"}) + "\n")
    return root


def test_layout_manifest_and_descriptor(small_folder: Path):
    config = IngestConfig(workers=1, val_fraction=0.5)
    dv = ingest_dataset(small_folder, "small", config, progress=False)
    root = Path(dv.root)
    assert root == Path(os.environ["T2I_DATA_ROOT"]).absolute() / "datasets" / "small" / dv.version
    assert dv.version == dataset_version(small_folder, config) and len(dv.version) == 16
    assert sorted(p.name for p in root.iterdir()) == ["manifest.json", "rejects.parquet", "train", "val"]
    assert [p.name for p in (root / "train").iterdir()] == ["part-0.parquet"]
    m = manifest(dv)
    assert {"counts", "schema", "config", "source", "statistics", "files", "split", "version", "name"} <= set(m)
    assert [f["name"] for f in m["schema"]["rows"]] == [
        "id", "caption", "image", "width", "height", "orig_width", "orig_height", "orig_format", "source_uri", "meta",
    ]  # fmt: skip
    assert m["source"]["kind"] == "metadata" and m["source"]["files"] == 7
    assert m["config"] == config.model_dump(mode="json")
    assert dv == load_dataset_version(root)
    assert dv.counts == {"train": m["counts"]["train"], "val": m["counts"]["val"], "rejects": 0}
    assert dv.resolution == 32 and Path(dv.manifest) == root / "manifest.json"


def test_reingest_is_a_noop_and_versions_follow_source_and_config(small_folder: Path):
    config = IngestConfig(workers=1)
    first = ingest_dataset(small_folder, "v", config, progress=False)
    mtime = Path(first.manifest).stat().st_mtime_ns
    again = ingest_dataset(small_folder, "v", config, progress=False)
    assert again == first and Path(first.manifest).stat().st_mtime_ns == mtime
    # Operational knobs do not change the version; output-changing ones do.
    assert dataset_version(small_folder, IngestConfig(workers=2, http_concurrency=3)) == first.version
    assert dataset_version(small_folder, IngestConfig(resolution=16)) != first.version
    (small_folder / "0.png").write_bytes(image_bytes(seed=100))
    changed = ingest_dataset(small_folder, "v", config, progress=False)
    assert changed.version != first.version
    assert sorted(p.name for p in Path(first.root).parent.iterdir()) == sorted([first.version, changed.version])


def test_parallel_ingest_equals_serial(tmp_path: Path):
    source = generate_shapes(tmp_path / "shapes", ShapesConfig(n_images=300, seed=5))
    serial = ingest_dataset(source, "shapes", IngestConfig(workers=1), data_root=tmp_path / "a", progress=False)
    parallel = ingest_dataset(source, "shapes", IngestConfig(workers=2), data_root=tmp_path / "b", progress=False)
    assert serial.version == parallel.version and serial.counts == parallel.counts
    for split in ("train", "val"):
        assert rows(serial, split) == rows(parallel, split)  # same rows in the same order


def test_failed_run_publishes_nothing(small_folder: Path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ingest_module, "_curate", boom)
    with pytest.raises(OSError, match="disk full"):
        ingest_dataset(small_folder, "f", IngestConfig(workers=1), progress=False)
    parent = Path(os.environ["T2I_DATA_ROOT"]) / "datasets" / "f"
    assert list(parent.iterdir()) == []


def test_killed_run_leaves_no_partial_version(small_folder: Path, tmp_path: Path):
    data_root = tmp_path / "killed"
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from tasks import ingest

        def die(*args, **kwargs):  # staged, not yet published: the worst moment
            os.kill(os.getpid(), signal.SIGKILL)

        ingest._curate = die
        ingest.ingest_dataset({str(small_folder)!r}, "k", ingest.IngestConfig(workers=1),
                              data_root=Path({str(data_root)!r}), progress=False)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    parent = data_root / "datasets" / "k"
    leftovers = list(parent.iterdir())
    assert leftovers and all(p.name.startswith(".tmp-") for p in leftovers)  # only the temporary

    dv = ingest_dataset(small_folder, "k", IngestConfig(workers=1), data_root=data_root, progress=False)
    assert [p.name for p in parent.iterdir()] == [dv.version]  # published; the dead run's temporary is gone
    assert dv.counts["train"] + dv.counts["val"] == 6


def test_source_with_no_valid_rows_fails_saying_why(tmp_path: Path):
    root = tmp_path / "hopeless"
    root.mkdir()
    (root / "a.png").write_bytes(b"")
    (root / "b.png").write_bytes(b"GIF89a garbage")
    (root / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "text": "x"}\n{"file_name": "b.png", "text": "y"}\n{"file_name": "c.png", "text": "z"}\n'
    )
    with pytest.raises(IngestError, match=r"no valid rows.*3 inputs.*undecodable: 2.*missing_file: 1"):
        ingest_dataset(root, "hopeless", IngestConfig(workers=1), progress=False)
    assert list((Path(os.environ["T2I_DATA_ROOT"]) / "datasets" / "hopeless").iterdir()) == []


def test_undetectable_sources_and_bad_names_are_clear_errors(tmp_path: Path):
    with pytest.raises(IngestError, match="does not exist"):
        detect_source(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="no metadata"):
        detect_source(tmp_path / "empty")
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(image_bytes())
    with pytest.raises(IngestError, match="no captions"):
        detect_source(tmp_path / "pics")
    (tmp_path / "notes.docx").write_bytes(b"x")
    with pytest.raises(IngestError, match="cannot ingest the file"):
        detect_source(tmp_path / "notes.docx")
    with pytest.raises(IngestError, match="no files match"):
        detect_source(str(tmp_path / "*.tar"))
    with pytest.raises(IngestError, match="dataset name"):
        ingest_dataset(tmp_path / "pics", "../evil", progress=False)
    with pytest.raises(ValueError, match="extra"):
        IngestConfig(resoltion=32)


# --- Source 5: the shapes generator, end to end ---------------------------------------------------


def test_shapes_source_ingests_completely_at_16px(tmp_path: Path):
    config = ShapesConfig(n_images=120, seed=1)
    source = generate_shapes(tmp_path / "shapes", config)
    dv = ingest_dataset(source, "shapes", IngestConfig(resolution=16, workers=1), progress=False)
    assert dv.counts["rejects"] == 0 and dv.counts["train"] + dv.counts["val"] == 120
    assert 0 < dv.counts["val"] < 30
    held = set(heldout_pairs(config))
    for row in rows(dv, "train") + rows(dv, "val"):
        assert Image.open(io.BytesIO(row["image"])).size == (16, 16)
        objects = json.loads(row["meta"])["objects"]
        assert all((o["colour"], o["shape"]) not in held for o in objects)
        assert all(o["colour"] in row["caption"] and o["shape"] in row["caption"] for o in objects)


# --- The Prefect task wrapper ------------------------------------------------------------------------


def test_task_wrapper_retries_and_cache_key(small_folder: Path, tmp_path: Path):
    from prefect.states import Failed

    assert ingest_task.retries == 2
    assert ingest_task.retry_delay_seconds == [10, 20]  # exponential backoff
    assert ingest_task.retry_condition_fn(None, None, Failed(data=OSError("flaky disk"))) is True
    assert ingest_task.retry_condition_fn(None, None, Failed(data=IngestError("bad source"))) is False

    key_fn = ingest_task.cache_policy.cache_key_fn
    params = {"source": str(small_folder), "name": "c", "config": IngestConfig(workers=1), "data_root": str(tmp_path / "c")}
    key = key_fn(None, params)  # known before the first run, so that run's result is what later runs reuse
    ingest_task.fn(**params)
    assert key and key == key_fn(None, params)
    assert key == key_fn(None, {**params, "config": {"workers": 2}})  # same version, same key
    assert key != key_fn(None, {**params, "config": {"resolution": 16}})
    (small_folder / "extra.txt").write_text("a new caption file changes the source fingerprint")
    assert key != key_fn(None, params)
