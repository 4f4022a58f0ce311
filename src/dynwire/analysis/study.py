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
        compare: [dynamic]          # ... and against these option-free wirings (any group's runs)
        curves: true                # plot training-loss curves (mean over seeds)
      - name: randwire
        models: [cifar_randwire_small]
        wirings: [random-ws, dynamic]
        graph_per_seed: true        # random-* runs of seed s use graph_seed=s (a new graph per seed)

Aggregation: per cell mean, sample std, n and the 95% t interval of the mean; paired differences
(same seed) against ``sequential`` and ``static`` of the same model, and the group's ``compare``
wirings (option-free runs, from any group), with 95% t intervals; written as ``results.csv`` (one row per run), ``summary.json``,
``summary.md`` and PNG plots.

This module holds the CLI and re-exports the pieces: ``_study_spec`` (the study file, its runs and
their expected config), ``_study_runner`` (run status, locks, the trainer processes),
``_study_aggregate`` (results and ``summary.md``) and ``_study_plots``.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
from collections.abc import Sequence
from typing import TextIO

# The pieces, re-exported: this module stays the public face of the study (tests, the CLI and
# scripts import from it). Patch a name in the module that reads it, e.g.
# ``_study_spec.TRAIN_COMMAND`` or ``_study_runner.subprocess``.
from ._study_aggregate import (  # noqa: F401
    EXECUTED_MACS_FILE,
    RESULT_FIELDS,
    aggregate,
    run_executed_macs,
)
from ._study_runner import (  # noqa: F401
    LOCK_FILE,
    LOG_FILE,
    STATUS_FILE,
    RunnerReport,
    _estimator,
    _finished_durations,
    _fmt_s,
    _lock_busy,
    run_status,
    run_study,
)
from ._study_spec import (  # noqa: F401
    TRAIN_COMMAND,
    Cell,
    Group,
    RunSpec,
    Study,
    config_mismatch,
    expected_config,
    load_study,
    study_from_dict,
)

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
