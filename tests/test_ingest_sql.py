"""Data tests of sql/: filters, exact dedupe, the train/val split and the statistics.

Staged rows are written by hand, so each rule is checked on its own; the split is
compared with an independent Python implementation of its md5 rule.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.image_io import REJECT_SCHEMA, ROW_SCHEMA
from tasks.ingest import IngestConfig, connect_staged, read_sql, statistics_from_rows, val_threshold


def staged_row(ordinal: int, image_id: str, caption: str = "a fine caption", w: int = 64, h: int = 64) -> dict:
    return {
        "ordinal": ordinal,
        "id": image_id,
        "caption": caption,
        "caption_chars": len(caption),
        "image": b"png bytes",
        "width": 32,
        "height": 32,
        "orig_width": w,
        "orig_height": h,
        "orig_format": "PNG",
        "source_uri": f"src/{ordinal}.png",
        "meta": "{}",
    }


def curate(tmp_path: Path, rows: list[dict], config: IngestConfig, rejects: list[dict] = ()):
    stage = tmp_path / "stage"
    (stage / "rows").mkdir(parents=True)
    (stage / "rejects").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), stage / "rows" / "part-000000.parquet")
    pq.write_table(pa.Table.from_pylist(list(rejects), schema=REJECT_SCHEMA), stage / "rejects" / "part-000000.parquet")
    con = connect_staged(stage, config)
    con.execute(read_sql("curate.sql"))
    return con


def decisions(con) -> dict[int, tuple[str | None, str | None]]:
    return {o: (r, s) for o, r, s in con.execute("SELECT ordinal, reason, split FROM decisions").fetchall()}


def test_filters_first_failing_rule_wins(tmp_path: Path):
    config = IngestConfig(resolution=32, max_aspect_ratio=2.0, min_caption_chars=3, max_caption_chars=10, val_fraction=0)
    rows = [
        staged_row(0, "a", "ok caption"),
        staged_row(1, "b", "ok", w=16, h=16),  # too small and too short: size is checked first
        staged_row(2, "c", "ok caption", w=100, h=40),  # aspect 2.5
        staged_row(3, "d", "ok caption", w=64, h=32),  # aspect exactly 2.0: allowed
        staged_row(4, "e", ""),
        staged_row(5, "f", "ab"),
        staged_row(6, "g", "x" * 11),
        staged_row(7, "h", "x" * 10),  # exactly the limit: allowed
        staged_row(8, "i", "ok caption", w=32, h=32),  # exactly min_size: allowed
    ]
    got = decisions(curate(tmp_path, rows, config))
    assert {o: r for o, (r, _) in got.items()} == {
        0: None, 1: "too_small", 2: "bad_aspect", 3: None, 4: "empty_caption",
        5: "caption_too_short", 6: "caption_too_long", 7: None, 8: None,
    }  # fmt: skip
    assert all((s == "train") == (r is None) for r, s in got.values())  # rejects get no split


def test_empty_caption_policy_keep(tmp_path: Path):
    config = IngestConfig(min_caption_chars=3, empty_caption_policy="keep", val_fraction=0)
    got = decisions(curate(tmp_path, [staged_row(0, "a", ""), staged_row(1, "b", "ab")], config))
    assert got == {0: (None, "train"), 1: ("caption_too_short", None)}


@pytest.mark.parametrize(
    "dedupe, kept",
    [("image", {1, 6}), ("image_caption", {1, 2, 6}), ("none", {1, 2, 3, 4, 6})],
)
def test_exact_dedupe_keeps_the_first_input(tmp_path: Path, dedupe: str, kept: set[int]):
    rows = [
        staged_row(0, "same", "first", w=8, h=8),  # earliest, but filtered out: never a dedupe winner
        staged_row(3, "same", "first"),
        staged_row(1, "same", "first"),
        staged_row(2, "same", "second"),
        staged_row(4, "same", "first"),
        staged_row(6, "other", "first"),
    ]
    got = decisions(curate(tmp_path, rows, IngestConfig(dedupe=dedupe, val_fraction=0)))
    assert {o for o, (r, _) in got.items() if r is None} == kept
    assert {o for o, (r, _) in got.items() if r == "duplicate"} == {1, 2, 3, 4, 6} - kept
    assert got[0][0] == "too_small"


def test_split_matches_the_md5_rule_and_the_fraction(tmp_path: Path):
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000)]
    con = curate(tmp_path, [staged_row(i, x) for i, x in enumerate(ids)], IngestConfig(val_fraction=0.2))
    got = {o: s for o, (_, s) in decisions(con).items()}

    def oracle(image_id: str) -> str:  # independent of DuckDB: 32-bit prefix of md5 as a number
        return "val" if int(hashlib.md5(image_id.encode()).hexdigest()[:8], 16) < 0.2 * 2**32 else "train"

    assert got == {i: oracle(x) for i, x in enumerate(ids)}
    share = Counter(got.values())["val"] / len(ids)
    assert abs(share - 0.2) < 4 * math.sqrt(0.2 * 0.8 / len(ids))


def test_val_threshold_edges():
    assert val_threshold(0.0) == "00000000"
    assert val_threshold(0.5) == "80000000"
    assert val_threshold(0.999999) < "ffffffff" and len(val_threshold(0.999999)) == 8


def test_rejects_union_and_statistics(tmp_path: Path):
    rows = [
        staged_row(0, "a", "x" * 5, w=64, h=64),
        staged_row(1, "b", "x" * 20, w=64, h=128),
        staged_row(2, "c", "x" * 40, w=300, h=256),
        staged_row(3, "a", "x" * 5),  # duplicate of 0
        staged_row(4, "d", "", w=64, h=64),  # empty
    ]
    worker_rejects = [
        {"ordinal": 10, "source_uri": "bad.png", "reason": "undecodable", "detail": "not an image",
         "caption": None, "orig_width": None, "orig_height": None, "id": None},
    ]  # fmt: skip
    con = curate(tmp_path, rows, IngestConfig(val_fraction=0), worker_rejects)
    rejects = con.execute(read_sql("rejects.sql")).fetchall()
    assert [(r[0], r[2]) for r in rejects] == [(3, "duplicate"), (4, "empty_caption"), (10, "undecodable")]
    assert "src/0.png" in rejects[0][3]

    stats = statistics_from_rows(con.execute(read_sql("stats.sql")).fetchall())
    assert stats["counts"] == {"train": 3, "val": 0, "rejects": 3}
    assert stats["rejects_by_reason"] == {"duplicate": 1, "empty_caption": 1, "undecodable": 1}
    assert stats["caption_chars"] == {"min": 5, "mean": round(65 / 3, 3), "max": 40}
    assert list(stats["caption_chars_histogram"].items()) == [("4-7", 1), ("16-31", 1), ("32-63", 1)]
    assert list(stats["orig_min_side_histogram"].items()) == [("64-127", 2), ("256-511", 1)]
    assert stats["top_orig_sizes"] == {"64x64": 1, "64x128": 1, "300x256": 1}
