"""``dynwire train`` and ``dynwire eval`` subcommands.

``dynwire.cli`` calls :func:`register` with its argparse subparsers and
dispatches with ``args.func(args)``. Each handler returns 0 on success and
raises ``SystemExit`` with a non-zero code (and a one-line message on
stderr) for bad input, divergence or interruption.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["register", "cmd_train", "cmd_eval", "build_parser", "main"]


def _add_set(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument(
        "--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[], help=help
    )


def register(subparsers: Any) -> None:
    """Add the ``train`` and ``eval`` subcommands to an argparse subparsers object."""
    p = subparsers.add_parser(
        "train",
        help="train a model from a YAML config",
        description="Train a model. Works in one process or under torchrun "
        "(torchrun --nproc_per_node=N -m dynwire.cli train ...); data.batch_size is the global batch.",
    )
    p.add_argument(
        "--config",
        required=True,
        help="YAML config path or the name of a shipped config (e.g. fmnist_resnet20)",
    )
    _add_set(p, "override config entries, e.g. --set optim.lr=0.05 schedule.epochs=3 (values parsed as YAML)")
    p.add_argument("--resume", action="store_true", help="continue from last.pt in the run directory if present")
    p.add_argument("--data-dir", help="dataset folder (sets data.root)")
    p.add_argument("--output-dir", help="parent folder of the run directory (sets output.dir)")
    p.set_defaults(func=cmd_train)

    e = subparsers.add_parser("eval", help="evaluate a checkpoint", description="Evaluate a training checkpoint.")
    e.add_argument("--checkpoint", required=True, help="path to last.pt / best.pt")
    e.add_argument("--data-dir", help="dataset folder (overrides the checkpoint's data.root)")
    e.add_argument("--split", default="val", help="dataset split to evaluate (default: val)")
    e.add_argument("--batch-size", type=int, help="evaluation batch size")
    e.add_argument("--num-workers", type=int, help="data loader workers")
    e.add_argument("--subset", type=int, help="evaluate on this many images")
    e.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    _add_set(e, "override the checkpoint's stored config, e.g. --set model.wiring_kwargs.eval_gate=soft")
    e.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    e.set_defaults(func=cmd_eval)


def _fail(msg: str, code: int = 2) -> SystemExit:
    print(f"dynwire: error: {msg}", file=sys.stderr, flush=True)
    return SystemExit(code)


def cmd_train(args: argparse.Namespace) -> int:
    """Handler of ``dynwire train``."""
    from .checkpoint import CheckpointError
    from .config import load_config
    from .trainer import TrainingDiverged, TrainingInterrupted, train

    overrides = list(args.overrides or [])
    if args.data_dir:
        overrides.append(f"data.root={json.dumps(str(args.data_dir))}")
    if args.output_dir:
        overrides.append(f"output.dir={json.dumps(str(args.output_dir))}")
    if args.resume:
        overrides.append("train.resume=auto")
    try:
        cfg = load_config(args.config, overrides)
        final = train(cfg)
    except (ValueError, CheckpointError) as exc:
        raise _fail(str(exc)) from None
    except TrainingDiverged as exc:
        raise _fail(str(exc), 3) from None
    except TrainingInterrupted as exc:
        raise _fail(str(exc), exc.exit_code) from None
    summary = {k: final.get(k) for k in ("run_dir", "val", "best_val_top1", "params", "macs", "train_images_per_s")}
    print(json.dumps(summary, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Handler of ``dynwire eval``."""
    from .trainer import evaluate

    try:
        result = evaluate(
            args.checkpoint,
            data_dir=args.data_dir,
            split=args.split,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            subset=args.subset,
            use_ema=args.ema,
            device=args.device,
            overrides=args.overrides,
        )
    except ValueError as exc:
        raise _fail(str(exc)) from None
    print(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser with just ``train`` and ``eval`` (``python -m dynwire.engine.commands``)."""
    parser = argparse.ArgumentParser(prog="dynwire")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
