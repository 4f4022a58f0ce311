"""scripts/frontier.py: cells, equal-cost pairing and paired differences from a study's results.csv."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import frontier  # noqa: E402

FIELDS = ["run", "model", "wiring", "options", "seed", "status", "top1", "macs", "executed_macs"]
WIDE = "model.wiring_kwargs.node=branch train.budget.target=0.325 model.wiring_kwargs.router_weight_std=0.2"


def _write(path: Path, rows: list[dict]) -> None:
    with (path / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})


def test_budget_cells_pair_with_the_static_network_of_nearest_macs(tmp_path: Path) -> None:
    rows = []
    for seed, (a20, a56, b) in enumerate([(88.0, 89.0, 88.5), (88.4, 88.6, 89.4), (87.9, 89.2, 88.6)]):
        rows += [
            dict(model="cifar_resnet20", wiring="sequential", seed=seed, status="done", top1=a20, macs=31e6),
            dict(model="cifar_resnet56", wiring="sequential", seed=seed, status="done", top1=a56, macs=96e6),
            dict(
                run=f"b{seed}",
                model="cifar_resnet56",
                wiring="dynamic",
                options=WIDE,
                seed=seed,
                status="done",
                top1=b,
                macs=97e6,
                executed_macs=30e6,
            ),
        ]
    rows.append(dict(model="cifar_resnet56", wiring="dynamic", options=WIDE, seed=3, status="busy"))
    _write(tmp_path, rows)
    assert frontier.main(["--results", str(tmp_path), "--no-plot"]) == 0
    s = json.loads((tmp_path / "frontier.json").read_text())
    b = s["cifar_resnet56 budget 0.325, wide routers"]
    assert b["equal_cost"] == "cifar_resnet20 sequential" and b["seeds"] == [0, 1, 2]
    assert b["vs_equal_cost"]["diffs"] == pytest.approx([0.5, 1.0, 0.7])
    assert b["vs_equal_cost"]["mean"] == pytest.approx(0.7333, abs=1e-4)
    assert b["vs_equal_cost"]["ci_low"] > 0  # 3 positive diffs close together
    assert b["vs_dense"]["diffs"] == pytest.approx([-0.5, 0.8, -0.6])
    assert b["mac_fraction"] == pytest.approx(30 / 96)
    assert "| `cifar_resnet56 budget 0.325, wide routers` | 3 |" in (tmp_path / "frontier.md").read_text()
    # analyses written earlier (dynwire analyze's executed_macs) are read back into the per-sample table
    for seed, cv in enumerate([0.02, 0.15, 0.01]):
        d = tmp_path / "analysis" / f"b{seed}"
        d.mkdir(parents=True)
        em = dict(
            cv=cv, vs_reference_loss_spearman=0.1 * seed, vs_loss_spearman=None, removal="per-sample", min=1, max=2
        )
        # last stage: edges of mean 0.5 with std 0.05 * (seed + 1); an edge never open (mean 0) is left out
        stage = dict(mean=[[None, None], [0.5, 0.0]], std=[[None, None], [0.05 * (seed + 1), 0.0]])
        (d / "analysis.json").write_text(json.dumps({"executed_macs": em, "stages": {"layer1": {}, "layer3": stage}}))
    assert frontier.main(["--results", str(tmp_path), "--no-plot"]) == 0
    ps = json.loads((tmp_path / "frontier.json").read_text())["cifar_resnet56 budget 0.325, wide routers"]["per_sample"]
    assert ps["macs_cv"] == [0.02, 0.15, 0.01] and ps["spearman_reference_loss"] == [0.0, 0.1, 0.2]
    assert ps["last_stage_spread"] == pytest.approx([0.1, 0.2, 0.3])
    assert (
        "| `cifar_resnet56 budget 0.325, wide routers` | 0, 1, 2 | 0.10, 0.20, 0.30 | per-sample | 2.00, 15.00, 1.00 "
        "| +0.00, +0.10, +0.20 |" in (tmp_path / "frontier.md").read_text()
    )


def test_without_dense_runs_the_fractions_use_the_counted_dense_model(tmp_path: Path) -> None:
    """A study without dense resnet56 runs (experiments/frontier_long): MAC fractions of the dense
    model counted at the studies' input, and no column against it."""
    rows = []
    for seed in range(2):
        rows += [
            dict(model="cifar_resnet20", wiring="sequential", seed=seed, status="done", top1=90.0 + seed, macs=31e6),
            dict(run=f"b{seed}", model="cifar_resnet56", wiring="dynamic", options=WIDE, seed=seed, status="done",
                 top1=90.5, macs=97e6, executed_macs=30e6),
        ]  # fmt: skip
    _write(tmp_path, rows)
    assert frontier.main(["--results", str(tmp_path), "--no-plot"]) == 0
    b = json.loads((tmp_path / "frontier.json").read_text())["cifar_resnet56 budget 0.325, wide routers"]
    assert "vs_dense" not in b and b["vs_equal_cost"]["diffs"] == pytest.approx([0.5, -0.5])
    assert b["mac_fraction"] == pytest.approx(30 / 96.05, rel=0.01)  # resnet56 at 1x28x28: 96.05 M MACs
