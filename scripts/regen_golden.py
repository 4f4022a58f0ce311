"""Regenerate tests/golden/profile.json: params and MACs of every registered model x wiring.

    python scripts/regen_golden.py

Also the branch form (``node="branch"``) of every DAG wiring. Counts come from dynwire.analysis.profile (meta device, torch's FLOP counter) at each model's
default input size with 1000 classes. Review the diff before committing it.
"""

from __future__ import annotations

import json
import os

import torch

import dynwire
from dynwire.analysis.profile import profile_model

BRANCH_WIRINGS = [w for w in dynwire.WIRINGS if w != "sequential"]
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "golden", "profile.json")


def main() -> None:
    doc = {"torch": torch.__version__.split("+")[0], "num_classes": 1000, "models": {}, "branch": {}}
    for name in dynwire.list_models():
        doc["models"][name] = {}
        for wiring in dynwire.WIRINGS:
            row = profile_model(name, wiring)
            doc["models"][name][wiring] = {"input_size": list(row.input_size), "params": row.params, "macs": row.macs}
        # branch nodes (WiringConfig.node): the same parameters, the block-internal additions gone
        doc["branch"][name] = {}
        for wiring in BRANCH_WIRINGS:
            row = profile_model(name, wiring, node="branch")
            doc["branch"][name][wiring] = {"input_size": list(row.input_size), "params": row.params, "macs": row.macs}
        print(name, {w: v["params"] for w, v in doc["models"][name].items()})
    with open(OUT, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
