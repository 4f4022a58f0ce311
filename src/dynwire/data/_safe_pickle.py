"""Restricted unpickling: only the numpy globals needed to rebuild plain arrays."""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["RestrictedUnpickler", "UnsafePickleError", "safe_load_pickle"]


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle asked for a global outside the allow-list (refused, nothing was executed)."""

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]


def _latin1_encode(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes, limited to latin-1."""
    if not isinstance(obj, str) or codecs.lookup(encoding).name != "iso8859-1" or errors != "strict":
        raise UnsafePickleError(f"refusing _codecs.encode with encoding={encoding!r}, errors={errors!r}")
    return obj.encode("latin-1")


def _allowed() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = _multiarray._reconstruct
        if hasattr(_numeric, "_frombuffer"):  # protocol-5 pickles of arrays
            allowed[(f"{mod}.numeric", "_frombuffer")] = _numeric._frombuffer
    return allowed


_ALLOWED = _allowed()


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` resolves only numpy array-reconstruction globals.

    Anything else (``os.system``, ``builtins.eval``, arbitrary classes...) raises
    ``pickle.UnpicklingError`` before it can be called.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global '{module}.{name}': only numpy array reconstruction "
                "is allowed in dataset pickles (the file may be corrupt or malicious)"
            ) from None


def safe_load_pickle(path: str | Path) -> Any:
    """Load a dataset pickle with :class:`RestrictedUnpickler` and ``encoding='bytes'``.

    Raises ``ValueError`` naming the file if it is not a valid (or not an allowed) pickle.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding="bytes").load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"cannot load pickle '{path}': {exc}") from exc
    except pickle.UnpicklingError as exc:
        raise ValueError(f"cannot load pickle '{path}': {exc}") from exc
    except (EOFError, ValueError, TypeError, IndexError, AttributeError, KeyError) as exc:
        raise ValueError(f"cannot load pickle '{path}': corrupt or truncated file ({type(exc).__name__}: {exc})") from exc
