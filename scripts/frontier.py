"""Accuracy against executed MACs: the static CIFAR ResNets against budget-trained DG-Net-56 (issue 17).

    python scripts/frontier.py                      # experiments/frontier/results -> frontier.{md,json,png}
    python scripts/frontier.py --results DIR --out DIR
    python scripts/frontier.py --analyze runs/study --reference runs/study_ref/cifar_resnet56__sequential__s0/best.pt

Reads the study's ``results.csv`` (``dynwire study --config experiments/frontier/study.yaml``).
Every cell's test top-1 (mean and 95% t interval over seeds) and executed MACs per image (the
executor's count on all test images; a sequential network runs all of its MACs), and for every
budget cell the seed-paired difference to the static network of the nearest MACs ("equal cost")
and to dense ``cifar_resnet56``.

``--analyze RUNS``: ``dynwire analyze`` of every finished budget run (all test images, against the
``--reference`` checkpoint's per-image loss; figures for seed 0 only) into ``<out>/analysis/<run>``,
skipping runs analyzed before; the table then gains each cell's per-sample compute: executed-MAC
std/mean, the Spearman correlation of executed MACs with the reference's loss, and whether the
removal is per-sample or static.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

from dynwire.analysis import _stats

DENSE = "cifar_resnet56 sequential"


def _label(row: dict[str, str]) -> str:
    if row["wiring"] == "sequential":
        return f"{row['model']} sequential"
    opts = dict(o.split("=", 1) for o in row["options"].split())
    short = {k.rsplit(".", 1)[-1]: v for k, v in opts.items()}
    if "target" not in short:
        return f"{row['model']} DG-Net dense"
    parts = [f"budget {float(short['target']):.3f}"]
    parts.append("wide routers" if "router_weight_std" in short else "default routers")
    if float(short.get("difficulty", 0)) > 0:
        parts.append(f"difficulty {short['difficulty']}")
    if float(short.get("per_stage", 0)) > 0:
        parts.append("per-stage")
    if float(short.get("warmup_epochs", 0)) > 0:
        parts.append(f"warm-up {short['warmup_epochs']} epochs")
    return f"{row['model']} " + ", ".join(parts)


def read_cells(results: Path) -> dict[str, dict]:
    cells: dict[str, dict] = defaultdict(lambda: {"top1": {}, "macs": {}, "runs": {}})
    with (results / "results.csv").open() as f:
        for row in csv.DictReader(f):
            if row["status"] != "done" or not row["top1"]:
                continue
            c = cells[_label(row)]
            seed = int(row["seed"])
            c["top1"][seed] = float(row["top1"])
            em = row["executed_macs"] if row["wiring"] != "sequential" else row["macs"]
            c["macs"][seed] = float(em or row["macs"])
            c["model"], c["budget"] = row["model"], "budget" in _label(row)
            c["runs"][seed] = row["run"]
    return dict(cells)


def _per_sample(analysis: dict) -> dict:
    """``executed_macs`` of a ``dynwire analyze`` output, plus the last stage's router spread: the
    median over its edges (those ever open) of the per-sample std of the edge weight over its mean."""
    out = dict(analysis["executed_macs"])
    stages = analysis.get("stages") or {}
    if stages:
        last = stages[list(stages)[-1]]
        rel = sorted(
            sd / m for rm, rs in zip(last["mean"], last["std"]) for m, sd in zip(rm, rs) if m is not None and m > 0
        )
        out["last_stage_spread"] = rel[len(rel) // 2] if rel else None
    return out


def analyze_runs(cells: dict[str, dict], runs: Path, reference: Path | None, out: Path) -> None:
    """``dynwire analyze`` of every budget run not analyzed yet; per-sample compute into the cells."""
    from dynwire.analysis.connectivity.pipeline import analyze_checkpoint

    for c in cells.values():
        if not c["budget"]:
            continue
        c["analysis"] = {}
        for seed, run in sorted(c["runs"].items()):
            dest = out / "analysis" / run
            path = dest / "analysis.json"
            if not path.is_file():
                if not (runs / run / "best.pt").is_file():  # e.g. trained in an earlier session
                    print(f"[frontier] skip {run}: no best.pt under {runs}", file=sys.stderr, flush=True)
                    continue
                print(f"[frontier] analyze {run}", file=sys.stderr, flush=True)
                analyze_checkpoint(runs / run / "best.pt", dest, reference=reference, num_threads=1, plots=seed == 0)
            c["analysis"][seed] = _per_sample(json.loads(path.read_text()))
        if not c["analysis"]:
            del c["analysis"]


def _dense_macs(cells: dict[str, dict]) -> float:
    """MACs per image of dense ``cifar_resnet56``: its runs' if the study has them, else counted
    (the studies' 1x28x28 Fashion-MNIST input)."""
    if DENSE in cells:
        return _stats.mean(cells[DENSE]["macs"].values())
    import dynwire
    from dynwire.analysis.profile import count_macs

    model = dynwire.create_model("cifar_resnet56", num_classes=10, wiring="sequential", in_chans=1)
    return float(count_macs(model, (1, 28, 28)))


def summarize(cells: dict[str, dict]) -> dict:
    dense_macs = _dense_macs(cells)
    statics = {k: v for k, v in cells.items() if k.endswith(" sequential")}
    out = {}
    for k, c in sorted(cells.items(), key=lambda kv: _stats.mean(kv[1]["macs"].values())):
        macs = _stats.mean(c["macs"].values())
        row = {
            "seeds": sorted(c["top1"]),
            "top1": _stats.mean_ci(list(c["top1"].values())).to_dict(),
            "executed_macs": macs,
            "mac_fraction": macs / dense_macs,
        }
        if c["budget"]:
            equal = min(statics, key=lambda s: abs(_stats.mean(statics[s]["macs"].values()) - macs))
            row["equal_cost"] = equal
            row["vs_equal_cost"] = _stats.paired_diff(c["top1"], statics[equal]["top1"]).to_dict()
            if DENSE in cells:
                row["vs_dense"] = _stats.paired_diff(c["top1"], cells[DENSE]["top1"]).to_dict()
        if c.get("analysis"):
            ems = list(c["analysis"].values())
            rho = [e["vs_reference_loss_spearman"] for e in ems if e.get("vs_reference_loss_spearman") is not None]
            row["per_sample"] = {
                "seeds": sorted(c["analysis"]),
                "macs_cv": [e["cv"] for e in ems],
                "spearman_reference_loss": rho,
                "spearman_own_loss": [e["vs_loss_spearman"] for e in ems],
                "removal": [e["removal"] for e in ems],
                "macs_min_max": [[e["min"], e["max"]] for e in ems],
                "last_stage_spread": [e.get("last_stage_spread") for e in ems],
            }
        out[k] = row
    return out


def _iv(d: dict) -> str:
    if d.get("ci_half_width") is None:
        return f"{d['mean']:+.2f} (n={d['n']})"
    star = "*" if d["ci_low"] > 0 or d["ci_high"] < 0 else ""
    return f"{d['mean']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]{star}"


def markdown(s: dict) -> str:
    lines = [
        "| cell | seeds | top-1 (%) | executed MACs (M) | of resnet56 | equal-cost static | vs it | vs resnet56 |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    analysed = {k: r["per_sample"] for k, r in s.items() if "per_sample" in r}
    for k, r in s.items():
        t = r["top1"]
        pm = f" ± {t['ci_half_width']:.2f}" if t.get("ci_half_width") is not None else ""
        eq = r.get("equal_cost", "")
        lines.append(
            f"| `{k}` | {len(r['seeds'])} | {t['mean']:.2f}{pm} | {r['executed_macs'] / 1e6:.2f} | "
            f"{r['mac_fraction']:.3f} | {f'`{eq}`' if eq else ''} | "
            f"{_iv(r['vs_equal_cost']) if eq else ''} | {_iv(r['vs_dense']) if 'vs_dense' in r else ''} |"
        )
    lines += [
        "",
        "Top-1: mean ± 95% t half-width over seeds. Differences: paired by seed, in points, with the "
        "95% t interval (* excludes 0). Executed MACs: per test image, as the executor ran them.",
    ]
    if analysed:
        lines += [
            "",
            "Per-sample compute (`dynwire analyze` on all test images, one value per seed):",
            "",
            "| cell | seeds | last-stage edge std/mean (median) | removal | executed-MAC std/mean (%) "
            "| Spearman with dense resnet56's loss | with own loss |",
            "| --- | ---: | ---: | --- | ---: | ---: | ---: |",
        ]
        for k, a in analysed.items():
            cv = ", ".join(f"{100 * v:.2f}" for v in a["macs_cv"])
            rho = ", ".join(f"{v:+.2f}" for v in a["spearman_reference_loss"]) or "n/a"
            own = ", ".join(f"{v:+.2f}" if v is not None else "n/a" for v in a["spearman_own_loss"])
            seeds = ", ".join(str(x) for x in a["seeds"])
            spread = ", ".join(f"{v:.2f}" if v is not None else "n/a" for v in a["last_stage_spread"])
            removal = ", ".join(sorted(set(a["removal"])))
            lines.append(f"| `{k}` | {seeds} | {spread} | {removal} | {cv} | {rho} | {own} |")
    return "\n".join(lines) + "\n"


def plot(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))

    def series(keys, **kw):
        keys = sorted(keys, key=lambda k: s[k]["executed_macs"])
        xs = [s[k]["executed_macs"] / 1e6 for k in keys]
        ys = [s[k]["top1"]["mean"] for k in keys]
        es = [s[k]["top1"].get("ci_half_width") or 0 for k in keys]
        ax.errorbar(xs, ys, yerr=es, capsize=3, **kw)
        return keys

    statics = [k for k in s if k.endswith(" sequential")]
    for k in series(statics, fmt="o-", color="tab:blue", label="static: CIFAR ResNet-20/32/44/56"):
        ax.annotate(
            k.split()[0].replace("cifar_", ""),
            (s[k]["executed_macs"] / 1e6, s[k]["top1"]["mean"]),
            textcoords="offset points",
            xytext=(4, -12),
            fontsize=8,
            color="tab:blue",
        )
    wide = [k for k in s if "wide routers" in k and "difficulty" not in k and "warm-up" not in k]
    if wide:
        series(wide, fmt="s-", color="tab:orange", label="DG-Net-56, budget (wide routers)")
    others = {
        "default routers": dict(fmt="v", color="tab:red"),
        "difficulty": dict(fmt="^", color="tab:green"),
        "warm-up": dict(fmt="P", color="tab:brown"),
        "DG-Net dense": dict(fmt="D", color="tab:purple"),
    }
    for tag, kw in others.items():
        ks = [k for k in s if tag in k]
        if ks:
            series(ks, label=f"DG-Net-56, {tag}" if tag != "DG-Net dense" else "DG-Net-56, dense", **kw)
    ax.set_xlabel("executed MACs per test image (M)")
    ax.set_ylabel("Fashion-MNIST test top-1 (%)")
    ax.set_title("Accuracy against executed MACs (mean, 95% interval over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=Path("experiments/frontier/results"))
    p.add_argument("--out", type=Path, help="output folder (default: --results)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--analyze", type=Path, metavar="RUNS", help="folder of the run directories: analyze budget runs")
    p.add_argument("--reference", type=Path, help="checkpoint whose per-image loss is the difficulty (with --analyze)")
    args = p.parse_args(argv)
    out = args.out or args.results
    out.mkdir(parents=True, exist_ok=True)
    cells = read_cells(args.results)
    if args.analyze is not None:
        analyze_runs(cells, args.analyze, args.reference, out)
    else:  # analyses written by an earlier --analyze are still read
        for c in cells.values():
            for seed, run in c["runs"].items():
                path = out / "analysis" / run / "analysis.json"
                if c["budget"] and path.is_file():
                    c.setdefault("analysis", {})[seed] = _per_sample(json.loads(path.read_text()))
    s = summarize(cells)
    (out / "frontier.json").write_text(json.dumps(s, indent=1) + "\n")
    (out / "frontier.md").write_text(markdown(s))
    if not args.no_plot:
        plot(s, out / "frontier.png")
    print(markdown(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
