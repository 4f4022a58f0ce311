"""Plots of :mod:`dynwire.study`: accuracy per cell, paired differences, training-loss curves."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..analysis._plots import pyplot

if TYPE_CHECKING:  # pragma: no cover
    from .spec import Study

__all__ = ["study_figures", "read_metrics"]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Records of ``metrics.jsonl`` (the last one wins for a repeated (kind, step))."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    by_key: dict[tuple[str, int], dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            by_key[(str(rec.get("kind")), int(rec["step"]))] = rec
    return [by_key[k] for k in sorted(by_key, key=lambda k: (k[1], k[0]))]


def _accuracy(summary: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    groups = [g for g in summary["groups"] if any(c["top1"]["n"] for c in g["cells"])]
    widths = [max(2.0, 0.9 * len(g["cells"]) + 1.0) for g in groups]
    fig, axes = plt.subplots(1, len(groups), figsize=(sum(widths) + 0.5, 4.2), squeeze=False, width_ratios=widths)
    rng = np.random.default_rng(0)
    for ax, g, width in zip(axes[0], groups, widths):
        for x, c in enumerate(g["cells"]):
            vals = list(c["top1_by_seed"].values())
            if vals:
                ax.scatter(x + rng.uniform(-0.12, 0.12, len(vals)), vals, s=10, color="0.6", zorder=2)
            t = c["top1"]
            if t["n"]:
                err = t["ci_half_width"] or 0.0
                ax.errorbar(x, t["mean"], yerr=err, fmt="o", color="#1f4e9c", capsize=4, zorder=3)
                ax.annotate(f"n={t['n']}", (x, t["mean"]), textcoords="offset points", xytext=(7, -3), fontsize=7)
        ax.set_xticks(range(len(g["cells"])))
        multi = len({c["model"] for c in g["cells"]}) > 1
        ax.set_xticklabels(
            [(c["model"].replace("cifar_", "") + "\n" if multi else "") + c["label"] for c in g["cells"]],
            rotation=30,
            ha="right",
            fontsize=8,
        )
        ax.set_title(textwrap.fill(g["title"], max(16, int(width * 12))), fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("test top-1 (%)")
    fig.suptitle("Accuracy per cell: mean with 95% t interval, dots = seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _diffs(summary: dict[str, Any], path: Path) -> bool:
    plt = pyplot()
    items = []  # (group title, label, key, ci)
    for g in summary["groups"]:
        for c in g["cells"]:
            for key, d in c["diffs"].items():
                if d["n"]:
                    multi = len({x["model"] for x in g["cells"]}) > 1
                    name = (c["model"].replace("cifar_", "") + " " if multi else "") + c["label"]
                    items.append((g["title"], name, key, d))
    if not items:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(items) + 1.2))
    colors = {"vs sequential": "#1f4e9c", "vs static": "#c0504d"}
    for y, (_title, _name, key, d) in enumerate(items):
        err = d["ci_half_width"]
        color = colors.get(key, "#4f9a4f")
        ax.errorbar(d["mean"], y, xerr=err if err is not None else None, fmt="o", color=color, capsize=3)
    ax.axvline(0.0, color="0.3", lw=0.8)
    ax.set_yticks(range(len(items)))
    ax.set_yticklabels([f"{name} {key} (n={d['n']})" for _, name, key, d in items], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("paired difference in test top-1 (points), mean with 95% t interval")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _curves(study: Study, group: Any, rows: dict[str, Any], path: Path) -> bool:
    """Training loss per logged step and test top-1 per evaluated epoch, mean over seeds per cell."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    drawn = False
    for c in group.cells:
        per_run = [read_metrics(study.run_dir(r)) for r in c.runs if rows[r.name]["status"] == "done"]
        per_run = [m for m in per_run if m]
        if not per_run:
            continue
        drawn = True
        label = c.label + f" (n={len(per_run)})"
        steps = sorted(set.intersection(*[{r["step"] for r in m if r.get("kind") == "train"} for m in per_run]))
        if steps:
            loss = np.array(
                [
                    [next(r["loss"] for r in m if r.get("kind") == "train" and r["step"] == s) for s in steps]
                    for m in per_run
                ]
            )
            mu, sd = loss.mean(0), loss.std(0, ddof=1) if len(per_run) > 1 else np.zeros(len(steps))
            (line,) = axes[0].plot(steps, mu, label=label, lw=1.2)
            axes[0].fill_between(steps, mu - sd, mu + sd, color=line.get_color(), alpha=0.15)
        epochs = sorted(
            set.intersection(
                *[
                    {r["epoch"] for r in m if r.get("kind") == "epoch" and r.get("val_top1") is not None}
                    for m in per_run
                ]
            )
        )
        if epochs:
            acc = np.array(
                [
                    [next(r["val_top1"] for r in m if r.get("kind") == "epoch" and r["epoch"] == e) for e in epochs]
                    for m in per_run
                ]
            )
            axes[1].plot(epochs, acc.mean(0), "o-", label=label)
    if not drawn:
        plt.close(fig)
        return False
    axes[0].set(title="training loss (mean ± std over seeds)", xlabel="step", ylabel="loss")
    axes[1].set(title="test top-1 per evaluated epoch (mean over seeds)", xlabel="epoch", ylabel="top-1 (%)")
    fig.suptitle(group.title, fontsize=10)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def figure_files(study: Study) -> list[str]:
    """Every PNG :func:`study_figures` may write for this study."""
    return ["accuracy.png", "paired_diffs.png"] + [f"curves_{g.name}.png" for g in study.groups if g.curves]


def study_figures(study: Study, summary: dict[str, Any], rows: dict[str, Any], out: Path) -> dict[str, str]:
    figs: dict[str, str] = {}
    _accuracy(summary, out / "accuracy.png")
    figs["accuracy"] = "accuracy.png"
    if _diffs(summary, out / "paired_diffs.png"):
        figs["paired_diffs"] = "paired_diffs.png"
    for g in study.groups:
        if g.curves:
            name = f"curves_{g.name}.png"
            if _curves(study, g, rows, out / name):
                figs[f"curves_{g.name}"] = name
    return figs
