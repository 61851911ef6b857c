"""Object storage behind the data root: `T2I_DATA_ROOT=s3://bucket/prefix`.

The stages read and write a local directory tree (Parquet, safetensors, atomic renames); with an
`s3://` data root that tree is a cache (`T2I_LOCAL_DATA_ROOT`) mirrored to the bucket at the
task boundaries:

- a stage that published a dataset version, an embedding set or a training run `push`es it:
  every file is uploaded, then a `_PUBLISHED` marker last, so a reader never takes a half
  upload for a whole one; dot-named paths are not (the stages publish none: those are
  temporaries a killed write left before its rename);
- a stage that needs one `pull`s it first when the local cache lacks it (another machine
  made it): downloaded next to its place, then renamed in, so a killed download leaves
  nothing that looks published.

A path maps to the object key of the same path relative to the local root, so every machine
with the same data root URI sees the same tree. S3-compatible stores (MinIO) are reached with
`T2I_S3_ENDPOINT_URL`; credentials come from the usual AWS variables or files.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

from models.checkpoint import fsync_dir, temp_dir
from tasks.settings import Settings, get_settings

log = logging.getLogger(__name__)

MARKER = "_PUBLISHED"


class StorageError(RuntimeError):
    """The object store could not be read or written as needed."""


def remote_uri(local: Path, settings: Settings | None = None) -> str | None:
    """The object-store URI of a path under the local data root; None without a remote root."""
    settings = settings or get_settings()
    if settings.data_uri is None:
        return None
    try:
        relative = Path(local).resolve().relative_to(settings.data_root.resolve())
    except ValueError as exc:
        raise StorageError(f"{local} is outside the local data root {settings.data_root}; cannot mirror it") from exc
    return f"{settings.data_uri.rstrip('/')}/{relative.as_posix()}"


def push(local: Path, settings: Settings | None = None) -> str | None:
    """Upload the directory `local` to its remote place, the marker last; returns the URI (None: no remote)."""
    settings = settings or get_settings()
    uri = remote_uri(local, settings)
    if uri is None:
        return None
    fs, base = _filesystem(uri, settings)
    files, skipped = [], 0
    for path in sorted(Path(local).rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(local).parts):
            # Dot-named: a temporary that was never renamed into place (atomic_write's
            # `.name.<hex>.tmp`, a stage's `.tmp-*` build directory) left by a killed write.
            skipped += path.is_file()
        elif path.is_file():
            files.append(path)
    if skipped:
        log.warning("not uploading %d dot-named temporary file(s) under %s: leftovers of killed writes", skipped, local)
    try:
        for path in files:
            key = f"{base}/{path.relative_to(local).as_posix()}"
            with open(path, "rb") as src, fs.open_output_stream(key) as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
        with fs.open_output_stream(f"{base}/{MARKER}") as dst:
            dst.write(f"{len(files)}\n".encode())
    except OSError as exc:
        raise StorageError(f"uploading {local} to {uri} failed: {exc}") from exc
    log.info("pushed %s (%d files) to %s", local, len(files), uri)
    return uri


def pull(local: Path, settings: Settings | None = None) -> bool:
    """Make sure the published directory `local` is here, downloading it when only the remote
    has it. Returns True when it downloaded (False: it was here, or another process pulled it
    first). A local copy is trusted as it is."""
    settings = settings or get_settings()
    local = Path(local)
    uri = remote_uri(local, settings)
    if uri is None or local.exists():
        return False
    from pyarrow import fs as pafs

    fs, base = _filesystem(uri, settings)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(local.parent, f".pull-{local.name}-{os.getpid()}-")  # threads of a process each their own
    try:
        try:
            if fs.get_file_info(f"{base}/{MARKER}").type != pafs.FileType.File:
                raise StorageError(f"{uri} is not published (no {MARKER}); run the stage that makes it")
            for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
                if info.type != pafs.FileType.File or info.base_name == MARKER:
                    continue
                target = tmp / info.path[len(base) + 1 :]
                if not target.resolve().is_relative_to(tmp.resolve()):
                    raise StorageError(f"object {info.path} would land outside {local}; refusing it")
                target.parent.mkdir(parents=True, exist_ok=True)
                with fs.open_input_stream(info.path) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 8 << 20)
        except OSError as exc:
            raise StorageError(f"downloading {uri} failed: {exc}") from exc
        try:
            os.replace(tmp, local)
        except OSError:
            if local.exists():  # another process pulled it first; its copy is as good as ours
                return False
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed download; nothing after a successful replace
    fsync_dir(local.parent)
    log.info("pulled %s from %s", local, uri)
    return True


def _filesystem(uri: str, settings: Settings):
    """(pyarrow filesystem, bucket/key path) for an s3:// URI."""
    from pyarrow import fs as pafs

    parsed = urlparse(uri)
    if parsed.scheme != "s3":
        raise StorageError(f"unsupported data root scheme {parsed.scheme!r} in {uri}; use s3://bucket/prefix")
    options = {}
    if settings.s3_endpoint_url:
        endpoint = urlparse(settings.s3_endpoint_url)
        options = {"endpoint_override": endpoint.netloc or endpoint.path, "scheme": endpoint.scheme or "https"}
    return pafs.S3FileSystem(**options), f"{parsed.netloc}{parsed.path}".rstrip("/")
