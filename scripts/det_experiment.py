"""Sequential vs dynamic Faster R-CNN + FPN on the Fashion-MNIST scenes (CPU-scale Table 2).

python scripts/det_experiment.py train   # makes the scenes if missing, trains both wirings side by side
python scripts/det_experiment.py report  # (re-)evaluates both last.pt on val -> experiments/det_fmnist_scenes/

`train` runs one subprocess per wiring (one thread each, logs in runs/<name>/train.log) and prints
their progress; rerun the same command after an interruption and both resume from last.pt.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

from dynwire.detection import (  # noqa: E402
    TABLE2_COLUMNS,
    coco_eval_from_results,
    coco_split_paths,
    draw_detections,
    evaluate_detector_checkpoint,
    load_detection_config,
    load_detector,
    make_scenes,
    profile_detector,
    read_image,
    train_detector,
)

WIRINGS = ("sequential", "dynamic")
RECIPE = "det_fmnist_scenes"


def overrides(args: argparse.Namespace, wiring: str) -> list[str]:
    o = [
        f"model.wiring={wiring}",
        f"output.name={RECIPE}_{wiring}",
        f"data.root={args.root}",
        f"output.dir={args.runs}",
    ]
    o += ["train.num_threads=1", "train.progress=false", f"train.eval_every_iters={args.eval_every}"]
    if args.iters:  # warm-up 1/15, steps at 2/3 and 13/15 of the schedule, as the recipe's 200, 2000, 2600 of 3000
        n = args.iters
        o += [
            f"schedule.iters={n}",
            f"schedule.warmup_iters={n // 15}",
            f"schedule.steps=[{2 * n // 3}, {13 * n // 15}]",
        ]
    return o


def run_dir(args: argparse.Namespace, wiring: str) -> Path:
    return Path(args.runs) / f"{RECIPE}_{wiring}"


def ensure_scenes(args: argparse.Namespace) -> None:
    for split, n in (("train", 4000), ("val", 500)):
        if not coco_split_paths(args.root, split)[1].is_file():
            print(f"making {n} {split} scenes in {args.root} ...", flush=True)
            print(make_scenes(args.root, split, n, image_size=192, seed=0, fmnist_root=args.fmnist_root), flush=True)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def cmd_run_one(args: argparse.Namespace) -> None:
    cfg = load_detection_config(RECIPE, overrides(args, args.wiring))
    print(json.dumps(train_detector(cfg, run_dir(args, args.wiring)), indent=2), flush=True)


def cmd_train(args: argparse.Namespace) -> None:
    ensure_scenes(args)
    pids = {}
    for w in WIRINGS:
        out = run_dir(args, w)
        out.mkdir(parents=True, exist_ok=True)
        pid_file = out / "train.pid"
        if pid_file.is_file() and alive(int(pid_file.read_text())):
            pids[w] = int(pid_file.read_text())  # already training: watch it
            continue
        cmd = [sys.executable, __file__, "--root", args.root, "--runs", args.runs, "--eval-every", str(args.eval_every)]
        cmd += ["--iters", str(args.iters)] if args.iters else []
        cmd += ["run-one", "--wiring", w]
        with open(out / "train.log", "a") as log:
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        pid_file.write_text(str(p.pid))
        pids[w] = p.pid
        print(f"{w}: pid {p.pid}: {' '.join(cmd)}", flush=True)
    while True:
        for pid in pids.values():  # reap finished children so alive() sees them gone
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        running = {w: alive(pid) for w, pid in pids.items()}
        line = []
        for w in WIRINGS:
            r = ([r for r in read_metrics(run_dir(args, w) / "metrics.jsonl") if "loss" in r] or [None])[-1]
            s = (
                f"it {r['iter']} loss {r['loss']:.3f} {1 / r['s_per_iter']:.2f} it/s ETA {r['eta_s'] / 60:.0f} min"
                if r
                else ""
            )
            line.append(f"{w}: {s or 'starting'}{'' if running[w] else ' (stopped)'}")
        print(time.strftime("%H:%M:%S ") + " | ".join(line), flush=True)
        if not any(running.values()):
            break
        time.sleep(args.every)
    for w in WIRINGS:
        final = run_dir(args, w) / "final.json"
        print(w, final.read_text() if final.is_file() else f"no final.json: see {run_dir(args, w) / 'train.log'}")


def evaluate_one(ckpt: str) -> dict:
    torch.set_num_threads(1)
    t = time.perf_counter()
    m = evaluate_detector_checkpoint(ckpt, device="cpu")
    m.pop("summary")
    return {**m, "eval_s_per_image": (time.perf_counter() - t) / m["images"]}


def fold_aps(args: argparse.Namespace, evals: dict, folds: int = 5) -> dict:
    """AP of each wiring on `folds` disjoint slices of the val images (paired: same images for both)."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(coco_split_paths(args.root, "val")[1]))
    ids = sorted(gt.getImgIds())
    dets = {w: json.loads(Path(e["detections_json"]).read_text()) for w, e in evals.items()}
    return {w: [coco_eval_from_results(gt, d, ids[k::folds])["AP"] for k in range(folds)] for w, d in dets.items()}


def cmd_report(args: argparse.Namespace) -> None:
    ensure_scenes(args)
    out = Path(args.out)
    (out / "detections").mkdir(parents=True, exist_ok=True)
    ckpts = [str(run_dir(args, w) / "last.pt") for w in WIRINGS]
    with ProcessPoolExecutor(2) as ex:
        evals = dict(zip(WIRINGS, ex.map(evaluate_one, ckpts)))
    torch.set_num_threads(2)
    results: dict = {"recipe": RECIPE, "data_root": args.root, "runs": {}}
    val_dir = coco_split_paths(args.root, "val")[0]
    for w, ckpt in zip(WIRINGS, ckpts):
        cfg = load_detection_config(RECIPE, overrides(args, w))
        m = cfg.model
        kw = dict(norm=m.norm, num_classes=11, backbone_kwargs=m.backbone_kwargs, fpn_channels=m.fpn_channels)
        kw.update(anchor_sizes=m.anchor_sizes, representation_size=m.representation_size, **m.detector_kwargs)
        prof = {f"{h}x{wd}": profile_detector(m.name, w, (h, wd), **kw) for h, wd in ((192, 192), (800, 1333))}
        recs = read_metrics(run_dir(args, w) / "metrics.jsonl")
        steps = [r for r in recs if "loss" in r]
        s_iter = statistics.median(r["s_per_iter"] for r in steps) if steps else None
        results["runs"][w] = {
            "eval": evals[w],
            "profile": prof,
            "train_s_per_iter_median": s_iter,
            "train_time_s_est": sum(r["s_per_iter"] * 20 for r in steps),  # log_every 20
            "curve": [{"iter": r["iter"], "loss": r["loss"]} for r in steps],
            "evals": [{"iter": r["iter"], **r["eval"]} for r in recs if "eval" in r],
            "command": f"train_detector(load_detection_config({RECIPE!r}, {overrides(args, w)}))",
        }
        model, ck = load_detector(ckpt)
        with torch.no_grad():
            for i in range(1, args.draw + 1):
                img = read_image(val_dir / f"{i:06d}.png")
                p = out / "detections" / f"{w}_{i:06d}.png"
                draw_detections(img, model([img])[0], ck["class_names"], 0.5, p, width=1)
                Image.open(p).save(p, optimize=True)
    pre = f"PYTHONPATH=src nice -n 5 python scripts/det_experiment.py --root {args.root} --eval-every {args.eval_every}"
    pre += f" --iters {args.iters}" if args.iters else ""
    results["commands"] = [f"{pre} train", f"{pre} report"]
    results["fold_AP"] = folds = fold_aps(args, evals)
    diff = [d - q for d, q in zip(folds["dynamic"], folds["sequential"])]
    mean, sd = statistics.mean(diff), statistics.stdev(diff)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for w, r in results["runs"].items():
        ax[0].plot([c["iter"] for c in r["curve"]], [c["loss"] for c in r["curve"]], label=w, lw=1)
        ax[1].plot([e["iter"] for e in r["evals"]], [e["AP"] for e in r["evals"]], "o-", label=w)
    ax[0].set(xlabel="iteration", ylabel="training loss (mean of 20 iterations)", yscale="log")
    ax[1].set(xlabel="iteration", ylabel="val box AP (%)")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=90)
    f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    rows = ["| wiring | " + " | ".join(TABLE2_COLUMNS) + " | AR100 | iters |", "| --- |" + " ---: |" * 8]
    rows += [
        f"| {w} | " + " | ".join(f(r["eval"][c]) for c in (*TABLE2_COLUMNS, "AR100")) + f" | {r['eval']['iter']} |"
        for w, r in results["runs"].items()
    ]
    rows += [
        "",
        "| wiring | backbone GMACs 192x192 | detector GMACs 192x192 | backbone GMACs 800x1333 | "
        "detector GMACs 800x1333 | params | train s/iter (median) | eval s/image |",
        "| --- |" + " ---: |" * 7,
    ]
    for w, r in results["runs"].items():
        a, b = r["profile"]["192x192"], r["profile"]["800x1333"]
        rows.append(
            f"| {w} | {a['detector_backbone_gmacs']:.3f} | {a['detector_gmacs']:.3f} | "
            f"{b['detector_backbone_gmacs']:.2f} | {b['detector_gmacs']:.2f} | {a['detector_params']:,} | "
            f"{r['train_s_per_iter_median']:.2f} | {r['eval']['eval_s_per_image']:.3f} |"
        )
    rows += [
        "",
        "AP on 5 disjoint folds of 100 val images: "
        + "; ".join(f"{w} " + ", ".join(f"{a:.1f}" for a in v) for w, v in folds.items())
        + f". Paired dynamic - sequential per fold: mean {mean:+.2f}, sd {sd:.2f} AP.",
    ]
    rows += ["", "Commands:", "", "```bash", *results["commands"], "```", ""]
    rows += [f"- {w}: `{r['command']}`" for w, r in results["runs"].items()]
    (out / "summary.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="data/fmnist_scenes", help="scenes folder (made when missing)")
    ap.add_argument("--fmnist-root", default=None, help="Fashion-MNIST IDX folder (default: searched)")
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--iters", type=int, default=0, help="schedule.iters override (0: the recipe's 3000)")
    ap.add_argument("--eval-every", type=int, default=1000)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--every", type=float, default=60.0, help="seconds between progress lines")
    r = sub.add_parser("report")
    r.add_argument("--out", default="experiments/det_fmnist_scenes")
    r.add_argument("--draw", type=int, default=6, help="val images drawn per wiring")
    one = sub.add_parser("run-one")  # what `train` runs per wiring
    one.add_argument("--wiring", choices=WIRINGS, required=True)
    args = ap.parse_args()
    {"train": cmd_train, "report": cmd_report, "run-one": cmd_run_one}[args.cmd](args)


if __name__ == "__main__":
    main()
