"""Accuracy against executed MACs: sequential vs DG-Net trained with compute budgets.

Trains one run per variant with ``dynwire train`` (resumable: finished runs are skipped, stopped
ones continue from ``last.pt``), then evaluates each best checkpoint with node removal and
writes ``summary.md``, ``results.json`` and ``accuracy_vs_macs.png`` to ``--out``.

    python scripts/budget_experiment.py --preset small      # cifar_resnet20, 10k images, 3 epochs
    python scripts/budget_experiment.py --preset issue      # cifar_resnet56, the fmnist CPU recipe
    python scripts/budget_experiment.py --preset resnet56   # cifar_resnet56 on the study's schedule
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PRESETS = {
    "small": ["model.name=cifar_resnet20", "data.subset=10000", "data.val_subset=2000", "schedule.epochs=3"],
    "issue": ["model.name=cifar_resnet56"],
    # the study's schedule (experiments/study): its cifar_resnet56 runs are directly comparable
    "resnet56": [
        "model.name=cifar_resnet56",
        "data.subset=20000",
        "data.val_subset=null",
        "schedule.epochs=4",
        "train.eval_every=4",
    ],
}
HARD = ["model.wiring=dynamic", "model.wiring_kwargs.train_gate=hard"]
VARIANTS = {
    "sequential": ["model.wiring=sequential"],
    "dynamic": ["model.wiring=dynamic"],
    "budget-1.0": [*HARD, "train.budget.target=1.0", "train.budget.weight=10"],
    "budget-0.7": [*HARD, "train.budget.target=0.7", "train.budget.weight=10"],
    "budget-0.6": [*HARD, "train.budget.target=0.6", "train.budget.weight=10"],
    "budget-0.5": [*HARD, "train.budget.target=0.5", "train.budget.weight=10"],
}


def train(variant: str, args: argparse.Namespace) -> None:
    run = Path(args.runs) / f"{args.preset}_{variant}"
    if (run / "final.json").exists():
        return
    sets = [*PRESETS[args.preset], *VARIANTS[variant], f"train.seed={args.seed}", "train.num_threads=1"]
    sets += [f"output.dir={args.runs}", f"output.name={run.name}"]
    cmd = [sys.executable, "-m", "dynwire.cli", "train", "--config", "fmnist_resnet20", "--set", *sets]
    if (run / "last.pt").exists():
        cmd.append("--resume")
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def report(args: argparse.Namespace) -> None:
    from dynwire.engine import evaluate

    rows = []
    for variant in VARIANTS:
        ckpt = Path(args.runs) / f"{args.preset}_{variant}" / "best.pt"
        if not ckpt.exists():
            continue
        r = evaluate(ckpt)
        dense = r.get("dense", {"macs": r.get("macs")})
        rows.append(
            dict(
                variant=variant,
                top1=r["top1"],
                macs=r.get("macs") or dense["macs"],
                mac_fraction=r.get("mac_fraction", 1.0),
                removed=r.get("removed", {}),
                images=r["images"],
            )
        )
    if not rows:
        raise SystemExit("no finished runs to report")
    seq = next((x for x in rows if x["variant"] == "sequential"), None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(dict(preset=args.preset, seed=args.seed, rows=rows), indent=1))
    lines = [
        f"# Accuracy vs executed MACs ({args.preset} preset, seed {args.seed})",
        "",
        f"`python scripts/budget_experiment.py --preset {args.preset}` (evaluation with node removal, "
        f"{rows[0]['images']} test images).",
        "",
        "| variant | top-1 (%) | MACs per image (M) | vs sequential | removed blocks per stage |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for x in rows:
        rel = f"{x['macs'] / seq['macs']:.3f}" if seq else "-"
        rem = ", ".join(f"{k} {100 * v:.0f}%" for k, v in x["removed"].items()) or "-"
        lines.append(f"| {x['variant']} | {x['top1']:.2f} | {x['macs'] / 1e6:.2f} | {rel} | {rem} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for x in rows:
        ax.scatter(x["macs"] / 1e6, x["top1"])
        ax.annotate(x["variant"], (x["macs"] / 1e6, x["top1"]), fontsize=8)
    ax.set_xlabel("executed MACs per image (M)")
    ax.set_ylabel("test top-1 (%)")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_macs.png", dpi=100)
    print((out / "summary.md").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=PRESETS, default="small")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default="runs/budget")
    p.add_argument("--out", default=None, help="default: experiments/budget/<preset>")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    args.out = args.out or f"experiments/budget/{args.preset}"
    if not args.report_only:
        for v in args.variants:
            train(v, args)
    report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
