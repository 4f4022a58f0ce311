"""Scale of the features and logits at initialisation, per model and wiring.

A complete DAG sums every earlier block output into each node (Eq. 3, no normalisation), so
inside a stage the activations grow roughly like ``(1 + w)^j`` with the edge weight ``w`` at
initialisation (router bias +3: ``w = 0.95 * sigmoid(0.95 - tau)`` in training). Stages that
start with a projection shortcut reset the scale; a long *last* stage feeds it to the classifier.

    python scripts/init_scale.py                      # cifar_resnet20 / cifar_resnet56, 28x28 grey
    python scripts/init_scale.py --models resnet50 --in-chans 3 --size 224 --batch 4
"""

from __future__ import annotations

import argparse

import torch

import dynwire


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["cifar_resnet20", "cifar_resnet56"])
    ap.add_argument("--wirings", nargs="+", default=["sequential", "static", "dynamic"])
    ap.add_argument("--in-chans", type=int, default=1)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    x = torch.randn(args.batch, args.in_chans, args.size, args.size)
    print(f"{'model':<16} {'wiring':<11} {'feature std':>11} {'logit std':>9}  (training mode, seed {args.seed})")
    for name in args.models:
        for wiring in args.wirings:
            torch.manual_seed(args.seed)
            m = dynwire.create_model(name, wiring=wiring, num_classes=10, in_chans=args.in_chans).train()
            with torch.no_grad():
                feats = m.forward_features(x)
                logits = m.forward_head(feats)
            print(f"{name:<16} {wiring:<11} {feats.std().item():>11.2f} {logits.std().item():>9.2f}")


if __name__ == "__main__":
    main()
