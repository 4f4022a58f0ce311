"""Render the committed result files into the Markdown tables of the docs (and README's headline table).

Every number on the documentation site that comes from a measurement is read here from the file
that holds it, so the pages cannot drift from the results:

* ``experiments/study/results/summary.json`` (``dynwire study --aggregate-only``): the study's
  headline table and one table per group;
* ``experiments/fmnist_resnet20/summary.json`` (``make demo``): the main job's two runs;
* ``tests/golden/profile.json`` (``scripts/regen_golden.py``): Table 1's overhead, RandWire's
  small regime;
* ``bench/results/*.json`` (``bench/*.py``): training overhead, inference speed, compile memory;
* ``experiments/det_fmnist_scenes/results.json``: the CPU detection runs.

Writes ``docs/_generated/*.md`` (included by the pages with ``--8<--``), copies the figures the
pages show into ``docs/_generated/img/``, and rewrites README.md's headline table between its
``<!-- headline:start -->`` / ``<!-- headline:end -->`` markers. ``--check`` changes nothing and
exits 1 when README's table is not what the results say.

    python scripts/render_tables.py [--check]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "_generated"
STUDY = ROOT / "experiments" / "study" / "results" / "summary.json"
HEADLINE_START, HEADLINE_END = "<!-- headline:start -->", "<!-- headline:end -->"
BRANCH_START, BRANCH_END = "<!-- branch:start -->", "<!-- branch:end -->"
BRANCH_STUDY = ROOT / "experiments" / "study_branch" / "results" / "summary.json"
FRONTIER_START, FRONTIER_END = "<!-- frontier:start -->", "<!-- frontier:end -->"
SMALL_START, SMALL_END = "<!-- small-perf:start -->", "<!-- small-perf:end -->"
FRONTIER = ROOT / "experiments" / "frontier" / "results" / "frontier.md"
INIT_SCALE = ROOT / "experiments" / "init_scale" / "init_scale.json"

# Figures the pages show (copied: MkDocs serves only what lies under docs/).
FIGURES = {
    "fig5_mean.png": "experiments/analysis_example/fig5_mean.png",
    "fig6_std.png": "experiments/analysis_example/fig6_std.png",
    "fig7_per_class.png": "experiments/analysis_example/fig7_per_class.png",
    "order_trends.png": "experiments/analysis_example/order_trends.png",
    "study_accuracy.png": "experiments/study/results/accuracy.png",
    "study_paired_diffs.png": "experiments/study/results/paired_diffs.png",
    "study_curves_router_bias.png": "experiments/study/results/curves_router_bias.png",
    "fmnist_curves.png": "experiments/fmnist_resnet20/curves.png",
    "det_curves.png": "experiments/det_fmnist_scenes/curves.png",
    "frontier.png": "experiments/frontier/results/frontier.png",
}


# --------------------------------------------------------------------------- formatting
def table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A Markdown table; ``align``: one of ``l``/``r`` per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def signed(x: float) -> str:
    return f"{x:+.2f}"


def interval(d: dict[str, Any] | None) -> str:
    """``+0.23 [+0.04, +0.42] *`` (``*``: the 95% interval excludes 0); ``—`` when absent."""
    if not d or d.get("mean") is None:
        return "—"
    if d.get("ci_low") is None:
        return f"{signed(d['mean'])} (n={d.get('n')})"
    star = " *" if d["ci_low"] > 0 or d["ci_high"] < 0 else ""
    return f"{signed(d['mean'])} [{signed(d['ci_low'])}, {signed(d['ci_high'])}]{star}"


def mean_std(t: dict[str, Any]) -> str:
    std = t.get("std")
    return f"{t['mean']:.2f} ± {std:.2f}" if std is not None else f"{t['mean']:.2f}"


def mega(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 1e6:.2f}"


def ratio(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}x"


def pct(new: float, base: float) -> str:
    return f"{100 * (new - base) / base:.2f}%"


# --------------------------------------------------------------------------- the study
def _study() -> dict[str, Any]:
    return json.loads(STUDY.read_text())


def _group(study: dict[str, Any], name: str) -> dict[str, Any]:
    for g in study["groups"]:
        if g["name"] == name:
            return g
    raise KeyError(f"{STUDY}: no group {name!r}")


def _cell(group: dict[str, Any], label: str) -> dict[str, Any]:
    for c in group["cells"]:
        if c["label"] == label:
            return c
    raise KeyError(f"group {group['name']!r}: no cell {label!r} (has {[c['label'] for c in group['cells']]})")


# (group, cell label, row label, which diff goes in the "vs dynamic" column, paper column)
HEADLINE_ROWS = [
    ("core", "sequential", "sequential", None, "ResNet-18 70.30"),
    ("core", "static", "static (alpha, Table 6)", None, "+0.21 (R18), +0.30 (R50) vs sequential"),
    (
        "core",
        "dynamic",
        "dynamic (alpha_b, Table 6)",
        "",
        "+1.02 / +1.58 vs sequential; +0.81 / +1.28 vs static",
    ),
    ("random", "random-er", "random-er (Table 4's generator)", "vs dynamic", "RandWire-ER 71.34 vs DG-Net 73.52"),
    ("random", "random-ba", "random-ba", "vs dynamic", "RandWire-BA 71.16"),
    ("random", "random-ws", "random-ws", "vs dynamic", "RandWire-WS 72.26"),
    ("router_bias", "dynamic [bias 0]", "dynamic, router bias 0 (Fig. 4)", "vs bias +3", "+3 best (78.28, ResNet-50)"),
    ("router_bias", "dynamic [bias -3]", "dynamic, router bias -3", "vs bias +3", "slowest start, lowest"),
]


def headline(study: dict[str, Any]) -> str:
    """The README's headline table: cifar_resnet20, core + random + router-bias cells."""
    rows = []
    for gname, label, shown, third, paper in HEADLINE_ROWS:
        c = _cell(_group(study, gname), label)
        d = c.get("diffs", {})
        if third == "":
            last = "—"
        elif third is None:
            last = ""
        elif third == "vs dynamic":
            last = interval(d.get(third))
        else:
            last = f"{third}: {interval(d.get(third))}"
        rows.append(
            [
                shown,
                c["top1"]["n"],
                mean_std(c["top1"]),
                "—" if label == "sequential" else interval(d.get("vs sequential")),
                "—" if label == "static" else interval(d.get("vs static")),
                last,
                paper,
            ]
        )
    header = [
        "cifar_resnet20",
        "seeds",
        "top-1 mean ± std",
        "Δ vs sequential [95% CI]",
        "Δ vs static [95% CI]",
        "Δ vs dynamic [95% CI]",
        "paper (ImageNet)",
    ]
    return table(header, rows, "lrrrrrl")


def randwire_results(study: dict[str, Any]) -> str:
    """RandWire's small regime at CPU size: the random generators against DG-Net, paired by seed."""
    rows = []
    for c in _group(study, "randwire")["cells"]:
        rows.append(
            [
                c["label"] + (" (DG-Net)" if c["label"] == "dynamic" else ""),
                c["top1"]["n"],
                mean_std(c["top1"]),
                "—" if c["label"] == "dynamic" else interval(c.get("diffs", {}).get("vs dynamic")),
                mega(c.get("macs")),
                (c.get("paper") or "").removeprefix("Table 4: "),
            ]
        )
    header = ["cifar_randwire_small", "seeds", "top-1 mean ± std", "Δ vs dynamic [95% CI]", "MACs (M)"]
    return table(header + ["paper (ImageNet, Table 4)"], rows, "lrrrrl")


def study_groups(study: dict[str, Any]) -> str:
    """One table per group of the study, with every paired difference the aggregation made."""
    parts = [
        f"Study `{study['study']}`: {study['runs_done']} of {study['runs_total']} runs aggregated, recipe "
        f"`{study['recipe']['config']}` with `{' '.join(study['recipe']['set'])}`.\n"
    ]
    for g in study["groups"]:
        diffs: list[str] = []
        for c in g["cells"]:
            diffs += [k for k in c.get("diffs", {}) if k not in diffs]
        first = {"vs sequential": 0, "vs static": 1}
        diffs.sort(key=lambda k: first.get(k, 2))  # stable: the others keep their order
        header = ["cell", "n", "top-1 mean ± std", "95% CI of mean"]
        header += [f"Δ {k} [95% CI]" for k in diffs] + ["params", "MMACs", "executed MMACs", "paper"]
        rows = []
        for c in g["cells"]:
            t = c["top1"]
            ci = f"[{t['ci_low']:.2f}, {t['ci_high']:.2f}]" if t.get("ci_low") is not None else "n/a"
            row = [f"{c['model']} {c['label']}", f"{t['n']}/{c['planned']}", mean_std(t), ci]
            row += [interval(c.get("diffs", {}).get(k)) for k in diffs]
            row += [f"{c['params']:,.0f}", mega(c.get("macs")), mega(c.get("executed_macs")), c.get("paper") or ""]
            rows.append(row)
        parts.append(f"### {g['title']}\n")
        if g.get("note"):
            parts.append(g["note"] + "\n")
        parts.append(table(header, rows, "lrrr" + "r" * len(diffs) + "rrrl"))
    return "\n".join(parts)


# --------------------------------------------------------------------------- the main job (make demo)
def demo() -> str:
    s = json.loads((ROOT / "experiments/fmnist_resnet20/summary.json").read_text())
    rows = []
    for wiring, f in s["final"].items():
        rows.append(
            [
                wiring,
                f"{f['val']['top1']:.2f}",
                f"{f['params']:,}",
                mega(f.get("macs")),
                f"{f['train_images_per_s']:.0f}" if f.get("train_images_per_s") else "n/a",
            ]
        )
    return table(["wiring", "test top-1 (%)", "params", "MACs (M)", "train images/s"], rows)


# --------------------------------------------------------------------------- profile (golden)
TABLE1_MODELS = [
    "resnet18",
    "resnet50",
    "resnet101",
    "resnext50_32x4d",
    "mobilenet_v2",
    "regnet_x_600mf",
    "regnet_x_1_6gf",
    "regnet_y_600mf",
    "cifar_resnet20",
    "cifar_resnet56",
    "cifar_resnet18",
]


def _golden() -> dict[str, Any]:
    return json.loads((ROOT / "tests/golden/profile.json").read_text())["models"]


def table1() -> str:
    g = _golden()
    rows = []
    for name in TABLE1_MODELS:
        seq, dyn = g[name]["sequential"], g[name]["dynamic"]
        rows.append(
            [
                name,
                f"{seq['params']:,}",
                pct(dyn["params"], seq["params"]),
                f"{seq['macs'] / 1e6:.1f}",
                pct(dyn["macs"], seq["macs"]),
            ]
        )
    return table(["model", "params", "+params", "MACs (M)", "+MACs"], rows)


RANDWIRE_PAPER = {
    "random-er": ("random-er (P=0.2)", "602", ""),
    "random-ba": ("random-ba (M=5)", "582", ""),
    "random-ws": ("random-ws (K=4, P=0.75)", "572", "5.6M params, 583M FLOPs"),
    "dynamic": ("dynamic (DG-Net)", "611", ""),
    "static": ("static", "", ""),
    "sequential": ("sequential", "", ""),
}


def randwire_small() -> str:
    g = _golden()["randwire_small"]
    rows = []
    for wiring, (shown, dgnet, randwire) in RANDWIRE_PAPER.items():
        rows.append([shown, f"{g[wiring]['params']:,}", f"{g[wiring]['macs'] / 1e6:.1f}", dgnet, randwire])
    header = ["wiring", "params", "MACs (M)", "paper: FLOPs (M), DG-Net Table 4", "paper: RandWire Table 2"]
    return table(header, rows, "lrrrl")


# --------------------------------------------------------------------------- benchmarks
def _bench(name: str) -> dict[str, Any]:
    return json.loads((ROOT / "bench/results" / name).read_text())


def train_steps(part: str = "steps_t2", file: str = "train_overhead.json") -> str:
    r = _bench(file)[part]
    rows = []
    for row in r["results"]:
        if row["variant"] == "sequential":
            continue
        t = row["time_ratio"]
        shipped = row["variant"] == "dynamic"
        name = f"`{row['variant']}`" + (" (shipped)" if shipped else "")
        rows.append(
            [
                row["model"],
                row["batch"],
                name,
                f"{ratio(t['median'], 3)} ({t['min']:.3f}..{t['max']:.3f})",
                ratio(row["bound"]["time_ratio_floor"], 3),
                ratio(row["memory_ratio"], 3),
                str(row.get("page_faults", "")),
            ]
        )
    header = [
        "model",
        "batch",
        "variant",
        f"step time vs sequential, median (min..max of {r['rounds']} rounds)",
        "floor",
        "peak RSS vs sequential",
        "page faults per step",
    ]
    heap = r.get("malloc", "default")
    return f"`{r['command']}` (heap: {heap}).{cpu_note(r.get('cpu'))}\n\n" + table(header, rows, "lrlrrrr")


def stage_backward() -> str:
    r = _bench("train_overhead.json")["stage"]
    by: dict[int, dict[str, Any]] = {}
    for row in r["rows"]:
        by.setdefault(row["threads"], {})[row["path"]] = row
    rows = []
    for threads, paths in sorted(by.items()):
        pull = paths["pull"]
        rows.append(
            [
                threads,
                f"{paths['plain']['ms_best']:.0f} ms",
                f"{paths['push']['ms_best']:.0f} ms",
                f"{pull['ms_best']:.0f} ms ({pull['speedup_vs_push']:.2f}x faster than push; {pull['gbs_best']:.1f} GB/s)",
            ]
        )
    head = f"{r['node']}; least traffic {r['ideal_mb']:.0f} MB; best time over the rounds.\n\n"
    return head + table(["threads", "plain", "`push` (first fused version)", "`pull` (shipped)"], rows)


def cpu_note(info: dict | None) -> str:
    """`` CPU: ...`` from a result's ``cpu_info()`` (bench/_machine.py); empty for runs before it was
    recorded. The C kernels' line width follows the CPU, so the same code differs between machines."""
    if not info or "simd" not in info:
        return ""
    simd = ", ".join(x.upper().replace("AVX512F", "AVX-512") for x in info["simd"]) or "no AVX"
    lines = f", kernel lines of {info['kernel_line_bytes']} bytes" if info.get("kernel_line_bytes") else ""
    return f" CPU: {info['model_name']} (family {info['family']}, model {info['model']}; {simd}){lines}."


def kernel_blocks() -> str:
    """One node's sum and tap per read order (bench/kernel_blocks.py): out of cache, as a share of
    torch.add's bandwidth; in cache, time against the old kernels'."""
    r = _bench("kernel_blocks.json")
    variants = list(dict.fromkeys(row["variant"] for row in r["rows"]))
    cold: dict[tuple, dict[str, float]] = {}
    hot: dict[tuple, dict[str, float]] = {}
    for row in r["rows"]:
        key = (row["node"], row["k"], row["phase"])
        if row["cache"] == "cold":
            cold.setdefault(key, {})[row["variant"]] = row["of_add"]
        else:
            hot.setdefault(key, {})[row["variant"]] = row["vs_blocks1024"]
    names = [f"`{v}`" for v in variants]
    rows = [[n, k, ph, *(f"{v[x]:.2f}" for x in variants)] for (n, k, ph), v in cold.items()]
    out = f"`{r['command']}`, one thread, float32.{cpu_note(r['machine'])}\n\nOut of cache, share of `torch.add`'s bandwidth (same rounds):\n\n"
    out += table(["node", "K", "pass", *names], rows, "lrl" + "r" * len(variants))
    rows = [[n, k, ph, *(f"{v[x]:.2f}x" for x in variants)] for (n, k, ph), v in hot.items()]
    out += "\n\nIn cache (the same call repeated), time per call against `blocks1024`'s:\n\n"
    return out + table(["node", "K", "pass", *names], rows, "lrl" + "r" * len(variants))


def inference_dense() -> str:
    part = _bench("inference.json")["parts"]["dense"]
    rows = []
    for r in part["results"]:
        v = r["variants"]
        size = "x".join(map(str, r["input"][1:]))
        rows.append(
            [
                f"{r['model']} ({size})",
                r["batch"],
                ratio(v["dynamic"]["latency_ratio"]),
                ratio(v["dynamic-reference"]["latency_ratio"]),
                ratio(1.0 / v["dynamic"]["throughput_ratio"]),
                ratio(v["static"]["latency_ratio"]),
            ]
        )
    header = [
        "model",
        "batch N",
        "`dynamic` latency b1",
        "`dynamic-reference` latency b1",
        "`dynamic` time per image at N",
        "`static` latency b1",
    ]
    return f"`{part['command']}`, against `sequential`.{cpu_note(part.get('cpu'))}\n\n" + table(header, rows)


def inference_removal() -> str:
    part = _bench("inference.json")["parts"]["removal"]
    (r,) = part["results"]
    rows = [
        [
            f"{float(k):.2f}",
            f"{s['executed_mac_fraction']:.3f}",
            ratio(s["throughput_vs_none_removed"]),
            ratio(s["latency_b1_vs_none_removed"]),
        ]
        for k, s in r["shares"].items()
    ]
    head = f"`{r['model']}`, batch {r['batch']}: the pruned executor against the same model with nothing removed.\n\n"
    return head + table(["removed share", "executed MACs", "throughput", "batch-1 latency"], rows)


def inference_trained() -> str:
    part = _bench("inference.json")["parts"]["trained"]
    (r,) = part["results"]
    rows = [
        [
            name.split("_", 1)[-1],
            f"{v['top1']:.2f}",
            f"{v['executed_mac_fraction']:.3f}",
            ratio(v["latency_ratio"]),
            ratio(v["throughput_ratio"]),
        ]
        for name, v in r["variants"].items()
    ]
    head = f"`{part['command']}`, {r['images']}:\n\n"
    header = ["run", "test top-1", "executed MACs", "batch-1 latency", f"throughput at {r['batch']}"]
    return head + table(header, rows)


def inference_compile() -> str:
    part = _bench("inference.json")["parts"]["compile"]
    (r,) = part["results"]
    rows = [[f"`{name}`", ratio(v["latency_ratio"]), ratio(v["throughput_ratio"])] for name, v in r["variants"].items()]
    head = f"`{part['command']}`, `{r['model']}`, batch {r['batch']}, against {r['vs']}:\n\n"
    return head + table(["variant", "batch-1 latency", f"throughput at {r['batch']}"], rows)


def small_perf() -> str:
    """README: the small models' training step (bench/node_overhead.py on the kept heap, as
    ``dynwire train`` runs) and evaluation (bench/inference.py --parts small, on its recorded heap)."""
    node = _bench("node_overhead.json")
    part = _bench("inference.json")["parts"]["small"]
    ev = {(r["model"], r["threads"]): r["variants"] for r in part["results"]}
    threads = sorted({t for _, t in ev})
    rows = []
    for r in node["results_kept_malloc"]:
        for form, key in (("branch (default)", "dynamic"), ("block", "dynamic-block")):
            row = [f"`{r['model']}`", form, ratio(r["train"][form.split()[0]]["ratio"])]
            for t in threads:
                v = ev.get((r["model"], t), {}).get(key)
                row += [ratio(1.0 / v["throughput_ratio"]), ratio(v["latency_ratio"])] if v else ["", ""]
            rows.append(row)
    header = ["model", "node form", "train step, 1 thread"]
    for t in threads:
        header += [f"eval batch 64, {t} thread{'s' * (t > 1)}", f"eval batch 1, {t} thread{'s' * (t > 1)}"]
    heap = part.get("malloc", "default")
    k = part.get("processes", 1)
    over = f"; evaluation: the median over {k} processes" if k > 1 else ""
    return (
        f"Time against `sequential` in the same process{over}, 1x28x28 inputs (`{node['command']}`, heap: "
        f"kept; `{part['command']}`, heap: {heap}).{cpu_note(part.get('cpu'))}\n\n"
        + table(header, rows, "ll" + "r" * (len(header) - 2))
    )


def _ratio_ci(r: float, ci: list[float] | None, invert: bool = False) -> str:
    """``r`` with the 95% interval of the per-round ratios' median (``invert``: the interval is of
    the throughput ratio, ``r`` a time ratio); ``r`` alone for files without intervals."""
    if not ci:
        return ratio(r)
    lo, hi = (1.0 / ci[1], 1.0 / ci[0]) if invert else ci
    return f"{ratio(r)} [{lo:.2f}, {hi:.2f}]"


def inference_small(key: str = "small") -> str:
    """The small models at the studies' input (issue 19's evaluation goals: batch 64 and batch 1);
    ``key="channels_last"``: the same models in channels_last, against the chain in that layout."""
    part = _bench("inference.json")["parts"][key]
    rows = []
    forms = (
        ("branch (default)", "dynamic"),
        ("block", "dynamic-block"),
        ("branch, full sums", "dynamic-full-sums"),
        ("branch, C calls declined", "dynamic-tensor-ops"),
        ("chain, default layout", "sequential-nchw"),
        ("branch, default layout", "dynamic-nchw"),
    )
    for r in part["results"]:
        v = r["variants"]
        for form, k in forms:
            if k not in v:
                continue
            rows.append(
                [
                    r["model"],
                    r["threads"],
                    form,
                    _ratio_ci(1.0 / v[k]["throughput_ratio"], v[k].get("throughput_ratio_ci95"), invert=True),
                    _ratio_ci(v[k]["latency_ratio"], v[k].get("latency_ratio_ci95")),
                ]
            )
    header = ["model", "threads", "node form", "time per image at batch 64", "batch-1 latency"]
    heap = part.get("malloc", "default")
    where = cpu_note(part.get("cpu"))
    ci = any("throughput_ratio_ci95" in v for r in part["results"] for v in r["variants"].values())
    k = part.get("processes", 1)
    if k > 1:
        note = (
            f" Each ratio: the median over {k} processes of each one's median over its rounds; in brackets the "
            "95% interval over those processes (order statistics)."
        )
    else:
        note = " In brackets: the 95% interval of the median over rounds (order statistics)." if ci else ""
    if any("dynamic-full-sums" in r["variants"] for r in part["results"]):
        note += " *Full sums*: the branch form without the batch path's partial sums (the same weights)."
    against = "`sequential`"
    if key == "channels_last":
        against = "`sequential` in channels_last (every model and input converted)"
        note += (
            " *C calls declined*: the branch form as it ran before the C calls read channels_last maps"
            " (the stages' tensor ops); *default layout*: the same models without the conversion."
        )
    return f"`{part['command']}` (heap: {heap}), 1x28x28 inputs, against {against}.{note}{where}\n\n" + table(
        header, rows, "lrlrr"
    )


def gpu_eager() -> str:
    """bench/gpu.py on a GPU: eager training step (fp32, bf16 + channels_last), evaluation, peak memory."""
    doc = _bench("gpu.json")
    rows = []
    for key, part in doc["parts"].items():
        if not key.startswith("train "):
            continue
        model = key[len("train ") :]
        ev = doc["parts"].get(f"eval {model}", {})
        for form, v in (("branch (default)", "dynamic"), ("block", "dynamic-block")):
            row = [model, form, ratio(part["fp32"][v]["ratio"]), ratio(part["amp"][v]["ratio"])]
            row.append(ratio(part["fp32"][v]["peak_ratio"]))
            bn = [k for k in ev if k.startswith("batch") and k != "batch1"]
            row += [ratio(ev[bn[0]][v]["ratio"]), ratio(ev["batch1"][v]["ratio"])] if bn else ["", ""]
            rows.append(row)
    header = ["model, batch, input", "node form", "train fp32", "train bf16 + channels_last", "peak memory",
              "eval batch N", "eval batch 1"]  # fmt: skip
    dev = doc["device"]["name"]
    return (
        f"{dev}, torch {doc['torch']} (CUDA {doc['cuda']}), eager, ratios of `dynamic` to `sequential` "
        f"(median of {doc['rounds']} interleaved rounds, CUDA events):\n\n" + table(header, rows, "llrrrrr")
    )


def _compile_table(doc: dict[str, Any], key: str) -> str:
    names = {
        "sequential": "sequential, eager",
        "dynamic": "dynamic, eager",
        "sequential-compiled": "sequential, compiled",
        "dynamic-compiled": "dynamic, compiled",
        "dynamic-compiled-opaque": "dynamic, compiled, aggregation as the custom op (0.2)",
        "sequential-cudagraphs": "sequential, compiled, CUDA graphs",
        "dynamic-cudagraphs": "dynamic, compiled, CUDA graphs",
    }

    def same(r: dict[str, Any]) -> str:
        return ratio(r["ratio_to_same_mode_sequential"]) if "ratio_to_same_mode_sequential" in r else "—"

    part = doc["parts"][key]
    rows = []
    for v, label in names.items():
        t, e = part["train"].get(v), part["eval"].get(v)
        if t is not None and e is not None:
            rows.append([label, ratio(t.get("ratio", 1.0)), same(t), ratio(e.get("ratio", 1.0)), same(e)])
    header = ["variant", "train step / eager sequential", "/ sequential, same mode", "eval b64 / eager sequential",
              "/ sequential, same mode"]  # fmt: skip
    return f"`{key}` on {doc['device']['name']}, float32:\n\n" + table(header, rows, "lrrrr")


def gpu_compile() -> str:
    """bench/gpu.py's compile part on the GPU: torch.compile default and reduce-overhead (CUDA graphs)."""
    doc = _bench("gpu.json")
    return _compile_table(doc, next(k for k in doc["parts"] if k.startswith("compile ")))


def compile_cpu() -> str:
    """bench/gpu.py's compile part on the CPU (1 thread): the compiled glue against the compiled chain."""
    doc = _bench("compile_cpu.json")
    keys = [k for k in doc["parts"] if k.startswith("compile ") and "error" not in doc["parts"][k]]
    return "\n\n".join(_compile_table(doc, k) for k in keys) + "\n"


def _frontier_label(run: str) -> str:
    opts = run.split("__")[2] if run.count("__") >= 3 else run
    parts = dict(o.split("=", 1) for o in opts.split("_") if "=" in o and not o.startswith("std"))
    label = f"budget {float(parts['target']):.3f}" if "target" in parts else run
    if "router_bias=0" not in run:
        label += ", default routers"
    if "difficulty" in parts:
        label += f", difficulty {parts['difficulty']}"
    if "per_stage=1" in run:
        label += ", per-stage"
    if "warmup_epochs" in run:
        label += ", warm-up"
    return label + f" (s{run.rsplit('__s', 1)[-1]})"


def inference_frontier() -> str:
    """Budget-trained DG-Net-56 against the static network of equal MACs and dense resnet56."""
    part = _bench("inference.json")["parts"]["frontier"]
    rows = []
    for r in part["results"]:
        for name, v in r["variants"].items():
            if "equal_cost" not in v:
                continue
            rows.append(
                [
                    _frontier_label(name),
                    r["threads"],
                    f"{v['top1']:.2f}",
                    f"{v['mac_fraction_of_resnet56']:.3f}",
                    f"`{v['equal_cost'].split()[0]}`",
                    ratio(v["throughput_ratio_vs_equal"]),
                    ratio(v["latency_ratio_vs_equal"]),
                    ratio(v["throughput_ratio"]),
                    ratio(v["latency_ratio"]),
                ]
            )
    header = [
        "DG-Net-56",
        "threads",
        "top-1",
        "executed MACs",
        "equal-cost static",
        "throughput vs it",
        "latency vs it",
        "throughput vs resnet56",
        "latency vs resnet56",
    ]
    head = f"`{part['command']}`, batch {part['results'][0]['batch']}, test images:\n\n"
    return head + table(header, rows, "lrrrlrrrr")


COMPILE_MEMORY_NAMES = {
    "sequential": "`sequential`, eager",
    "dynamic": "`dynamic`, eager (taps + recomputation, as shipped)",
    "dynamic-nomech": "`dynamic`, eager, both mechanics off",
    "sequential-compiled": "`sequential`, `torch.compile`",
    "dynamic-compiled": "`dynamic`, `torch.compile(fullgraph=True)`",
}


def compile_memory() -> str:
    c = _bench("compile_memory.json")
    s = c["setup"]
    rows = [
        [
            COMPILE_MEMORY_NAMES.get(r["variant"], f"`{r['variant']}`"),
            f"{r['step_added_mib']:.0f} MiB",
            ratio(r["memory_vs_dynamic"], 3),
        ]
        for r in c["results"]
    ]
    head = f"`{s['model']}`, batch {s['batch']}, {s['input']}x{s['input']}, {s['threads']} thread(s):\n\n"
    return head + table(["variant", "step adds", "vs eager `dynamic`"], rows, "lrr")


# --------------------------------------------------------------------------- connectivity analysis
ANALYSES = {
    "default recipe": "experiments/analysis_example/analysis.json",
    "router bias 0, tau 0.5, hard gate": "experiments/analysis_example/hard_gate/analysis.json",
    "the study's dynamic seed 0": "experiments/analysis_example/study_dynamic_s0/analysis.json",
}


def analysis_example() -> str:
    rows = []
    for name, path in ANALYSES.items():
        a = json.loads((ROOT / path).read_text())
        st = a["stages"].values()
        em = a.get("executed_macs") or {}
        rows.append(
            [
                name,
                a["images"],
                f"{a['top1']:.2f}",
                " / ".join(f"{100 * s['closed_edge_share']:.2f}" for s in st),
                " / ".join(f"{100 * s['removed_node_share']:.2f}" for s in st),
                mega(em.get("mean")),
            ]
        )
    header = ["`cifar_resnet20`, dynamic", "images", "top-1", "closed edges (%)", "removed nodes (%)", "executed MMACs"]
    stages = " / ".join(json.loads((ROOT / next(iter(ANALYSES.values()))).read_text())["stages"])
    return table(header, rows, "lrrrrr") + f"\nPer stage: {stages}. From each folder's `analysis.json`.\n"


# --------------------------------------------------------------------------- detection
def detection() -> str:
    d = json.loads((ROOT / "experiments/det_fmnist_scenes/results.json").read_text())
    cols = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    rows = []
    for wiring, run in d["runs"].items():
        ev = run["eval"]
        rows.append(
            [wiring] + ["n/a" if ev.get(k) is None else f"{ev[k]:.1f}" for k in cols] + [ev["iter"], ev["images"]]
        )
    return table(["wiring"] + cols + ["iteration", "val images"], rows)


# --------------------------------------------------------------------------- driver
# (group, cell label, row label): the branch-node study (issue 16), block and branch form side by side
BRANCH_ROWS = [
    ("chain56", "sequential", "cifar_resnet56 sequential"),
    ("depth", "static [block]", "cifar_resnet56 static, block nodes"),
    ("depth", "static [branch]", "cifar_resnet56 static, **branch nodes**"),
    ("depth", "dynamic [block]", "cifar_resnet56 dynamic, block nodes"),
    ("depth", "dynamic [branch]", "cifar_resnet56 dynamic, **branch nodes**"),
    ("chain20", "sequential", "cifar_resnet20 sequential"),
    ("core", "static [block]", "cifar_resnet20 static, block nodes"),
    ("core", "static [branch]", "cifar_resnet20 static, **branch nodes**"),
    ("core", "dynamic [block]", "cifar_resnet20 dynamic, block nodes"),
    ("core", "dynamic [branch]", "cifar_resnet20 dynamic, **branch nodes**"),
    ("random", "random-er [branch]", "cifar_resnet20 random-er, **branch nodes**"),
]


def _branch_study() -> dict[str, Any]:
    return json.loads(BRANCH_STUDY.read_text())


def branch_results(study: dict[str, Any]) -> str:
    """Block against branch nodes (``WiringConfig.node``), paired by seed with the chain and each other."""
    rows = []
    for gname, label, shown in BRANCH_ROWS:
        c = _cell(_group(study, gname), label)
        d = c.get("diffs", {})
        rows.append(
            [
                shown,
                f"{c['top1']['n']}/{c['planned']}",
                mean_std(c["top1"]) if c["top1"]["n"] else "—",
                "—" if label == "sequential" else interval(d.get("vs sequential")),
                interval(d.get("vs static")) if "dynamic" in label else "—",
                interval(d.get("vs block")) if "[branch]" in label else "—",
            ]
        )
    header = ["cell", "seeds", "top-1 mean ± std", "Δ vs sequential", "Δ vs static (same form)", "Δ vs block form"]
    return table(header, rows, "lrrrrr")


def branch_contrast(study: dict[str, Any]) -> str:
    """The depth group's gain contrast: (cell - sequential) at resnet56 minus the same at resnet20."""
    con = _group(study, "depth").get("contrasts", {"rows": []})
    rows = [[r["label"], interval(r)] for r in con["rows"]]
    return table(["cell", "gain at 56 minus gain at 20 [95% CI]"], rows, "lr")


def init_scale() -> str:
    """Every stage's output std at initialisation (``scripts/init_scale.py``), per family, wiring, form."""
    doc = json.loads(INIT_SCALE.read_text())
    rows = []
    for r in doc["rows"]:
        stages = [k for k in r["stds"] if k != "logits"]
        text = " / ".join(f"{r['stds'][k]:.3g}" for k in stages)
        rows.append([r["model"], r["wiring"], r["node"], r["size"], text, f"{r['max_ratio']:.3g}"])
    return table(
        ["model", "wiring", "node", "input", "stage output std, stage by stage", "max ratio to sequential"],
        rows,
        "lllrlr",
    )


def node_overhead(key: str = "results") -> str:
    """The small models' overhead above the chain, by part (bench/node_overhead.py)."""
    doc = _bench("node_overhead.json")
    rows = []
    for r in doc.get(key) or []:
        for form, t in r["train"].items():
            sh = t["parts_share_of_sequential"]
            rows.append(
                [
                    f"`{r['model']}`",
                    form,
                    ratio(t["ratio"]),
                    ratio(t["ratio_receivers"]) if "ratio_receivers" in t else "",
                    f"{sh['norecompute']:+.1%}",
                    f"{sh['notaps']:+.1%}",
                    f"{sh['norouters']:+.1%}",
                    f"{sh['aggregation kernels']:+.1%}",
                    f"{t['rest_s'] / r['sequential_step_s']:+.1%}",
                    f"{t['ops']} / {r['sequential_ops']}",
                    ratio(r["eval"][form]["b64_ratio"]),
                    *_eval_split_cells(r, form),
                    ratio(r["eval"][form]["b1_ratio"]),
                    f"{r['eval'][form]['removed_share']:.1%}" if "removed_share" in r["eval"][form] else "",
                ]
            )
    return _cpu_head(doc) + table(
        [
            "model",
            "node",
            "train step",
            "train step, gates per receiver",
            "recompute",
            "taps",
            "routers",
            "aggregation kernels",
            "rest",
            "aten ops / chain",
            "eval b64",
            "b64: blocks",
            "b64: stage outside blocks",
            "b64: aggregation traffic (chain's adds)",
            "eval b1",
            "removed at eval",
        ],
        rows,
        "llrrrrrrrrrrrrrr",
    )


def _cpu_head(doc: dict) -> str:
    """bench/node_overhead.py's CPU as a paragraph above its tables; empty for files without it."""
    where = cpu_note(doc.get("machine")).strip()
    return f"{where}\n\n" if where else ""


def _eval_split_cells(r: dict, form: str) -> list[str]:
    """Batch-64 evaluation by part, as shares of the chain's evaluation (bench/node_overhead.py's
    ``eval_split``; the chain's blocks include its shortcut adds); empty for files without it."""
    split = r.get("eval_split")
    if not split:
        return ["", "", ""]
    chain, v = split["sequential"]["total_s"], split[form]
    return [
        f"{v['in_blocks_s'] / chain:.1%} ({split['sequential']['in_blocks_s'] / chain:.1%})",
        f"{v['stages_outside_blocks_s'] / chain:.1%}",
        f"{r['eval'][form]['agg_traffic_share']:.1%} ({r['eval'][form]['chain_add_traffic_share']:.1%})",
    ]


def node_overhead_eval() -> str:
    """Batch-64 evaluation by part on both heaps (bench/node_overhead.py's ``eval_split``): shares of
    the chain's evaluation in the same passes, and the rate of DG-Net's C calls on their least traffic
    next to ``torch.add``'s out of and in the cache. Empty for files before the split had its parts."""
    doc = _bench("node_overhead.json")
    rows = []
    for key, heap in (("results_kept_malloc", "kept"), ("results", "glibc")):
        for r in doc.get(key) or []:
            split = r.get("eval_split", {})
            if "sequential" not in split or "c_steps_s" not in split["sequential"]:
                continue
            seq = split["sequential"]
            chain = seq["total_s"]

            def share(v: dict, k: str, chain: float = chain) -> str:
                return f"{v[k] / chain:.1%}"

            def shortcut(v: dict, chain: float = chain) -> str:
                return f"{(v['in_blocks_s'] - v['branches_s']) / chain:.1%}"

            for form in r["eval"]:
                v, e = split[form], r["eval"][form]
                rows.append(
                    [
                        f"`{r['model']}`",
                        form,
                        heap,
                        ratio(e["b64_ratio"], 3),
                        ratio(v["total_s"] / chain, 3),
                        f"{share(v, 'branches_s')} ({share(seq, 'branches_s')})",
                        f"{shortcut(v)} ({shortcut(seq)})",
                        share(v, "c_steps_s"),
                        f"{(v['stages_outside_blocks_s'] - v['c_steps_s']) / chain:.1%}",
                        f"{e['c_steps_gbs']:.1f}",
                        f"{r['bandwidth_gbs']:.1f} / {r['bandwidth_in_cache_gbs']:.1f}",
                    ]
                )
    if not rows:
        return ""
    return _cpu_head(doc) + table(
        [
            "model",
            "node",
            "heap",
            "eval b64 (rounds)",
            "eval b64 (split passes)",
            "branches (chain's)",
            "shortcuts: adds, ReLUs, downsampling (chain's)",
            "C calls",
            "rest of the stages",
            "C calls' rate on least traffic, GB/s",
            "torch.add out of / in cache, GB/s",
        ],
        rows,
        "lllrrrrrrrr",
    )


#: bench/eval_levers.py's variants, in the table's words
_LEVERS = {
    "dynamic": "DG-Net, as shipped",
    "prefetch": "inputs prefetched 512 bytes ahead",
    "stream": "node inputs written with non-temporal stores",
    "full-sums": "no partial sums (every node reads all inputs)",
    "tiled": "first stage on the batch's two halves",
    "sequential-tiled": "chain, first stage on the two halves",
}


def eval_levers() -> str:
    """Batch 64's levers on the C calls' memory traffic (bench/eval_levers.py): each variant's
    evaluation time and C calls against the chain's of the same rounds, median over processes."""
    doc = _bench("eval_levers.json")
    rows = []
    for r in doc["results"]:
        for v, d in r["variants"].items():
            lo, hi = d["ratio_range"]
            rows.append(
                [
                    f"`{r['model']}`",
                    _LEVERS.get(v, v),
                    f"{d['ratio']:.3f}x ({lo:.3f} - {hi:.3f})",
                    f"{d['c_calls_share']:.1%}" if d["c_calls_share"] else "—",
                    "equal" if d["max_abs_diff"] == 0 else f"{d['max_abs_diff']:.1e}",
                ]
            )
    head = (
        f"Thread CPU time, {doc['processes']} processes of {doc['rounds']} rounds, one thread, batch 64, branch form."
    )
    return (
        _cpu_head(doc)
        + head
        + "\n\n"
        + table(
            [
                "model",
                "variant",
                "time / chain's (range of the processes' medians)",
                "C calls / chain's time",
                "logits against the shipped model's (max abs diff)",
            ],
            rows,
            "llrrr",
        )
    )


def frontier() -> str:
    """Accuracy against executed MACs (issue 17): ``scripts/frontier.py``'s table, as committed."""
    if not FRONTIER.is_file():
        raise FileNotFoundError(f"{FRONTIER} not found: run python scripts/frontier.py")
    return FRONTIER.read_text(encoding="utf-8")


SNIPPETS: dict[str, Callable[[], str]] = {
    "frontier.md": frontier,
    "node_overhead.md": node_overhead,
    "node_overhead_kept_malloc.md": lambda: node_overhead("results_kept_malloc"),
    "node_overhead_eval.md": node_overhead_eval,
    "eval_levers.md": eval_levers,
    "branch_results.md": lambda: branch_results(_branch_study()),
    "branch_contrast.md": lambda: branch_contrast(_branch_study()),
    "init_scale.md": init_scale,
    "study_headline.md": lambda: headline(_study()),
    "study_groups.md": lambda: study_groups(_study()),
    "randwire_results.md": lambda: randwire_results(_study()),
    "demo.md": demo,
    "table1.md": table1,
    "randwire_small.md": randwire_small,
    "train_steps_t2.md": lambda: train_steps("steps_t2"),
    "train_steps_t1.md": lambda: train_steps("steps_t1"),
    "train_steps_t1_s28.md": lambda: train_steps("steps_t1_s28"),
    "train_steps_t1_s28_default_heap.md": lambda: train_steps("steps_t1_s28", "train_overhead_default_heap.json"),
    "stage_backward.md": stage_backward,
    "kernel_blocks.md": kernel_blocks,
    "inference_dense.md": inference_dense,
    "inference_removal.md": inference_removal,
    "inference_trained.md": inference_trained,
    "inference_compile.md": inference_compile,
    "inference_small.md": inference_small,
    "inference_channels_last.md": lambda: inference_small("channels_last"),
    "gpu_eager.md": gpu_eager,
    "gpu_compile.md": gpu_compile,
    "compile_cpu.md": compile_cpu,
    "inference_frontier.md": inference_frontier,
    "compile_memory.md": compile_memory,
    "detection.md": detection,
    "analysis_example.md": analysis_example,
}


def _between(text: str, start: str, end: str, block: str) -> str:
    if start not in text or end not in text:
        raise ValueError(f"README.md lacks the {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{block}{end}{tail}"


def readme_with_headline(text: str, block: str) -> str:
    """README with its generated tables replaced: the headline, the branch-node rows, the frontier,
    the small models' speed."""
    text = _between(text, HEADLINE_START, HEADLINE_END, block)
    if BRANCH_START in text:
        text = _between(text, BRANCH_START, BRANCH_END, branch_results(_branch_study()))
    if FRONTIER_START in text:
        text = _between(text, FRONTIER_START, FRONTIER_END, frontier())
    if SMALL_START in text:
        text = _between(text, SMALL_START, SMALL_END, small_perf())
    return text


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if README's headline table is stale")
    args = p.parse_args(argv)
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    new = readme_with_headline(text, headline(_study()))
    if args.check:
        if new != text:
            print(
                "README.md: the headline table differs from experiments/study/results/summary.json; "
                "run python scripts/render_tables.py",
                file=sys.stderr,
            )
            return 1
        for make in SNIPPETS.values():  # every table still renders from its file
            make()
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, make in SNIPPETS.items():
        (OUT / name).write_text(make(), encoding="utf-8")
    img = OUT / "img"
    img.mkdir(exist_ok=True)
    for name, src in FIGURES.items():
        shutil.copyfile(ROOT / src, img / name)
    if new != text:
        readme.write_text(new, encoding="utf-8")
        print("README.md: headline table updated")
    print(f"wrote {len(SNIPPETS)} tables and {len(FIGURES)} figures to {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
