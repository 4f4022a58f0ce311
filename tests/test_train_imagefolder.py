"""#10: training on one's own class folders (`data.name=imagefolder`) through `dynwire train` + `dynwire eval`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dynwire
import dynwire.cli
from dynwire.engine import load_checkpoint


def write_png_folders(root: Path, splits: dict[str, int], size: tuple[int, int] = (14, 12), seed: int = 0) -> Path:
    """root/<split>/{cat,dog}/*.png: cats are reddish, dogs bluish (learnable)."""
    rng = np.random.default_rng(seed)
    for split, n in splits.items():
        for c, name in enumerate(("cat", "dog")):
            d = root / split / name if split else root / name
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                arr = rng.integers(0, 80, (size[1], size[0], 3), dtype=np.uint8)
                arr[..., 0 if c == 0 else 2] += 150
                Image.fromarray(arr).save(d / f"{name}{k}.png")
    return root


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_train_and_eval_on_own_class_folders(tmp_path: Path, capsys) -> None:
    data = write_png_folders(tmp_path / "pets", {"train": 8, "val": 3})
    out = tmp_path / "runs"
    argv = ["train", "--config", "fmnist_resnet20", "--data-dir", str(data), "--output-dir", str(out), "--set",
            "data.name=imagefolder", "data.subset=null", "data.batch_size=4", "schedule.epochs=2",
            "train.log_every=2"]  # fmt: skip
    assert dynwire.cli.main(argv) == 0
    run_dir = out / "imagefolder_cifar_resnet20_dynamic"
    final = json.loads((run_dir / "final.json").read_text())
    run = json.loads((run_dir / "run.json").read_text())
    # class count, names and input size come from the data and are saved with the run
    assert run["data"] == {
        "name": "imagefolder",
        "num_classes": 2,
        "classes": ["cat", "dog"],
        "in_chans": 3,
        "input_size": [3, 12, 12],
        "train_images": 16,
        "val_images": 6,
    }
    assert final["input_size"] == [3, 12, 12] and final["val"]["images"] == 6
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert ckpt["data_info"]["classes"] == ["cat", "dog"]
    model = dynwire.create_model("cifar_resnet20", num_classes=2, in_chans=3)
    assert {k: v.shape for k, v in ckpt["model"].items()} == {k: v.shape for k, v in model.state_dict().items()}
    capsys.readouterr()

    assert dynwire.cli.main(["eval", "--checkpoint", str(run_dir / "last.pt"), "--device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["images"] == 6
    assert got["top1"] == pytest.approx(final["val"]["top1"]) and got["loss"] == pytest.approx(final["val"]["loss"])


def test_imagenet_reader_keeps_its_class_check(tmp_path: Path, caplog) -> None:
    from dynwire.data import build_dataset

    data = write_png_folders(tmp_path / "pets", {"train": 2, "val": 1})
    _, info = build_dataset("imagenet", data, "train", image_size=12)
    assert info.num_classes == 1000
    assert "expected 1000" in caplog.text and "imagefolder" in caplog.text
