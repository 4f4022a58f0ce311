"""Evaluate one checkpoint with each evaluation gate (hard / soft / masked, see README).

python scripts/eval_gates.py runs/<run>/best.pt [--batch-size 256]   (the run's validation split, every image)
"""

from __future__ import annotations

import argparse
import types

import torch

import dynwire
from dynwire.data import build_loader
from dynwire.engine import build_model, build_split, config_from_dict, evaluate_model, load_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    ck = load_checkpoint(args.checkpoint)
    cfg = config_from_dict(ck["config"])
    saved = ck.get("data_info")  # classes and input size the model was trained with
    val, info = build_split(cfg, "val", train=False, info=types.SimpleNamespace(**saved) if saved else None)
    model = build_model(cfg, info)
    model.load_state_dict(ck["model"])
    for gate in ("hard", "masked", "soft"):
        model.set_eval_gate(gate)
        r = evaluate_model(model, build_loader(val, args.batch_size, train=False), device=torch.device("cpu"))
        print(f"{gate:<7} top1 {r['top1']:.2f}  top5 {r['top5']:.2f}  loss {r['loss']:.4f}  ({r['images']} images)")
    # share of existing edges that Eq. 5 closes (alpha < tau), per stage, over the same images
    model.set_eval_gate("masked")
    model.eval()
    closed: dict[str, list[float]] = {}
    with torch.no_grad(), dynwire.record_adjacency(model) as rec:
        for x, _ in build_loader(val, args.batch_size, train=False):
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
