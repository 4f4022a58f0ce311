"""Connectivity analysis (App. 6.5): streaming statistics against brute force, removed nodes, Fig. 7 picks, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_fmnist_fixture

import dynwire
from dynwire.analysis.connectivity import ConnectivityAccumulator, StageStats, main_analyze
from dynwire.cli import main as cli_main
from dynwire.engine import build_model, build_split, load_config
from dynwire.engine.checkpoint import CKPT_VERSION
from dynwire.engine.config import config_to_dict


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tril_mask(n: int) -> np.ndarray:
    return np.tril(np.ones((n, n), dtype=bool), k=-1)


def _random_batches(n_total: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.as_tensor(_tril_mask(n))
    adj = torch.rand(n_total, n, n, generator=g) * mask
    adj[adj < 0.25] = 0.0  # some closed edges
    labels = torch.randint(0, 3, (n_total,), generator=g)
    logits = torch.randn(n_total, 3, generator=g)
    return adj, labels, logits


def _none_removed(adj: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"s": torch.zeros(adj.shape[0], adj.shape[1], dtype=torch.bool)}


# --------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("batch", [1, 7, 50])
def test_streaming_mean_std_per_class_match_brute_force(batch: int) -> None:
    n, total = 5, 50
    adj, labels, logits = _random_batches(total, n)
    mask = _tril_mask(n)
    acc = ConnectivityAccumulator({"s": mask}, num_classes=3, per_class=0, top_k=0)
    for i in range(0, total, batch):
        a = adj[i : i + batch]
        acc.update({"s": a}, logits[i : i + batch], labels[i : i + batch], removed=_none_removed(a), macs=a.sum((1, 2)))
    st = acc.stages["s"]
    a = adj.double().numpy()
    np.testing.assert_allclose(st.mean()[mask], a.mean(0)[mask], atol=1e-12)
    np.testing.assert_allclose(st.std()[mask], a.std(0, ddof=1)[mask], atol=1e-12)
    assert np.isnan(st.mean()[~mask]).all()
    for c in range(3):
        np.testing.assert_allclose(st.class_mean()[c][mask], a[labels.numpy() == c].mean(0)[mask], atol=1e-12)
    closed = ((a == 0) & mask).sum() / (mask.sum() * total)
    assert st.closed_share() == pytest.approx(closed)
    assert acc.count == total
    assert acc.open_edges == [int(((a[k] != 0) & mask).sum()) for k in range(total)]
    pred = logits.argmax(1)
    assert acc.correct == int((pred == labels).sum())


def test_node_order_statistics_hand_computed() -> None:
    n = 4
    st = StageStats("s", 0, _tril_mask(n), num_classes=1)
    # identical samples: mean = m, std = 0; second batch shifts edge (3, 2) for a known std
    m = np.zeros((n, n))
    m[1, 0], m[2, 0], m[3, 0] = 0.9, 0.8, 0.7  # node 0 out: mean 0.8
    m[2, 1], m[3, 1] = 0.6, 0.4  # node 1 out: mean 0.5
    m[3, 2] = 0.2  # node 2 out: 0.2
    x = torch.tensor(np.stack([m, m]), dtype=torch.float32)
    x[1, 3, 2] = 0.4  # edge 2->3 takes 0.2 and 0.4: mean 0.3, sample std 0.1414
    st.update(x, None, torch.zeros(2, dtype=torch.long), torch.zeros(2, n, dtype=torch.bool))
    o = st.node_order_stats()
    assert o["senders"] == [0, 1, 2] and o["receivers"] == [1, 2, 3]
    np.testing.assert_allclose(o["out_edge_mean"], [0.8, 0.5, 0.3], atol=1e-6)
    np.testing.assert_allclose(o["out_edge_std"], [0.0, 0.0, np.sqrt(0.02)], atol=1e-6)
    np.testing.assert_allclose(o["in_edge_std"], [0.0, 0.0, np.sqrt(0.02) / 3], atol=1e-6)
    assert o["out_mean_vs_order"]["spearman"] == pytest.approx(-1.0)
    assert o["out_mean_vs_order"]["slope_per_step"] == pytest.approx(-0.25, abs=1e-6)  # (0.3 - 0.8) / 2
    assert o["in_std_vs_order"]["spearman"] == pytest.approx(np.sqrt(3) / 2)  # ranks (1.5, 1.5, 3) vs (1, 2, 3)


def test_most_least_confident_and_per_class_samples() -> None:
    n = 3
    mask = _tril_mask(n)
    conf_logits = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 9.0], [0.2, 0.0]])
    labels = torch.tensor([0, 0, 1, 0, 1, 1])
    adj = torch.rand(6, n, n) * torch.as_tensor(mask)
    acc = ConnectivityAccumulator({"s": mask}, num_classes=2, per_class=1, top_k=2)
    for i in range(0, 6, 4):  # batches of 4 and 2
        a = adj[i : i + 4]
        acc.update(
            {"s": a},
            conf_logits[i : i + 4],
            labels[i : i + 4],
            removed=_none_removed(a),
            macs=torch.ones(len(a)),
            images=torch.zeros(4, 1, 2, 2),
        )
    assert [r.index for r in acc.most_confident] == [4, 1]
    assert [r.index for r in acc.least_confident] == [0, 5]
    assert {c: [r.index for r in rs] for c, rs in acc.class_samples.items()} == {0: [0], 1: [2]}
    np.testing.assert_allclose(acc.most_confident[0].adjacency["s"], adj[4].numpy())


def test_recorded_removed_nodes_and_macs_are_used() -> None:
    n = 3
    mask = _tril_mask(n)
    adj = torch.ones(4, n, n) * torch.as_tensor(mask)
    removed = torch.tensor([[False, True, False]] * 4)
    macs = torch.tensor([1e6, 2e6, 3e6, 4e6])
    acc = ConnectivityAccumulator({"s": mask}, num_classes=2, per_class=1, top_k=1)
    logits = torch.tensor([[4.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
    acc.update({"s": adj}, logits, torch.tensor([0, 0, 1, 1]), removed={"s": removed}, macs=macs)
    s = acc.summary(["a", "b"])
    st = s["stages"]["s"]
    assert st["removed_share_per_node"] == [0.0, 1.0, 0.0]
    em = s["executed_macs"]
    assert em["n"] == 4 and em["mean"] == pytest.approx(2.5e6) and em["median"] == pytest.approx(2.5e6)
    assert em["mean_correct"] == pytest.approx(2.5e6)  # samples 0 and 3 are right
    assert s["samples"]["most_confident"][0]["macs"] == 1e6
    assert s["samples"]["per_class"]["a"][0]["removed_nodes"] == {"s": [1]}


def test_per_sample_compute_summary_against_plain_numpy() -> None:
    n = 3
    mask = _tril_mask(n)
    adj = torch.ones(6, n, n) * torch.as_tensor(mask)
    logits = torch.tensor([[4.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0], [1.0, 0.0], [0.0, 0.5]])
    labels = torch.tensor([0, 0, 1, 1, 0, 1])
    ref = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 0.1], [0.5, 0.0], [0.0, 4.0]])
    macs = torch.tensor([5e6, 1e6, 6e6, 2e6, 4e6, 3e6])
    removed = torch.zeros(6, n, dtype=torch.bool)
    removed[macs < 5e6, 1] = True
    acc = ConnectivityAccumulator({"s": mask}, num_classes=2, per_class=0, top_k=2)
    for i in (0, 3):
        acc.update(
            {"s": adj[i : i + 3]},
            logits[i : i + 3],
            labels[i : i + 3],
            removed={"s": removed[i : i + 3]},
            macs=macs[i : i + 3],
            reference_logits=ref[i : i + 3],
        )
    em = acc.summary(["a", "b"])["executed_macs"]
    from scipy import stats as sps

    own = torch.nn.functional.cross_entropy(logits, labels, reduction="none").numpy()
    ref_loss = torch.nn.functional.cross_entropy(ref, labels, reduction="none").numpy()
    assert em["vs_loss_spearman"] == pytest.approx(sps.spearmanr(macs.numpy(), own).statistic)
    assert em["vs_reference_loss_spearman"] == pytest.approx(sps.spearmanr(macs.numpy(), ref_loss).statistic)
    assert em["cv"] == pytest.approx(macs.numpy().std(ddof=1) / macs.numpy().mean())
    assert em["removal"] == "per-sample" and em["distinct_values"] == 6
    assert em["per_class_mean"] == {
        "a": {"n": 3, "mean": pytest.approx(10e6 / 3)},
        "b": {"n": 3, "mean": pytest.approx(11e6 / 3)},
    }
    assert [r.index for r in acc.cheapest] == [1, 3] and [r.index for r in acc.most_expensive] == [2, 0]
    with pytest.raises(ValueError, match="same classes"):
        acc.update(
            {"s": adj[:1]},
            logits[:1],
            labels[:1],
            removed={"s": removed[:1]},
            macs=macs[:1],
            reference_logits=ref[:1, :1],
        )


@pytest.mark.parametrize("remove", [False, True])
def test_equal_macs_for_every_sample_is_static_or_no_removal(remove: bool) -> None:
    n = 3
    mask = _tril_mask(n)
    adj = torch.ones(4, n, n) * torch.as_tensor(mask)
    removed = torch.zeros(4, n, dtype=torch.bool)
    removed[:, 1] = remove
    acc = ConnectivityAccumulator({"s": mask}, num_classes=2, per_class=0, top_k=0)
    acc.update(
        {"s": adj}, torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]), removed={"s": removed}, macs=torch.full((4,), 2e6)
    )
    em = acc.summary()["executed_macs"]
    assert em["removal"] == ("static" if remove else "none") and em["cv"] == 0.0
    assert em["vs_reference_loss_spearman"] is None


# --------------------------------------------------------------------------- end to end
TINY = [
    "data.image_size=12",
    "data.batch_size=16",
    "data.subset=null",
    "data.val_subset=null",
    "model.wiring_kwargs.router_bias=0",
]


def _checkpoint(tmp_path: Path, data: Path, wiring: str, tau: float | None = None) -> tuple[Path, object]:
    # block form: its untrained routers spread enough that a threshold of 0.5 removes nodes for some samples only
    cfg = load_config(
        "fmnist_resnet20", [*TINY, f"model.wiring={wiring}", "model.wiring_kwargs.node=block", f"data.root={data}"]
    )
    _, info = build_split(cfg, "val", train=False)
    torch.manual_seed(0)
    model = build_model(cfg, info)
    sd = model.state_dict()
    if tau is not None:  # router outputs start near sigmoid(0) = 0.5: a threshold there closes about half
        for k in sd:
            if k.endswith("edges.tau"):
                sd[k].fill_(tau)
    path = tmp_path / f"{wiring}.pt"
    # as the trainer writes it (version 2: the config's node form is what the model was built with)
    torch.save(
        {"version": CKPT_VERSION, "model": sd, "config": config_to_dict(cfg), "epoch": 1, "global_step": 3}, path
    )
    return path, cfg


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fmnist_fixture(tmp_path_factory.mktemp("fmnist"), n_train=16, n_test=40)


def test_analyze_cli_end_to_end_matches_direct_recording(tmp_path: Path, fmnist: Path, capsys) -> None:
    ckpt, cfg = _checkpoint(tmp_path, fmnist, "dynamic", tau=0.5)
    out = tmp_path / "ana"
    ref_ckpt, ref_cfg = _checkpoint(tmp_path, fmnist, "sequential")
    args = [str(ckpt), "--out", str(out), "--batch-size", "7", "--per-class", "1", "--top-k", "2"]
    rc = main_analyze([*args, "--reference", str(ref_ckpt)])
    assert rc == 0
    assert "analyzed 40 images" in capsys.readouterr().out
    s = json.loads((out / "analysis.json").read_text())
    expected_figs = {
        "fig5_mean",
        "fig6_std",
        "router_mean",
        "closed_share",
        "per_class_mean",
        "order_trends",
        "fig7_per_class",
        "fig7_most_confident",
        "fig7_least_confident",
        "open_edges_hist",
        "macs_hist",
        "fig7_cheapest",
        "fig7_most_expensive",
    }
    assert set(s["figures"]) == expected_figs
    for f in s["figures"].values():
        assert (out / f).stat().st_size > 1000
    md = (out / "analysis.md").read_text()
    assert "![fig5_mean](fig5_mean.png)" in md and "Observation (2)" in md and "Observation (4)" in md
    assert s["images"] == 40 and s["meta"]["wiring"] == "dynamic"
    assert len(s["samples"]["per_class"]) == 10 and len(s["samples"]["most_confident"]) == 2

    # brute force: all 40 images in one batch
    ds, info = build_split(cfg, "val", train=False)
    model = build_model(cfg, info)
    model.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    model.eval()
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad(), dynwire.record_adjacency(model) as rec:
        logits = model(x)
    y = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
    assert s["top1"] == pytest.approx(100.0 * float((logits.argmax(1) == y).float().mean()))
    closed_any = removed_any = False
    for name, a in rec.items():
        st = s["stages"][name]
        n = a.shape[1]
        mask = np.tril(np.ones((n, n), dtype=bool), -1)
        got = np.array([[np.nan if v is None else v for v in row] for row in st["mean"]])
        np.testing.assert_allclose(got[mask], a.double().mean(0).numpy()[mask], atol=2e-5)
        got = np.array([[np.nan if v is None else v for v in row] for row in st["std"]])
        np.testing.assert_allclose(got[mask], a.double().std(0).numpy()[mask], atol=2e-5)
        closed = float(((a == 0).numpy() & mask).sum() / (mask.sum() * len(ds)))
        assert st["closed_edge_share"] == pytest.approx(closed)
        closed_any |= closed > 0
        removed = rec.removed[name]
        np.testing.assert_allclose(st["removed_share_per_node"], removed.double().mean(0).numpy(), atol=1e-12)
        removed_any |= bool(removed.any())
    assert closed_any and removed_any, "tau=0.5 should close some edges and remove some nodes"
    em = s["executed_macs"]
    assert em["n"] == 40 and em["mean"] == pytest.approx(float(rec.macs.double().mean()), rel=1e-9)
    assert em["min"] < em["max"], "removed nodes should make the executed MACs vary by sample"
    assert "Executed MACs per sample" in md and "![macs_hist](macs_hist.png)" in md
    assert em["removal"] == "per-sample" and "Removal is **per-sample**" in md
    # the reference's difficulty: the sequential model's per-image loss on the same images, by brute force
    ref_model = build_model(ref_cfg, info)
    ref_model.load_state_dict(torch.load(ref_ckpt, weights_only=True)["model"])
    with torch.no_grad():
        ref_loss = torch.nn.functional.cross_entropy(ref_model.eval()(x), y, reduction="none")
    from scipy import stats as sps

    want = sps.spearmanr(rec.macs.double().numpy(), ref_loss.numpy()).statistic
    assert em["vs_reference_loss_spearman"] == pytest.approx(want, abs=1e-6)
    assert s["meta"]["reference"] == str(ref_ckpt)
    cheap = s["samples"]["cheapest"]
    assert len(cheap) == 2 and cheap[0]["macs"] == pytest.approx(float(rec.macs.min()))
    assert s["samples"]["most_expensive"][0]["macs"] == pytest.approx(float(rec.macs.max()))


def test_analyze_sequential_max_images_without_plots(tmp_path: Path, fmnist: Path) -> None:
    ckpt, _ = _checkpoint(tmp_path, fmnist, "sequential")
    out = tmp_path / "seq"
    assert main_analyze([str(ckpt), "--out", str(out), "--max-images", "13", "--no-plots"]) == 0
    s = json.loads((out / "analysis.json").read_text())
    assert s["images"] == 13 and s["figures"] == {}
    st = s["stages"]["layer1"]
    assert st["closed_edge_share"] == 0.0 and st["node_order"]["mean_edge_std"] == 0.0
    assert st["mean"][1][0] == 1.0 and st["mean"][2][0] is None  # a chain: only j = i + 1 edges exist
    assert not list(out.glob("*.png"))
    assert st["removed_node_share"] == 0.0  # nothing can be removed from a chain
    assert s["executed_macs"] is None  # rec.macs does not count the blocks of chain stages


def test_analyze_cli_errors(tmp_path: Path, capsys) -> None:
    assert main_analyze([str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main_analyze([str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o"), "--max-images", "0"]) == 2


def test_dynwire_analyze_command(tmp_path: Path, fmnist: Path, capsys) -> None:
    ckpt, _ = _checkpoint(tmp_path, fmnist, "dynamic", tau=0.5)
    out = tmp_path / "cli"
    assert cli_main(["analyze", str(ckpt), "--out", str(out), "--max-images", "8", "--no-plots"]) == 0
    assert "analyzed 8 images" in capsys.readouterr().out
    assert json.loads((out / "analysis.json").read_text())["images"] == 8
    assert cli_main(["analyze", str(tmp_path / "missing.pt"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dynwire analyze: error: ") and "missing.pt" in err
    assert cli_main(["analyze", str(ckpt), "--out", str(out), "--batch-size", "0"]) == 2
    assert capsys.readouterr().err.startswith("dynwire analyze: error: --batch-size must be >= 1")
