"""A resumable multi-seed study: a grid of ``dynwire train`` runs and its paired statistics.

``dynwire study --config study.yaml [--jobs N] [--dry-run] [--aggregate-only]`` (or
``python -m dynwire.analysis.study ...``) expands a grid (model x wiring x options x seeds)
into runs with stable names, runs them as ``dynwire train`` subprocesses, one per core, and
aggregates the finished ones. The study can be stopped (Ctrl-C, SIGTERM, even SIGKILL) and
started again any number of times:

* a run with ``final.json`` is never rerun; one with ``last.pt`` is continued (``--resume``:
  exact resume); a run whose resolved config no longer matches the study file is reported as
  ``stale`` and left alone;
* each running run holds a lock on ``<run>/.study.lock`` (inherited by the trainer process), so two
  runners never train the same run; the trainer receives SIGTERM when its runner dies, and
  saves ``last.pt`` before exiting;
* runs are ordered by seed first, so a study stopped early has complete seeds for every cell.

The study file::

    name: my-study
    recipe: {config: fmnist_resnet20, set: [data.subset=20000]}   # shared by every run
    output: runs/study              # run directories (relative to the working directory)
    results: experiments/study      # results.csv, summary.md, summary.json, plots
    estimates_s: {cifar_resnet20: 300}   # per-run seconds on one core, for --dry-run and the ETA
    groups:
      - name: core
        models: [cifar_resnet20]
        wirings: [sequential, static, dynamic]
        seeds: 10                   # 0..9, or a list
      - name: router_bias
        models: [cifar_resnet20]
        wirings: [dynamic]
        options:                    # label -> extra overrides; runs with equal overrides are shared
          "bias +3": []
          "bias 0": [model.wiring_kwargs.router_bias=0]
        seeds: 3
        reference: "bias +3"        # also report paired differences against this option
        curves: true                # plot training-loss curves (mean over seeds)

Aggregation: per cell mean, sample std, n and the 95% t interval of the mean; paired differences
(same seed) against ``sequential`` and ``static`` of the same model (option-free runs, from any
group) with 95% t intervals; written as ``results.csv`` (one row per run), ``summary.json``,
``summary.md`` and PNG plots.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import datetime as _dt
import fnmatch
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from ..engine.config import config_from_dict, config_to_dict, load_config
from ..graph.wiring import WIRINGS
from . import _stats

__all__ = [
    "RunSpec",
    "Cell",
    "Group",
    "Study",
    "load_study",
    "run_status",
    "expected_config",
    "run_study",
    "aggregate",
    "main_study",
]

#: The command that trains one run (``python -m dynwire.cli train``).
TRAIN_COMMAND: tuple[str, ...] = ("-m", "dynwire.cli", "train")
#: Config entries that may differ between a run's stored config and the study without making it stale.
_VOLATILE = {
    ("output", "dir"),
    ("output", "name"),
    ("train", "resume"),
    ("train", "num_threads"),
    ("train", "device"),
    ("data", "root"),
    ("data", "num_workers"),
}
_SAFE = re.compile(r"[^A-Za-z0-9._+=-]+")
STATUS_FILE = "study_run.json"
LOCK_FILE = ".study.lock"
LOG_FILE = "study.log"


# --------------------------------------------------------------------------- study description
@dataclass(frozen=True)
class RunSpec:
    """One training run: its stable name is ``model__wiring[__options]__s<seed>``."""

    model: str
    wiring: str
    overrides: tuple[str, ...]
    seed: int

    @property
    def options_slug(self) -> str:
        parts = []
        for o in sorted(self.overrides):
            key, _, value = o.partition("=")
            parts.append(_SAFE.sub("_", f"{key.split('.')[-1]}={value.strip()}"))
        return "_".join(parts)

    @property
    def name(self) -> str:
        slug = self.options_slug
        return f"{self.model}__{self.wiring}" + (f"__{slug}" if slug else "") + f"__s{self.seed}"

    @property
    def options_text(self) -> str:
        return " ".join(self.overrides)


@dataclass
class Cell:
    """A (model, wiring, option) combination of a group, with one run per seed."""

    group: str
    model: str
    wiring: str
    option: str  # label ("" when the group has no options)
    overrides: tuple[str, ...]
    runs: list[RunSpec]

    @property
    def label(self) -> str:
        return self.wiring + (f" [{self.option}]" if self.option else "")


@dataclass
class Group:
    name: str
    title: str
    cells: list[Cell]
    reference: str | None = None
    curves: bool = False
    paper: dict[str, str] = field(default_factory=dict)
    contrast: str | None = None  # name of another group: compare gains (vs sequential) seed by seed
    note: str = ""


@dataclass
class Study:
    path: Path | None
    name: str
    recipe: str
    recipe_set: list[str]
    output: Path
    results: Path
    data_dir: str | None
    estimates_s: dict[str, float]
    groups: list[Group]
    max_attempts: int = 3

    @property
    def runs(self) -> list[RunSpec]:
        """Unique runs, ordered by seed, then by their first appearance in the groups."""
        seen: dict[str, tuple[int, RunSpec]] = {}
        for g in self.groups:
            for c in g.cells:
                for r in c.runs:
                    if r.name not in seen:
                        seen[r.name] = (len(seen), r)
        return [r for _, r in sorted(seen.values(), key=lambda t: (t[1].seed, t[0]))]

    def run_dir(self, run: RunSpec) -> Path:
        return self.output / run.name

    def command(self, run: RunSpec, *, python: str | None = None) -> list[str]:
        cmd = [python or sys.executable, *TRAIN_COMMAND, "--config", self.recipe, "--resume"]
        if self.data_dir:
            cmd += ["--data-dir", str(self.data_dir)]
        cmd += [
            "--set",
            *self.recipe_set,
            f"model.name={run.model}",
            f"model.wiring={run.wiring}",
            *run.overrides,
            f"train.seed={run.seed}",
            "train.num_threads=1",
            f"output.dir={self.output}",
            f"output.name={run.name}",
        ]
        return cmd

    def estimate(self, run: RunSpec) -> float | None:
        v = self.estimates_s.get(run.model)
        return float(v) if v is not None else None


def _as_list(v: Any, what: str) -> list:
    if v is None:
        return []
    if isinstance(v, (str, int)):
        return [v]
    if isinstance(v, list):
        return v
    raise ValueError(f"{what}: expected a value or a list, got {type(v).__name__}")


def _seeds(v: Any, where: str) -> list[int]:
    if isinstance(v, bool):
        raise ValueError(f"{where}: seeds must be a count or a list of ints")
    if isinstance(v, int):
        if v < 1:
            raise ValueError(f"{where}: seeds={v} must be >= 1")
        return list(range(v))
    if isinstance(v, list) and v and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in v):
        if len(set(v)) != len(v):
            raise ValueError(f"{where}: repeated seeds {v}")
        return list(v)
    raise ValueError(f"{where}: seeds must be a count (0..n-1) or a non-empty list of ints >= 0, got {v!r}")


def _check_override(o: Any, where: str) -> str:
    if not isinstance(o, str) or "=" not in o or "." not in o.partition("=")[0]:
        raise ValueError(f"{where}: override {o!r} must look like section.key=value")
    key = o.partition("=")[0].strip()
    if key in ("model.name", "model.wiring", "train.seed", "output.dir", "output.name"):
        raise ValueError(f"{where}: {key} is set by the study runner; use the grid's models/wirings/seeds")
    return o.strip()


def study_from_dict(
    raw: dict[str, Any], *, path: Path | None = None, output: str | None = None, results: str | None = None
) -> Study:
    """Validate a study description (as read from YAML) and expand its grid."""
    where = str(path) if path else "study"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping")
    known = {"name", "recipe", "output", "results", "data_dir", "estimates_s", "groups", "max_attempts", "notes"}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(known)}")
    recipe = raw.get("recipe") or {}
    if isinstance(recipe, str):
        recipe = {"config": recipe}
    if not isinstance(recipe, dict) or "config" not in recipe:
        raise ValueError(f"{where}: recipe needs a config (a shipped config name or a YAML path)")
    config = str(recipe["config"])
    if path is not None and not os.path.isabs(config) and (path.parent / config).is_file():
        config = str((path.parent / config).resolve())
    recipe_set = [_check_override(o, f"{where}: recipe.set") for o in _as_list(recipe.get("set"), "recipe.set")]
    groups: list[Group] = []
    names: dict[str, RunSpec] = {}
    for gi, g in enumerate(_as_list(raw.get("groups"), "groups")):
        if not isinstance(g, dict):
            raise ValueError(f"{where}: groups[{gi}] must be a mapping")
        gname = str(g.get("name") or f"group{gi}")
        gw = f"{where}: group {gname!r}"
        allowed = {
            "name",
            "title",
            "models",
            "wirings",
            "options",
            "seeds",
            "reference",
            "curves",
            "paper",
            "contrast",
            "note",
        }
        if set(g) - allowed:
            raise ValueError(f"{gw}: unknown key(s) {sorted(set(g) - allowed)}; allowed: {sorted(allowed)}")
        models = [str(m) for m in _as_list(g.get("models"), f"{gw}.models")]
        wirings = [str(w) for w in _as_list(g.get("wirings"), f"{gw}.wirings")]
        if not models or not wirings:
            raise ValueError(f"{gw}: needs models and wirings")
        for w in wirings:
            if w not in WIRINGS:
                raise ValueError(f"{gw}: unknown wiring {w!r}; choose from {', '.join(WIRINGS)}")
        options_raw = g.get("options") or {"": []}
        if not isinstance(options_raw, dict):
            raise ValueError(f"{gw}: options must map a label to a list of overrides")
        options = {
            str(k): tuple(_check_override(o, f"{gw}.options[{k}]") for o in _as_list(v, f"{gw}.options"))
            for k, v in options_raw.items()
        }
        seeds = _seeds(g.get("seeds", 3), gw)
        cells = []
        for m in models:
            for w in wirings:
                for label, ovr in options.items():
                    runs = [RunSpec(m, w, ovr, s) for s in seeds]
                    for r in runs:
                        prev = names.setdefault(r.name, r)
                        if prev != r:
                            raise ValueError(f"{gw}: runs {prev} and {r} would share the folder {r.name!r}")
                    cells.append(Cell(gname, m, w, label, ovr, runs))
        ref = g.get("reference")
        if ref is not None and str(ref) not in options:
            raise ValueError(f"{gw}: reference {ref!r} is not one of the options {list(options)}")
        paper = g.get("paper") or {}
        if not isinstance(paper, dict):
            raise ValueError(f"{gw}: paper must map a cell label to a text")
        groups.append(
            Group(
                name=gname,
                title=str(g.get("title") or gname),
                cells=cells,
                reference=None if ref is None else str(ref),
                curves=bool(g.get("curves", False)),
                paper={str(k): str(v) for k, v in paper.items()},
                contrast=None if g.get("contrast") is None else str(g["contrast"]),
                note=str(g.get("note") or ""),
            )
        )
    if not groups:
        raise ValueError(f"{where}: no groups")
    if len({g.name for g in groups}) != len(groups):
        raise ValueError(f"{where}: group names must be unique")
    for g in groups:
        if g.contrast is not None and g.contrast not in {x.name for x in groups}:
            raise ValueError(f"{where}: group {g.name!r}: contrast {g.contrast!r} is not a group")
    est = raw.get("estimates_s") or {}
    if not isinstance(est, dict):
        raise ValueError(f"{where}: estimates_s must map a model name to seconds")
    out = Path(output or raw.get("output") or "runs/study").expanduser().resolve()
    res = Path(results or raw.get("results") or out / "results").expanduser().resolve()
    max_attempts = int(raw.get("max_attempts", 3))
    return Study(
        path=path,
        name=str(raw.get("name") or (path.stem if path else "study")),
        recipe=config,
        recipe_set=recipe_set,
        output=out,
        results=res,
        data_dir=None if raw.get("data_dir") is None else str(raw["data_dir"]),
        estimates_s={str(k): float(v) for k, v in est.items()},
        groups=groups,
        max_attempts=max_attempts,
    )


def load_study(path: str | os.PathLike[str], *, output: str | None = None, results: str | None = None) -> Study:
    """Read a study YAML file (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"study file {str(p)!r} not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"study file {str(p)!r}: invalid YAML ({exc})") from None
    return study_from_dict(raw, path=p, output=output, results=results)


# --------------------------------------------------------------------------- run state
def expected_config(study: Study, run: RunSpec) -> dict[str, Any]:
    """The resolved config a run of this study trains with (as ``config.yaml`` stores it)."""
    cmd = study.command(run)
    overrides = cmd[cmd.index("--set") + 1 :]
    return config_to_dict(load_config(study.recipe, overrides))


def _strip_volatile(cfg: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for section, values in cfg.items():
        if isinstance(values, dict):
            out[section] = {k: v for k, v in values.items() if (section, k) not in _VOLATILE}
        else:
            out[section] = values
    return out


def config_mismatch(study: Study, run: RunSpec) -> list[str]:
    """Entries in which the run's stored ``config.yaml`` differs from the study (empty: none or no file)."""
    path = study.run_dir(run) / "config.yaml"
    if not path.is_file():
        return []
    try:
        stored = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return ["config.yaml unreadable"]
    want = _strip_volatile(expected_config(study, run))
    try:  # fields added to the config since the run was made take their defaults
        stored = config_to_dict(config_from_dict(stored))
    except (TypeError, ValueError):
        pass  # compared as stored: every difference is reported
    have = _strip_volatile(stored)
    diffs = []
    for section in sorted(set(want) | set(have)):
        a, b = want.get(section) or {}, have.get(section) or {}
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                diffs.append(f"{section}.{k}: study {a.get(k)!r}, run {b.get(k)!r}")
    return diffs


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
    """``done``, ``stale``, ``busy``, ``failed`` (gave up after max_attempts), ``partial`` or ``new``."""
    d = study.run_dir(run)
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


def _finished_durations(study: Study, runs: Sequence[RunSpec]) -> dict[str, list[float]]:
    """Wall seconds of finished runs, by model (from the runner's per-run status files)."""
    out: dict[str, list[float]] = {}
    for r in runs:
        d = study.run_dir(r)
        if not (d / "final.json").is_file():
            continue
        st = _read_json(d / STATUS_FILE)
        if st and st.get("wall_s_total"):
            out.setdefault(r.model, []).append(float(st["wall_s_total"]))
    return out


def _estimator(study: Study, durations: dict[str, list[float]]) -> Callable[[RunSpec], float | None]:
    every = [x for v in durations.values() for x in v]

    def est(r: RunSpec) -> float | None:
        if durations.get(r.model):
            return _stats.mean(durations[r.model])
        e = study.estimate(r)
        if e is not None:
            # scale the file's estimate by how fast finished runs of other models actually were
            ratios = [
                _stats.mean(v) / study.estimates_s[m] for m, v in durations.items() if study.estimates_s.get(m) and v
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
        durations = _finished_durations(study, runs)
        est = _estimator(study, durations)
        now = time.monotonic()
        done_n = sum(1 for r in runs if (study.run_dir(r) / "final.json").is_file())
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


# --------------------------------------------------------------------------- aggregation
RESULT_FIELDS = [
    "run",
    "model",
    "wiring",
    "options",
    "seed",
    "status",
    "top1",
    "top5",
    "loss",
    "best_top1",
    "params",
    "macs",
    "executed_macs",
    "epochs",
    "train_time_s",
    "train_images_per_s",
    "wall_s",
]


EXECUTED_MACS_FILE = "executed_macs.json"


def run_executed_macs(study: Study, run: RunSpec, *, compute: bool = True) -> dict[str, Any] | None:
    """Mean MACs executed per test sample by a finished run's ``best.pt`` (``rec.macs``: removed nodes
    skipped, Sec. 3.3), over the whole evaluation split.

    ``final.json`` reports only the static (all-blocks) MAC count, so the study measures this once
    per run while aggregating and caches it in ``<run>/executed_macs.json`` (keyed by the
    checkpoint's size and mtime); ``compute=False`` only reads the cache. ``None`` for
    ``sequential`` runs: a chain executes every block, so its cost is the ``macs`` column.
    """
    d = study.run_dir(run)
    ckpt = d / "best.pt"
    if not ckpt.is_file() or run.wiring == "sequential":  # a chain runs every block: nothing to measure
        return None
    st = ckpt.stat()
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    cached = _read_json(d / EXECUTED_MACS_FILE)
    if cached and cached.get("checkpoint_key") == key:
        return cached
    if not compute:
        return None
    from .connectivity import executed_macs

    out = {**executed_macs(ckpt, data_dir=study.data_dir, device="cpu", num_threads=1), "checkpoint_key": key}
    _write_json(d / EXECUTED_MACS_FILE, out)
    return out


def _run_row(study: Study, run: RunSpec, *, executed_macs: bool = True) -> dict[str, Any]:
    d = study.run_dir(run)
    row: dict[str, Any] = {
        "run": run.name,
        "model": run.model,
        "wiring": run.wiring,
        "options": run.options_text,
        "seed": run.seed,
        "status": run_status(study, run),
    }
    final = _read_json(d / "final.json") if row["status"] == "done" else None
    if final:
        val = final.get("val") or {}
        row.update(
            top1=val.get("top1"),
            top5=val.get("top5"),
            loss=val.get("loss"),
            best_top1=final.get("best_val_top1"),
            params=final.get("params"),
            macs=final.get("macs"),
            epochs=final.get("epochs"),
            train_time_s=final.get("train_time_s"),
            train_images_per_s=final.get("train_images_per_s"),
        )
        st = _read_json(d / STATUS_FILE) or {}
        row["wall_s"] = st.get("wall_s_total")
        em = run_executed_macs(study, run, compute=executed_macs)
        if em is not None:
            row["executed_macs"] = em["executed_macs"]
    return row


def _top1_by_seed(rows: dict[str, dict[str, Any]], runs: Sequence[RunSpec]) -> dict[int, float]:
    return {
        r.seed: float(rows[r.name]["top1"])
        for r in runs
        if rows[r.name].get("status") == "done" and rows[r.name].get("top1") is not None
    }


def _reference_runs(study: Study, model: str, wiring: str, seeds: Sequence[int]) -> list[RunSpec]:
    """Option-free runs of ``model``/``wiring`` from any group."""
    found = {r.seed: r for r in study.runs if r.model == model and r.wiring == wiring and not r.overrides}
    return [found[s] for s in seeds if s in found]


def aggregate(
    study: Study, *, plots: bool = True, executed_macs: bool = True, stream: TextIO | None = None
) -> dict[str, Any]:
    """Read every run of the study and write ``results.csv``, ``summary.json``, ``summary.md`` and plots.

    ``executed_macs``: measure the executed MACs of finished runs not measured yet (one pass over
    the test set each, cached; see :func:`run_executed_macs`); ``False`` uses only cached values.
    """
    out_dir = study.results
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = study.runs
    rows = {r.name: _run_row(study, r, executed_macs=executed_macs) for r in runs}
    with open(out_dir / "results.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in runs:
            w.writerow({k: ("" if rows[r.name].get(k) is None else rows[r.name].get(k)) for k in RESULT_FIELDS})
    all_seeds = sorted({r.seed for r in runs})
    groups_out = []
    cell_index: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for g in study.groups:
        cells_out = []
        for c in g.cells:
            vals = _top1_by_seed(rows, c.runs)
            ci = _stats.mean_ci(list(vals.values()))
            finished = [rows[r.name] for r in c.runs if rows[r.name].get("status") == "done"]
            cell = {
                "label": c.label,
                "model": c.model,
                "wiring": c.wiring,
                "option": c.option,
                "overrides": list(c.overrides),
                "planned": len(c.runs),
                "top1_by_seed": {str(k): v for k, v in sorted(vals.items())},
                "top1": ci.to_dict(),
                "params": _first(x.get("params") for x in finished),
                "macs": _first(x.get("macs") for x in finished),
                "executed_macs": _stats.mean([x["executed_macs"] for x in finished if x.get("executed_macs")])
                if any(x.get("executed_macs") for x in finished)
                else None,
                "train_time_s": _stats.mean([x["train_time_s"] for x in finished if x.get("train_time_s")])
                if finished
                else None,
                "paper": g.paper.get(c.label) or g.paper.get(c.option) or g.paper.get(c.wiring),
                "diffs": {},
            }
            for ref in ("sequential", "static"):
                if c.wiring == ref and not c.overrides:
                    continue
                ref_runs = _reference_runs(study, c.model, ref, all_seeds)
                if ref_runs:
                    cell["diffs"][f"vs {ref}"] = _stats.paired_diff(vals, _top1_by_seed(rows, ref_runs)).to_dict()
            if g.reference is not None and c.option != g.reference:
                other = next(
                    (x for x in g.cells if x.model == c.model and x.wiring == c.wiring and x.option == g.reference),
                    None,
                )
                if other is not None:
                    cell["diffs"][f"vs {g.reference}"] = _stats.paired_diff(
                        vals, _top1_by_seed(rows, other.runs)
                    ).to_dict()
            cell_index[(g.name, c.model, c.wiring, c.option)] = cell
            cells_out.append(cell)
        groups_out.append(
            {
                "name": g.name,
                "title": g.title,
                "note": g.note,
                "reference": g.reference,
                "curves": g.curves,
                "cells": cells_out,
            }
        )
    # gain contrasts: (cell - sequential) in this group minus the same in another group, seed by seed
    for g, gout in zip(study.groups, groups_out):
        if g.contrast is None:
            continue
        other = next(x for x in study.groups if x.name == g.contrast)
        contrasts = []
        for c in g.cells:
            for oc in other.cells:
                if oc.wiring != c.wiring or oc.option != c.option or c.wiring == "sequential":
                    continue
                mine = cell_index[(g.name, c.model, c.wiring, c.option)]["diffs"].get("vs sequential")
                theirs = cell_index[(other.name, oc.model, oc.wiring, oc.option)]["diffs"].get("vs sequential")
                if not mine or not theirs:
                    continue
                a = dict(zip(mine["seeds"], mine["diffs"]))
                b = dict(zip(theirs["seeds"], theirs["diffs"]))
                d = _stats.paired_diff(a, b).to_dict()
                contrasts.append({"label": c.label, "model": c.model, "other_model": oc.model, **d})
        gout["contrasts"] = {"with": other.name, "rows": contrasts}
    done = sum(1 for r in rows.values() if r["status"] == "done")
    summary = {
        "study": study.name,
        "recipe": {"config": study.recipe, "set": study.recipe_set},
        "runs_total": len(runs),
        "runs_done": done,
        "status_counts": _counts(r["status"] for r in rows.values()),
        "groups": groups_out,
        "figures": {},
    }
    from . import _study_plots

    if plots and done:
        summary["figures"] = _study_plots.study_figures(study, summary, rows, out_dir)
    for name in _study_plots.figure_files(study):  # a figure of an earlier aggregation that no longer applies
        if name not in summary["figures"].values():
            (out_dir / name).unlink(missing_ok=True)
    _write_json(out_dir / "summary.json", summary)
    (out_dir / "summary.md").write_text(_summary_md(summary), encoding="utf-8")
    if stream is not None:
        print(f"[study] aggregated {done}/{len(runs)} finished runs into {out_dir}", file=stream, flush=True)
    return summary


def _first(values) -> Any:
    for v in values:
        if v is not None:
            return v
    return None


def _counts(xs) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return out


def _pm(ci: dict[str, Any], digits: int = 2) -> str:
    if ci.get("n", 0) == 0 or ci.get("mean") is None:
        return "n/a"
    s = f"{ci['mean']:.{digits}f}"
    if ci.get("std") is not None:
        s += f" ± {ci['std']:.{digits}f}"
    return s


def _interval(ci: dict[str, Any], digits: int = 2, signed: bool = False) -> str:
    if ci.get("n", 0) == 0 or ci.get("mean") is None:
        return "n/a"
    sign = "+" if signed else ""
    m = f"{ci['mean']:{sign}.{digits}f}"
    if ci.get("ci_half_width") is None:
        return f"{m} (n={ci['n']})"
    star = " *" if signed and (ci["ci_low"] > 0 or ci["ci_high"] < 0) else ""
    return f"{m} [{ci['ci_low']:{sign}.{digits}f}, {ci['ci_high']:{sign}.{digits}f}]{star} (n={ci['n']})"


def _summary_md(s: dict[str, Any]) -> str:
    rec = s["recipe"]
    lines = [
        f"# Study `{s['study']}`",
        "",
        f"Recipe: `{rec['config']}` with `{' '.join(rec['set']) or '(no overrides)'}`. "
        f"Finished runs: {s['runs_done']}/{s['runs_total']} "
        f"({', '.join(f'{k} {v}' for k, v in sorted(s['status_counts'].items()))}).",
        "",
        "Top-1 is the test accuracy (%) after the last epoch. `mean ± std` uses the sample standard deviation; "
        "intervals are 95% t intervals of the mean; differences are paired by seed (same data order and initial "
        "block weights) against the option-free `sequential` / `static` runs of the same model; `*` marks an "
        "interval that excludes 0. MMACs: every block executed (`final.json`); executed MMACs: mean multiply-adds "
        "per test image with removed nodes skipped (`rec.macs` of each run's `best.pt`, averaged over the seeds).",
        "",
    ]
    for g in s["groups"]:
        lines += [f"## {g['title']}", ""]
        if g.get("note"):
            lines += [g["note"], ""]
        diff_keys: list[str] = ["vs sequential", "vs static"]
        for c in g["cells"]:
            for k in c["diffs"]:
                if k not in diff_keys:
                    diff_keys.append(k)
        diff_keys = [k for k in diff_keys if any(k in c["diffs"] for c in g["cells"])]
        head = ["model", "cell", "n", "top-1 mean ± std", "95% CI of mean"]
        head += [f"Δ {k} [95% CI]" for k in diff_keys]
        head += ["params", "MMACs", "executed MMACs", "train s", "paper"]
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
        for c in g["cells"]:
            t = c["top1"]
            ci_txt = "n/a" if t.get("ci_low") is None else f"[{t['ci_low']:.2f}, {t['ci_high']:.2f}]"
            row = [c["model"], c["label"], f"{t['n']}/{c['planned']}", _pm(t), ci_txt]
            row += [_interval(c["diffs"][k], signed=True) if k in c["diffs"] else "—" for k in diff_keys]
            row += [
                f"{c['params']:,}" if c.get("params") else "n/a",
                f"{c['macs'] / 1e6:.2f}" if c.get("macs") else "n/a",
                f"{c['executed_macs'] / 1e6:.2f}" if c.get("executed_macs") else "n/a",
                f"{c['train_time_s']:.0f}" if c.get("train_time_s") else "n/a",
                c.get("paper") or "",
            ]
            lines.append("| " + " | ".join(row) + " |")
        con = g.get("contrasts")
        if con and con["rows"]:
            lines += [
                "",
                f"Gain contrast with `{con['with']}`: (cell − sequential) here minus (cell − sequential) there, "
                "paired by seed:",
                "",
                "| cell | models | Δ gain [95% CI] |",
                "| --- | --- | --- |",
            ]
            for r in con["rows"]:
                lines.append(f"| {r['label']} | {r['model']} − {r['other_model']} | {_interval(r, signed=True)} |")
        lines.append("")
    figs = s.get("figures") or {}
    if figs:
        lines += ["## Figures", ""]
        for key, path in figs.items():
            lines += [f"![{key}]({path})", ""]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- CLI
def _dry_run(study: Study, jobs: int, only: Sequence[str], out: TextIO) -> None:
    runs = [r for r in study.runs if not only or any(fnmatch.fnmatch(r.name, p) for p in only)]
    est = _estimator(study, _finished_durations(study, runs))
    todo_s, unknown = 0.0, 0
    counts: dict[str, int] = {}
    print(f"{'run':<58} {'status':<8} {'est.':>8}", file=out)
    for r in runs:
        s = run_status(study, r)
        counts[s] = counts.get(s, 0) + 1
        e = est(r)
        if s in ("new", "partial"):
            if e is None:
                unknown += 1
            else:
                todo_s += e
        print(f"{r.name:<58} {s:<8} {_fmt_s(e):>8}", file=out)
    print(
        f"\n{len(runs)} runs ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}); "
        f"to run: {_fmt_s(todo_s)} of single-core time"
        + (f" (+{unknown} runs without an estimate)" if unknown else "")
        + f", about {_fmt_s(todo_s / max(jobs, 1))} wall time with {jobs} job(s)",
        file=out,
    )
    first = next((r for r in runs if run_status(study, r) in ("new", "partial")), None)
    if first is not None:
        print("first command:\n  " + " ".join(study.command(first)), file=out)


STUDY_DESCRIPTION = "Run (resumably) and aggregate a multi-seed grid of training runs."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``dynwire study`` (shared by :func:`build_parser` and :mod:`dynwire.cli`)."""
    p.add_argument("--config", required=True, help="study YAML file (see dynwire.analysis.study)")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time, one core each (default: os.cpu_count())")
    p.add_argument("--dry-run", action="store_true", help="list the runs, their status and the time estimate")
    p.add_argument("--aggregate-only", action="store_true", help="only aggregate the finished runs")
    p.add_argument("--no-aggregate", action="store_true", help="do not aggregate after running")
    p.add_argument("--only", nargs="+", default=[], metavar="GLOB", help="run only runs whose names match")
    p.add_argument("--out", help="folder of the run directories (overrides the file's output)")
    p.add_argument("--results", help="folder for results.csv, summary.md and plots (overrides the file's results)")
    p.add_argument("--no-plots", action="store_true", help="aggregate without plots")
    p.add_argument(
        "--no-executed-macs",
        action="store_true",
        help="do not measure the executed MACs of finished runs while aggregating",
    )
    p.add_argument("--progress-every", type=float, default=60.0, help="seconds between progress lines (default 60)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynwire study", description=STUDY_DESCRIPTION)
    add_arguments(p)
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Run ``dynwire study`` for parsed arguments; returns the exit code (1 if a run failed, 128+N if
    stopped by signal N). Bad input raises ``ValueError``/``FileNotFoundError``."""
    if args.jobs is not None and args.jobs < 1:
        raise ValueError("--jobs must be >= 1")
    study = load_study(args.config, output=args.out, results=args.results)
    jobs = args.jobs or os.cpu_count() or 1
    if args.dry_run:
        _dry_run(study, jobs, args.only, sys.stdout)
        return 0
    code = 0
    if not args.aggregate_only:
        report = run_study(study, jobs=jobs, only=args.only, progress_every=args.progress_every)
        code = report.exit_code
        if report.signal is not None:
            return code
    if not args.no_aggregate or args.aggregate_only:
        aggregate(study, plots=not args.no_plots, executed_macs=not args.no_executed_macs, stream=sys.stdout)
    return code


def main_study(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m dynwire.analysis.study`` (same as ``dynwire study``)."""
    args = build_parser().parse_args(argv)
    try:
        return run_cli(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"dynwire study: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_study())
