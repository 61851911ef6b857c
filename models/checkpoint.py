"""Checkpoint I/O: atomic writes, safetensors for weights, `weights_only` for the rest.

Weights never go through pickle. Any other state (optimizer, RNG, step) is read
with `torch.load(weights_only=True)`, which refuses objects that carry code.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class UnsafeCheckpointError(ValueError):
    """A file where weights belong is not a safetensors file (e.g. a pickle)."""


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary sibling of `path`, fsync it, then `os.replace`.

    A crash at any point leaves either the old file or the new one, never half of one. The file
    gets the mode a plain `open()` gives (0o666 less the umask), not mkstemp's 0o600: a reader
    under another uid (a serving container) must be able to load what is published.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the kernel applies the umask
    mode = stat.S_IMODE(tmp.stat().st_mode)
    try:
        write(tmp)
        try:
            os.chmod(tmp, mode)  # `write` may replace the file: safetensors renames its own 0o600 file over it
        except OSError as exc:  # a file system without modes (some FUSE and CIFS mounts): its own rules apply
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new directory `parent/<prefix><random>` to build something in before it is published by
    a rename. Its mode is a plain mkdir's (0o777 less the umask), not mkdtemp's 0o700: a reader
    under another uid (a serving container, a training job) must be able to open what is published."""
    path = Path(parent) / f"{prefix}{uuid.uuid4().hex[:12]}"
    path.mkdir(mode=0o777)
    return path


def fsync_dir(directory: Path) -> None:
    # The rename itself lives in the directory entry; flush it too (POSIX only).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_weights(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save tensors as safetensors, atomically. Shared storage is cloned, as safetensors requires."""
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in state_dict.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file; anything else (a pickle, a truncated file) is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UnsafeCheckpointError(
            f"{path} is not a valid safetensors file ({exc}); weights are only ever "
            "loaded through safetensors, never unpickled"
        ) from exc


def save_state(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Save non-weight training state (optimizer, scheduler, RNG, step) with torch.save, atomically."""
    return atomic_write(path, lambda tmp: torch.save(dict(state), tmp))


def load_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load state saved by `save_state`; `weights_only=True` refuses pickled code."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError or RuntimeError depending on content
        if isinstance(exc, FileNotFoundError):
            raise
        raise UnsafeCheckpointError(
            f"refused to load {path}: it is not plain tensor/primitive state ({type(exc).__name__}: {exc})"
        ) from exc
