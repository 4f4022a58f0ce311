"""Every stage's output standard deviation at initialisation, per model, wiring and node form.

A complete DAG of whole blocks (``node="block"``) sums every earlier block output, its shortcut
included, into each node (Eq. 3, no normalisation): inside a stage the scale grows roughly like
``(1 + w)^j``. Branch nodes (``node="branch"``, the unrolled ResNet) keep the chain's scale.
Training mode (BatchNorm on batch statistics), as at the first training step.

    python scripts/init_scale.py                                  # every registered model
    python scripts/init_scale.py --models cifar_resnet56 --json out.json
"""

from __future__ import annotations

import argparse
import json

import torch

import dynwire
from dynwire._registry import get_model_cfg
from dynwire.analysis.scale import stage_output_stds

FORMS = [
    ("sequential", "block"),
    ("static", "block"),
    ("static", "branch"),
    ("dynamic", "block"),
    ("dynamic", "branch"),
]


def measure(name: str, size: int | None, batch: int, seed: int) -> list[dict]:
    c, h, _ = get_model_cfg(name).input_size
    size = size or (32 if h <= 32 else 160)
    torch.manual_seed(seed)
    x = torch.randn(batch, c, size, size)
    rows = []
    for wiring, node in FORMS:
        torch.manual_seed(seed)
        m = dynwire.create_model(name, wiring=wiring, node=node, num_classes=10).train()
        stds = stage_output_stds(m, x)
        rows.append(dict(model=name, wiring=wiring, node=node, size=size, stds=stds))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None, help="default: every registered model")
    ap.add_argument("--size", type=int, default=None, help="input size (default: 32 for small-input models, else 160)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()
    rows = []
    print("| model | wiring | node | stage output std (stage by stage) | max ratio to sequential |")
    print("| --- | --- | --- | --- | ---: |")
    for name in args.models or dynwire.list_models():
        res = measure(name, args.size, args.batch, args.seed)
        base = res[0]["stds"]
        for r in res:
            stages = [k for k in r["stds"] if k != "logits"]
            ratio = max(max(r["stds"][k] / base[k], base[k] / r["stds"][k]) for k in stages)
            r["max_ratio"] = ratio
            text = " / ".join(f"{r['stds'][k]:.3g}" for k in stages)
            print(f"| {name} | {r['wiring']} | {r['node']} | {text} | {ratio:.3g} |", flush=True)
        rows += res
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(seed=args.seed, batch=args.batch, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
