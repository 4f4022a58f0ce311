"""The ``dynwire`` command line: ``profile``, ``models``, ``train``, ``eval``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import __version__
from ._registry import get_model_cfg, list_models
from .graph.wiring import WIRINGS


def _profile(args: argparse.Namespace) -> int:
    from .analysis.profile import overhead_table, profile_model

    names: list[str] = []
    for pat in args.names or ["*"]:
        found = list_models(pat)
        if not found:
            get_model_cfg(pat)  # raises ValueError with suggestions
        names += [n for n in found if n not in names]
    size = None
    if args.input_size:
        if len(args.input_size) == 1:
            size = None  # resolved per model below: keep its channels, set H = W
        elif len(args.input_size) != 3:
            raise ValueError(f"--input-size takes C H W or a single size, got {args.input_size}")
        else:
            size = tuple(args.input_size)
    rows, pairs = [], []
    for n in names:
        s = size
        if args.input_size and len(args.input_size) == 1:
            c = get_model_cfg(n).input_size[0]
            s = (c, args.input_size[0], args.input_size[0])
        base = profile_model(n, args.baseline, s)
        other = profile_model(n, args.wiring, s)
        pairs.append((base, other))
        rows += [base.to_dict(), other.to_dict()]
    print(overhead_table(pairs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def _models(args: argparse.Namespace) -> int:
    for n in list_models(args.pattern):
        cfg = get_model_cfg(n)
        print(f"{n:<18} {cfg.family:<12} input {'x'.join(map(str, cfg.input_size)):<10} {cfg.paper}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .engine.checkpoint import export_safetensors

    out = export_safetensors(args.checkpoint, args.out, use_ema=args.ema)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynwire", description="Dynamic Graph Networks (DG-Net) for PyTorch")
    p.add_argument("--version", action="version", version=f"dynwire {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("profile", help="parameters and MACs of backbones, baseline vs DG-Net (Table 1)")
    pr.add_argument("names", nargs="*", help="model names or patterns (default: all)")
    pr.add_argument("--input-size", nargs="+", type=int, metavar="N", help="C H W, or one size for H = W")
    pr.add_argument("--wiring", default="dynamic", choices=WIRINGS)
    pr.add_argument("--baseline", default="sequential", choices=WIRINGS)
    pr.add_argument("--json", help="also write the rows to this JSON file")
    pr.set_defaults(func=_profile)

    ls = sub.add_parser("models", help="list registered models")
    ls.add_argument("pattern", nargs="?", default="*")
    ls.set_defaults(func=_models)

    ex = sub.add_parser("export", help="write a checkpoint's weights as .safetensors")
    ex.add_argument("--checkpoint", required=True, help="last.pt / best.pt of a run")
    ex.add_argument("--out", required=True, help="output .safetensors path")
    ex.add_argument("--ema", action="store_true", help="export the EMA weights")
    ex.set_defaults(func=_export)

    try:
        from .engine import commands as engine_commands
    except ImportError:
        engine_commands = None
    if engine_commands is not None and hasattr(engine_commands, "register"):
        engine_commands.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"dynwire {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
