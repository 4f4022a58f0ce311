"""Tests for dynwire.data, on tiny fixtures written in the real on-disk formats."""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dynwire.data.fashion_mnist as fm_mod
from dynwire.data import (
    CIFAR10,
    CIFAR100,
    DATASET_NAMES,
    FashionMNIST,
    ImageNetFolder,
    UnsafePickleError,
    build_dataset,
    build_loader,
    get_dataset_info,
    read_idx,
    safe_load_pickle,
)

# --------------------------------------------------------------------------- fixtures


def write_idx(path: Path, arr: np.ndarray, *, magic: int | None = None) -> Path:
    """Write ``arr`` (uint8) as an IDX file; gzip it when the name ends in .gz."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | arr.ndim
    raw = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    return path


def make_fmnist(folder: Path, n_train: int = 12, n_test: int = 7, seed: int = 0) -> dict[str, np.ndarray]:
    """Train split gzipped, test split plain; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    write_idx(folder / "train-images-idx3-ubyte.gz", out["train_x"])
    write_idx(folder / "train-labels-idx1-ubyte.gz", out["train_y"])
    write_idx(folder / "t10k-images-idx3-ubyte", out["test_x"])
    write_idx(folder / "t10k-labels-idx1-ubyte", out["test_y"])
    return out


@pytest.fixture
def fmnist_dir(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    d = tmp_path / "fashion-mnist"
    return d, make_fmnist(d)


def make_cifar10(root: Path, per_batch: int = 3, seed: int = 1) -> dict[str, np.ndarray]:
    """cifar-10-batches-py with bytes keys (like the real python-2 pickles)."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    xs, ys = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        xs.append(x)
        ys += y
        entry = {b"batch_label": b"training batch", b"labels": y, b"data": x, b"filenames": [b"f"] * per_batch}
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump(entry, f, protocol=2 if i % 2 else 4)
    tx = rng.integers(0, 256, (5, 3072), dtype=np.uint8)
    ty = [int(v) for v in rng.integers(0, 10, 5)]
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"labels": ty, b"data": tx}, f, protocol=5)
    names = [f"class{i}".encode() for i in range(10)]
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f, protocol=2)
    return {"train_x": np.concatenate(xs), "train_y": np.array(ys), "test_x": tx, "test_y": np.array(ty)}


def make_cifar100(root: Path, seed: int = 2) -> dict[str, np.ndarray]:
    """cifar-100-python with str keys (as a python-3 re-pickle would have)."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    out = {}
    for split, n in (("train", 6), ("test", 4)):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        with open(d / split, "wb") as f:
            pickle.dump({"data": x, "fine_labels": fine, "coarse_labels": [v // 5 for v in fine]}, f, protocol=2)
        out[f"{split}_x"], out[f"{split}_y"] = x, np.array(fine)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": ["x"] * 20}, f)
    return out


def make_imagefolder(root: Path) -> dict[str, object]:
    """root/{train,val}/<wnid>/ with small PNG/JPEG files, plus one corrupt .JPEG in train."""
    rng = np.random.default_rng(3)
    for split in ("train", "val"):
        for wnid in ("n01", "n02"):
            cdir = root / split / wnid
            cdir.mkdir(parents=True)
            for k in range(2):
                arr = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                ext, fmt = (".JPEG", "JPEG") if k == 0 else (".png", "PNG")
                Image.fromarray(arr).save(cdir / f"img{k}{ext}", format=fmt)
    bad = root / "train" / "n01" / "img0b.JPEG"  # sorts between img0.JPEG and img1.png
    bad.write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    return {"bad": bad}


# --------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("split,key", [("train", "train"), ("test", "test"), ("val", "test")])
def test_fmnist_roundtrip(fmnist_dir, split, key):
    folder, arrays = fmnist_dir
    ds = FashionMNIST(folder, split=split)
    n = len(arrays[f"{key}_y"])
    assert len(ds) == n
    assert ds.data.dtype == torch.uint8 and ds.data.shape == (n, 28, 28)
    assert torch.equal(ds.data, torch.from_numpy(arrays[f"{key}_x"]))
    assert ds.targets.tolist() == arrays[f"{key}_y"].tolist()
    assert len(ds.classes) == 10 and ds.classes[0] == "T-shirt/top"
    img, label = ds[n - 1]
    assert img.shape == (1, 28, 28) and img.dtype == torch.float32
    assert torch.allclose(img[0] * 255, torch.from_numpy(arrays[f"{key}_x"][n - 1]).float())
    assert label == int(arrays[f"{key}_y"][n - 1])


def test_fmnist_explicit_root_parent(fmnist_dir):
    folder, _ = fmnist_dir
    ds = FashionMNIST(folder.parent, split="train")  # root holding fashion-mnist/
    assert ds.root == folder


def test_fmnist_env_search(tmp_path, monkeypatch):
    data_dir = tmp_path / "datasets"
    make_fmnist(data_dir / "fashion-mnist", n_train=5, n_test=3)
    monkeypatch.setenv("DYNWIRE_DATA_DIR", str(data_dir))
    monkeypatch.chdir(tmp_path)
    ds = FashionMNIST(None, split="test")
    assert ds.root == data_dir / "fashion-mnist"
    assert len(ds) == 3
    # the env dir itself holding the files also works
    flat = tmp_path / "flat"
    make_fmnist(flat, n_train=4, n_test=2)
    monkeypatch.setenv("DYNWIRE_DATA_DIR", str(flat))
    assert FashionMNIST(None, split="test").root == flat


def test_fmnist_missing_message(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNWIRE_DATA_DIR", str(tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fm_mod, "SYSTEM_DIR", str(tmp_path / "system-missing"))
    with pytest.raises(FileNotFoundError) as ei:
        FashionMNIST(None, split="train")
    msg = str(ei.value)
    assert "sudo apt-get update && sudo apt-get install dataset-fashion-mnist" in msg
    assert "--data-dir" in msg and "data.root" in msg
    assert str(tmp_path / "nowhere" / "fashion-mnist") in msg
    assert str(tmp_path / "system-missing") in msg

    partial = tmp_path / "partial"
    partial.mkdir()
    write_idx(partial / "train-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(FileNotFoundError, match="missing train-labels-idx1-ubyte"):
        FashionMNIST(partial, split="train")


def test_idx_corrupt_magic_names_file(fmnist_dir):
    folder, _ = fmnist_dir
    bad = write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(7, np.uint8), magic=0x0803)
    with pytest.raises(ValueError, match="magic number") as ei:
        FashionMNIST(folder, split="test")
    assert str(bad) in str(ei.value)


def test_idx_truncated_and_bad_gzip(tmp_path):
    good = write_idx(tmp_path / "x-idx3-ubyte", np.ones((3, 28, 28), np.uint8))
    short = tmp_path / "short-idx3-ubyte"
    short.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(ValueError, match="holds 2347 bytes of data") as ei:
        read_idx(short, 2051)
    assert str(short) in str(ei.value)
    tiny = tmp_path / "tiny-idx3-ubyte"
    tiny.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="too short") as ei:
        read_idx(tiny, 2051)
    assert str(tiny) in str(ei.value)
    badgz = tmp_path / "bad-idx3-ubyte.gz"
    badgz.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot read IDX file") as ei:
        read_idx(badgz, 2051)
    assert str(badgz) in str(ei.value)
    assert read_idx(good, 2051).shape == (3, 28, 28)


def test_fmnist_label_count_mismatch(fmnist_dir):
    folder, _ = fmnist_dir
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(6, np.uint8))
    with pytest.raises(ValueError, match="7 images but .* 6 labels"):
        FashionMNIST(folder, split="test")


# --------------------------------------------------------------------------- CIFAR


def _check_cifar(ds, x: np.ndarray, y: np.ndarray) -> None:
    assert len(ds) == len(y)
    assert ds.data.dtype == torch.uint8 and ds.data.shape == (len(y), 3, 32, 32)
    assert torch.equal(ds.data, torch.from_numpy(x).view(-1, 3, 32, 32))
    assert ds.targets.tolist() == y.tolist()
    img, label = ds[1]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    # channel-major layout: first 1024 bytes are the red plane
    assert torch.allclose(img[0].flatten() * 255, torch.from_numpy(x[1, :1024]).float())
    assert label == int(y[1])


def test_cifar10_roundtrip(tmp_path):
    arrays = make_cifar10(tmp_path)
    train = CIFAR10(tmp_path, split="train")
    _check_cifar(train, arrays["train_x"], arrays["train_y"])
    assert train.classes == [f"class{i}" for i in range(10)]
    test = CIFAR10(tmp_path / "cifar-10-batches-py", split="test")  # root = the batches folder itself
    _check_cifar(test, arrays["test_x"], arrays["test_y"])


def test_cifar100_roundtrip(tmp_path):
    arrays = make_cifar100(tmp_path)
    for split in ("train", "test"):
        ds = CIFAR100(tmp_path, split=split)
        _check_cifar(ds, arrays[f"{split}_x"], arrays[f"{split}_y"])
        assert len(ds.classes) == 100 and ds.classes[7] == "c7"


def test_cifar_missing_files(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError) as ei:
        CIFAR10(tmp_path, split="train")
    msg = str(ei.value)
    assert "missing data_batch_4" in msg and str(tmp_path / "cifar-10-batches-py") in msg
    CIFAR10(tmp_path, split="test")  # the test split does not need data_batch_4
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        CIFAR100(tmp_path, split="test")


class _SystemPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _OpenPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("payload", [_SystemPayload, _OpenPayload])
def test_malicious_pickle_refused(tmp_path, payload):
    make_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    evil = {b"data": payload(marker), b"labels": [0]}
    target = tmp_path / "cifar-10-batches-py" / "test_batch"
    target.write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(UnsafePickleError, match="refusing to load global") as ei:
        CIFAR10(tmp_path, split="test")
    assert str(target) in str(ei.value)
    assert not marker.exists()
    assert isinstance(ei.value, ValueError)


def test_malicious_pickle_control(tmp_path):
    """The marker check can fail: an unrestricted unpickler does create it."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_OpenPayload(marker))).close()
    assert marker.exists()


def test_safe_pickle_codecs_restricted(tmp_path):
    p = tmp_path / "x.pkl"
    p.write_bytes(pickle.dumps({"data": np.arange(4, dtype=np.uint8)}, protocol=2))
    assert safe_load_pickle(p)["data"].tolist() == [0, 1, 2, 3]
    # a protocol-2 pickle calling _codecs.encode with another codec is refused
    p.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(UnsafePickleError, match="rot13"):
        safe_load_pickle(p)
    p.write_bytes(b"\x80\x02}q\x00")  # truncated
    with pytest.raises(ValueError, match="x.pkl"):
        safe_load_pickle(p)


# --------------------------------------------------------------------------- ImageNet folders


def test_imagefolder_raise_names_path(tmp_path):
    bad = make_imagefolder(tmp_path)["bad"]
    ds, info = build_dataset("imagenet", tmp_path, "train", image_size=16)
    assert info.input_size == (3, 16, 16) and info.num_classes == 1000
    assert len(ds) == 5 and ds.classes == ["n01", "n02"]
    bad_idx = [p for p, _ in ds.samples].index(str(bad))
    img, label = ds[0]
    assert img.shape == (3, 16, 16) and img.dtype == torch.float32 and label == 0
    with pytest.raises(ValueError) as ei:
        ds[bad_idx]
    msg = str(ei.value)
    assert f"cannot read image '{bad}'" in msg and "skip_bad_images" in msg


def test_imagefolder_skip_counts(tmp_path, caplog):
    bad = make_imagefolder(tmp_path)["bad"]
    ds = ImageNetFolder(tmp_path, "train", on_bad_image="skip")
    bad_idx = [p for p, _ in ds.samples].index(str(bad))
    with caplog.at_level(logging.WARNING, logger="dynwire.data.imagefolder"):
        out = [ds[i] for i in range(len(ds))]
    assert ds.num_bad_images == 1 and ds.bad_images == [str(bad)]
    assert any(str(bad) in r.getMessage() for r in caplog.records)
    # the bad sample was replaced by the next one
    assert np.array_equal(np.asarray(out[bad_idx][0]), np.asarray(out[bad_idx + 1][0]))
    assert out[bad_idx][1] == out[bad_idx + 1][1]
    ds[bad_idx]
    assert ds.num_bad_images == 1  # distinct files


def test_imagenet_eval_transform_and_missing(tmp_path):
    make_imagefolder(tmp_path)
    ds, _ = build_dataset("imagenet", tmp_path, "val", image_size=16)
    assert len(ds) == 4 and ds.num_bad_images == 0
    a, b = ds[2][0], ds[2][0]
    assert a.shape == (3, 16, 16) and torch.equal(a, b)  # eval transforms are deterministic
    with pytest.raises(FileNotFoundError, match="val") as ei:
        ImageNetFolder(tmp_path / "nope", "val")
    assert str(tmp_path / "nope" / "val") in str(ei.value)


# --------------------------------------------------------------------------- build_dataset / transforms


def test_build_fmnist_transforms(fmnist_dir):
    folder, arrays = fmnist_dir
    val, info = build_dataset("fashion_mnist", folder, "val")
    assert info.input_size == (1, 28, 28) and info.num_classes == 10 and info.in_chans == 1
    x, y = val[0]
    expect = (torch.from_numpy(arrays["test_x"][0]).float() / 255 - 0.2860) / 0.3530
    assert torch.allclose(x[0], expect, atol=1e-5) and y == int(arrays["test_y"][0])

    train, _ = build_dataset("fashion-mnist", folder, "train")
    torch.manual_seed(0)
    xs = torch.stack([train[0][0] for _ in range(8)])
    assert xs.shape == (8, 1, 28, 28) and xs.dtype == torch.float32
    assert not all(torch.equal(xs[0], xs[i]) for i in range(1, 8))  # augmentation is random
    # each augmented image is the original shifted by <= 2 px with zero padding, maybe mirrored
    padded = torch.nn.functional.pad(torch.from_numpy(arrays["train_x"][0]).float(), (2, 2, 2, 2))
    norm = (padded / 255 - 0.2860) / 0.3530
    crops = [norm[t : t + 28, s : s + 28] for t in range(5) for s in range(5)]
    candidates = crops + [c.flip(-1) for c in crops]
    for img in xs[:, 0]:
        assert any(torch.allclose(img, c, atol=1e-5) for c in candidates)
    plain = build_dataset("fashion_mnist", folder, "train", augment=False)[0]
    assert torch.equal(plain[0][0], plain[0][0])
    assert torch.allclose(plain[0][0][0], norm[2:30, 2:30], atol=1e-5)
    big, info32 = build_dataset("fashion_mnist", folder, "val", image_size=32)
    assert big[0][0].shape == (1, 32, 32) and info32.input_size == (1, 32, 32)


def test_build_cifar(tmp_path):
    arrays = make_cifar10(tmp_path)
    make_cifar100(tmp_path)
    ds, info = build_dataset("cifar10", tmp_path, "train")
    assert len(ds) == 15 and info.num_classes == 10 and info.input_size == (3, 32, 32)
    assert ds[0][0].shape == (3, 32, 32)
    val, _ = build_dataset("cifar10", tmp_path, "val")
    mean = torch.tensor(info.mean).view(3, 1, 1)
    std = torch.tensor(info.std).view(3, 1, 1)
    expect = (torch.from_numpy(arrays["test_x"][0]).view(3, 32, 32).float() / 255 - mean) / std
    assert torch.allclose(val[0][0], expect, atol=1e-5)
    ds100, info100 = build_dataset("cifar100", tmp_path, "test")
    assert len(ds100) == 4 and info100.num_classes == 100


def test_subset_deterministic(fmnist_dir):
    folder, arrays = fmnist_dir
    a, _ = build_dataset("fashion_mnist", folder, "train", subset=5, subset_seed=1)
    b, _ = build_dataset("fashion_mnist", folder, "train", subset=5, subset_seed=1)
    c, _ = build_dataset("fashion_mnist", folder, "train", subset=5, subset_seed=2)
    assert len(a) == 5 and a.indices == b.indices and a.indices != c.indices
    assert len(set(a.indices)) == 5 and all(0 <= i < 12 for i in a.indices)
    assert a.targets.tolist() == [int(arrays["train_y"][i]) for i in a.indices]
    assert len(a.classes) == 10
    full, _ = build_dataset("fashion_mnist", folder, "train", subset=100)
    assert len(full) == 12


def test_bad_arguments(fmnist_dir):
    folder, _ = fmnist_dir
    with pytest.raises(ValueError, match="unknown dataset 'mnist'") as ei:
        build_dataset("mnist", folder, "train")
    for name in DATASET_NAMES:
        assert name in str(ei.value)
    with pytest.raises(ValueError, match="split='dev'"):
        build_dataset("fashion_mnist", folder, "dev")
    with pytest.raises(ValueError, match="on_bad_image='ignore'"):
        build_dataset("fashion_mnist", folder, "train", on_bad_image="ignore")
    with pytest.raises(ValueError, match="subset=0"):
        build_dataset("fashion_mnist", folder, "train", subset=0)
    with pytest.raises(ValueError, match="image_size=-1"):
        get_dataset_info("cifar10", image_size=-1)
    ds, _ = build_dataset("fashion_mnist", folder, "train")
    with pytest.raises(ValueError, match="batch_size=0"):
        build_loader(ds, 0, train=True)
    with pytest.raises(ValueError, match="num_workers=-1"):
        build_loader(ds, 4, train=True, num_workers=-1)
    with pytest.raises(ValueError, match="drop_last=True with batch_size=64"):
        build_loader(ds, 64, train=True, drop_last=True)
    with pytest.raises(RuntimeError, match="init_process_group"):
        build_loader(ds, 4, train=True, distributed=True)


# --------------------------------------------------------------------------- loaders


def _labels(loader) -> list[list[int]]:
    return [y.tolist() for _, y in loader]


def test_loader_reproducible(tmp_path):
    arrays = make_fmnist(tmp_path / "fm", n_train=40, n_test=10, seed=5)
    ds, _ = build_dataset("fashion_mnist", tmp_path / "fm", "train", augment=False)
    la = build_loader(ds, 8, train=True, seed=3)
    lb = build_loader(ds, 8, train=True, seed=3)
    lc = build_loader(ds, 8, train=True, seed=4)
    ea1, ea2 = _labels(la), _labels(la)
    assert ea1 == _labels(lb) and ea2 == _labels(lb)  # epoch by epoch
    assert ea1 != ea2  # reshuffled each epoch
    assert ea1 != _labels(lc)
    assert sorted(sum(ea1, [])) == sorted(arrays["train_y"].tolist())
    ev = build_loader(ds, 16, train=False)
    assert sum(_labels(ev), []) == arrays["train_y"].tolist()  # eval: in order, nothing dropped
    assert len(ev) == 3 and len(la) == 5
    tiny = build_loader(build_dataset("fashion_mnist", tmp_path / "fm", "val")[0], 32, train=True)
    assert len(tiny) == 1  # default drop_last does not drop everything


def test_loader_worker_augmentation_reproducible(fmnist_dir):
    folder, _ = fmnist_dir
    ds, _ = build_dataset("fashion_mnist", folder, "train")
    runs = []
    for _ in range(2):
        loader = build_loader(ds, 6, train=True, num_workers=1, seed=7)
        runs.append([x for x, _ in loader])
        del loader
    assert len(runs[0]) == 2
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))


# --------------------------------------------------------------------------- real data (optional)


@pytest.mark.skipif(not Path(fm_mod.SYSTEM_DIR).is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_test_split():
    ds = FashionMNIST(fm_mod.SYSTEM_DIR, split="test")
    assert len(ds) == 10000 and len(ds.classes) == 10
    assert sorted(ds.targets.unique().tolist()) == list(range(10))
    assert torch.bincount(ds.targets).tolist() == [1000] * 10


# --------------------------------------------------------------------------- own class folders


def _png_classes(root: Path, counts: dict[str, int], size=(10, 8)) -> None:
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for k in range(n):
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / name / f"{k}.png")


def test_imagefolder_derives_classes_and_size_from_the_data(tmp_path):
    _png_classes(tmp_path / "train", {"b": 3, "a": 2}, size=(10, 8))
    _png_classes(tmp_path / "val", {"a": 1}, size=(10, 8))
    train, info = build_dataset("imagefolder", tmp_path, "train")
    assert info.classes == ("a", "b") and info.num_classes == 2 and info.input_size == (3, 8, 8)
    assert len(train) == 5 and train[0][0].shape == (3, 8, 8)
    val, vinfo = build_dataset("imagefolder", tmp_path, "val")
    assert vinfo == info and len(val) == 1 and val[0][1] == 0  # labels follow the train classes
    _, big = build_dataset("imagefolder", tmp_path, "train", image_size=16)
    assert big.input_size == (3, 16, 16)
    with pytest.raises(ValueError, match="imagefolder.*data.root"):
        build_dataset("imagefolder", None, "train")
    with pytest.raises(ValueError, match="unknown class"):
        build_dataset("imagefolder", tmp_path, "val", classes=["x", "y"])


def test_imagefolder_without_val_splits_one_folder_by_seed(tmp_path):
    _png_classes(tmp_path, {"a": 10, "b": 10})
    tr, info = build_dataset("imagefolder", tmp_path, "train", subset_seed=1)
    va, _ = build_dataset("imagefolder", tmp_path, "val", subset_seed=1)
    assert info.classes == ("a", "b") and len(tr) == 18 and len(va) == 2
    assert sorted(va.targets) == [0, 1]  # stratified: one of each class
    assert not set(tr.indices) & set(va.indices) and sorted(tr.indices + va.indices) == list(range(20))
    again, _ = build_dataset("imagefolder", tmp_path, "val", subset_seed=1)
    other, _ = build_dataset("imagefolder", tmp_path, "val", subset_seed=2)
    assert again.indices == va.indices and other.indices != va.indices


@pytest.mark.parametrize("alias", ["fmnist", "fashion-mnist", "Fashion_MNIST", "FashionMNIST"])
def test_dataset_aliases(alias, fmnist_dir):
    folder, _ = fmnist_dir
    assert build_dataset(alias, folder, "val")[1].name == "fashion_mnist"


def test_augmentation_is_a_function_of_seed_epoch_and_index(fmnist_dir):
    """Workers, resume position and the global RNG do not change a sample's augmentation."""
    from dynwire.data import SeededDataset

    folder, _ = fmnist_dir
    ds, _ = build_dataset("fashion_mnist", folder, "train")
    seeded = SeededDataset(ds, seed=3)
    torch.manual_seed(0)
    a = seeded[(1, 4)][0]
    torch.manual_seed(123)
    assert torch.equal(seeded[(1, 4)][0], a)
    assert not all(torch.equal(seeded[(e, 4)][0], a) for e in range(2, 8))  # epochs differ
    state = torch.get_rng_state()
    seeded[(0, 0)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG stream is untouched
    loaders = [build_loader(ds, 4, train=True, num_workers=w, seed=3) for w in (0, 2)]
    got = [[x for x, _ in loader] for loader in loaders]
    assert all(torch.equal(p, q) for p, q in zip(*got))
