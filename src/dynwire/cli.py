"""The ``dynwire`` command line: ``train``, ``eval``, ``export``, ``profile``, ``graphs``, ``models``.

Every command reports bad input the same way: ``dynwire <command>: error: <message>`` on
stderr and exit status 2 (3 when training diverged, 128 + signal when it was interrupted).
Runs under ``torchrun`` too: ``torchrun --nproc_per_node=N -m dynwire.cli train ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import __version__
from ._registry import get_model_cfg, list_models
from .engine import TrainingDiverged, TrainingInterrupted, evaluate, export_safetensors, load_config, train
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


def _train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.root={json.dumps(str(args.data_dir))}")
    if args.output_dir:
        overrides.append(f"output.dir={json.dumps(str(args.output_dir))}")
    if args.resume:
        overrides.append("train.resume=auto")
    final = train(load_config(args.config, overrides))
    summary = {k: final.get(k) for k in ("run_dir", "val", "best_val_top1", "params", "macs", "train_images_per_s")}
    print(json.dumps(summary, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
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
    print(json.dumps(result, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    from .deploy import NoBuildInfoError, compare_onnx, export_input_size, export_onnx
    from .deploy import export_safetensors as export_described

    fmt = args.format or ("onnx" if str(args.out).lower().endswith(".onnx") else "safetensors")
    if fmt == "safetensors":
        if args.input_size is not None or args.opset is not None or args.no_check or args.no_optimize:
            raise ValueError("--input-size, --opset, --no-check and --no-optimize apply to --format onnx only")
        try:
            out = export_described(args.checkpoint, args.out, use_ema=args.ema)
        except NoBuildInfoError:  # bare weights: nothing to describe them with
            out = export_safetensors(args.checkpoint, args.out, use_ema=args.ema)
            print("note: the checkpoint does not say which model it holds; wrote the weights only", file=sys.stderr)
        print(f"wrote {out}")
        return 0
    import torch

    from .deploy import load_model

    model = load_model(args.checkpoint, "cpu", use_ema=args.ema)
    size = export_input_size(model, args.input_size)
    out = export_onnx(model, args.out, input_size=size, opset=args.opset, optimize=not args.no_optimize)
    print(f"wrote {out} (input {'x'.join(map(str, size))}, dynamic batch axis, stages on the dense executor)")
    if not args.no_check:
        x = torch.randn(3, *size, generator=torch.Generator().manual_seed(0))
        diff, scale = compare_onnx(model, out, x)  # against the pruned executor
        tol = 1e-4 * max(1.0, scale)  # float32 rounding grows with the logits' size
        print(f"onnxruntime vs PyTorch (pruned executor), batch 3: max abs diff {diff:.3g} (max |logit| {scale:.3g})")
        if not diff <= tol:
            raise ValueError(f"{out}: onnxruntime's outputs differ from PyTorch's by {diff:.3g} (> {tol:.3g})")
    return 0


def _graphs(args: argparse.Namespace) -> int:
    import warnings

    from .analysis.graphs import describe_graphs, graphs_table

    get_model_cfg(args.name)  # unknown names: ValueError with suggestions
    for wiring in args.wiring:
        print(f"{args.name}, {wiring} (graph_seed {args.graph_seed}..{args.graph_seed + args.seeds - 1}):")
        with warnings.catch_warnings():  # the table's last column says it
            warnings.simplefilter("ignore")
            rows = describe_graphs(args.name, wiring, seeds=args.seeds, graph_seed=args.graph_seed)
        print(graphs_table(rows) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynwire", description="Dynamic Graph Networks (DG-Net) for PyTorch")
    p.add_argument("--version", action="version", version=f"dynwire {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    tr = sub.add_parser(
        "train",
        help="train a model from a YAML config",
        description="Train a model. Works in one process or under torchrun "
        "(torchrun --nproc_per_node=N -m dynwire.cli train ...); data.batch_size is the global batch.",
    )
    tr.add_argument("--config", required=True, help="YAML config path or a shipped config name (fmnist_resnet20)")
    _add_set(tr, "override config entries, e.g. --set optim.lr=0.05 schedule.epochs=3 (values parsed as YAML)")
    tr.add_argument("--resume", action="store_true", help="continue from last.pt in the run directory if present")
    tr.add_argument("--data-dir", help="dataset folder (sets data.root)")
    tr.add_argument("--output-dir", help="parent folder of the run directory (sets output.dir)")
    tr.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint", description="Evaluate a training checkpoint.")
    ev.add_argument("--checkpoint", required=True, help="path to last.pt / best.pt")
    ev.add_argument("--data-dir", help="dataset folder (overrides the checkpoint's data.root)")
    ev.add_argument("--split", default="val", help="dataset split to evaluate (default: val)")
    ev.add_argument("--batch-size", type=int, help="evaluation batch size")
    ev.add_argument("--num-workers", type=int, help="data loader workers")
    ev.add_argument("--subset", type=int, help="evaluate on this many images")
    ev.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    _add_set(ev, "override the checkpoint's stored config, e.g. --set model.wiring_kwargs.eval_gate=soft")
    ev.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ev.set_defaults(func=_eval)

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

    gr = sub.add_parser("graphs", help="each stage's graph for a wiring: nodes, edges, depth, seed dependence")
    gr.add_argument("name", help="model name")
    gr.add_argument("--wiring", nargs="+", default=["random-er", "random-ba", "random-ws"], choices=WIRINGS)
    gr.add_argument("--seeds", type=int, default=8, help="graph seeds to build (counts distinct graphs)")
    gr.add_argument("--graph-seed", type=int, default=0, help="first graph seed")
    gr.set_defaults(func=_graphs)

    ex = sub.add_parser(
        "export",
        help="export a trained model as self-describing .safetensors or as ONNX",
        description="Export a run directory (best.pt, else last.pt), a checkpoint or a safetensors export. "
        "safetensors: the weights plus the build info (dynwire.load_model rebuilds the model from the file). "
        "onnx: a graph with a dynamic batch axis in which node removal (Sec. 3.3) is expressed as masks; "
        "checked against PyTorch with onnxruntime unless --no-check.",
    )
    ex.add_argument("--checkpoint", required=True, help="run directory, last.pt / best.pt, or a .safetensors export")
    ex.add_argument("--out", required=True, help="output file (.safetensors or .onnx)")
    ex.add_argument(
        "--format", choices=("safetensors", "onnx"), help="output format (default: from --out, else safetensors)"
    )
    ex.add_argument("--ema", action="store_true", help="export the EMA weights")
    ex.add_argument(
        "--input-size", nargs=3, type=int, metavar=("C", "H", "W"), help="ONNX input size (default: training size)"
    )
    ex.add_argument("--opset", type=int, help="ONNX opset (18 or later; default: the exporter's)")
    ex.add_argument("--no-check", action="store_true", help="ONNX: skip the onnxruntime comparison")
    ex.add_argument("--no-optimize", action="store_true", help="ONNX: skip onnxscript's graph optimizer")
    ex.set_defaults(func=_export)
    return p


def _add_set(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument(
        "--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[], help=help
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (errors reported as ``dynwire <cmd>: error: ...``)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, TrainingDiverged, TrainingInterrupted) as e:  # incl. CheckpointError
        code = 3 if isinstance(e, TrainingDiverged) else e.exit_code if isinstance(e, TrainingInterrupted) else 2
        print(f"dynwire {args.command}: error: {e}", file=sys.stderr, flush=True)
        return code


if __name__ == "__main__":
    sys.exit(main())
