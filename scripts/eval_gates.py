"""Evaluate one checkpoint with each evaluation gate (hard / soft / masked, see README).

python scripts/eval_gates.py runs/<run>/last.pt [--split val] [--subset N]
"""

from __future__ import annotations

import argparse

import torch

import dynwire
from dynwire.engine import load_checkpoint
from dynwire.engine.config import config_from_dict
from dynwire.engine.sampler import make_eval_loader
from dynwire.engine.trainer import build_split, evaluate_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    ck = load_checkpoint(args.checkpoint)
    cfg = config_from_dict(ck["config"])
    val, info = build_split(cfg, "val", train=False)
    model = dynwire.create_model(
        cfg.model.name,
        num_classes=info.num_classes,
        in_chans=info.in_chans,
        wiring=cfg.model.wiring,
        **(cfg.model.wiring_kwargs or {}),
    )
    model.load_state_dict(ck["model"])
    for gate in ("hard", "masked", "soft"):
        model.set_eval_gate(gate)
        r = evaluate_model(model, make_eval_loader(val, args.batch_size), device=torch.device("cpu"))
        print(f"{gate:<7} top1 {r['top1']:.2f}  top5 {r['top5']:.2f}  loss {r['loss']:.4f}  ({r['images']} images)")
    # share of existing edges that Eq. 5 closes (alpha < tau), per stage, over the same images
    model.set_eval_gate("masked")
    model.eval()
    closed: dict[str, list[float]] = {}
    with torch.no_grad(), dynwire.record_adjacency(model) as rec:
        for x, _ in make_eval_loader(val, args.batch_size):
            model(x)
            for name, stage in model.graph_stages():
                exists = stage.edges.edge_mask_matrix().bool()
                shut = (rec[name] == 0) & exists
                c = closed.setdefault(name, [0.0, 0.0])
                c[0] += shut.sum().item()
                c[1] += exists.sum().item() * x.shape[0]
    print("closed edges: " + ", ".join(f"{n} {100 * a / b:.2f}%" for n, (a, b) in closed.items()))


if __name__ == "__main__":
    main()
