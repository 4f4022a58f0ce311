"""SIGINT/SIGTERM handling: finish the current step, save ``last.pt``, then stop."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

__all__ = ["SignalGuard", "TrainingInterrupted"]


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM stopped training after saving ``last.pt``."""

    def __init__(self, message: str, signum: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.signum = signum
        self.checkpoint = checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


class SignalGuard:
    """Turns the first SIGINT/SIGTERM into a flag the loop checks after each step.

    A second signal restores the previous handlers and acts at once (SIGINT raises
    ``KeyboardInterrupt``, SIGTERM terminates). Use as a context manager.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # second signal: give up at once
            self.uninstall()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(
            f"\n[dynwire] received {signal.Signals(signum).name}: finishing the current step and saving "
            f"last.pt (send it again to abort without saving)",
            file=sys.stderr,
            flush=True,
        )

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGTERM).name

    def install(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def __enter__(self) -> SignalGuard:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()
