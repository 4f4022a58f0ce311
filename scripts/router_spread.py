"""Per-sample spread of the edge weights, stage by stage, from ``dynwire analyze`` outputs (issue 17).

    python scripts/router_spread.py experiments/router_spread/*/analysis.json

For every stage: the largest per-sample standard deviation of an edge weight, and the largest and
median ratio of that std to the edge's mean weight (issue 17's goal: at least 0.10 in the last stage).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(paths: list[str]) -> None:
    for p in paths:
        d = json.loads(Path(p).read_text())
        for k, v in d["stages"].items():
            pairs = [(m, s) for rm, rs in zip(v["mean"], v["std"]) for m, s in zip(rm, rs) if m is not None]
            rel = sorted(s / m for m, s in pairs if m > 0)
            print(
                f"{Path(p).parent.name} {k}: edge std max {max(s for _, s in pairs):.4f}, "
                f"std/mean max {rel[-1]:.3f}, median {rel[len(rel) // 2]:.4f}"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
