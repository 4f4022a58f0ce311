"""``dynwire study`` / ``python -m dynwire.study``: dry run, run and aggregate a study file."""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from .aggregate import aggregate
from .runner import _estimator, _finished_durations, _fmt_s, run_status, run_study
from .spec import Study, load_study

__all__ = ["STUDY_DESCRIPTION", "add_arguments", "build_parser", "run_cli", "main_study"]


# --------------------------------------------------------------------------- CLI
def _dry_run(study: Study, jobs: int, only: Sequence[str], out: TextIO) -> None:
    runs = [r for r in study.runs if not only or any(fnmatch.fnmatch(r.name, p) for p in only)]
    # every finished run of the study informs the estimate, not only the selected ones
    est = _estimator(study, _finished_durations(study, study.runs))
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
    p.add_argument("--config", required=True, help="study YAML file (see dynwire.study)")
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
    """Entry point of ``python -m dynwire.study`` (same as ``dynwire study``)."""
    args = build_parser().parse_args(argv)
    try:
        return run_cli(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"dynwire study: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_study())
