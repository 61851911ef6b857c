"""Ingest on awkward inputs: malformed metadata.csv rows, huge CSV fields, paths with glob characters.

Each case is either a counted reject with its reason or an IngestError that names the place.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_ingest import image_bytes, reject_reasons, rows

from tasks.image_io import MAX_CAPTION_BYTES
from tasks.ingest import IngestConfig, IngestError, detect_source, ingest_dataset

CONFIG = IngestConfig(workers=1, val_fraction=0.0)


def csv_folder(root: Path, body: str) -> Path:
    """A folder with 0.png..2.png and a metadata.csv of `body` (after the header file_name,text,tag)."""
    root.mkdir()
    for i in range(3):
        (root / f"{i}.png").write_bytes(image_bytes(seed=i))
    (root / "metadata.csv").write_text("file_name,text,tag\n" + body, encoding="utf-8")
    return root


def test_csv_row_with_more_fields_than_the_header_is_a_counted_reject(tmp_path: Path):
    root = csv_folder(tmp_path / "src", "0.png,a red circle,x\n1.png,a blue square,y,EXTRA,MORE\n2.png,green,z\n")
    dv = ingest_dataset(root, "extra", CONFIG, progress=False)
    assert dv.counts == {"train": 2, "val": 0, "rejects": 1}
    assert reject_reasons(dv) == {"metadata.csv:3": "bad_metadata"}
    (reject,) = pq.read_table(Path(dv.root) / "rejects.parquet").to_pylist()
    assert "2 extra field(s)" in reject["detail"]
    assert sorted(json.loads(r["meta"])["tag"] for r in rows(dv, "train")) == ["x", "z"]


def test_csv_caption_over_the_csv_module_default_limit_is_caption_too_long(tmp_path: Path):
    long_caption = "x" * 200_000
    root = csv_folder(tmp_path / "src", f"0.png,a red circle,x\n1.png,{long_caption},y\n")
    previous = csv.field_size_limit(131_072)  # csv's default, as a fresh process has it (an earlier test raised it)
    try:
        dv = ingest_dataset(root, "long", CONFIG, progress=False)
    finally:
        csv.field_size_limit(max(previous, csv.field_size_limit()))
    assert dv.counts == {"train": 1, "val": 0, "rejects": 1}
    assert reject_reasons(dv) == {"1.png": "caption_too_long"}
    assert csv.field_size_limit() == MAX_CAPTION_BYTES  # raised for the process: threads read CSVs at once


def test_unreadable_csv_is_an_error_naming_the_file_and_line(tmp_path: Path):
    too_big = "x" * (MAX_CAPTION_BYTES + 1)
    root = csv_folder(tmp_path / "src", f"0.png,a red circle,x\n1.png,{too_big},y\n")
    with pytest.raises(IngestError, match=r"metadata\.csv at line 3: field larger than field limit"):
        ingest_dataset(root, "toobig", CONFIG, progress=False)


def test_existing_paths_with_glob_characters_are_sources_not_globs(tmp_path: Path):
    root = tmp_path / "photos[2024]*?"
    root.mkdir()
    (root / "0.png").write_bytes(image_bytes())
    (root / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a red circle"}\n')
    assert detect_source(str(root)).kind == "metadata"
    assert detect_source(str(root / "metadata.jsonl")).files == (root / "metadata.jsonl",)
    with pytest.raises(IngestError, match="no files match"):
        detect_source(str(tmp_path / "photos[2024]" / "*.tar"))  # not there: still a glob


def test_data_root_with_glob_characters(tmp_path: Path):
    root = csv_folder(tmp_path / "src", "0.png,a red circle,x\n1.png,a blue square,y\n")
    data_root = tmp_path / "runs" / "exp[1]*?"
    dv = ingest_dataset(root, "globroot", CONFIG, data_root=data_root, progress=False)
    assert Path(dv.root).parent.parent.parent == data_root
    assert dv.counts == {"train": 2, "val": 0, "rejects": 0}
    assert sorted(r["caption"] for r in rows(dv, "train")) == ["a blue square", "a red circle"]


def test_source_without_inputs_is_an_error_saying_so(tmp_path: Path):
    root = tmp_path / "empty"
    root.mkdir()
    (root / "metadata.jsonl").write_text("")
    with pytest.raises(IngestError, match="no inputs"):
        ingest_dataset(root, "empty", CONFIG, progress=False)
