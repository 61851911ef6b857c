"""Ingest: a caption dataset -> a versioned, validated Parquet dataset at training resolution.

Sources (detected from what the path is, see `detect_source`):

- a folder with `metadata.jsonl|csv|parquet` (`file_name`, `text` columns; Hugging Face imagefolder),
- a folder of images with sidecar captions (`img001.png` + `img001.txt`),
- WebDataset tar shards (a `.tar` file, a folder of them, or a glob such as `shards/*.tar`),
- a URL list (`.csv`, `.tsv` or `.parquet` with `url` and `caption` or `text` columns).

Work is staged by worker processes (`tasks/image_io.py`) into Parquet parts, then
the data rules in `sql/` (filters, exact dedupe, train/val split, statistics) run
in DuckDB and write the final Parquet:

    data/datasets/<name>/<version>/{train,val}/part-*.parquet, rejects.parquet, manifest.json

The version is a content hash of the source fingerprint and the ingest config.
Publication is one rename of a temporary sibling directory, so a killed run leaves
no partial version, and ingesting an unchanged source again returns the published
version at once. `ingest_dataset` is the plain function; `ingest_task` wraps it for
Prefect with retries and a cache key on the version.

Staging runs in a local process pool, or on a Dask cluster when `dask_address` (or
`T2I_DASK_ADDRESS`) names a scheduler, e.g. `tcp://10.0.0.5:8786`. Its workers need
this project installed and the data root at the same path (a shared mount): they read
the sources and write the staged parts there. The output is the same either way.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import logging
import multiprocessing
import os
import platform
import re
import shutil
import socket
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, ProcessPoolExecutor, as_completed, wait
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import duckdb
import PIL
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from models.checkpoint import fsync_dir, temp_dir
from tasks import storage
from tasks.cluster import dask_client, require_distributed
from tasks.contracts import DatasetVersion
from tasks.prefect_compat import exponential_backoff, task
from tasks.image_io import (
    IMAGE_EXTENSIONS,
    MAX_CAPTION_BYTES,
    ImageOptions,
    InputItem,
    StageOptions,
    WorkUnit,
    check_url,
    stage_unit,
)
from tasks.settings import get_settings

# Bump when the layout or the meaning of the output changes: it is part of every version hash.
INGEST_FORMAT = 1
SQL_DIR = Path(__file__).resolve().parents[1] / "sql"
MANIFEST_NAME = "manifest.json"
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
URL_LIST_SUFFIXES = (".csv", ".tsv", ".parquet")
FILES_PER_UNIT = 128
URLS_PER_UNIT = 64
# Config fields that change how fast ingest runs, never what it produces: not part of the version.
_OPERATIONAL_FIELDS = frozenset({"workers", "http_concurrency", "duckdb_memory_limit"})
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
log = logging.getLogger(__name__)

SourceKind = Literal["metadata", "sidecar", "tar", "urls"]


class IngestError(ValueError):
    """The source or the config cannot give a dataset; the message says why and what to do."""


class IngestConfig(BaseModel):
    """Everything that decides what ingest produces (plus a few speed knobs, see _OPERATIONAL_FIELDS)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resolution: int = Field(32, ge=8, le=4096, description="side of the training images in pixels")
    resize_mode: Literal["center_crop", "pad", "keep_ratio"] = "center_crop"
    image_format: Literal["png", "webp", "jpeg"] = "png"
    quality: int = Field(95, ge=1, le=100, description="WebP/JPEG quality; PNG is lossless")
    min_size: int | None = Field(None, ge=1, description="smallest original side accepted; None: the resolution")
    max_aspect_ratio: float = Field(3.0, ge=1.0, description="longer / shorter original side")
    min_caption_chars: int = Field(1, ge=0)
    max_caption_chars: int = Field(1000, ge=1)
    empty_caption_policy: Literal["reject", "keep"] = "reject"
    dedupe: Literal["image", "image_caption", "none"] = Field(
        "image", description="exact dedupe key: the encoded image, or the (image, caption) pair"
    )
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    allowed_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
    max_image_pixels: int = Field(40_000_000, ge=1, description="decompression-bomb limit, from the header")
    max_input_bytes: int = Field(64 << 20, ge=1, description="largest image file or download read")
    pad_colour: tuple[int, int, int] = (0, 0, 0)
    alpha_background: tuple[int, int, int] = (255, 255, 255)
    caption_keys: tuple[str, ...] = Field(("caption", "text"), description="caption fields of a tar sample's .json")
    fingerprint: Literal["content", "stat"] = Field(
        "content", description="hash source files' bytes, or only their paths, sizes and mtimes (faster, stricter)"
    )
    row_group_size: int = Field(1024, ge=1, description="rows per Parquet row group in the output")
    workers: int | None = Field(None, ge=1, description="worker processes; None: the usable cores")
    http_timeout_s: float = Field(10.0, gt=0, description="deadline of one download attempt, connect to last byte")
    http_retries: int = Field(2, ge=0)
    http_backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles each retry")
    http_concurrency: int = Field(16, ge=1, description="downloads in flight per worker")
    duckdb_memory_limit: str = Field("1GB", description="DuckDB spills to disk beyond this")

    @model_validator(mode="after")
    def _check(self) -> IngestConfig:
        if self.min_caption_chars > self.max_caption_chars:
            raise ValueError(f"min_caption_chars={self.min_caption_chars} > max_caption_chars={self.max_caption_chars}")
        unknown = set(self.allowed_formats) - {"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"}
        if unknown or not self.allowed_formats:
            raise ValueError(f"allowed_formats {sorted(unknown)} unsupported; choose from PNG, JPEG, WEBP, GIF, BMP, TIFF")
        for name in ("pad_colour", "alpha_background"):
            if not all(0 <= c <= 255 for c in getattr(self, name)):
                raise ValueError(f"{name} must be three integers in 0..255")
        return self


@dataclass(frozen=True)
class SourceSpec:
    kind: SourceKind
    uri: str  # as given
    root: Path  # paths in rows and in the fingerprint are relative to it
    files: tuple[Path, ...]  # metadata file / tar shards / URL list; empty for sidecar folders


# ---------------------------------------------------------------------------
# Public API


def ingest_dataset(
    source: str | Path,
    name: str,
    config: IngestConfig | None = None,
    data_root: Path | None = None,
    progress: bool = True,
    dask_address: str | None = None,
) -> DatasetVersion:
    """Ingest `source` as dataset `name`; return the published (or already published) version.

    `dask_address` (default: the T2I_DASK_ADDRESS setting) is a Dask scheduler to stage the
    work units on instead of the local process pool; it changes where the work runs, never
    the version or the rows. Raises IngestError when the source cannot be read or no input
    survives curation.
    """
    config = config or IngestConfig()
    dask_address = dask_address or get_settings().dask_address or None
    _check_name(name)
    spec = detect_source(source)
    fingerprint = fingerprint_source(spec, config.fingerprint)
    version = _version(fingerprint, config)
    final = _datasets_dir(data_root) / name / version
    if (final / MANIFEST_NAME).is_file():
        log.info("%s/%s is already published at %s", name, version, final)
        return load_dataset_version(final)
    if final.exists():
        raise IngestError(f"{final} exists but holds no {MANIFEST_NAME}: not a published version; delete it")

    log.info("ingesting %s (%s source) as %s/%s", source, spec.kind, name, version)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(final.parent)
    tmp = temp_dir(final.parent, f".tmp-{version}-{os.getpid()}@{_host()}-")
    try:
        stage_dir = tmp / "stage"
        staged = _stage(spec, config, stage_dir, progress=progress, desc=f"ingest {name}", dask_address=dask_address)
        if staged["inputs"] == 0:
            raise IngestError(f"{spec.uri} ({spec.kind} source) has no inputs; add images and captions to it")
        curated = _curate(stage_dir, tmp, config, staged)
        counts = curated["counts"]
        if counts["train"] + counts["val"] == 0:
            raise IngestError(_no_rows_message(spec, curated))
        shutil.rmtree(stage_dir)
        manifest = {
            "name": name,
            "version": version,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **curated,
            "config": config.model_dump(mode="json"),
            "source": {"uri": str(source), "kind": spec.kind, "root": str(spec.root.absolute()), **fingerprint},
            "software": {
                "python": platform.python_version(),
                "pillow": PIL.__version__,
                "duckdb": duckdb.__version__,
                "pyarrow": pa.__version__,
            },
        }
        # Not sort_keys: histogram buckets are in numeric order, which sorting by name would break.
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _fsync_tree(tmp)  # the data is on disk before the rename makes it visible
        try:
            os.rename(tmp, final)
        except OSError:
            if (final / MANIFEST_NAME).is_file():  # a concurrent run published the same version first
                return load_dataset_version(final)
            raise
        fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left after a successful rename
    log.info("published %s: %s", final, counts)
    return load_dataset_version(final)


def dataset_version(source: str | Path, config: IngestConfig | None = None) -> str:
    """The version `ingest_dataset` would publish `source` under (hashes the source)."""
    config = config or IngestConfig()
    return _version(fingerprint_source(detect_source(source), config.fingerprint), config)


def load_dataset_version(root: str | Path) -> DatasetVersion:
    """The descriptor of a published version directory, read from its manifest."""
    root = Path(root).absolute()
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise IngestError(f"{root} is not a published dataset version (no {MANIFEST_NAME}); run ingest first")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    counts = manifest["counts"]
    return DatasetVersion(
        name=manifest["name"],
        version=manifest["version"],
        root=str(root),
        counts={k: int(counts[k]) for k in ("train", "val", "rejects")},
        resolution=int(manifest["resolution"]),
        manifest=str(manifest_path),
    )


def detect_source(source: str | Path) -> SourceSpec:
    """Which kind of source `source` is, from what the path is; IngestError if none fits."""
    text = str(source)
    # An existing path is taken as it is, even with glob characters in it (`photos[2024]`).
    if not isinstance(source, Path) and any(c in text for c in "*?[") and not os.path.lexists(text):
        matches = sorted(Path(p).absolute() for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not matches:
            raise IngestError(f"no files match {text!r}")
        others = [p.name for p in matches if not p.name.lower().endswith(TAR_SUFFIXES)]
        if others:
            raise IngestError(f"a glob source must match tar shards only; {text!r} also matches {others[:3]}")
        root = Path(os.path.commonpath([p.parent for p in matches]))
        return SourceSpec("tar", text, root, tuple(matches))

    path = Path(source).absolute()
    if not path.exists():
        raise IngestError(f"source {path} does not exist")
    if path.is_file():
        lower = path.name.lower()
        if lower in METADATA_FILES:
            return SourceSpec("metadata", text, path.parent, (path,))
        if lower.endswith(TAR_SUFFIXES):
            return SourceSpec("tar", text, path.parent, (path,))
        if lower.endswith(URL_LIST_SUFFIXES):
            return SourceSpec("urls", text, path.parent, (path,))
        raise IngestError(
            f"cannot ingest the file {path.name}: expected a metadata.jsonl|csv|parquet, a tar shard "
            f"({', '.join(TAR_SUFFIXES)}) or a URL list ({', '.join(URL_LIST_SUFFIXES)})"
        )
    metadata = [path / m for m in METADATA_FILES if (path / m).is_file()]
    if len(metadata) > 1:
        raise IngestError(f"{path} has several metadata files {[m.name for m in metadata]}; keep exactly one")
    if metadata:
        return SourceSpec("metadata", text, path, (metadata[0],))
    shards = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(TAR_SUFFIXES))
    if shards:
        return SourceSpec("tar", text, path, tuple(shards))
    has_images = has_captions = False
    for _, _, filenames in os.walk(path):
        has_images = has_images or any(f.lower().endswith(IMAGE_EXTENSIONS) for f in filenames)
        has_captions = has_captions or any(f.lower().endswith(".txt") for f in filenames)
        if has_images and has_captions:
            return SourceSpec("sidecar", text, path, ())
    if has_images:
        raise IngestError(
            f"{path} holds images but no captions: add a metadata.jsonl with file_name and text "
            "columns, or a caption file next to each image (img001.png + img001.txt)"
        )
    raise IngestError(
        f"{path} holds no metadata.jsonl|csv|parquet, no tar shards and no images with .txt captions; "
        "see tasks/ingest.py for the supported source layouts"
    )


def fingerprint_source(spec: SourceSpec, mode: Literal["content", "stat"] = "content") -> dict[str, Any]:
    """A digest of every source file: relative path, size, and sha256 (content) or mtime (stat).

    A URL list is fingerprinted by the list file only: the remote images are not ours to hash.
    """
    digest = hashlib.sha256()
    n_files = n_bytes = 0
    for path in _source_files(spec):
        stat = path.stat()
        if mode == "content":
            with open(path, "rb") as f:
                mark = hashlib.file_digest(f, "sha256").hexdigest()
        else:
            mark = str(stat.st_mtime_ns)
        rel = path.relative_to(spec.root).as_posix()
        digest.update(f"{rel}\0{stat.st_size}\0{mark}\n".encode())
        n_files += 1
        n_bytes += stat.st_size
    return {"fingerprint": digest.hexdigest(), "fingerprint_mode": mode, "files": n_files, "bytes": n_bytes}


# ---------------------------------------------------------------------------
# Prefect task


def _retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry I/O hiccups; an IngestError (bad source or config) fails the same way every time."""
    try:
        state.result()
    except IngestError:
        return False
    except Exception:
        return True
    return True


def _ingest_cache_key(context, parameters: dict[str, Any]) -> str | None:
    """Key on the version directory the inputs map to (source content + ingest config).

    The first run stores its descriptor under this key, so re-running an unchanged source is
    a cache hit. A version deleted from disk afterwards is not re-ingested from the cache's
    point of view: run with PREFECT_TASKS_REFRESH_CACHE=true (later stages check their
    inputs exist and say so).
    """
    config = parameters.get("config")
    config = IngestConfig.model_validate(config) if config is not None else IngestConfig()
    version = dataset_version(parameters["source"], config)
    final = _datasets_dir(parameters.get("data_root")) / parameters["name"] / version
    return "ingest-" + hashlib.sha256(str(final.absolute()).encode()).hexdigest()[:32]


@task(
    name="ingest",
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),
    retry_jitter_factor=0.5,
    retry_condition_fn=_retry_unless_bad_input,
    cache_key_fn=_ingest_cache_key,
    persist_result=True,
)
def ingest_task(
    source: str,
    name: str,
    config: IngestConfig | None = None,
    data_root: str | None = None,
    dask_address: str | None = None,
) -> DatasetVersion:
    """Prefect wrapper of `ingest_dataset` (no progress bar: Prefect logs are not a terminal).

    `dask_address` is not in the cache key: where the shards were staged does not change the dataset.
    """
    dataset = ingest_dataset(
        source, name, config, Path(data_root) if data_root else None, progress=False, dask_address=dask_address
    )
    storage.push(Path(dataset.root))  # with an s3:// data root; a no-op otherwise
    return dataset


# ---------------------------------------------------------------------------
# Planning: inputs -> work units


def _plan_units(spec: SourceSpec) -> Iterator[WorkUnit]:
    """Work units in a deterministic order; items are produced lazily, so memory stays bounded."""
    if spec.kind == "tar":
        for index, shard in enumerate(spec.files):
            yield WorkUnit(index=index, kind="tar", shard=str(shard), shard_name=shard.relative_to(spec.root).as_posix())
        return
    if spec.kind == "metadata":
        items, kind, size = _metadata_items(spec), "files", FILES_PER_UNIT
    elif spec.kind == "sidecar":
        items, kind, size = _sidecar_items(spec.root), "files", FILES_PER_UNIT
    else:
        items, kind, size = _url_items(spec.files[0]), "urls", URLS_PER_UNIT
    for index, chunk in enumerate(_chunks(items, size)):
        yield WorkUnit(index=index, kind=kind, items=tuple(chunk))


def _chunks(items: Iterable[InputItem], size: int) -> Iterator[list[InputItem]]:
    chunk: list[InputItem] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _metadata_items(spec: SourceSpec) -> Iterator[InputItem]:
    meta_file = spec.files[0]
    root = spec.root
    for where, record in _metadata_records(meta_file):
        if not isinstance(record, dict):
            yield InputItem(uri=where, source_uri=where, reject=("bad_metadata", str(record)))
            continue
        file_name = record.get("file_name")
        caption_key = "text" if "text" in record else "caption"
        caption = record.get(caption_key)
        meta = json.dumps(
            {k: v for k, v in record.items() if k not in ("file_name", caption_key)}, sort_keys=True, default=str
        )
        caption = None if caption is None else str(caption)
        if not isinstance(file_name, str) or not file_name:
            yield InputItem(uri=where, source_uri=where, caption=caption, reject=("bad_metadata", "no file_name"))
            continue
        # A lexical check (no resolve(): one syscall per path component per row is
        # slow on big folders); it is the metadata that must not point outside.
        relative = os.path.normpath(file_name)
        path = root / relative
        if os.path.isabs(relative) or relative == ".." or relative.startswith(".." + os.sep):
            yield InputItem(
                uri=file_name, source_uri=file_name, caption=caption, meta=meta,
                reject=("unsafe_path", f"{file_name!r} is outside the source folder"),
            )  # fmt: skip
            continue
        if caption is None:
            yield InputItem(
                uri=str(path), source_uri=file_name, meta=meta,
                reject=("missing_caption", f"{where} has no text or caption value"),
            )  # fmt: skip
            continue
        yield InputItem(uri=str(path), source_uri=file_name, caption=caption, meta=meta)


def _metadata_records(path: Path) -> Iterator[tuple[str, dict | str]]:
    """(location, record) per metadata row; a row that does not parse yields an error string."""
    name = path.name
    if name.endswith(".jsonl"):
        with open(path, encoding="utf-8-sig", errors="strict") as f:
            try:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        yield f"{name}:{lineno}", f"invalid JSON: {exc}"
                        continue
                    yield f"{name}:{lineno}", record if isinstance(record, dict) else "line is not a JSON object"
            except UnicodeDecodeError as exc:
                raise IngestError(f"{path} is not UTF-8 ({exc}); save it as UTF-8") from None
    elif name.endswith(".csv"):
        with open(path, encoding="utf-8-sig", newline="", errors="strict") as f:
            _lift_csv_field_limit()
            reader = csv.DictReader(f)
            try:
                columns = reader.fieldnames or []
                _require_columns(path, columns)
                for rowno, row in enumerate(reader, 2):
                    if None in row:  # DictReader keeps the fields beyond the header under None
                        extra = len(row[None])
                        yield f"{name}:{rowno}", f"row has {extra} extra field(s) beyond the header's {len(columns)}"
                        continue
                    yield f"{name}:{rowno}", row
            except UnicodeDecodeError as exc:
                raise IngestError(f"{path} is not UTF-8 ({exc}); save it as UTF-8") from None
            except csv.Error as exc:
                # The inner reader's line_num: DictReader sets its own only once a row has parsed.
                raise IngestError(f"cannot read {path} at line {reader.reader.line_num}: {exc}") from None
    else:
        parquet = pq.ParquetFile(path)
        _require_columns(path, parquet.schema_arrow.names)
        rowno = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                rowno += 1
                yield f"{name}:{rowno}", row


def _lift_csv_field_limit() -> None:
    """Raise csv's field limit from its 128 KiB default to MAX_CAPTION_BYTES, so a long caption
    reaches the caption_too_long rule (a longer field stops the read with an IngestError naming
    its line). The limit is one per process and threads read CSVs at once, so it is only ever
    raised, never put back."""
    if csv.field_size_limit() < MAX_CAPTION_BYTES:
        csv.field_size_limit(MAX_CAPTION_BYTES)


def _require_columns(path: Path, columns: list[str]) -> None:
    if "file_name" not in columns or not ({"text", "caption"} & set(columns)):
        raise IngestError(f"{path} needs a file_name and a text (or caption) column; it has {list(columns)}")


def _sidecar_items(root: Path) -> Iterator[InputItem]:
    """One input per image file (captioned by `<stem>.txt` beside it) and per caption file without image."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        directory = Path(dirpath)
        images = sorted(f for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS))
        captions = {Path(f).stem: f for f in filenames if f.lower().endswith(".txt")}
        image_stems = {Path(f).stem for f in images}
        for file_name in images:
            path = directory / file_name
            rel = path.relative_to(root).as_posix()
            caption_file = captions.get(Path(file_name).stem)
            if caption_file is None:
                yield InputItem(uri=str(path), source_uri=rel, reject=("missing_caption", f"no {Path(file_name).stem}.txt"))
            else:
                yield InputItem(uri=str(path), source_uri=rel, caption_path=str(directory / caption_file))
        for stem, caption_file in sorted(captions.items()):
            if stem not in image_stems:
                path = directory / caption_file
                rel = path.relative_to(root).as_posix()
                yield InputItem(uri=str(path), source_uri=rel, reject=("missing_file", "caption file without an image"))


def _url_items(path: Path) -> Iterator[InputItem]:
    for url, caption in _url_rows(path):
        problem = check_url(url)
        yield InputItem(uri=url or "", source_uri=url or "", caption=caption, reject=problem)


def _url_rows(path: Path) -> Iterator[tuple[str | None, str | None]]:
    if path.name.lower().endswith(".parquet"):
        parquet = pq.ParquetFile(path)
        url_col, caption_col = _url_columns(path, parquet.schema_arrow.names)
        for batch in parquet.iter_batches(batch_size=4096, columns=[url_col, caption_col]):
            yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist())
        return
    parse = pa_csv.ParseOptions(delimiter="\t" if path.name.lower().endswith(".tsv") else ",")
    try:
        names = pa_csv.open_csv(path, parse_options=parse).schema.names
        url_col, caption_col = _url_columns(path, names)
        reader = pa_csv.open_csv(
            path,
            parse_options=parse,
            convert_options=pa_csv.ConvertOptions(
                column_types={url_col: pa.string(), caption_col: pa.string()},
                include_columns=[url_col, caption_col],
                strings_can_be_null=False,
            ),
        )
        for batch in reader:
            yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist())
    except pa.ArrowInvalid as exc:
        raise IngestError(f"cannot read the URL list {path}: {exc}") from None


def _url_columns(path: Path, names: list[str]) -> tuple[str, str]:
    by_lower = {n.lower(): n for n in names}
    url_col = by_lower.get("url")
    caption_col = by_lower.get("caption") or by_lower.get("text")
    if url_col is None or caption_col is None:
        raise IngestError(f"URL list {path} needs a url and a caption (or text) column; it has {names}")
    return url_col, caption_col


def _source_files(spec: SourceSpec) -> Iterator[Path]:
    if spec.kind in ("tar", "urls"):
        yield from spec.files
        return
    for dirpath, dirnames, filenames in os.walk(spec.root):
        dirnames.sort()
        for file_name in sorted(filenames):
            yield Path(dirpath) / file_name


# ---------------------------------------------------------------------------
# Staging: work units -> Parquet parts, in a process pool or on a Dask cluster


def _stage_options(config: IngestConfig) -> StageOptions:
    return StageOptions(
        image=ImageOptions(
            resolution=config.resolution,
            resize_mode=config.resize_mode,
            image_format=config.image_format,
            quality=config.quality,
            allowed_formats=config.allowed_formats,
            max_image_pixels=config.max_image_pixels,
            pad_colour=config.pad_colour,
            alpha_background=config.alpha_background,
        ),
        caption_keys=config.caption_keys,
        max_input_bytes=config.max_input_bytes,
        http_timeout_s=config.http_timeout_s,
        http_retries=config.http_retries,
        http_backoff_s=config.http_backoff_s,
        http_concurrency=config.http_concurrency,
        row_group_rows=min(config.row_group_size, 512),
    )


def _stage(
    spec: SourceSpec, config: IngestConfig, stage_dir: Path, progress: bool, desc: str, dask_address: str | None = None
) -> Counter:
    (stage_dir / "rows").mkdir(parents=True)
    (stage_dir / "rejects").mkdir()
    opts = _stage_options(config)
    workers = config.workers or usable_cores()
    totals: Counter = Counter()
    with tqdm(desc=desc, unit="input", disable=not progress, dynamic_ncols=True) as bar:

        def done(result: dict[str, int]) -> None:
            totals.update(result)
            totals["units"] += 1
            bar.update(result["inputs"])
            bar.set_postfix(rejected=totals["rejected"], refresh=False)

        if workers == 1 and dask_address is None:
            for unit in _plan_units(spec):
                done(stage_unit(unit, opts, str(stage_dir)))
            return totals
        # Each unit writes its own part-<index> files and the SQL orders rows by id and source
        # position, so neither the order nor the place units finish in changes the output.
        with _unit_executor(workers, dask_address) as (pool, slots):
            pending: set = set()
            for unit in _plan_units(spec):
                # Bounded look-ahead: planning never runs far ahead of the workers.
                while len(pending) >= 2 * slots:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        done(future.result())
                pending.add(pool.submit(stage_unit, unit, opts, str(stage_dir)))
            for future in as_completed(pending):
                done(future.result())
    return totals


@contextmanager
def _unit_executor(workers: int, dask_address: str | None) -> Iterator[tuple[Executor, int]]:
    """(executor for `stage_unit` calls, how many run at once): a local process pool of
    `workers`, or the Dask cluster at `dask_address` with all its worker threads."""
    if dask_address is None:
        pool: Executor = ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context())
        try:
            yield pool, workers
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return

    require_distributed(dask_address, "ingest", IngestError)
    with dask_client(dask_address) as client:
        threads = sum(client.nthreads().values())
        # pure=False: every submission runs, even of a unit Dask has seen before (it writes files).
        pool = client.get_executor(pure=False)
        try:
            yield pool, threads
        except BaseException:
            pool.shutdown(wait=False)  # cancels what has not run
            raise
        pool.shutdown(wait=True)


def _mp_context() -> multiprocessing.context.BaseContext:
    # forkserver: workers fork from one clean server process (no inherited threads or
    # locks, unlike fork) that imports the main module and the worker code once per
    # run; with spawn every worker of every pool would re-import them (the CLI's main
    # pulls in Prefect and torch: seconds each). pandas is there because pyarrow
    # imports it on first use, and it costs about a second.
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["__main__", "tasks.image_io", "pandas"])
        return ctx
    return multiprocessing.get_context("spawn")


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------
# Curation: DuckDB SQL over the staged parts


def read_sql(name: str) -> str:
    """A file of the top-level sql/ folder, without a trailing semicolon (so it nests in COPY)."""
    return (SQL_DIR / name).read_text(encoding="utf-8").strip().rstrip(";")


def _literal(value: str | Path) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def curation_variables(config: IngestConfig) -> dict[str, Any]:
    """The values sql/curate.sql reads with getvariable()."""
    return {
        "min_size": config.min_size if config.min_size is not None else config.resolution,
        "max_aspect_ratio": config.max_aspect_ratio,
        "min_caption_chars": config.min_caption_chars,
        "max_caption_chars": config.max_caption_chars,
        "keep_empty_captions": config.empty_caption_policy == "keep",
        "dedupe": config.dedupe,
        "val_threshold": val_threshold(config.val_fraction),
    }


def val_threshold(val_fraction: float) -> str:
    """A row is in val when the first 8 hex digits of md5(id) sort below this (fixed-width hex)."""
    return format(int(val_fraction * 2**32), "08x")


def connect_staged(stage_dir: Path, config: IngestConfig) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with views `staged` and `staged_rejects` and the curation variables set."""
    con = duckdb.connect(
        config={
            "threads": config.workers or usable_cores(),
            "memory_limit": config.duckdb_memory_limit,
            "temp_directory": str(stage_dir / "duckdb"),
            "preserve_insertion_order": False,
        }
    )
    # The parts are listed here, not globbed by DuckDB: the data root may hold glob characters.
    for view, folder in (("staged", "rows"), ("staged_rejects", "rejects")):
        parts = ", ".join(_literal(p) for p in sorted((stage_dir / folder).glob("*.parquet")))
        con.execute(f"CREATE VIEW {view} AS SELECT * FROM read_parquet([{parts}])")
    for key, value in curation_variables(config).items():
        con.execute(f"SET VARIABLE {key} = ?", [value])
    return con


def _curate(stage_dir: Path, out_dir: Path, config: IngestConfig, staged: Counter) -> dict[str, Any]:
    """Run sql/ over the staged parts; write train/, val/, rejects.parquet; return the manifest body."""
    con = connect_staged(stage_dir, config)
    try:
        con.execute(read_sql("curate.sql"))
        files: dict[str, Any] = {}
        for split in ("train", "val"):
            con.execute("SET VARIABLE split = ?", [split])
            con.execute(
                f"COPY ({read_sql('accepted.sql')}) TO {_literal(out_dir / split)} "
                f"(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {config.row_group_size}, "
                "FILE_SIZE_BYTES '256MB', FILENAME_PATTERN 'part-{i}')"
            )
            files[split] = sorted(p.relative_to(out_dir).as_posix() for p in (out_dir / split).glob("part-*.parquet"))
        con.execute(f"COPY ({read_sql('rejects.sql')}) TO {_literal(out_dir / 'rejects.parquet')} (FORMAT parquet, COMPRESSION zstd)")
        files["rejects"] = "rejects.parquet"
        statistics = statistics_from_rows(con.execute(read_sql("stats.sql")).fetchall())
    finally:
        con.close()

    counts = {k: int(statistics["counts"].get(k, 0)) for k in ("train", "val", "rejects")}
    counts["inputs"] = staged["inputs"]
    if counts["train"] + counts["val"] + counts["rejects"] != staged["inputs"]:
        # Every input is a row or a reject; anything else is a bug here, not bad input.
        raise RuntimeError(f"ingest lost inputs: staged {dict(staged)}, published {counts}")
    return {
        "format": INGEST_FORMAT,
        "resolution": config.resolution,
        "counts": counts,
        "files": files,
        "schema": {
            "rows": _schema_of(out_dir / files["train"][0]),
            "rejects": _schema_of(out_dir / "rejects.parquet"),
        },
        "split": {
            "rule": "val if left(md5(id), 8) < val_threshold else train",
            "val_fraction": config.val_fraction,
            "val_threshold": val_threshold(config.val_fraction),
        },
        "statistics": statistics,
    }


_STAT_SECTIONS = (
    "counts",
    "rejects_by_reason",
    "caption_chars",
    "caption_chars_histogram",
    "orig_min_side_histogram",
    "top_orig_sizes",
)


def statistics_from_rows(rows: list[tuple]) -> dict[str, dict[str, float | int]]:
    """(section, key, value, sort) rows of sql/stats.sql -> {section: {key: value}} in sort order."""
    out: dict[str, dict[str, float | int]] = {section: {} for section in _STAT_SECTIONS}
    out["counts"] = {"train": 0, "val": 0, "rejects": 0}
    for section, key, value, _ in sorted(rows, key=lambda r: (r[0], r[3], r[1])):
        value = float(value)
        out.setdefault(section, {})[key] = int(value) if value.is_integer() else round(value, 3)
    return out


def _schema_of(path: Path) -> list[dict[str, str]]:
    return [{"name": f.name, "type": str(f.type)} for f in pq.read_schema(path)]


def _no_rows_message(spec: SourceSpec, manifest: dict[str, Any]) -> str:
    reasons = manifest["statistics"].get("rejects_by_reason", {})
    summary = ", ".join(f"{reason}: {n}" for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
    return (
        f"no valid rows in {spec.uri} ({spec.kind} source): all {manifest['counts']['inputs']} inputs were "
        f"rejected ({summary or 'the source has no inputs'}); fix the source or loosen the ingest config"
    )


# ---------------------------------------------------------------------------
# Paths, versions, publication


def _datasets_dir(data_root: str | Path | None) -> Path:
    return (Path(data_root) if data_root is not None else get_settings().data_root).absolute() / "datasets"


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise IngestError(f"dataset name {name!r} must be letters, digits, '.', '_' or '-', starting with a letter or digit")


def _version(fingerprint: dict[str, Any], config: IngestConfig) -> str:
    payload = {
        "format": INGEST_FORMAT,
        "source": fingerprint["fingerprint"],
        "config": config.model_dump(mode="json", exclude=set(_OPERATIONAL_FIELDS)),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def _remove_stale_temporaries(parent: Path) -> None:
    """Delete `.tmp-*` directories of runs on this host whose process is gone (killed runs)."""
    for path in parent.glob(".tmp-*"):
        match = re.match(r"^\.tmp-[0-9a-f]+-(\d+)@(.+)-[^-]+$", path.name)
        if not match or match.group(2) != _host():
            continue
        pid = int(match.group(1))
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for file_name in filenames:
            with open(os.path.join(dirpath, file_name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))
