"""Do the trained routers carry per-image difficulty? Raise every threshold at test time and see.

    python scripts/threshold_probe.py RUN_OR_CKPT --reference CKPT [--offsets 0 0.05 0.1 0.2 0.3] \
        [--max-images 2000] --out experiments/frontier/results/threshold_probe.json

A budget-trained DG-Net learns thresholds (Eq. 5's tau) at the extremes: above 1 (edge always
closed, node always removed) or near 0 (always open), so its removal is static. This probe adds
one offset to every threshold of the trained model (nothing retrained) and, for each offset, runs
``dynwire analyze``'s pass on the same test images: top-1, executed MACs per image (mean, std/mean)
and their Spearman correlation with ``--reference``'s per-image loss. If the routers' per-image
variation followed difficulty, raising the thresholds would remove more on easy images
(correlation > 0) and cost accuracy slowly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dynwire.analysis.connectivity.collect import analyze_model, load_for_eval, torch_threads


def _checkpoint(path: Path) -> Path:
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: no best.pt or last.pt")
    return path


def probe(checkpoint: Path, reference: Path, offsets: list[float], max_images: int | None, threads: int) -> dict:
    kw = dict(data_dir=None, split="val", max_images=max_images, batch_size=None, overrides=(), use_ema=False)
    ld = load_for_eval(checkpoint, device="cpu", **kw)
    ref = load_for_eval(reference, device="cpu", **kw).model
    stages = [s for _, s in ld.model.graph_stages()]
    if not stages or not all(hasattr(s.edges, "tau") for s in stages):
        raise ValueError(f"{checkpoint}: not a DG-Net with learnable thresholds (wiring 'dynamic')")
    tau0 = [s.edges.tau.detach().clone() for s in stages]
    rows = []
    with torch_threads(threads):
        for off in offsets:
            with torch.no_grad():
                for s, t in zip(stages, tau0):
                    s.edges.tau.copy_(t + off)
            acc = analyze_model(
                ld.model, ld.loader, num_classes=int(ld.info.num_classes), device=ld.device, reference=ref
            )
            rep = acc.summary()  # the report's statistics, without writing its files
            em = rep["executed_macs"]
            row = dict(
                offset=off,
                top1=rep["top1"],
                macs_mean=em["mean"],
                macs_cv=em["cv"],
                removal=em["removal"],
                spearman_reference_loss=em["vs_reference_loss_spearman"],
                spearman_own_loss=em["vs_loss_spearman"],
            )
            rows.append(row)
            print(
                f"[probe] offset {off:+.2f}: top-1 {row['top1']:.2f}, MACs {row['macs_mean'] / 1e6:.2f} M, "
                f"std/mean {100 * row['macs_cv']:.2f}%, Spearman vs reference loss "
                f"{row['spearman_reference_loss'] if row['spearman_reference_loss'] is not None else float('nan'):+.2f}",
                file=sys.stderr,
                flush=True,
            )
    taus = {n: [round(v, 3) for v in t.tolist()] for (n, _), t in zip(ld.model.graph_stages(), tau0)}
    return dict(checkpoint=str(checkpoint), images=rep["images"], trained_thresholds=taus, rows=rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories or checkpoints (DG-Net, wiring dynamic)")
    p.add_argument("--reference", type=Path, required=True, help="checkpoint whose per-image loss is the difficulty")
    p.add_argument("--offsets", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.3])
    p.add_argument("--max-images", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True, help="JSON file (one entry per run; existing entries kept)")
    args = p.parse_args(argv)
    out = json.loads(args.out.read_text()) if args.out.is_file() else {}
    out["command"] = " ".join(["python scripts/threshold_probe.py", *(argv if argv is not None else sys.argv[1:])])
    runs = out.setdefault("runs", {})
    for r in args.runs:
        ck = _checkpoint(r)
        runs[r.name if r.is_dir() else ck.parent.name] = probe(
            ck, _checkpoint(args.reference), args.offsets, args.max_images, args.threads
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
