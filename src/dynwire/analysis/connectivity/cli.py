"""``dynwire analyze`` (and ``python -m dynwire.analysis.connectivity``): the command line of the analysis."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .pipeline import analyze_checkpoint
from .report import _fmt, _pct

__all__ = ["ANALYZE_DESCRIPTION", "add_arguments", "build_parser", "run_analyze", "main_analyze"]

ANALYZE_DESCRIPTION = "Statistics and figures of a trained model's learned connectivity (paper App. 6.5, Figs. 5-7)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``dynwire analyze`` (shared by :func:`build_parser` and :mod:`dynwire.cli`)."""
    p.add_argument("checkpoint", help="a training checkpoint (last.pt / best.pt)")
    p.add_argument("--out", required=True, help="output folder for PNGs, analysis.json and analysis.md")
    p.add_argument("--data-dir", help="dataset folder (overrides the checkpoint's data.root)")
    p.add_argument("--split", default="val", help="dataset split (default: val, the test split for small datasets)")
    p.add_argument("--max-images", type=int, help="analyze a fixed random subset of this many images")
    p.add_argument("--batch-size", type=int, help="evaluation batch size (default: the run's)")
    p.add_argument("--per-class", type=int, default=2, help="samples per class drawn in Fig. 7 (default 2)")
    p.add_argument("--top-k", type=int, default=4, help="most/least confident samples drawn (default 4)")
    p.add_argument(
        "--reference",
        metavar="CKPT",
        help="a second checkpoint on the same data (e.g. the dense sequential model): its per-image loss is "
        "the difficulty that executed MACs are rank-correlated with",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--num-threads", type=int, help="torch CPU threads (default: the run's train.num_threads)")
    p.add_argument("--ema", action="store_true", help="analyze the EMA weights")
    p.add_argument("--no-plots", action="store_true", help="write only analysis.json and analysis.md")
    p.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        nargs="+",
        action="extend",
        default=[],
        help="override the checkpoint's config, e.g. --set model.wiring_kwargs.eval_gate=soft",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynwire analyze", description=ANALYZE_DESCRIPTION)
    add_arguments(p)
    return p


def run_analyze(args: argparse.Namespace) -> int:
    """Run ``dynwire analyze`` for parsed arguments; bad input raises ``ValueError``/``FileNotFoundError``."""
    for flag in ("max_images", "batch_size", "num_threads"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    for flag in ("per_class", "top_k"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0")
    try:
        s = analyze_checkpoint(
            args.checkpoint,
            args.out,
            data_dir=args.data_dir,
            split=args.split,
            max_images=args.max_images,
            batch_size=args.batch_size,
            per_class=args.per_class,
            top_k=args.top_k,
            device=args.device,
            overrides=args.overrides,
            use_ema=args.ema,
            num_threads=args.num_threads,
            plots=not args.no_plots,
            reference=args.reference,
        )
    except KeyError as exc:  # a stage without a record: report it like other bad input
        raise ValueError(str(exc)) from None
    closed = ", ".join(f"{n} {_fmt(_pct(st['closed_edge_share']), '.2f')}%" for n, st in s["stages"].items())
    removed = ", ".join(f"{n} {_fmt(_pct(st['removed_node_share']), '.2f')}%" for n, st in s["stages"].items())
    print(f"analyzed {s['images']} images: top-1 {s['top1']:.2f}%; closed edges: {closed}; removed nodes: {removed}")
    em = s.get("executed_macs")
    if em:
        print(
            f"executed MACs per sample: mean {em['mean'] / 1e6:.3f} M (min {em['min'] / 1e6:.3f}, max {em['max'] / 1e6:.3f},"
            f" std/mean {100 * (em['cv'] or 0):.2f}%): removal is {em['removal']}"
        )
    print(f"wrote {Path(args.out) / 'analysis.md'}")
    return 0


def main_analyze(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m dynwire.analysis.connectivity`` (same as ``dynwire analyze``)."""
    args = build_parser().parse_args(argv)
    try:
        return run_analyze(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"dynwire analyze: error: {exc}", file=sys.stderr)
        return 2
