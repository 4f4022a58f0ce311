"""Checkpoint files: atomic writes, weights-only loading, RNG capture, safetensors export."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import dynwire
from dynwire.engine.checkpoint import (
    CheckpointError,
    atomic_torch_save,
    capture_rng_state,
    export_safetensors,
    load_checkpoint,
    restore_rng_state,
)
from dynwire.engine.files import TMP_SUFFIX, atomic_link, atomic_write, atomic_write_json, remove_stale_temp_files


def _tiny_model(wiring: str = "dynamic") -> nn.Module:
    torch.manual_seed(0)
    return dynwire.create_model("cifar_resnet20", num_classes=10, in_chans=1, wiring=wiring)


def test_atomic_save_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    atomic_torch_save({"a": torch.ones(3)}, path)
    atomic_torch_save({"a": torch.zeros(3)}, path)
    assert torch.equal(load_checkpoint(path)["a"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_failed_save_keeps_old_checkpoint_and_removes_partial_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    atomic_torch_save({"step": 1, "w": torch.arange(4.0)}, path)
    before = path.read_bytes()
    real_save = torch.save

    def save_then_crash(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # the whole payload is written to the temp file ...
        f.write(b"garbage")
        f.flush()
        raise OSError("disk full (simulated)")  # ... then the write fails

    monkeypatch.setattr(torch, "save", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"step": 2, "w": torch.zeros(4)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_every_writer_uses_one_temp_suffix_that_cleanup_knows(tmp_path: Path, monkeypatch) -> None:
    """Text, JSON, links and checkpoints all write through atomic_write's `.partial` temp files."""
    seen: list[str] = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(Path(src).name)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    atomic_write(tmp_path / "config.yaml", "a: 1\n")
    atomic_write_json(tmp_path / "run.json", {"a": 1})
    atomic_torch_save({"a": torch.ones(1)}, tmp_path / "last.pt")
    atomic_link(tmp_path / "last.pt", tmp_path / "best.pt")
    export_safetensors({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    assert len(seen) == 5 and all(n.startswith(".") and n.endswith(TMP_SUFFIX) for n in seen), seen
    assert (tmp_path / "run.json").read_text() == '{\n  "a": 1\n}\n'
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "best.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.pt",
        "config.yaml",
        "last.pt",
        "run.json",
        "w.safetensors",
    ]


def test_stale_temp_files_are_cleaned(tmp_path: Path) -> None:
    (tmp_path / f".last.pt.abc{TMP_SUFFIX}").write_bytes(b"half a checkpoint")
    (tmp_path / "last.pt").write_bytes(b"keep")
    removed = remove_stale_temp_files(tmp_path)
    assert [p.name for p in removed] == [f".last.pt.abc{TMP_SUFFIX}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


class _Payload:
    """Unpickling this runs ``open(marker, 'w')`` - what a malicious checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_checkpoint_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(1)}, "extra": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(path)
    assert not marker.exists()
    # The payload is live: a full unpickle would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_truncated_or_missing_checkpoint_gives_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    atomic_torch_save({"w": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="file not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_random_bytes_give_one_message_everywhere(tmp_path: Path, capsys) -> None:
    """`dynwire eval`, `dynwire analyze`, load_checkpoint and load_model say the same about a file
    that is no checkpoint: not a dynwire file (it holds no code, so no "could run code")."""
    from dynwire.cli import main as cli_main

    rng = np.random.default_rng(0)
    junk = tmp_path / "random_bytes.pt"
    junk.write_bytes(b"\x13" + rng.integers(0, 256, 4095, dtype=np.uint8).tobytes())
    expected = f"{str(junk)!r} is not a dynwire file (neither a PyTorch checkpoint nor safetensors)"
    with pytest.raises(CheckpointError) as direct:
        load_checkpoint(junk)
    with pytest.raises(ValueError) as loaded:
        dynwire.load_model(junk)
    assert str(direct.value) == str(loaded.value) == expected
    assert cli_main(["eval", "--checkpoint", str(junk)]) == 2
    assert capsys.readouterr().err.strip() == f"dynwire eval: error: {expected}"
    assert cli_main(["analyze", str(junk), "--out", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err.strip() == f"dynwire analyze: error: {expected}"
    assert not (tmp_path / "a").exists()

    # bytes that start like a pickle but are none: still not a dynwire file, and no "could run code"
    fake = tmp_path / "fake_pickle.pt"
    fake.write_bytes(b"\x80\x02" + rng.integers(0, 256, 64, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError) as direct:
        load_checkpoint(fake)
    with pytest.raises(ValueError) as loaded:
        dynwire.load_model(fake)
    assert str(direct.value) == str(loaded.value)
    assert "is not a dynwire file (unreadable pickle data" in str(direct.value)
    assert "could run code" not in str(direct.value)

    # a safetensors export handed to `dynwire eval`: said so, with what loads it
    export = tmp_path / "m.safetensors"
    export_safetensors(_tiny_model(), export)
    with pytest.raises(CheckpointError, match=r"is a safetensors export, not a training checkpoint.*load_model"):
        load_checkpoint(export)


def test_refused_objects_name_the_class(tmp_path: Path) -> None:
    """A real pickle with a class weights-only loading refuses: "could run code", naming the class."""
    import fractions

    path = tmp_path / "obj.pt"
    torch.save({"model": {"w": torch.ones(1)}, "x": fractions.Fraction(1, 3)}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert "refused to load" in msg and "could run code" in msg and "fractions.Fraction" in msg
    assert "In PyTorch 2.6" not in msg  # torch's advice to load with weights_only=False is not repeated
    with pytest.raises(ValueError, match="refused to load"):
        dynwire.load_model(path)


def test_rng_state_survives_weights_only_round_trip(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    state = capture_rng_state()
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    path = tmp_path / "rng.pt"
    atomic_torch_save({"rng": state}, path)
    loaded = torch.load(path, weights_only=True)["rng"]
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(loaded)
    got = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 4)
        self.dec.weight = self.enc.weight  # shared storage, which save_file refuses as is


def test_export_safetensors_handles_shared_tensors(tmp_path: Path) -> None:
    model = _Tied()
    out = export_safetensors(model, tmp_path / "tied.safetensors")
    loaded = load_file(str(out))
    assert set(loaded) == set(model.state_dict())
    fresh = _Tied()
    fresh.load_state_dict(loaded)
    assert torch.equal(fresh.enc.weight, model.enc.weight) and torch.equal(fresh.dec.bias, model.dec.bias)


def test_export_safetensors_from_checkpoint_round_trips(tmp_path: Path) -> None:
    model = _tiny_model()
    ema_state = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    ckpt = tmp_path / "last.pt"
    atomic_torch_save({"model": model.state_dict(), "ema": {"weights": ema_state}}, ckpt)
    export_safetensors(ckpt, tmp_path / "m.safetensors")
    loaded = load_file(str(tmp_path / "m.safetensors"))
    assert set(loaded) == set(model.state_dict())
    assert any(".edges." in k for k in loaded)  # wiring parameters are exported too
    for k, v in model.state_dict().items():
        assert torch.equal(loaded[k], v), k
    other = _tiny_model()
    other.load_state_dict(loaded)
    x = torch.randn(2, 1, 16, 16)
    model.eval(), other.eval()
    assert torch.equal(model(x), other(x))
    export_safetensors(load_checkpoint(ckpt), tmp_path / "ema.safetensors", use_ema=True)
    ema = load_file(str(tmp_path / "ema.safetensors"))
    assert all(torch.equal(ema[k], ema_state[k]) for k in ema_state)
    with pytest.raises(ValueError, match="no 'ema' weights"):
        export_safetensors({"model": model.state_dict(), "ema": None}, tmp_path / "x.safetensors", use_ema=True)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(TMP_SUFFIX)]
