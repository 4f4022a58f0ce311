"""Headless matplotlib for every figure dynwire draws (connectivity analysis, study, curves)."""

from __future__ import annotations

from typing import Any

__all__ = ["pyplot", "require_matplotlib"]


def require_matplotlib() -> None:
    """Fail at once, in one line, where matplotlib (a dependency of dynwire) is missing.

    Raises ``ValueError`` (what the commands report as ``dynwire <command>: error: ...``), so a
    command that draws stops before its work, not after it.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ValueError(
            f"drawing figures needs matplotlib, a dependency of dynwire that is missing here ({exc}): "
            "pip install matplotlib (or reinstall dynwire), or skip the figures with --no-plots"
        ) from None


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt
