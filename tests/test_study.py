"""Study runner: grid expansion, statistics on hand-made runs, a tiny grid end to end, kill and resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_fmnist_fixture

from dynwire.cli import main as cli_main
from dynwire.study import (
    STATUS_FILE,
    _lock_busy,
    aggregate,
    expected_config,
    load_study,
    main_study,
    run_status,
    study_from_dict,
)
from dynwire.study.runner import _estimator, _finished_durations

GRID = {
    "name": "unit",
    "recipe": {"config": "fmnist_resnet20", "set": ["schedule.epochs=1"]},
    "groups": [
        {"name": "core", "models": ["cifar_resnet20"], "wirings": ["sequential", "static", "dynamic"], "seeds": 3},
        {
            "name": "bias",
            "models": ["cifar_resnet20"],
            "wirings": ["dynamic"],
            "options": {"bias +3": [], "bias -3": ["model.wiring_kwargs.router_bias=-3"]},
            "seeds": [0, 1],
            "reference": "bias +3",
        },
    ],
}


def _study(tmp_path: Path, raw: dict | None = None):
    return study_from_dict(raw or GRID, output=str(tmp_path / "runs"), results=str(tmp_path / "results"))


# --------------------------------------------------------------------------- grid
def test_grid_expansion_names_dedupe_and_seed_order(tmp_path: Path) -> None:
    st = _study(tmp_path)
    names = [r.name for r in st.runs]
    # bias +3 has no overrides: the same runs as core's dynamic seeds 0, 1 (shared, not duplicated)
    assert len(names) == len(set(names)) == 3 * 3 + 2
    assert names[:4] == [
        "cifar_resnet20__sequential__s0",
        "cifar_resnet20__static__s0",
        "cifar_resnet20__dynamic__s0",
        "cifar_resnet20__dynamic__router_bias=-3__s0",
    ]
    assert [r.seed for r in st.runs] == sorted(r.seed for r in st.runs)  # seeds first: a cut study has whole seeds
    cmd = st.command(st.runs[3])
    assert cmd[1:4] == ["-m", "dynwire.cli", "train"] and "--resume" in cmd
    sets = cmd[cmd.index("--set") + 1 :]
    assert sets[0] == "schedule.epochs=1"
    for want in ("model.wiring=dynamic", "model.wiring_kwargs.router_bias=-3", "train.seed=0", "train.num_threads=1"):
        assert want in sets
    assert (
        f"output.dir={tmp_path / 'runs'}" in sets and "output.name=cifar_resnet20__dynamic__router_bias=-3__s0" in sets
    )
    cfg = expected_config(st, st.runs[3])
    assert cfg["model"]["wiring_kwargs"] == {"router_bias": -3} and cfg["train"]["seed"] == 0


def test_graph_per_seed_gives_random_wirings_one_graph_per_seed(tmp_path: Path) -> None:
    raw = json.loads(json.dumps(GRID))
    raw["groups"] = [
        {
            "name": "rw",
            "models": ["cifar_randwire_small"],
            "wirings": ["random-ws", "dynamic"],
            "seeds": [0, 2],
            "graph_per_seed": True,
        }
    ]
    st = _study(tmp_path, raw)
    by_name = {r.name: r for r in st.runs}
    assert sorted(by_name) == [
        "cifar_randwire_small__dynamic__s0",
        "cifar_randwire_small__dynamic__s2",
        "cifar_randwire_small__random-ws__graph_seed=0__s0",
        "cifar_randwire_small__random-ws__graph_seed=2__s2",
    ]
    ws2 = by_name["cifar_randwire_small__random-ws__graph_seed=2__s2"]
    assert expected_config(st, ws2)["model"]["wiring_kwargs"] == {"graph_seed": 2}
    assert "model.wiring_kwargs.graph_seed=2" in st.command(ws2)
    # the dynamic runs stay option-free, so other groups' `compare: [dynamic]` can pair with them
    assert not by_name["cifar_randwire_small__dynamic__s2"].overrides
    cell = next(c for c in st.groups[0].cells if c.wiring == "random-ws")
    assert cell.label == "random-ws" and cell.overrides == ()


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"wirings": ["dynamc"]}, "unknown wiring"),
        ({"seeds": 0}, "must be >= 1"),
        ({"seeds": [1, 1]}, "repeated seeds"),
        ({"options": {"a": ["train.seed=3"]}}, "set by the study runner"),
        ({"options": {"a": ["nonsense"]}}, "section.key=value"),
        ({"reference": "nope"}, "reference"),
        ({"compare": ["nope"]}, "compare must be a list of wirings"),
        ({"graph_per_seed": "yes"}, "graph_per_seed must be true or false"),
        ({"colour": 1}, "unknown key"),
    ],
)
def test_grid_validation_errors(tmp_path: Path, patch: dict, message: str) -> None:
    raw = json.loads(json.dumps(GRID))
    raw["groups"][0].update(patch)
    with pytest.raises(ValueError, match=message):
        _study(tmp_path, raw)


# --------------------------------------------------------------------------- aggregation
TOP1 = {
    "sequential": [90.0, 91.0, 92.0],
    "static": [90.0, 91.5, 92.0],
    "dynamic": [90.5, 91.0, 93.0],
}


def _fake_run(st, run, top1: float, wall: float = 100.0, macs: int = 2_000_000) -> None:
    d = st.run_dir(run)
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(expected_config(st, run)))
    final = {"val": {"top1": top1, "loss": 0.3, "top5": 99.0}, "params": 1000, "macs": macs, "train_time_s": 90.0}
    (d / "final.json").write_text(json.dumps(final))
    (d / STATUS_FILE).write_text(json.dumps({"attempts": [{"wall_s": wall, "outcome": "done"}], "wall_s_total": wall}))


def test_aggregate_matches_hand_computed_statistics(tmp_path: Path) -> None:
    raw = json.loads(json.dumps(GRID))
    raw["groups"][0]["compare"] = ["dynamic"]  # also pair every cell with dynamic (Table 4's comparison)
    st = _study(tmp_path, raw)
    for r in st.runs:
        if not r.overrides:
            # static's MACs differ by seed, as a random wiring's do with graph_per_seed: the cell shows the mean
            _fake_run(st, r, TOP1[r.wiring][r.seed], macs=2_000_000 + (300_000 * r.seed if r.wiring == "static" else 0))
    # bias -3: only seed 0 finished; seed 1 never started
    _fake_run(st, next(r for r in st.runs if r.overrides and r.seed == 0), 89.0)
    st.results.mkdir(parents=True)
    (st.results / "paired_diffs.png").write_bytes(b"an earlier aggregation's figure")
    s = aggregate(st, plots=False)
    assert not (st.results / "paired_diffs.png").exists() and s["figures"] == {}
    assert s["runs_done"] == 10 and s["status_counts"] == {"done": 10, "new": 1}
    core = {c["wiring"]: c for c in s["groups"][0]["cells"]}
    seq = core["sequential"]["top1"]
    assert seq["n"] == 3 and seq["mean"] == pytest.approx(91.0) and seq["std"] == pytest.approx(1.0)
    assert seq["ci_half_width"] == pytest.approx(4.3027 * 1.0 / math.sqrt(3), abs=1e-3)  # t(0.975, 2) = 4.303
    d = core["dynamic"]["diffs"]["vs sequential"]  # diffs 0.5, 0.0, 1.0: mean 0.5, s 0.5
    assert d["diffs"] == pytest.approx([0.5, 0.0, 1.0])
    assert d["mean"] == pytest.approx(0.5) and d["std"] == pytest.approx(0.5)
    assert d["ci_half_width"] == pytest.approx(4.3027 * 0.5 / math.sqrt(3), abs=1e-3)  # 1.242
    d = core["dynamic"]["diffs"]["vs static"]  # 0.5, -0.5, 1.0: mean 1/3, s = sqrt(7/12)
    assert d["mean"] == pytest.approx(1 / 3) and d["std"] == pytest.approx(math.sqrt(7 / 12))
    assert "vs sequential" not in core["sequential"]["diffs"] and "vs static" in core["sequential"]["diffs"]
    d = core["static"]["diffs"]["vs dynamic"]  # -0.5, +0.5, -1.0
    assert d["diffs"] == pytest.approx([-0.5, 0.5, -1.0]) and d["mean"] == pytest.approx(-1 / 3)
    assert "vs dynamic" not in core["dynamic"]["diffs"]
    assert core["static"]["macs"] == pytest.approx(2_300_000) and core["dynamic"]["macs"] == 2_000_000
    assert core["static"]["params"] == 1000
    bias = {c["option"]: c for c in s["groups"][1]["cells"]}
    assert bias["bias +3"]["top1_by_seed"] == {"0": 90.5, "1": 91.0}  # shared with core's dynamic runs
    d = bias["bias -3"]["diffs"]["vs bias +3"]
    assert d["n"] == 1 and d["mean"] == pytest.approx(-1.5) and d["ci_half_width"] is None
    rows = (st.results / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 11 and rows[0].startswith("run,model,wiring,options,seed,status,top1")
    md = (st.results / "summary.md").read_text()
    assert "+0.50 [-0.74, +1.74] (n=3)" in md and "91.00 ± 1.00" in md

    # a config written before a field existed (here train.budget) is not stale: the field takes its default
    r = st.runs[0]
    cfg = yaml.safe_load((st.run_dir(r) / "config.yaml").read_text())
    del cfg["train"]["budget"]
    (st.run_dir(r) / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert run_status(st, r) == "done"

    # a run whose stored config no longer matches the study is stale: excluded and never rerun
    cfg["optim"]["lr"] = 0.3
    (st.run_dir(r) / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert run_status(st, r) == "stale"
    s = aggregate(st, plots=False)
    assert s["groups"][0]["cells"][0]["top1"]["n"] == 2


def test_imported_runs_stand_in_and_option_cells_pair_with_their_own_option(tmp_path: Path) -> None:
    """A study that imports another study's results.csv: those runs are done (never rerun) and
    enter the statistics; a cell with an option pairs with the same option's static cell."""
    first = _study(tmp_path / "a")
    for r in first.runs:
        if not r.overrides:
            _fake_run(first, r, TOP1[r.wiring][r.seed])
    aggregate(first, plots=False)
    node = ["model.wiring_kwargs.node=branch"]
    raw = {
        "name": "second",
        "recipe": GRID["recipe"],
        "imports": [str(first.results / "results.csv")],
        "groups": [
            {"name": "chain", "models": ["cifar_resnet20"], "wirings": ["sequential"], "seeds": 3},
            {
                "name": "forms",
                "models": ["cifar_resnet20"],
                "wirings": ["static", "dynamic"],
                "options": {"block": [], "branch": node},
                "reference": "block",
                "seeds": 3,
            },
        ],
    }
    st = study_from_dict(raw, output=str(tmp_path / "b" / "runs"), results=str(tmp_path / "b" / "results"))
    assert len(st.imported) == 9
    todo = [r.name for r in st.runs if run_status(st, r) != "done"]
    assert todo == [f"cifar_resnet20__{w}__node=branch__s{k}" for k in range(3) for w in ("static", "dynamic")]
    branch_top1 = {"static": [90.0, 90.5, 91.0], "dynamic": [92.0, 91.0, 93.0]}
    for r in st.runs:
        if r.overrides:
            _fake_run(st, r, branch_top1[r.wiring][r.seed], wall=250.0)
    s = aggregate(st, plots=False)
    assert s["runs_done"] == 15
    cells = {c["label"]: c for c in s["groups"][1]["cells"]}
    assert cells["dynamic [block]"]["top1_by_seed"] == {str(k): TOP1["dynamic"][k] for k in range(3)}  # imported
    d = cells["dynamic [branch]"]["diffs"]
    # against the imported chain, against branch-form static (same option), against block form (reference)
    assert d["vs sequential"]["diffs"] == pytest.approx([b - a for a, b in zip(TOP1["sequential"], [92.0, 91.0, 93.0])])
    assert d["vs static"]["diffs"] == pytest.approx([2.0, 0.5, 2.0])
    assert d["vs block"]["diffs"] == pytest.approx([b - a for a, b in zip(TOP1["dynamic"], [92.0, 91.0, 93.0])])
    assert "vs static" not in cells["static [branch]"]["diffs"]  # not against itself
    rows = (st.results / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 15
    with pytest.raises(ValueError, match="imports: .*not found"):
        study_from_dict({**raw, "imports": [str(tmp_path / "missing.csv")]})

    # a study importing its own committed results: with its run folders gone (a fresh checkout) the
    # finished runs stay done, and the ETA comes from their recorded wall time, cell by cell
    import shutil

    shutil.rmtree(tmp_path / "b" / "runs")
    own = {**raw, "imports": [str(first.results / "results.csv"), str(st.results / "results.csv")]}
    again = study_from_dict(own, output=str(tmp_path / "b" / "runs"), results=str(tmp_path / "b" / "results"))
    assert all(run_status(again, r) == "done" for r in again.runs)
    est = _estimator(again, _finished_durations(again, again.runs))
    branch = next(r for r in again.runs if r.overrides)
    assert est(branch) == pytest.approx(250.0)
    assert est(next(r for r in again.runs if not r.overrides and r.wiring == "dynamic")) == pytest.approx(100.0)

    # re-running one seed (its folder made anew): the --only selection is estimated from the
    # cell's other, recorded seeds, not from the file's per-model guess (this study has none)
    import io

    from dynwire.study.cli import _dry_run

    again.run_dir(branch).mkdir(parents=True)
    buf = io.StringIO()
    _dry_run(again, 1, [branch.name], buf)
    text = buf.getvalue()
    assert "1 runs (new 1)" in text and "without an estimate" not in text
    assert "to run: 4m10s of single-core time" in text


def test_dry_run_lists_status_and_estimate(tmp_path: Path, capsys) -> None:
    raw = dict(GRID, estimates_s={"cifar_resnet20": 300})
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = ["--out", str(tmp_path / "runs"), "--results", str(tmp_path / "res")]
    assert main_study(["--config", str(path), "--dry-run", "--jobs", "2", *out]) == 0
    text = capsys.readouterr().out
    assert "11 runs (new 11)" in text and "to run: 55m00s of single-core time" in text and "27m30s wall" in text
    assert main_study(["--config", str(path), "--dry-run", "--only", "*__s2", *out]) == 0
    assert "3 runs (new 3)" in capsys.readouterr().out
    assert main_study(["--config", str(tmp_path / "missing.yaml")]) == 2


def test_dynwire_study_command(tmp_path: Path, capsys) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(dict(GRID, estimates_s={"cifar_resnet20": 300})))
    out = ["--out", str(tmp_path / "runs"), "--results", str(tmp_path / "res")]
    assert cli_main(["study", "--config", str(path), "--dry-run", "--jobs", "2", *out]) == 0
    assert "11 runs (new 11)" in capsys.readouterr().out
    assert cli_main(["study", "--config", str(path), "--aggregate-only", "--no-plots", *out]) == 0
    assert "aggregated 0/11 finished runs" in capsys.readouterr().out
    assert "Finished runs: 0/11" in (tmp_path / "res" / "summary.md").read_text()
    assert cli_main(["study", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dynwire study: error: ") and "missing.yaml" in err
    assert cli_main(["study", "--config", str(path), "--jobs", "0"]) == 2
    assert capsys.readouterr().err.startswith("dynwire study: error: --jobs must be >= 1")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(dict(GRID, colour=1)))
    assert cli_main(["study", "--config", str(bad), "--dry-run"]) == 2
    assert "unknown key" in capsys.readouterr().err


# --------------------------------------------------------------------------- end to end
TINY_SET = [
    "data.subset=null",
    "data.val_subset=null",
    "data.image_size=12",
    "data.batch_size=32",
    "schedule.epochs=1",
    "schedule.warmup_epochs=0.1",
    "train.log_every=2",
    "train.ckpt_every_steps=2",
]


def _write_study(tmp_path: Path, data: Path, recipe_set: list[str], seeds: int, curves: bool = False) -> Path:
    raw = {
        "name": "tiny",
        "recipe": {"config": "fmnist_resnet20", "set": recipe_set},
        "data_dir": str(data),
        "output": str(tmp_path / "runs"),
        "results": str(tmp_path / "results"),
        "estimates_s": {"cifar_resnet20": 10},
        "groups": [
            {
                "name": "core",
                "models": ["cifar_resnet20"],
                "wirings": ["sequential", "dynamic"],
                "seeds": seeds,
                "curves": curves,
            }
        ],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def fmnist256(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fmnist_fixture(tmp_path_factory.mktemp("fmnist"), n_train=256, n_test=64)


def _attempts(study, run) -> list[dict]:
    return json.loads((study.run_dir(run) / STATUS_FILE).read_text())["attempts"]


@pytest.mark.slow
def test_tiny_grid_end_to_end_two_jobs(tmp_path: Path, fmnist256: Path, capsys) -> None:
    path = _write_study(tmp_path, fmnist256, TINY_SET, seeds=2, curves=True)
    assert main_study(["--config", str(path), "--jobs", "2", "--progress-every", "5"]) == 0
    out = capsys.readouterr().out
    assert "4 runs, 0 done, 4 to run, 2 job(s)" in out and "done 4/4" in out
    st = load_study(path)
    rows = (st.results / "results.csv").read_text().splitlines()
    assert len(rows) == 5 and all(",done," in r for r in rows[1:])
    s = json.loads((st.results / "summary.json").read_text())
    dyn = s["groups"][0]["cells"][1]
    assert dyn["top1"]["n"] == 2 and dyn["diffs"]["vs sequential"]["n"] == 2
    # executed MACs: measured once per run from best.pt (removed nodes skipped), cached next to it
    assert s["groups"][0]["cells"][0]["executed_macs"] is None  # sequential: rec.macs misses chain stages
    assert 0 < dyn["executed_macs"] <= dyn["macs"] * 1.02
    for r in st.runs:
        if r.wiring == "sequential":
            assert not (st.run_dir(r) / "executed_macs.json").exists()
            continue
        em = json.loads((st.run_dir(r) / "executed_macs.json").read_text())
        final = json.loads((st.run_dir(r) / "final.json").read_text())
        assert em["images"] == 64 and em["top1"] == pytest.approx(final["val"]["top1"])
    assert "executed MMACs" in (st.results / "summary.md").read_text()
    assert set(s["figures"]) == {"accuracy", "paired_diffs", "curves_core"}
    for f in s["figures"].values():
        assert (st.results / f).stat().st_size > 1000
    for r in st.runs:
        cfg = yaml.safe_load((st.run_dir(r) / "config.yaml").read_text())
        assert cfg["train"]["seed"] == r.seed and cfg["train"]["num_threads"] == 1
        assert "===== " in (st.run_dir(r) / "study.log").read_text()
    mtimes = {r.name: (st.run_dir(r) / "final.json").stat().st_mtime_ns for r in st.runs}

    # a second invocation reruns nothing
    assert main_study(["--config", str(path), "--jobs", "2"]) == 0
    assert "4 runs, 4 done, 0 to run" in capsys.readouterr().out
    assert {r.name: (st.run_dir(r) / "final.json").stat().st_mtime_ns for r in st.runs} == mtimes
    assert all(len(_attempts(st, r)) == 1 for r in st.runs)


def _wait(cond, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_trainer_and_killed_runner_resume(tmp_path: Path, fmnist256: Path, capsys) -> None:
    """SIGKILL one trainer and then the runner itself; a new invocation finishes both runs by resuming."""
    recipe = [*TINY_SET[:3], "data.batch_size=8", "schedule.epochs=2", *TINY_SET[5:]]  # 64 steps per run
    path = _write_study(tmp_path, fmnist256, recipe, seeds=1)
    st = load_study(path)
    seq, dyn = st.runs
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]),
    )
    runner = subprocess.Popen(
        [sys.executable, "-m", "dynwire.study", "--config", str(path), "--jobs", "2", "--no-aggregate"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        _wait(lambda: all((st.run_dir(r) / "last.pt").is_file() for r in st.runs), 120, "both runs to checkpoint")
        assert not any((st.run_dir(r) / "final.json").exists() for r in st.runs), "runs too short for this test"
        pid = json.loads((st.run_dir(dyn) / STATUS_FILE).read_text())["running"]["pid"]
        os.kill(pid, signal.SIGKILL)  # a trainer dies without saving
        _wait(lambda: not _lock_busy(st.run_dir(dyn)), 30, "the killed trainer's lock to drop")
        runner.kill()  # the runner dies too: its other trainer gets SIGTERM and saves last.pt
        runner.wait(timeout=30)
        _wait(lambda: not _lock_busy(st.run_dir(seq)), 60, "the orphaned trainer to save and exit")
    finally:
        if runner.poll() is None:
            runner.kill()
    assert not any((st.run_dir(r) / "final.json").exists() for r in st.runs)
    assert {run_status(st, r) for r in st.runs} == {"partial"}
    assert "SIGTERM" in (st.run_dir(seq) / "study.log").read_text()

    assert main_study(["--config", str(path), "--jobs", "2", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert out.count("[study] resume ") == 2 and "done 2/2" in out
    for r in st.runs:
        run = json.loads((st.run_dir(r) / "run.json").read_text())
        assert run.get("resumes"), f"{r.name} was restarted from scratch"
        final = json.loads((st.run_dir(r) / "final.json").read_text())
        assert final["global_step"] == 64
        assert _attempts(st, r)[-1]["outcome"] == "done" and _attempts(st, r)[-1]["resumed"] is True
    assert main_study(["--config", str(path), "--jobs", "2", "--no-aggregate"]) == 0
    assert "2 runs, 2 done, 0 to run" in capsys.readouterr().out
