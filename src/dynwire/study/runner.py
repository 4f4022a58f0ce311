"""The runner of :mod:`dynwire.study`: run status, per-run locks and the trainer processes.

:func:`run_status` classifies a run from its folder; :func:`run_study` runs every unfinished run
as a ``dynwire train`` subprocess, ``jobs`` at a time, holding a lock on ``<run>/.study.lock``
(inherited by the trainer), recording each attempt in ``study_run.json`` and forwarding
SIGINT/SIGTERM so the trainers save ``last.pt``.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import fnmatch
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..analysis import _stats
from .spec import RunSpec, Study, config_mismatch

STATUS_FILE = "study_run.json"
LOCK_FILE = ".study.lock"
LOG_FILE = "study.log"


# --------------------------------------------------------------------------- run state
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _lock_busy(run_dir: Path) -> bool:
    """True when another process holds the run's lock."""
    import fcntl

    p = run_dir / LOCK_FILE
    if not p.exists():
        return False
    fd = os.open(p, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops our lock
    return False


def run_status(study: Study, run: RunSpec, *, check_config: bool = True) -> str:
    """``done``, ``stale``, ``busy``, ``failed`` (gave up after max_attempts), ``partial`` or ``new``.

    A run whose folder is absent but whose row the study imports is ``done``.
    """
    d = study.run_dir(run)
    if run.name in study.imported and not d.exists():
        return "done"  # trained elsewhere, its row imported (Study.imported)
    if check_config and config_mismatch(study, run):
        return "stale"
    if (d / "final.json").is_file():
        return "done"
    if _lock_busy(d):
        return "busy"
    st = _read_json(d / STATUS_FILE) or {}
    failures = sum(1 for a in st.get("attempts", []) if a.get("outcome") == "failed")
    if failures >= study.max_attempts:
        return "failed"
    if (d / "last.pt").is_file():
        return "partial"
    return "new"


# --------------------------------------------------------------------------- runner
def _pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to send SIGTERM to the trainer if the runner dies (the trainer then saves last.pt)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _fmt_s(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


@dataclass
class _Active:
    run: RunSpec
    proc: subprocess.Popen
    lock_fd: int
    log: Any
    start: float
    start_iso: str
    resumed: bool


@dataclass
class RunnerReport:
    done: list[str] = field(default_factory=list)  # finished in this invocation
    failed: list[str] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> status
    signal: int | None = None

    @property
    def exit_code(self) -> int:
        if self.signal is not None:
            return 128 + self.signal
        return 1 if self.failed else 0


def _imported_stands_in(study: Study, r: RunSpec) -> bool:
    return r.name in study.imported and not study.run_dir(r).exists()


def _cell(r: RunSpec) -> str:
    return f"{r.model}__{r.wiring}__{r.options_slug}"


def _finished_durations(study: Study, runs: Sequence[RunSpec]) -> dict[str, list[float]]:
    """Wall seconds of finished runs, by cell (model, wiring, options) and by model.

    From the runner's per-run status files, or the ``wall_s`` of an imported row.
    """
    out: dict[str, list[float]] = {}
    for r in runs:
        d = study.run_dir(r)
        wall = None
        if (d / "final.json").is_file():
            st = _read_json(d / STATUS_FILE)
            if st and st.get("wall_s_total"):
                wall = float(st["wall_s_total"])
        elif r.name in study.imported and not d.exists():
            try:
                wall = float(study.imported[r.name].get("wall_s") or "nan")
            except ValueError:
                wall = None
            if wall is not None and not wall > 0:
                wall = None
        if wall is not None:
            out.setdefault(_cell(r), []).append(wall)
            out.setdefault(r.model, []).append(wall)
    return out


def _estimator(study: Study, durations: dict[str, list[float]]) -> Callable[[RunSpec], float | None]:
    models = {m: v for m, v in durations.items() if "__" not in m}
    every = [x for v in models.values() for x in v]

    def est(r: RunSpec) -> float | None:
        if durations.get(_cell(r)):
            return _stats.mean(durations[_cell(r)])
        if models.get(r.model):
            return _stats.mean(models[r.model])
        e = study.estimate(r)
        if e is not None:
            # scale the file's estimate by how fast finished runs of other models actually were
            ratios = [
                _stats.mean(v) / study.estimates_s[m] for m, v in models.items() if study.estimates_s.get(m) and v
            ]
            return e * (_stats.mean(ratios) if ratios else 1.0)
        return _stats.mean(every) if every else None

    return est


def run_study(
    study: Study,
    *,
    jobs: int | None = None,
    only: Sequence[str] = (),
    progress_every: float = 30.0,
    stream: TextIO | None = None,
    poll_s: float = 0.5,
    python: str | None = None,
) -> RunnerReport:
    """Run every unfinished run of the study, ``jobs`` at a time; returns what happened."""
    import fcntl

    out = stream or sys.stdout
    jobs = max(1, int(jobs or os.cpu_count() or 1))
    runs = [r for r in study.runs if not only or any(fnmatch.fnmatch(r.name, p) for p in only)]
    report = RunnerReport()
    pending: list[RunSpec] = []
    done_before = 0
    for r in runs:
        s = run_status(study, r)
        if s in ("new", "partial"):
            pending.append(r)
        elif s == "done":
            done_before += 1
        else:
            report.skipped[r.name] = s
    for name, s in report.skipped.items():
        extra = ""
        if s == "stale":
            r = next(x for x in runs if x.name == name)
            extra = ": " + "; ".join(config_mismatch(study, r)[:3]) + " (delete the run folder to rerun it)"
        elif s == "failed":
            extra = f": failed {study.max_attempts} times, see {LOG_FILE} (delete {STATUS_FILE} to retry)"
        elif s == "busy":
            extra = ": another process is training it"
        print(f"[study] skip {name} ({s}){extra}", file=out, flush=True)
    total = len(runs)
    print(
        f"[study] {study.name}: {total} runs, {done_before} done, {len(pending)} to run, {jobs} job(s); "
        f"runs in {study.output}",
        file=out,
        flush=True,
    )
    study.output.mkdir(parents=True, exist_ok=True)
    active: dict[str, _Active] = {}
    stop: list[int] = []
    t_start = time.monotonic()
    last_print = 0.0

    def on_signal(signum: int, frame: Any) -> None:
        stop.append(signum)
        first = len(stop) == 1
        sig = signal.SIGTERM if first else signal.SIGKILL
        word = "stopping: the running trainers save last.pt" if first else "second signal: killing the trainers"
        print(f"\n[study] {signal.Signals(signum).name}: {word}", file=out, flush=True)
        for a in active.values():
            try:
                os.kill(a.proc.pid, sig)
            except ProcessLookupError:
                pass

    previous = {}
    if _in_main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            previous[s] = signal.signal(s, on_signal)

    def launch(r: RunSpec) -> bool:
        d = study.run_dir(r)
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            report.skipped[r.name] = "busy"
            print(f"[study] skip {r.name} (busy: another process is training it)", file=out, flush=True)
            return False
        if (d / "final.json").is_file():  # finished by another runner meanwhile
            os.close(fd)
            return False
        resumed = (d / "last.pt").is_file()
        cmd = study.command(r, python=python)
        log = open(d / LOG_FILE, "ab")
        log.write(f"\n===== {_now()} {'resume' if resumed else 'start'}: {' '.join(cmd)}\n".encode())
        log.flush()
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # a terminal Ctrl-C reaches only the runner, which forwards it once
            pass_fds=(fd,),  # the trainer inherits the lock: it stays held if the runner dies
            preexec_fn=_pdeathsig if sys.platform.startswith("linux") else None,
        )
        st = _read_json(d / STATUS_FILE) or {"run": r.name, "attempts": []}
        st["running"] = {"pid": proc.pid, "start": _now(), "host": os.uname().nodename}
        _write_json(d / STATUS_FILE, st)
        active[r.name] = _Active(r, proc, fd, log, time.monotonic(), _now(), resumed)
        verb = "resume" if resumed else "start"
        print(f"[study] {verb} {r.name} (pid {proc.pid}, log {d / LOG_FILE})", file=out, flush=True)
        return True

    def finish(a: _Active, rc: int) -> None:
        d = study.run_dir(a.run)
        wall = time.monotonic() - a.start
        a.log.close()
        os.close(a.lock_fd)
        ok = rc == 0 and (d / "final.json").is_file()
        if ok:
            outcome = "done"
            report.done.append(a.run.name)
        elif stop and rc in (128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL):
            outcome = "interrupted"
            report.interrupted.append(a.run.name)
        else:
            outcome = "failed"
            report.failed.append(a.run.name)
        st = _read_json(d / STATUS_FILE) or {"run": a.run.name, "attempts": []}
        st.pop("running", None)
        st.setdefault("attempts", []).append(
            {
                "start": a.start_iso,
                "end": _now(),
                "wall_s": round(wall, 2),
                "rc": rc,
                "resumed": a.resumed,
                "outcome": outcome,
            }
        )
        st["wall_s_total"] = round(sum(x.get("wall_s", 0.0) for x in st["attempts"]), 2)
        _write_json(d / STATUS_FILE, st)
        msg = f"[study] {outcome} {a.run.name} in {_fmt_s(wall)} (exit {rc})"
        if outcome == "done":
            final = _read_json(d / "final.json") or {}
            top1 = (final.get("val") or {}).get("top1")
            if top1 is not None:
                msg += f": top-1 {top1:.2f}%"
        print(msg, file=out, flush=True)
        if outcome == "failed":
            tail = (d / LOG_FILE).read_bytes()[-1500:].decode(errors="replace").strip().splitlines()[-6:]
            print("\n".join(f"    | {line}" for line in tail), file=out, flush=True)

    def show() -> None:
        durations = _finished_durations(study, study.runs)
        est = _estimator(study, durations)
        now = time.monotonic()
        done_n = sum(1 for r in runs if (study.run_dir(r) / "final.json").is_file() or _imported_stands_in(study, r))
        remaining = [est(r) for r in pending]
        # a run past its estimate is assumed to need another tenth of it
        remaining += [
            None if est(a.run) is None else max(est(a.run) - (now - a.start), 0.1 * est(a.run)) for a in active.values()
        ]
        eta = None if any(x is None for x in remaining) else sum(remaining) / jobs
        running = ", ".join(f"{n} ({_fmt_s(now - a.start)})" for n, a in active.items())
        print(
            f"[study {time.strftime('%H:%M:%S')}] done {done_n}/{total} (+{len(report.done)} now), "
            f"running {len(active)}: {running or '-'}; pending {len(pending)}; failed {len(report.failed)}; "
            f"elapsed {_fmt_s(now - t_start)}, ETA {_fmt_s(eta) if remaining else '0s'}",
            file=out,
            flush=True,
        )

    try:
        while pending or active:
            changed = False
            for name, a in list(active.items()):
                rc = a.proc.poll()
                if rc is not None:
                    del active[name]
                    finish(a, rc)
                    changed = True
            while not stop and pending and len(active) < jobs:
                changed |= launch(pending.pop(0))
            if stop and not active:
                break
            now = time.monotonic()
            if changed or now - last_print >= progress_every:
                last_print = now
                show()
            time.sleep(poll_s)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for a in active.values():  # only on an exception in the loop itself
            try:
                os.kill(a.proc.pid, signal.SIGTERM)
                a.proc.wait(timeout=60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
    if stop:
        report.signal = stop[0]
        print(f"[study] stopped; {len(pending)} run(s) not started. Run the same command again to continue.", file=out)
    return report


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
