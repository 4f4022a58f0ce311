"""Detection: Faster R-CNN + FPN over every backbone family, COCO data, scenes, evaluation, training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import write_fmnist_fixture
from PIL import Image
from torchvision.models.detection import FasterRCNN
from torchvision.ops.misc import FrozenBatchNorm2d

import dynwire
from dynwire.detection import (
    CocoDetection,
    CocoFormatError,
    collate_detection,
    default_returned_stages,
    detect_images,
    draw_detections,
    drop_crowd,
    evaluate_coco,
    evaluate_detector_checkpoint,
    fasterrcnn_fpn,
    hflip,
    load_detector,
    lr_factor,
    main_make_scenes,
    make_scenes,
    profile_detector,
    train_detector,
)
from dynwire.detection.config import load_detection_config
from dynwire.detection.scenes import area_band
from dynwire.models import torchvision_reference

pytestmark = pytest.mark.filterwarnings("ignore:fasterrcnn_fpn. norm='frozen_bn' without backbone_weights")

# Small heads: the tests exercise the backbone integration, not the head's size.
TINY = dict(
    min_size=64,
    max_size=64,
    fpn_channels=16,
    representation_size=32,
    rpn_pre_nms_top_n_train=64,
    rpn_post_nms_top_n_train=32,
    rpn_pre_nms_top_n_test=64,
    rpn_post_nms_top_n_test=32,
    box_batch_size_per_image=16,
)


def _images_targets():
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [30.0, 30.0, 60.0, 46.0]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # an image without objects
    ]
    return images, targets


# --------------------------------------------------------------------------- the detector
@pytest.mark.parametrize(
    "name,node", [(n, "block") for n in dynwire.list_models()] + [("resnet18", "branch"), ("mobilenet_v2", "branch")]
)
def test_every_family_trains_and_detects(name, node):
    torch.set_num_threads(1)
    model = fasterrcnn_fpn(name, "dynamic", num_classes=3, **TINY, backbone_kwargs=dict(node=node))
    assert isinstance(model, FasterRCNN)
    images, targets = _images_targets()
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    # a trainable stage's routers get gradients, a frozen one's do not exist
    body = model.backbone.body
    last = getattr(body, body.feature_info[-1]["module"])
    assert last.edges.tau.grad is not None
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and set(out[0]) == {"boxes", "labels", "scores"}
    assert out[1]["boxes"].shape[1] == 4


def test_defaults_follow_detectron2_r50_fpn():
    model = fasterrcnn_fpn("resnet50", num_classes=3, **TINY)
    body = model.backbone.body
    assert model.backbone.stage_names == ["layer1", "layer2", "layer3", "layer4"]
    assert model.backbone.strides == [4, 8, 16, 32]
    assert isinstance(body.bn1, FrozenBatchNorm2d) and not any(
        isinstance(m, torch.nn.BatchNorm2d) for m in body.modules()
    )
    assert not body.conv1.weight.requires_grad
    assert not any(p.requires_grad for p in body.layer1.parameters())  # stem + res2 frozen
    for stage in ("layer2", "layer3", "layer4"):
        s = getattr(body, stage)
        assert all(p.requires_grad for p in s.parameters())
        assert s.edges.tau.requires_grad and s.edges.routers[0].fc.weight.requires_grad
    assert not body.layer1.edges.tau.requires_grad and not body.layer1.edges.routers[0].fc.weight.requires_grad
    sizes = model.rpn.anchor_generator.sizes
    assert sizes == ((32,), (64,), (128,), (256,), (512,))
    assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2", "3"]


def test_frozen_bn_without_weights_warns():
    with pytest.warns(UserWarning, match="train from scratch with norm='bn'"):
        fasterrcnn_fpn("cifar_resnet20", num_classes=3, **TINY)


def test_stage_choice_and_options():
    mb = dynwire.create_model("mobilenet_v2", num_classes=0)
    idx = default_returned_stages(mb.feature_info)
    assert [mb.feature_info[i]["module"] for i in idx] == ["stage2", "stage3", "stage5", "stage7"]
    m = fasterrcnn_fpn("mobilenet_v2", num_classes=3, **TINY)
    assert m.backbone.strides == [4, 8, 16, 32]
    assert not any(p.requires_grad for p in m.backbone.body.conv_head.parameters())  # never run
    m = fasterrcnn_fpn("cifar_resnet20", num_classes=3, **TINY)
    assert m.backbone.stage_names == ["layer1", "layer2", "layer3"] and len(m.rpn.anchor_generator.sizes) == 4
    m = fasterrcnn_fpn(
        "resnet18", num_classes=3, trainable_stages=0, norm="bn", returned_stages=["layer3", "layer4"], **TINY
    )
    assert not any(p.requires_grad for p in m.backbone.body.parameters())
    assert (
        isinstance(m.backbone.body.layer4.blocks()[0].bn1, torch.nn.BatchNorm2d)
        and len(m.rpn.anchor_generator.sizes) == 3
    )
    m = fasterrcnn_fpn("resnet18", "sequential", num_classes=3, trainable_stages=4, **TINY)
    assert all(p.requires_grad for p in m.backbone.body.layer1.parameters())
    with pytest.raises(ValueError, match="trainable_stages"):
        fasterrcnn_fpn("resnet18", num_classes=3, trainable_stages=5, **TINY)
    with pytest.raises(ValueError, match="norm="):
        fasterrcnn_fpn("resnet18", num_classes=3, norm="gn", **TINY)
    with pytest.raises(ValueError, match="anchor_sizes"):
        fasterrcnn_fpn("resnet18", num_classes=3, anchor_sizes=[[32], [64]], **TINY)
    with pytest.raises(ValueError, match="unknown stage"):
        fasterrcnn_fpn("resnet18", num_classes=3, returned_stages=["layer9"], **TINY)


def test_adjacency_recording_and_eval_gate_inside_the_detector():
    model = fasterrcnn_fpn("cifar_resnet20", num_classes=3, **TINY).eval()
    model.backbone.body.set_eval_gate("hard")
    images, _ = _images_targets()
    with dynwire.record_adjacency(model) as rec, torch.no_grad():
        model(images)
    assert rec["backbone.body.layer2"].shape == (2, 4, 4)


# --------------------------------------------------------------------------- backbone weights
def test_backbone_from_classification_checkpoint_and_torchvision_file(tmp_path):
    cls = dynwire.create_model("resnet18", num_classes=10)
    with torch.no_grad():
        cls.bn1.running_mean.uniform_()
    ckpt = tmp_path / "last.pt"
    torch.save({"model": cls.state_dict(), "epoch": 3, "config": {"model": {"name": "resnet18"}}}, ckpt)
    det = fasterrcnn_fpn("resnet18", num_classes=3, backbone_weights=ckpt, **TINY)
    body = det.backbone.body
    assert torch.equal(getattr(body.layer3, "1").conv2.weight, getattr(cls.layer3, "1").conv2.weight)
    assert torch.equal(body.bn1.running_mean, cls.bn1.running_mean)  # statistics into FrozenBatchNorm2d
    assert torch.equal(body.layer2.edges.tau, cls.layer2.edges.tau)  # a dynamic checkpoint keeps its wiring

    tv = tmp_path / "resnet18_tv.pth"
    ref = torchvision_reference("resnet18")
    torch.save(ref.state_dict(), tv)
    det = fasterrcnn_fpn("resnet18", "dynamic", num_classes=3, backbone_weights=tv, norm="bn", **TINY)
    assert torch.equal(det.backbone.body.layer4.blocks()[0].downsample[0].weight, ref.layer4[0].downsample[0].weight)

    with pytest.raises(ValueError, match=r"resnet18_tv\.pth.*do not fit.*(missing|unexpected|shape)") as e:
        fasterrcnn_fpn("resnet50", num_classes=3, backbone_weights=tv, **TINY)
    assert "layer" in str(e.value)
    junk = tmp_path / "notes.txt"
    junk.write_text("not weights")
    with pytest.raises(ValueError, match=r"notes\.txt"):
        fasterrcnn_fpn("resnet18", num_classes=3, backbone_weights=junk, **TINY)
    with pytest.raises(ValueError, match="not found"):
        fasterrcnn_fpn("resnet18", num_classes=3, backbone_weights=tmp_path / "nope.pt", **TINY)


def test_one_channel_stem_is_spread_over_rgb(tmp_path):
    cls = dynwire.create_model("cifar_resnet20", num_classes=10, in_chans=1)
    path = tmp_path / "fmnist.pt"
    torch.save({"model": cls.state_dict()}, path)
    det = fasterrcnn_fpn("cifar_resnet20", num_classes=3, backbone_weights=path, **TINY)
    w = det.backbone.body.conv1.weight
    assert w.shape[1] == 3 and torch.allclose(w.sum(1, keepdim=True), cls.conv1.weight)


# --------------------------------------------------------------------------- COCO data
def _write_coco(root: Path, n_images=3, size=(40, 32)):
    (root / "img").mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(1, n_images + 1):
        Image.new("RGB", size, (i * 40, 10, 10)).save(root / "img" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": size[0], "height": size[1]})
    anns = [
        {"id": 10, "image_id": 1, "category_id": 3, "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 7, "bbox": [20, 10, 15, 20], "area": 300, "iscrowd": 0},
        {"id": 12, "image_id": 2, "category_id": 7, "bbox": [0, 0, 40, 32], "area": 1280, "iscrowd": 1},
        {"id": 13, "image_id": 3, "category_id": 3, "bbox": [5, 5, 5, 5], "area": 25, "iscrowd": 0},
    ]
    cats = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    return {"images": images, "annotations": anns, "categories": cats}


def _dump(root, data, name="ann.json"):
    p = root / name
    p.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return p


def test_coco_dataset_format_and_crowd(tmp_path):
    data = _write_coco(tmp_path)
    ds = CocoDetection(tmp_path / "img", _dump(tmp_path, data))
    assert len(ds) == 3 and ds.num_classes == 3 and ds.class_names == ["__background__", "cat", "dog"]
    img, t = ds[0]
    assert img.shape == (3, 32, 40) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    assert t["boxes"].tolist() == [[2, 3, 12, 11], [20, 10, 35, 30]]
    assert t["labels"].tolist() == [1, 2] and int(t["image_id"]) == 1 and t["iscrowd"].tolist() == [0, 0]
    _, t2 = ds[1]
    assert t2["iscrowd"].tolist() == [1] and drop_crowd(t2)["boxes"].shape == (0, 4)
    assert ds.label_to_cat_id == {1: 3, 2: 7}
    images, targets = collate_detection([ds[0], ds[1]])
    assert len(images) == len(targets) == 2 and images[1].shape == (3, 32, 40)
    flipped, ft = hflip(img, t)
    assert ft["boxes"][0].tolist() == [28, 3, 38, 11] and torch.equal(flipped.flip(-1), img)
    ds2 = CocoDetection(tmp_path / "img", _dump(tmp_path, data), remove_empty=True)
    assert len(ds2) == 2  # image 2 holds only a crowd region


BAD_CASES = {
    "non-positive width": (lambda d: d["annotations"][0].update(bbox=[2, 3, 0, 8]), "annotation id 10", "non-positive"),
    "non-positive height": (
        lambda d: d["annotations"][1].update(bbox=[2, 3, 4, -1]),
        "annotation id 11",
        "non-positive",
    ),
    "outside the image": (lambda d: d["annotations"][1].update(bbox=[30, 10, 15, 20]), "annotation id 11", "outside"),
    "negative corner": (lambda d: d["annotations"][0].update(bbox=[-5, 3, 10, 8]), "annotation id 10", "outside"),
    "unknown category": (lambda d: d["annotations"][3].update(category_id=99), "annotation id 13", "category_id 99"),
    "duplicate annotation id": (
        lambda d: d["annotations"][3].update(id=11),
        "annotation id 11",
        "duplicate annotation",
    ),
    "unknown image id": (lambda d: d["annotations"][3].update(image_id=42), "annotation id 13", "image_id 42"),
    "malformed box": (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "annotation id 10", "bbox"),
    "duplicate image id": (lambda d: d["images"].append(dict(d["images"][0])), "", "duplicate image id 1"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_annotations_error_or_skip(tmp_path, case):
    edit, ident, what = BAD_CASES[case]
    data = _write_coco(tmp_path)
    edit(data)
    ann = _dump(tmp_path, data)
    with pytest.raises(CocoFormatError) as e:
        CocoDetection(tmp_path / "img", ann)
    msg = str(e.value)
    assert str(ann) in msg and ident in msg and what in msg and "skip_bad" in msg
    ds = CocoDetection(tmp_path / "img", ann, skip_bad=True)
    assert sum(ds.skipped.values()) == 1
    assert len(ds) == 3
    assert all(torch.isfinite(ds[i][1]["boxes"]).all() for i in range(len(ds)))


def test_bad_images_error_or_skip(tmp_path):
    data = _write_coco(tmp_path)
    (tmp_path / "img" / "2.png").unlink()
    (tmp_path / "img" / "3.png").write_bytes(b"not a png at all")
    ann = _dump(tmp_path, data)
    with pytest.raises(CocoFormatError, match=r"2\.png.*image id 2.*not found"):
        CocoDetection(tmp_path / "img", ann)
    ds = CocoDetection(tmp_path / "img", ann, skip_bad=True)
    assert ds.skipped == {"missing image": 1, "unreadable image": 1, "annotation of a skipped image": 2}
    assert ds.ids == [1] and ds.skipped_ids["unreadable image"] == [3]
    # a truncated file that passes the header check fails when read, naming the file
    Image.new("RGB", (40, 32)).save(tmp_path / "img" / "2.png")
    Image.new("RGB", (40, 32)).save(tmp_path / "img" / "3.png")
    raw = (tmp_path / "img" / "3.png").read_bytes()
    (tmp_path / "img" / "3.png").write_bytes(raw[:60])
    assert CocoDetection(tmp_path / "img", ann, skip_bad=True, check_images="decode").skipped["unreadable image"] == 1
    with pytest.raises(CocoFormatError, match=r"3\.png.*image id 3.*cannot read"):
        CocoDetection(tmp_path / "img", ann, check_images="decode")
    ds = CocoDetection(tmp_path / "img", ann, skip_bad=True, check_images="exists")
    with pytest.raises(CocoFormatError, match=r"3\.png.*image id 3.*cannot decode"):
        ds[ds.ids.index(3)]
    data["images"][0]["width"] = 41
    with pytest.raises(CocoFormatError, match="is 40x32 but the JSON says 41x32"):
        CocoDetection(tmp_path / "img", _dump(tmp_path, data))


def test_malformed_json_always_stops(tmp_path):
    _write_coco(tmp_path)
    bad = _dump(tmp_path, '{"images": [], "annotations": [,]}')
    with pytest.raises(CocoFormatError, match=r"ann\.json.*malformed JSON at line 1 column"):
        CocoDetection(tmp_path / "img", bad, skip_bad=True)
    with pytest.raises(CocoFormatError, match="missing or non-list 'categories'"):
        CocoDetection(tmp_path / "img", _dump(tmp_path, {"images": [], "annotations": []}))
    with pytest.raises(CocoFormatError, match="not found"):
        CocoDetection(tmp_path / "img", tmp_path / "missing.json")


# --------------------------------------------------------------------------- scenes
@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    return write_fmnist_fixture(tmp_path_factory.mktemp("fm"), n_train=60, n_test=30)


def test_scenes_are_deterministic_tight_and_cover_the_area_bands(tmp_path, fmnist):
    a = make_scenes(tmp_path / "a", "val", 12, image_size=192, seed=3, fmnist_root=fmnist)
    b = make_scenes(tmp_path / "b", "val", 12, image_size=192, seed=3, fmnist_root=fmnist)
    ja, jb = (json.loads(Path(s["ann_file"]).read_text()) for s in (a, b))
    assert ja["annotations"] == jb["annotations"] and ja["images"] == jb["images"]
    pa = Image.open(Path(a["image_dir"]) / "000007.png")
    assert pa.size == (192, 192) and pa.mode == "RGB"
    assert (Path(a["image_dir"]) / "000007.png").read_bytes() == (Path(b["image_dir"]) / "000007.png").read_bytes()
    c = make_scenes(tmp_path / "c", "val", 12, image_size=192, seed=4, fmnist_root=fmnist)
    assert json.loads(Path(c["ann_file"]).read_text())["annotations"] != ja["annotations"]
    assert all(v > 0 for v in a["bands"].values()), a["bands"]
    assert [c["name"] for c in ja["categories"]][:2] == ["T-shirt/top", "Trouser"]
    per_image = {}
    for ann in ja["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(ann)
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 192 and y + h <= 192
        assert 0 < ann["area"] <= w * h and area_band(ann["area"]) in ("small", "medium", "large")
    assert all(1 <= len(v) <= 6 for v in per_image.values()) and len(per_image) == 12
    ds = CocoDetection(a["image_dir"], a["ann_file"])  # valid by our own validator
    assert len(ds) == 12 and ds.num_classes == 11


def test_make_scenes_cli_and_splits(tmp_path, fmnist, capsys):
    assert (
        main_make_scenes(
            [
                str(tmp_path),
                "--train-images",
                "3",
                "--val-images",
                "2",
                "--image-size",
                "64",
                "--fmnist-root",
                str(fmnist),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "train: 3 images" in out and "val: 2 images" in out
    tr = json.loads((tmp_path / "annotations" / "instances_train.json").read_text())
    va = json.loads((tmp_path / "annotations" / "instances_val.json").read_text())
    assert len(tr["images"]) == 3 and len(va["images"]) == 2
    assert "train images" in tr["info"]["description"] and "test images" in va["info"]["description"]
    with pytest.raises(ValueError, match="split"):
        make_scenes(tmp_path, "test", 2, fmnist_root=fmnist)


# --------------------------------------------------------------------------- evaluation, drawing
def test_evaluate_zero_detections_and_perfect_detections(tmp_path):
    data = _write_coco(tmp_path)
    ds = CocoDetection(tmp_path / "img", _dump(tmp_path, data))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_detection)

    class Replay(torch.nn.Module):
        def __init__(self, outputs):
            super().__init__()
            self.outputs = list(outputs)
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def forward(self, images):
            return [self.outputs.pop(0) for _ in images]

    def run(perfect):
        outs = []
        for i in range(len(ds)):
            t = drop_crowd(ds.target(i)) if perfect else {k: v[:0] for k, v in ds.target(i).items() if k != "image_id"}
            outs.append({"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))})
        return evaluate_coco(Replay(outs), loader, ds.coco, tmp_path / f"det_{perfect}.json")

    zero = run(False)
    assert zero["AP"] == 0.0 and zero["detections"] == 0 and zero["images"] == 3
    assert json.loads((tmp_path / "det_False.json").read_text()) == []
    assert zero["APl"] is None  # no ground truth larger than 96^2 in 40x32 images
    perfect = run(True)
    assert perfect["AP"] == pytest.approx(100.0) and perfect["AP50"] == pytest.approx(100.0)
    res = json.loads((tmp_path / "det_True.json").read_text())
    assert {r["category_id"] for r in res} == {3, 7}  # labels mapped back to COCO category ids
    assert res[0]["bbox"] == [2.0, 3.0, 10.0, 8.0]


def test_draw_detections(tmp_path):
    img = torch.rand(3, 40, 50)
    det = {
        "boxes": torch.tensor([[2.0, 2.0, 20.0, 30.0], [5.0, 5.0, 9.0, 9.0]]),
        "labels": torch.tensor([1, 2]),
        "scores": torch.tensor([0.9, 0.1]),
    }
    out = draw_detections(img, det, ["__background__", "cat", "dog"], 0.5, tmp_path / "d.png")
    assert out.dtype == torch.uint8 and out.shape == (3, 40, 50)
    assert Image.open(tmp_path / "d.png").size == (50, 40)
    assert not torch.equal(out, (img * 255).round().to(torch.uint8))


# --------------------------------------------------------------------------- training
def _recipe(root: Path, iters: int, **extra):
    cfg = {
        "model": {
            "name": "cifar_resnet20",
            "wiring": "dynamic",
            "norm": "bn",
            "fpn_channels": 16,
            "representation_size": 32,
            "anchor_sizes": [[8], [16], [32], [64]],
            "detector_kwargs": {k: v for k, v in TINY.items() if k.startswith(("rpn_", "box_"))},
        },
        "data": {
            "name": "fmnist_scenes",
            "root": str(root),
            "train_split": "train",
            "val_split": "val",
            "batch_size": 2,
            "eval_batch_size": 4,
            "num_workers": 0,
            "train_min_size": [56, 64],
            "test_min_size": 64,
            "max_size": 64,
        },
        "optim": {"lr": 0.01, "reference_batch": 2},
        "schedule": {"iters": iters, "warmup_iters": 2, "steps": [iters - 1]},
        "train": {
            "log_every": 1,
            "ckpt_every_iters": 1,
            "progress": False,
            "tensorboard": False,
            "num_threads": 1,
            "device": "cpu",
        },
    }
    for k, v in extra.items():
        cfg[k].update(v)
    return cfg


@pytest.fixture(scope="module")
def scenes(tmp_path_factory, fmnist):
    root = tmp_path_factory.mktemp("scenes")
    make_scenes(root, "train", 8, image_size=64, seed=0, fmnist_root=fmnist)
    make_scenes(root, "val", 4, image_size=64, seed=0, fmnist_root=fmnist)
    return root


def test_end_to_end_train_evaluate_reload(tmp_path, scenes):
    final = train_detector(_recipe(scenes, 3), tmp_path / "run")
    ev = final["eval"]
    assert final["completed"] and final["iters"] == 3
    for k in ("AP", "AP50", "AP75", "APs", "APm"):
        assert math.isfinite(ev[k]) and 0.0 <= ev[k] <= 100.0, (k, ev)
    assert ev["APl"] is None  # 64-pixel images hold no object above 96^2
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    assert [x["iter"] for x in train_lines] == [1, 2, 3] and all(math.isfinite(x["loss"]) for x in train_lines)
    assert "eval" in lines[-1] and (tmp_path / "run" / "detections_val.json").is_file()
    assert "Average Precision" in (tmp_path / "run" / "eval_summary.txt").read_text()
    model, ckpt = load_detector(tmp_path / "run" / "last.pt")
    assert ckpt["iter"] == 3 and ckpt["class_names"][1] == "T-shirt/top"
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64)])
    assert set(out[0]) == {"boxes", "labels", "scores"}
    ev2 = evaluate_detector_checkpoint(tmp_path / "run" / "last.pt", device="cpu")
    assert ev2["AP"] == pytest.approx(ev["AP"]) and Path(ev2["detections_json"]).name == "last_detections.json"
    drawn = detect_images(model, [scenes / "val" / "000001.png"], tmp_path / "drawn", ckpt["class_names"], 0.0)
    assert Image.open(drawn[0]).size == (64, 64)
    with pytest.raises(ValueError, match="already holds last.pt"):
        train_detector(_recipe(scenes, 3), tmp_path / "run", resume=False)


def test_resume_gives_identical_weights(tmp_path, scenes):
    cfg = _recipe(scenes, 4, schedule={"steps": [3]})
    train_detector(cfg, tmp_path / "full", stop_at=4)
    train_detector(cfg, tmp_path / "split", stop_at=2)
    assert torch.load(tmp_path / "split" / "last.pt", weights_only=True)["iter"] == 2
    train_detector(cfg, tmp_path / "split", stop_at=4)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert a["iter"] == b["iter"] == 4
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    iters = [json.loads(x)["iter"] for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert iters == [1, 2, 3, 4, 4]  # four training lines, then the final evaluation
    cfg["model"]["wiring"] = "sequential"
    with pytest.raises(ValueError, match="another model or schedule"):
        train_detector(cfg, tmp_path / "split")


def test_schedule_and_recipes():
    assert lr_factor(0, 1000, 0.001, [60000, 80000], 0.1) == pytest.approx(0.001)
    assert lr_factor(500, 1000, 0.001, [60000, 80000], 0.1) == pytest.approx(0.5005)
    assert lr_factor(1000, 1000, 0.001, [60000, 80000], 0.1) == 1.0
    assert lr_factor(60000, 1000, 0.001, [60000, 80000], 0.1) == pytest.approx(0.1)
    assert lr_factor(89999, 1000, 0.001, [60000, 80000], 0.1) == pytest.approx(0.01)
    for name, backbone in (
        ("coco_fasterrcnn_r50_fpn_1x", "resnet50"),
        ("coco_fasterrcnn_r101_fpn_1x", "resnet101"),
        ("coco_fasterrcnn_x50_fpn_1x", "resnext50_32x4d"),
    ):
        cfg = load_detection_config(name)
        assert cfg.model.name == backbone and cfg.schedule.iters == 90000 and cfg.schedule.steps == [60000, 80000]
        assert cfg.optim.lr == 0.02 and cfg.data.batch_size == 16 and cfg.schedule.warmup_iters == 1000
        assert cfg.data.train_min_size == [640, 672, 704, 736, 768, 800] and cfg.data.max_size == 1333
        assert cfg.data.test_min_size == 800 and cfg.model.norm == "frozen_bn" and cfg.model.trainable_stages == 3
    cfg = load_detection_config("det_fmnist_scenes", ["model.wiring=sequential", "schedule.iters=500"])
    assert cfg.model.wiring == "sequential" and cfg.schedule.iters == 500 and cfg.data.name == "fmnist_scenes"
    with pytest.raises(ValueError, match="unknown config key 'schedule.iter'"):
        load_detection_config("det_fmnist_scenes", ["schedule.iter=10"])


def test_profile_detector_counts_the_wiring_overhead():
    seq = profile_detector("cifar_resnet20", "sequential", (64, 64), fpn_channels=16, representation_size=32)
    dyn = profile_detector("cifar_resnet20", "dynamic", (64, 64), fpn_channels=16, representation_size=32)
    assert 0 < seq["backbone_gmacs"] < dyn["backbone_gmacs"] < seq["detector_gmacs"]
    assert dyn["detector_backbone_gmacs"] == pytest.approx(dyn["backbone_gmacs"], rel=1e-6)
    assert dyn["detector_gmacs"] == pytest.approx(
        dyn["backbone_gmacs"] + dyn["fpn_gmacs"] + dyn["rpn_gmacs"] + dyn["roi_heads_gmacs"], rel=1e-6
    )


def test_pruned_executor_inside_the_detector_matches_the_dense_reference():
    """Nodes removed per image inside a detector: same detections as every block executed."""
    torch.manual_seed(0)
    model = fasterrcnn_fpn("cifar_resnet20", "dynamic", num_classes=3, norm="bn", **TINY).eval()
    images, _ = _images_targets()
    body = model.backbone.body
    with torch.no_grad(), dynwire.record_adjacency(model) as rec:
        model(images)
    stages = {n: m for n, m in model.named_modules() if isinstance(m, dynwire.GraphStage)}
    assert set(rec.router) == set(stages) and len(stages) == len(body.feature_info)
    with torch.no_grad():  # thresholds inside each node's range of router weights
        for name, stage in stages.items():
            for j in range(1, stage.num_nodes):
                stage.edges.tau[j - 1] = rec.router[name][:, j, :j].median() + 1e-6
    with torch.no_grad(), dynwire.record_adjacency(model) as rec:
        pruned = model(images)
    assert any(r[:, 1:-1].any() for r in rec.removed.values()), "some blocks are removed"
    for stage in stages.values():
        stage.executor = "dense"
    with torch.no_grad():
        dense = model(images)
    for p, d in zip(pruned, dense):
        assert p["boxes"].shape == d["boxes"].shape
        torch.testing.assert_close(p["boxes"], d["boxes"], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(p["scores"], d["scores"], atol=1e-4, rtol=1e-4)


def test_profile_counts_the_backbone_that_is_built():
    from dynwire.detection import profile_detector

    cifar = profile_detector("cifar_resnet20", "sequential", (64, 64), detector=False)["backbone_gmacs"]
    stem = profile_detector(
        "cifar_resnet20", "sequential", (64, 64), detector=False, backbone_kwargs={"stem": "imagenet"}
    )["backbone_gmacs"]
    assert stem < cifar / 10  # the ImageNet stem downsamples 4x before the stages: ~16x fewer MACs
