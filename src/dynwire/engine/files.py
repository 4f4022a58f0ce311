"""Atomic file writes: every file the engine writes (checkpoints, run.json, config.yaml, final.json,
metrics snapshots, exports) goes through :func:`atomic_write`.

The content goes to a temporary file ``.<name>.<random>.partial`` in the same folder, which is
flushed, fsync'ed and renamed over the target with :func:`os.replace` (then the folder is
fsync'ed), so a crash mid-write never leaves a truncated file; a save that is killed leaves at
most a ``.partial`` file, which :func:`remove_stale_temp_files` deletes when a run starts.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["TMP_SUFFIX", "atomic_write", "atomic_write_json", "atomic_link", "remove_stale_temp_files"]

#: Temporary files written by :func:`atomic_write` end with this suffix.
TMP_SUFFIX = ".partial"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_path(path: Path) -> tuple[int, Path]:
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    return fd, Path(name)


def atomic_write(path: str | os.PathLike[str], content: str | bytes | Callable[[BinaryIO], Any]) -> Path:
    """Write ``content`` (text as UTF-8, bytes, or a function that writes to a binary file) atomically.

    If anything fails the temp file is removed and an existing ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_path(path)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, str):
                f.write(content.encode("utf-8"))
            elif isinstance(content, bytes):
                f.write(content)
            else:
                content(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """``atomic_write`` of ``obj`` as indented JSON."""
    return atomic_write(path, json.dumps(obj, indent=2) + "\n")


def atomic_link(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Make ``dst`` a hard link to ``src`` atomically (a copy where links are not supported)."""
    src, dst = Path(src), Path(dst)
    fd, tmp = _temp_path(dst)
    os.close(fd)
    tmp.unlink()
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        tmp.unlink(missing_ok=True)
        with open(src, "rb") as f:
            atomic_write(dst, lambda out: shutil.copyfileobj(f, out))
    return dst


def remove_stale_temp_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete temp files left by a write that was killed midway; returns them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.glob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
