"""Aggregation of :mod:`dynwire.study`: ``results.csv``, ``summary.json``, ``summary.md`` and plots.

:func:`aggregate` reads every run of a study (measuring the executed MACs of finished runs once,
:func:`run_executed_macs`), computes per-cell means with 95% t intervals and paired differences
by seed, and writes the results folder; :func:`_summary_md` renders ``summary.md``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from typing import Any, TextIO

from ..analysis import _stats
from .runner import STATUS_FILE, _read_json, _write_json, run_status
from .spec import RunSpec, Study

RESULT_FIELDS = [
    "run",
    "model",
    "wiring",
    "options",
    "seed",
    "status",
    "top1",
    "top5",
    "loss",
    "best_top1",
    "params",
    "macs",
    "executed_macs",
    "epochs",
    "train_time_s",
    "train_images_per_s",
    "wall_s",
]


EXECUTED_MACS_FILE = "executed_macs.json"


def run_executed_macs(study: Study, run: RunSpec, *, compute: bool = True) -> dict[str, Any] | None:
    """Mean MACs executed per test sample by a finished run's ``best.pt`` (``rec.macs``: removed nodes
    skipped, Sec. 3.3), over the whole evaluation split.

    ``final.json`` reports only the static (all-blocks) MAC count, so the study measures this once
    per run while aggregating and caches it in ``<run>/executed_macs.json`` (keyed by the
    checkpoint's size and mtime); ``compute=False`` only reads the cache. ``None`` for
    ``sequential`` runs: a chain executes every block, so its cost is the ``macs`` column.
    """
    d = study.run_dir(run)
    ckpt = d / "best.pt"
    if not ckpt.is_file() or run.wiring == "sequential":  # a chain runs every block: nothing to measure
        return None
    st = ckpt.stat()
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    cached = _read_json(d / EXECUTED_MACS_FILE)
    if cached and cached.get("checkpoint_key") == key:
        return cached
    if not compute:
        return None
    from ..analysis.connectivity import executed_macs

    out = {**executed_macs(ckpt, data_dir=study.data_dir, device="cpu", num_threads=1), "checkpoint_key": key}
    _write_json(d / EXECUTED_MACS_FILE, out)
    return out


def _imported_row(raw: dict[str, str]) -> dict[str, Any]:
    """A row of an imported ``results.csv``, numbers parsed (empty fields dropped)."""
    out: dict[str, Any] = {}
    for k in RESULT_FIELDS:
        v = raw.get(k)
        if k in ("run", "model", "wiring", "options", "seed", "status") or v in (None, ""):
            continue
        out[k] = float(v) if k not in ("params", "epochs") else int(float(v))
    return out


def _run_row(study: Study, run: RunSpec, *, executed_macs: bool = True) -> dict[str, Any]:
    d = study.run_dir(run)
    row: dict[str, Any] = {
        "run": run.name,
        "model": run.model,
        "wiring": run.wiring,
        "options": run.options_text,
        "seed": run.seed,
        "status": run_status(study, run),
    }
    if row["status"] == "done" and run.name in study.imported and not d.exists():
        return {**row, **_imported_row(study.imported[run.name])}
    final = _read_json(d / "final.json") if row["status"] == "done" else None
    if final:
        val = final.get("val") or {}
        row.update(
            top1=val.get("top1"),
            top5=val.get("top5"),
            loss=val.get("loss"),
            best_top1=final.get("best_val_top1"),
            params=final.get("params"),
            macs=final.get("macs"),
            epochs=final.get("epochs"),
            train_time_s=final.get("train_time_s"),
            train_images_per_s=final.get("train_images_per_s"),
        )
        st = _read_json(d / STATUS_FILE) or {}
        row["wall_s"] = st.get("wall_s_total")
        em = run_executed_macs(study, run, compute=executed_macs)
        if em is not None:
            row["executed_macs"] = em["executed_macs"]
    return row


def _top1_by_seed(rows: dict[str, dict[str, Any]], runs: Sequence[RunSpec]) -> dict[int, float]:
    return {
        r.seed: float(rows[r.name]["top1"])
        for r in runs
        if rows[r.name].get("status") == "done" and rows[r.name].get("top1") is not None
    }


def _reference_runs(study: Study, model: str, wiring: str, seeds: Sequence[int]) -> list[RunSpec]:
    """Option-free runs of ``model``/``wiring`` from any group."""
    found = {r.seed: r for r in study.runs if r.model == model and r.wiring == wiring and not r.overrides}
    return [found[s] for s in seeds if s in found]


def aggregate(
    study: Study, *, plots: bool = True, executed_macs: bool = True, stream: TextIO | None = None
) -> dict[str, Any]:
    """Read every run of the study and write ``results.csv``, ``summary.json``, ``summary.md`` and plots.

    ``executed_macs``: measure the executed MACs of finished runs not measured yet (one pass over
    the test set each, cached; see :func:`run_executed_macs`); ``False`` uses only cached values.
    """
    out_dir = study.results
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = study.runs
    rows = {r.name: _run_row(study, r, executed_macs=executed_macs) for r in runs}
    with open(out_dir / "results.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in runs:
            w.writerow({k: ("" if rows[r.name].get(k) is None else rows[r.name].get(k)) for k in RESULT_FIELDS})
    all_seeds = sorted({r.seed for r in runs})
    groups_out = []
    cell_index: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for g in study.groups:
        cells_out = []
        for c in g.cells:
            vals = _top1_by_seed(rows, c.runs)
            ci = _stats.mean_ci(list(vals.values()))
            finished = [rows[r.name] for r in c.runs if rows[r.name].get("status") == "done"]
            cell = {
                "label": c.label,
                "model": c.model,
                "wiring": c.wiring,
                "option": c.option,
                "overrides": list(c.overrides),
                "planned": len(c.runs),
                "top1_by_seed": {str(k): v for k, v in sorted(vals.items())},
                "top1": ci.to_dict(),
                # random wirings with graph_per_seed: each seed's graph has its own cost
                "params": _mean_or_none(x.get("params") for x in finished),
                "macs": _mean_or_none(x.get("macs") for x in finished),
                "executed_macs": _mean_or_none(x.get("executed_macs") or None for x in finished),
                "train_time_s": _mean_or_none(x.get("train_time_s") or None for x in finished),
                "paper": g.paper.get(c.label) or g.paper.get(c.option) or g.paper.get(c.wiring),
                "diffs": {},
            }
            for ref in ("sequential", "static", *g.compare):
                if c.wiring == ref and (not c.overrides or g.reference is not None):
                    continue  # itself, or the option reference's diff below says it
                # a group with options pairs a cell with the same option's reference cell, if it has one
                same = next(
                    (x for x in g.cells if x.model == c.model and x.wiring == ref and x.option == c.option), None
                )
                ref_runs = (
                    same.runs if same is not None and c.option else _reference_runs(study, c.model, ref, all_seeds)
                )
                if ref_runs:
                    cell["diffs"][f"vs {ref}"] = _stats.paired_diff(vals, _top1_by_seed(rows, ref_runs)).to_dict()
            if g.reference is not None and c.option != g.reference:
                other = next(
                    (x for x in g.cells if x.model == c.model and x.wiring == c.wiring and x.option == g.reference),
                    None,
                )
                if other is not None:
                    cell["diffs"][f"vs {g.reference}"] = _stats.paired_diff(
                        vals, _top1_by_seed(rows, other.runs)
                    ).to_dict()
            cell_index[(g.name, c.model, c.wiring, c.option)] = cell
            cells_out.append(cell)
        groups_out.append(
            {
                "name": g.name,
                "title": g.title,
                "note": g.note,
                "reference": g.reference,
                "curves": g.curves,
                "cells": cells_out,
            }
        )
    # gain contrasts: (cell - sequential) in this group minus the same in another group, seed by seed
    for g, gout in zip(study.groups, groups_out):
        if g.contrast is None:
            continue
        other = next(x for x in study.groups if x.name == g.contrast)
        contrasts = []
        for c in g.cells:
            for oc in other.cells:
                if oc.wiring != c.wiring or oc.option != c.option or c.wiring == "sequential":
                    continue
                mine = cell_index[(g.name, c.model, c.wiring, c.option)]["diffs"].get("vs sequential")
                theirs = cell_index[(other.name, oc.model, oc.wiring, oc.option)]["diffs"].get("vs sequential")
                if not mine or not theirs:
                    continue
                a = dict(zip(mine["seeds"], mine["diffs"]))
                b = dict(zip(theirs["seeds"], theirs["diffs"]))
                d = _stats.paired_diff(a, b).to_dict()
                contrasts.append({"label": c.label, "model": c.model, "other_model": oc.model, **d})
        gout["contrasts"] = {"with": other.name, "rows": contrasts}
    done = sum(1 for r in rows.values() if r["status"] == "done")
    summary = {
        "study": study.name,
        "recipe": {"config": study.recipe, "set": study.recipe_set},
        "runs_total": len(runs),
        "runs_done": done,
        "status_counts": _counts(r["status"] for r in rows.values()),
        "groups": groups_out,
        "figures": {},
    }
    from . import plots as _study_plots

    if plots and done:
        summary["figures"] = _study_plots.study_figures(study, summary, rows, out_dir)
    for name in _study_plots.figure_files(study):  # a figure of an earlier aggregation that no longer applies
        if name not in summary["figures"].values():
            (out_dir / name).unlink(missing_ok=True)
    _write_json(out_dir / "summary.json", summary)
    (out_dir / "summary.md").write_text(_summary_md(summary), encoding="utf-8")
    if stream is not None:
        print(f"[study] aggregated {done}/{len(runs)} finished runs into {out_dir}", file=stream, flush=True)
    return summary


def _mean_or_none(values) -> float | None:
    vals = [v for v in values if v is not None]
    return _stats.mean(vals) if vals else None


def _counts(xs) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return out


def _pm(ci: dict[str, Any], digits: int = 2) -> str:
    if ci.get("n", 0) == 0 or ci.get("mean") is None:
        return "n/a"
    s = f"{ci['mean']:.{digits}f}"
    if ci.get("std") is not None:
        s += f" ± {ci['std']:.{digits}f}"
    return s


def _interval(ci: dict[str, Any], digits: int = 2, signed: bool = False) -> str:
    if ci.get("n", 0) == 0 or ci.get("mean") is None:
        return "n/a"
    sign = "+" if signed else ""
    m = f"{ci['mean']:{sign}.{digits}f}"
    if ci.get("ci_half_width") is None:
        return f"{m} (n={ci['n']})"
    star = " *" if signed and (ci["ci_low"] > 0 or ci["ci_high"] < 0) else ""
    return f"{m} [{ci['ci_low']:{sign}.{digits}f}, {ci['ci_high']:{sign}.{digits}f}]{star} (n={ci['n']})"


def _summary_md(s: dict[str, Any]) -> str:
    rec = s["recipe"]
    lines = [
        f"# Study `{s['study']}`",
        "",
        f"Recipe: `{rec['config']}` with `{' '.join(rec['set']) or '(no overrides)'}`. "
        f"Finished runs: {s['runs_done']}/{s['runs_total']} "
        f"({', '.join(f'{k} {v}' for k, v in sorted(s['status_counts'].items()))}).",
        "",
        "Top-1 is the test accuracy (%) after the last epoch. `mean ± std` uses the sample standard deviation; "
        "intervals are 95% t intervals of the mean; differences are paired by seed (same data order and initial "
        "block weights) against the option-free `sequential` / `static` runs of the same model; `*` marks an "
        "interval that excludes 0. MMACs: every block executed (`final.json`); executed MMACs: mean multiply-adds "
        "per test image with removed nodes skipped (`rec.macs` of each run's `best.pt`, averaged over the seeds).",
        "",
    ]
    for g in s["groups"]:
        lines += [f"## {g['title']}", ""]
        if g.get("note"):
            lines += [g["note"], ""]
        diff_keys: list[str] = ["vs sequential", "vs static"]
        for c in g["cells"]:
            for k in c["diffs"]:
                if k not in diff_keys:
                    diff_keys.append(k)
        diff_keys = [k for k in diff_keys if any(k in c["diffs"] for c in g["cells"])]
        head = ["model", "cell", "n", "top-1 mean ± std", "95% CI of mean"]
        head += [f"Δ {k} [95% CI]" for k in diff_keys]
        head += ["params", "MMACs", "executed MMACs", "train s", "paper"]
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
        for c in g["cells"]:
            t = c["top1"]
            ci_txt = "n/a" if t.get("ci_low") is None else f"[{t['ci_low']:.2f}, {t['ci_high']:.2f}]"
            row = [c["model"], c["label"], f"{t['n']}/{c['planned']}", _pm(t), ci_txt]
            row += [_interval(c["diffs"][k], signed=True) if k in c["diffs"] else "—" for k in diff_keys]
            row += [
                f"{c['params']:,.0f}" if c.get("params") else "n/a",
                f"{c['macs'] / 1e6:.2f}" if c.get("macs") else "n/a",
                f"{c['executed_macs'] / 1e6:.2f}" if c.get("executed_macs") else "n/a",
                f"{c['train_time_s']:.0f}" if c.get("train_time_s") else "n/a",
                c.get("paper") or "",
            ]
            lines.append("| " + " | ".join(row) + " |")
        con = g.get("contrasts")
        if con and con["rows"]:
            lines += [
                "",
                f"Gain contrast with `{con['with']}`: (cell − sequential) here minus (cell − sequential) there, "
                "paired by seed:",
                "",
                "| cell | models | Δ gain [95% CI] |",
                "| --- | --- | --- |",
            ]
            for r in con["rows"]:
                lines.append(f"| {r['label']} | {r['model']} − {r['other_model']} | {_interval(r, signed=True)} |")
        lines.append("")
    figs = s.get("figures") or {}
    if figs:
        lines += ["## Figures", ""]
        for key, path in figs.items():
            lines += [f"![{key}]({path})", ""]
    return "\n".join(lines).rstrip() + "\n"
