"""The ``dynwire`` command line (``dynwire --help``).

Commands: ``train``, ``eval``, ``export``, ``profile``, ``graphs``, ``models``, for detection ``make-scenes`` and ``detect`` (``train``, ``eval`` and ``profile --detector`` take
detection recipes, checkpoints and backbones too), ``analyze`` (connectivity statistics and figures
of a checkpoint) and ``study`` (a resumable multi-seed grid of runs and its paired statistics).

Every command reports bad input the same way: ``dynwire <command>: error: <message>`` on
stderr and exit status 2 (3 when training diverged, 128 + signal when it was interrupted).
Runs under ``torchrun`` too: ``torchrun --nproc_per_node=N -m dynwire.cli train ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from . import study
from ._malloc import keep_freed_memory
from ._registry import get_model_cfg, list_models
from ._version import __version__
from .analysis import connectivity
from .detection.scenes import MAKE_SCENES_DESCRIPTION, add_make_scenes_arguments
from .engine import TrainingDiverged, TrainingInterrupted, evaluate, export_safetensors, load_config, train
from .graph.wiring import WIRINGS


def _profile_detector(args: argparse.Namespace) -> int:
    from .detection import profile_detector

    get_model_cfg(args.detector)  # unknown names: ValueError with suggestions
    if args.names or args.input_size:
        raise ValueError("--detector profiles one backbone at --size H W; drop the model names and --input-size")
    if len(args.size) != 2 or min(args.size) < 32:
        raise ValueError(f"--size takes H W (each >= 32), got {args.size}")
    rows = []
    with warnings.catch_warnings():  # frozen BN at its initial statistics: irrelevant for counting
        warnings.filterwarnings("ignore", message="fasterrcnn_fpn: norm='frozen_bn' without backbone_weights")
        for wiring in (args.baseline, args.wiring):
            rows.append(profile_detector(args.detector, wiring, tuple(args.size), detector=not args.backbone_only))
    h, w = args.size
    print(f"Faster R-CNN + FPN, {args.detector} backbone, one {h}x{w} image (GFLOPs = 2 x GMACs, as Table 2)")
    cols = [("backbone", True)]
    if not args.backbone_only:
        cols += [("fpn", False), ("rpn", False), ("roi_heads", False), ("detector", True)]
    head = [f"{c} GMACs" + (f" | {c} GFLOPs" if flops else "") for c, flops in cols]
    print("| wiring | " + " | ".join(head) + " |")
    print("| --- |" + " ---: |" * sum(2 if flops else 1 for _, flops in cols))
    base = rows[0]
    for r in rows:
        cells = []
        for c, flops in cols:
            v, v0 = r[f"{c}_gmacs"], base[f"{c}_gmacs"]
            extra = f" ({100 * (v / v0 - 1):+.2f}%)" if r is not base and flops and v0 else ""
            cells += [f"{v:.2f}"] + ([f"{2 * v:.2f}{extra}"] if flops else [])
        print(f"| {r['wiring']} | " + " | ".join(cells) + " |")
    if not args.backbone_only:
        print(f"RoI heads on {rows[-1]['proposals']} proposals; detector input padded to {rows[-1]['padded_size']}")
    if args.json:
        from .engine.files import atomic_write_json

        atomic_write_json(args.json, rows)
        print(f"wrote {args.json}")
    return 0


def _profile(args: argparse.Namespace) -> int:
    if args.detector:
        return _profile_detector(args)
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


def _train_detection(args: argparse.Namespace) -> int:
    from .detection import load_detection_config, train_detector

    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.root={json.dumps(str(args.data_dir))}")
    if args.output_dir:
        overrides.append(f"output.dir={json.dumps(str(args.output_dir))}")
    cfg = load_detection_config(args.config, overrides)
    final = train_detector(cfg, resume=args.resume)
    summary = {k: final.get(k) for k in ("run_dir", "iters", "completed", "eval", "s_per_iter", "world_size")}
    if os.environ.get("RANK", "0") == "0":  # one summary under torchrun
        print(json.dumps(summary, indent=2))
    return 0


def _train(args: argparse.Namespace) -> int:
    from .detection.config import is_detection_recipe

    if is_detection_recipe(args.config):
        return _train_detection(args)
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


def _eval_detection(args: argparse.Namespace) -> int:
    from .detection import TABLE2_COLUMNS, evaluate_detector_checkpoint
    from .engine.files import atomic_write_json

    if args.ema:
        raise ValueError("--ema: detection checkpoints have no EMA weights")
    m = evaluate_detector_checkpoint(
        args.checkpoint,
        data_root=args.data_dir,
        split=args.split,
        out_json=args.out,
        device=args.device,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        max_images=args.subset,
        overrides=args.overrides,
    )
    cols = (*TABLE2_COLUMNS, "AR100")
    print(
        f"{args.checkpoint} (iteration {m['iter']}), split {m['split']!r}: {m['images']} images, {m['detections']} detections"
    )
    print("| " + " | ".join(cols) + " |")
    print("|" + " ---: |" * len(cols))
    print("| " + " | ".join("-" if m[c] is None else f"{m[c]:.1f}" for c in cols) + " |")
    det = Path(m["detections_json"])
    metrics_path = det.with_name(det.stem.removesuffix("_detections") + "_eval.json")
    atomic_write_json(
        metrics_path, {k: v for k, v in m.items() if k != "summary"} | {"checkpoint": str(args.checkpoint)}
    )
    print(f"wrote {det} (COCO results format) and {metrics_path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .detection.train import is_detection_checkpoint

    if is_detection_checkpoint(args.checkpoint):
        return _eval_detection(args)
    if args.out:
        raise ValueError("--out is for detection checkpoints (where to write the detections)")
    result = evaluate(
        args.checkpoint,
        data_dir=args.data_dir,
        split=args.split or "val",
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        subset=args.subset,
        use_ema=args.ema,
        device=args.device,
        overrides=args.overrides,
    )
    if "dense" in result:
        print(_pruned_vs_dense(result), file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0


def _pruned_vs_dense(r: dict) -> str:
    """Top-1 and executed MACs with closed nodes removed (Sec. 3.3) next to every block executed."""
    d = r["dense"]
    lines = [
        f"{'':<28} {'removed nodes':>14} {'every block':>12}",
        f"{'top-1 (%)':<28} {r['top1']:>14.2f} {d['top1']:>12.2f}",
        f"{'MACs per image (M)':<28} {r['macs'] / 1e6:>14.2f} {d['macs'] / 1e6:>12.2f}",
        f"{'executed MAC fraction':<28} {r['mac_fraction']:>14.3f} {1.0:>12.3f}",
    ]
    lines += [f"{'removed blocks, ' + k:<28} {100 * v:>13.1f}% {0.0:>11.1f}%" for k, v in r["removed"].items()]
    return "\n".join(lines)


def _detect(args: argparse.Namespace) -> int:
    from .detection import detect_images, load_detector
    from .detection.train import _pick_device

    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise ValueError(f"image '{missing[0]}': file not found")
    model, ckpt = load_detector(args.checkpoint, _pick_device(args.device), args.overrides)
    written = detect_images(model, args.images, args.out, ckpt["class_names"], args.score_thresh)
    for src, dst in zip(args.images, written):
        print(f"{src} -> {dst}")
    return 0


def _make_scenes(args: argparse.Namespace) -> int:
    from .detection.scenes import run_make_scenes

    return run_make_scenes(args)


def _export(args: argparse.Namespace) -> int:
    from .deploy import NoBuildInfoError, compare_onnx, export_input_size, export_onnx, require_onnx
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
    require_onnx(check=not args.no_check)  # the onnx extra, before any work
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
    tr.add_argument(
        "--config",
        required=True,
        help="YAML config path or a shipped config name (fmnist_resnet20; detection recipes, with "
        "task: detection, e.g. det_fmnist_scenes or coco_fasterrcnn_r50_fpn_1x, train a detector)",
    )
    _add_set(tr, "override config entries, e.g. --set optim.lr=0.05 schedule.epochs=3 (values parsed as YAML)")
    tr.add_argument("--resume", action="store_true", help="continue from last.pt in the run directory if present")
    tr.add_argument("--data-dir", help="dataset folder (sets data.root)")
    tr.add_argument("--output-dir", help="parent folder of the run directory (sets output.dir)")
    tr.set_defaults(func=_train)

    ev = sub.add_parser(
        "eval",
        help="evaluate a checkpoint",
        description="Evaluate a training checkpoint. On a detection checkpoint: COCOeval (bbox) with Table 2's "
        "columns, detections written in COCO results format beside the checkpoint (<name>_detections.json) and "
        "the metrics in <name>_eval.json.",
    )
    ev.add_argument("--checkpoint", required=True, help="path to last.pt / best.pt")
    ev.add_argument("--data-dir", help="dataset folder (overrides the checkpoint's data.root)")
    ev.add_argument("--split", help="dataset split to evaluate (default: val; detection: the config's data.val_split)")
    ev.add_argument("--batch-size", type=int, help="evaluation batch size")
    ev.add_argument("--num-workers", type=int, help="data loader workers")
    ev.add_argument("--subset", type=int, help="evaluate on this many images")
    ev.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    _add_set(ev, "override the checkpoint's stored config, e.g. --set model.wiring_kwargs.eval_gate=soft")
    ev.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ev.add_argument("--out", help="detection: write the COCO results JSON here (default: beside the checkpoint)")
    ev.set_defaults(func=_eval)

    de = sub.add_parser(
        "detect",
        help="draw a detection checkpoint's boxes on images",
        description="Run a detection checkpoint on image files and write <out>/<stem>.png with the boxes, class "
        "names and scores drawn.",
    )
    de.add_argument("--checkpoint", required=True, help="a detection run's last.pt")
    de.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    de.add_argument("--out", required=True, help="output folder for the PNG files")
    de.add_argument("--score-thresh", type=float, default=0.5, help="draw detections scoring at least this")
    de.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    _add_set(de, "override the checkpoint's stored config, e.g. --set data.test_min_size=640")
    de.set_defaults(func=_detect)

    ms = sub.add_parser(
        "make-scenes",
        help="generate the Fashion-MNIST detection scenes (COCO format)",
        description=MAKE_SCENES_DESCRIPTION,
    )
    add_make_scenes_arguments(ms)
    ms.set_defaults(func=_make_scenes)

    pr = sub.add_parser(
        "profile",
        help="parameters and MACs of backbones, baseline vs DG-Net (Table 1); --detector: Faster R-CNN (Table 2)",
    )
    pr.add_argument("names", nargs="*", help="model names or patterns (default: all)")
    pr.add_argument("--input-size", nargs="+", type=int, metavar="N", help="C H W, or one size for H = W")
    pr.add_argument("--wiring", default="dynamic", choices=WIRINGS)
    pr.add_argument("--baseline", default="sequential", choices=WIRINGS)
    pr.add_argument("--json", help="also write the rows to this JSON file")
    pr.add_argument("--detector", metavar="BACKBONE", help="profile Faster R-CNN + FPN over this backbone (Table 2)")
    pr.add_argument("--size", nargs=2, type=int, default=[800, 1333], metavar=("H", "W"), help="detector input")
    pr.add_argument("--backbone-only", action="store_true", help="with --detector: the backbone only (fast)")
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

    an = sub.add_parser(
        "analyze",
        help="connectivity statistics and figures of a checkpoint (Figs. 5-7)",
        description=connectivity.ANALYZE_DESCRIPTION,
    )
    connectivity.add_arguments(an)
    an.set_defaults(func=connectivity.run_analyze)

    st = sub.add_parser(
        "study", help="run (resumably) and aggregate a multi-seed grid of runs", description=study.STUDY_DESCRIPTION
    )
    study.add_arguments(st)
    st.set_defaults(func=study.run_cli)
    return p


def _add_set(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument(
        "--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[], help=help
    )


#: Commands that run models; where the fused CPU kernels were not built they say so, once per process.
_KERNEL_COMMANDS = frozenset({"train", "eval", "detect", "analyze", "study", "export"})
# Processes that run models keep freed feature maps in the heap (dynwire.keep_freed_memory): on
# glibc's default heap they are unmapped and faulted in again every step, which made
# `python bench/inference.py --parts small --malloc default` run cifar_resnet20's chain at 0.67x
# the throughput of `--malloc kept` (bench/results/inference*.json); a DG-Net training step faulted in
# 3,000-9,000 pages on the default heap and none kept (bench/train_overhead.py --malloc default|kept,
# "page_faults"). A study's runs are `dynwire train` processes, so they keep it too.
_HEAP_KEPT_COMMANDS = frozenset({"train", "eval", "detect", "analyze"})
_KERNEL_NOTE = (
    "note: dynwire's fused aggregation kernels (layers/_aggkernel.c) were not built when it was installed "
    "(no C compiler with OpenMP): the plain PyTorch kernels run, with the same results, slower on the CPU"
)
_announced = False


def announce_kernel_fallback(stream: TextIO | None = None) -> bool:
    """Print :data:`_KERNEL_NOTE` once per process where the CPU kernels are missing; True if printed."""
    global _announced
    from .layers.aggregation import fused_available

    if _announced or fused_available("cpu"):
        return False
    _announced = True
    print(_KERNEL_NOTE, file=stream or sys.stderr, flush=True)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (errors reported as ``dynwire <cmd>: error: ...``)."""
    args = build_parser().parse_args(argv)
    if args.command in _KERNEL_COMMANDS:
        announce_kernel_fallback()
    if args.command in _HEAP_KEPT_COMMANDS:
        keep_freed_memory()
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, TrainingDiverged, TrainingInterrupted) as e:  # incl. CheckpointError
        code = 3 if isinstance(e, TrainingDiverged) else e.exit_code if isinstance(e, TrainingInterrupted) else 2
        print(f"dynwire {args.command}: error: {e}", file=sys.stderr, flush=True)
        return code


if __name__ == "__main__":
    sys.exit(main())
