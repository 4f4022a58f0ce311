"""The README's main job: train cifar_resnet20 on Fashion-MNIST twice (sequential, dynamic).

    python scripts/demo.py [--config fmnist_resnet20] [--out runs/demo-<time>] [--results DIR]
                           [--set key=value ...]

Each run is a real `dynwire train` process (so its run directory records the exact command,
resolved config, seed and versions). While they train, the terminal shows one live bar per run
(epoch, step, loss, images/s, ETA), drawn from the plain progress lines each run writes to its
log (`<out>/<run>.log`); without a terminal those lines are printed, prefixed with the wiring.
Afterwards a side-by-side table is printed and written, with the training curves, to the output
folder (and copied to --results when given).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import IO, Any

from tqdm import tqdm

from dynwire.engine.logging import parse_progress

WIRINGS = ("sequential", "dynamic")


class RunMonitor:
    """Follows one run's output: copies every line to its log and shows its progress.

    On a terminal (``tty``) a tqdm bar at ``position`` tracks the run's progress lines and
    epoch summaries are printed above the bars; otherwise every progress or epoch line is
    printed to ``stream`` prefixed with the run's name.
    """

    BAR = "{desc:<11}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps [{elapsed}]{postfix}"

    def __init__(self, name: str, log: IO[str], *, position: int, tty: bool, stream: IO[str] | None = None) -> None:
        self.name, self.log, self.tty = name, log, tty
        self.stream = stream if stream is not None else sys.stderr
        self.bar: Any = None
        if tty:
            self.bar = tqdm(
                total=1, desc=name, position=position, bar_format=self.BAR, file=self.stream, dynamic_ncols=True
            )
            self.bar.set_postfix_str("starting")

    def feed(self, line: str) -> None:
        self.log.write(line)
        self.log.flush()
        text = line.rstrip("\n")
        rec = parse_progress(text)
        if rec is None:
            if text.startswith(("[dynwire] epoch", "[dynwire] resumed", "dynwire train: error")):
                self._print(text)
            return
        if self.bar is None:
            self._print(text)
            return
        eta = rec["eta_s"]
        self.bar.total = rec["epochs"] * rec["steps"]
        self.bar.n = (rec["epoch"] - 1) * rec["steps"] + rec["step"]
        self.bar.set_postfix_str(
            f"epoch {rec['epoch']}/{rec['epochs']} step {rec['step']}/{rec['steps']} loss {rec['loss']:.3f} "
            f"{rec['img_per_s']} img/s eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"
        )

    def _print(self, text: str) -> None:
        if self.bar is not None:
            tqdm.write(f"{self.name}: {text}", file=self.stream)
        else:
            print(f"[{self.name}] {text}", file=self.stream, flush=True)

    def follow(self, lines: Any) -> None:
        for line in lines:
            self.feed(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(run_dirs: dict[str, str], out_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for wiring, d in run_dirs.items():
        rows = _read_jsonl(os.path.join(d, "metrics.jsonl"))
        train = [r for r in rows if r.get("kind") == "train" and "loss" in r]
        epochs = [r for r in rows if r.get("kind") == "epoch"]
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label=wiring)
        axes[1].plot([r["epoch"] for r in epochs], [r.get("train_acc") for r in epochs], "o-", label=wiring)
        axes[2].plot([r["epoch"] for r in epochs], [r.get("val_top1") for r in epochs], "o-", label=wiring)
    axes[0].set(title="training loss", xlabel="step")
    axes[1].set(title="training accuracy (%)", xlabel="epoch")
    axes[2].set(title="test top-1 (%)", xlabel="epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="fmnist_resnet20")
    ap.add_argument("--out", default=os.path.join("runs", time.strftime("demo-%Y%m%d-%H%M%S")))
    ap.add_argument("--results", help="also copy summary, curves and metrics here (e.g. experiments/...)")
    ap.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--parallel",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train both wirings at once, one core each (default: when >= 2 CPUs)",
    )
    args = ap.parse_args()

    parallel = args.parallel if args.parallel is not None else (os.cpu_count() or 1) >= 2
    os.makedirs(args.out, exist_ok=True)
    run_dirs, finals, commands = {}, {}, {}
    tty = sys.stderr.isatty()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    running: list[tuple[str, subprocess.Popen, threading.Thread, RunMonitor, IO[str]]] = []

    def wait(jobs: list) -> None:
        for wiring, proc, thread, monitor, log in jobs:
            thread.join()
            code = proc.wait()
            monitor.close()
            log.close()
            if code != 0:
                for other in jobs:
                    other[1].terminate()  # the other run saves last.pt and stops (SIGTERM)
                raise SystemExit(f"the {wiring} run failed (exit {code}); see {log.name}")

    for position, wiring in enumerate(WIRINGS):
        name = f"{args.config}_{wiring}"
        cmd = [
            sys.executable,
            "-m",
            "dynwire.cli",
            "train",
            "--config",
            args.config,
            "--output-dir",
            args.out,
            "--set",
            f"model.wiring={wiring}",
            f"output.name={name}",
            *args.overrides,
        ]
        run_dirs[wiring] = os.path.join(args.out, name)
        commands[wiring] = " ".join(["dynwire", *cmd[3:]])
        log = open(os.path.join(args.out, f"{name}.log"), "w")
        print(f"=== {wiring}: {commands[wiring]}  (log: {log.name})", flush=True)
        # one single-threaded run per core (parallel); its output is followed line by line
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        monitor = RunMonitor(wiring, log, position=position if parallel else 0, tty=tty)
        thread = threading.Thread(target=monitor.follow, args=(proc.stdout,), daemon=True)
        thread.start()
        running.append((wiring, proc, thread, monitor, log))
        if not parallel:
            wait(running)
            running.clear()
    wait(running)
    for wiring in WIRINGS:
        with open(os.path.join(run_dirs[wiring], "final.json")) as f:
            finals[wiring] = json.load(f)
    wall = round(time.time() - t0, 1)

    lines = [
        "| wiring | test top-1 (%) | params | MACs (M) | executed MACs per image (M) | train images/s "
        "| train time (s) | run directory |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for wiring in WIRINGS:
        f = finals[wiring]
        # measured in the final evaluation with removed nodes skipped (Sec. 3.3); a chain runs every block
        executed = f["val"].get("macs", f["macs"])
        lines.append(
            f"| {wiring} | {f['val']['top1']:.2f} | {f['params']:,} | {f['macs'] / 1e6:.2f} | {executed / 1e6:.2f} | "
            f"{f['train_images_per_s']:.0f} | {f['train_time_s']:.0f} | {run_dirs[wiring]} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    val = finals[WIRINGS[0]]["val"]
    print(f"(test top-1 on {val['images']} Fashion-MNIST test images)")
    print(f"\n{'both runs in parallel' if parallel else 'runs one after the other'}: {wall:.0f} s wall")
    summary = {
        "config": args.config,
        "overrides": args.overrides,
        "parallel": parallel,
        "wall_time_s": wall,
        "demo_command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "commands": commands,
        "final": finals,
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(table + "\n")
    plot_curves(run_dirs, os.path.join(args.out, "curves.png"))
    print(f"\nruns saved under {os.path.abspath(args.out)} (summary.md, summary.json, curves.png)")

    if args.results:
        os.makedirs(args.results, exist_ok=True)
        for fname in ("summary.json", "summary.md", "curves.png"):
            shutil.copy(os.path.join(args.out, fname), args.results)
        for wiring, d in run_dirs.items():
            dst = os.path.join(args.results, wiring)
            os.makedirs(dst, exist_ok=True)
            for fname in ("metrics.csv", "final.json", "config.yaml", "run.json"):
                shutil.copy(os.path.join(d, fname), dst)
        print(f"results copied to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
