"""Shared helpers for locating datasets on disk."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["ENV_VAR", "PathLike", "candidate_roots", "format_searched"]

#: Environment variable naming a folder that holds the datasets.
ENV_VAR = "DYNWIRE_DATA_DIR"

PathLike = str | os.PathLike[str]


def _dedupe(paths: Sequence[Path]) -> list[Path]:
    seen: set[str] = set()
    out: list[Path] = []
    for p in paths:
        key = str(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def candidate_roots(
    root: PathLike | None,
    subdirs: Sequence[str],
    *,
    system_dirs: Sequence[str] = (),
) -> list[Path]:
    """Folders to try, in order, for a dataset stored in one of ``subdirs``.

    With an explicit ``root``: ``root/<subdir>`` for each subdir, then ``root``.
    With ``root=None``: ``$DYNWIRE_DATA_DIR/<subdir>``, ``$DYNWIRE_DATA_DIR``,
    ``./data/<subdir>`` and finally ``system_dirs``.
    """
    out: list[Path] = []
    if root is not None:
        base = Path(root).expanduser()
        out += [base / s for s in subdirs]
        out.append(base)
        return _dedupe(out)
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        base = Path(env).expanduser()
        out += [base / s for s in subdirs]
        out.append(base)
    out += [Path("data") / s for s in subdirs]
    out += [Path(s) for s in system_dirs]
    return _dedupe(out)


def format_searched(notes: Sequence[tuple[Path, str]]) -> str:
    """Render ``(path, note)`` pairs as an indented list for error messages."""
    lines = []
    for path, note in notes:
        shown = path if path.is_absolute() else f"{path} (= {path.absolute()})"
        lines.append(f"  - {shown}: {note}")
    return "\n".join(lines)
