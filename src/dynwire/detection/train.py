"""A small iteration-based detection training loop (standalone until the engine takes it over).

Schedule as Detectron2's ``WarmupMultiStepLR``: linear warm-up from ``warmup_factor`` over
``warmup_iters``, then the lr is multiplied by ``gamma`` at each of ``steps``. SGD with
momentum; weight decay on conv/linear weights only (not on norms, biases, router biases,
thresholds or edge logits, as the classification recipes). Every iteration reseeds torch's RNG
from ``(seed, iteration)`` (the flip, the multi-scale size and the RPN/RoI samplers draw from
it) and the data order is a function of ``(seed, iteration)``, so a run resumed from its last
checkpoint reproduces the uninterrupted run's weights exactly. Checkpoints are written to a
temporary file and renamed over ``last.pt``; metrics go to ``metrics.jsonl``.
"""

from __future__ import annotations

import bisect
import json
import os
import pickle
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Sampler

from ._transforms import random_hflip_batch
from .coco import CocoDetection, coco_split_paths, collate_detection, drop_crowd
from .config import DetectionConfig, detection_config_from_dict, detection_config_to_dict
from .evaluate import evaluate_coco
from .model import fasterrcnn_fpn

__all__ = [
    "train_detector",
    "build_detector",
    "build_detection_datasets",
    "load_detector",
    "evaluate_detector_checkpoint",
    "lr_factor",
    "IterationBatchSampler",
    "CHECKPOINT_FORMAT",
]

CHECKPOINT_FORMAT = "dynwire-detection/1"


def lr_factor(it: int, warmup_iters: int, warmup_factor: float, steps: Sequence[int], gamma: float) -> float:
    """Detectron2's WarmupMultiStepLR factor for 0-based iteration ``it``."""
    f = gamma ** bisect.bisect_right(list(steps), it)
    if it < warmup_iters:
        alpha = it / warmup_iters
        f *= warmup_factor * (1 - alpha) + alpha
    return f


def _iter_seed(seed: int, it: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(it)]).generate_state(1, dtype=np.uint64)[0] >> 1)


class IterationBatchSampler(Sampler[list[int]]):
    """Batches for iterations ``start .. stop-1``: consecutive slices of per-epoch permutations.

    Epoch ``e`` is ``randperm(n)`` seeded by ``(seed, e)``; iteration ``i`` takes positions
    ``i * batch .. (i + 1) * batch`` of their concatenation, so the batches depend only on
    ``(seed, i)`` and resuming at ``start`` continues exactly. ``rank``/``world_size`` give each
    process its share of every batch (for DDP).
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if n < 1:
            raise ValueError("the training set is empty")
        self.n, self.batch, self.seed, self.start, self.stop = n, batch_size, seed, start, stop
        self.rank, self.world = rank, world_size

    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(_iter_seed(self.seed, 1_000_000_007 + epoch))
        return torch.randperm(self.n, generator=g).tolist()

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        pos = self.start * self.batch
        epoch, off = divmod(pos, self.n)
        perm = self._perm(epoch)
        for _ in range(len(self)):
            batch = []
            while len(batch) < self.batch:
                if off == self.n:
                    epoch, off = epoch + 1, 0
                    perm = self._perm(epoch)
                take = min(self.batch - len(batch), self.n - off)
                batch.extend(perm[off : off + take])
                off += take
            yield batch[self.rank :: self.world]


def build_detection_datasets(cfg: DetectionConfig) -> tuple[CocoDetection, CocoDetection]:
    d = cfg.data
    if d.root is None:
        hint = " (generate it: dynwire make-scenes DIR)" if d.name == "fmnist_scenes" else ""
        raise ValueError(f"data.root is not set: the folder with <split>/ and annotations/{hint}")
    sets = []
    for split, train in ((d.train_split, True), (d.val_split, False)):
        images, ann = coco_split_paths(d.root, split)
        if not ann.is_file():
            hint = f"; generate the scenes with: dynwire make-scenes {d.root}" if d.name == "fmnist_scenes" else ""
            raise ValueError(f"data: annotation file '{ann}' not found (data.root={d.root!r}, split {split!r}){hint}")
        sets.append(
            CocoDetection(
                images, ann, skip_bad=d.skip_bad, check_images=d.check_images, remove_empty=train and d.remove_empty
            )
        )
    return sets[0], sets[1]


def build_detector(cfg: DetectionConfig, num_classes: int, backbone_weights: bool = True) -> nn.Module:
    m, d = cfg.model, cfg.data
    return fasterrcnn_fpn(
        m.name,
        wiring=m.wiring,
        num_classes=num_classes,
        trainable_stages=m.trainable_stages,
        norm=m.norm,
        returned_stages=m.returned_stages,
        min_size=tuple(int(s) for s in d.train_min_size),
        max_size=d.max_size,
        backbone_weights=m.backbone_weights if backbone_weights else None,
        backbone_kwargs={**m.wiring_kwargs, **m.backbone_kwargs},
        fpn_channels=m.fpn_channels,
        anchor_sizes=m.anchor_sizes,
        representation_size=m.representation_size,
        **m.detector_kwargs,
    )


@contextmanager
def _test_size(model: nn.Module, size: int) -> Iterator[None]:
    """Evaluate at ``size`` (GeneralizedRCNNTransform uses ``min_size[-1]`` in eval mode)."""
    old = model.transform.min_size
    model.transform.min_size = (int(size),)
    try:
        yield
    finally:
        model.transform.min_size = old


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"checkpoint '{path}': unreadable or not weights-only ({exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint '{path}': not a dynwire detection checkpoint ({CHECKPOINT_FORMAT})")
    return ckpt


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _trim_metrics(path: Path, last_iter: int) -> None:
    """After a resume, drop metric lines logged after the checkpoint (they will be logged again)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("iter", 0) <= last_iter]
    path.write_text("".join(ln + "\n" for ln in keep))


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k != "summary"}


def train_detector(
    cfg: DetectionConfig | dict[str, Any],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    resume: bool = True,
    stop_at: int | None = None,
    datasets: tuple[CocoDetection, CocoDetection] | None = None,
) -> dict[str, Any]:
    """Train Faster R-CNN + FPN as ``cfg`` says, in ``out_dir`` (default ``output.dir/output.name``).

    Resumes from ``out_dir/last.pt`` when it exists (``resume=False`` refuses to overwrite an
    existing run). ``stop_at`` ends the run after that many iterations (the schedule is still
    ``schedule.iters`` long: an interruption, for tests). Returns the final metrics (also in
    ``final.json``).
    """
    cfg = detection_config_from_dict(cfg)
    out = Path(out_dir) if out_dir is not None else Path(cfg.output.dir) / cfg.output.name
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = out / "last.pt", out / "metrics.jsonl"
    if ckpt_path.exists() and not resume:
        raise ValueError(f"'{out}' already holds a run (last.pt); resume it or choose another output folder")
    threads = torch.get_num_threads()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    try:
        return _train(cfg, out, ckpt_path, metrics_path, stop_at, datasets)
    finally:
        torch.set_num_threads(threads)


def _train(
    cfg: DetectionConfig,
    out: Path,
    ckpt_path: Path,
    metrics_path: Path,
    stop_at: int | None,
    datasets: tuple[CocoDetection, CocoDetection] | None,
) -> dict[str, Any]:
    from tqdm import tqdm

    device = _pick_device(cfg.train.device)
    train_ds, val_ds = datasets if datasets is not None else build_detection_datasets(cfg)
    if train_ds.label_to_cat_id != val_ds.label_to_cat_id:
        raise ValueError(
            f"'{train_ds.ann_file}' and '{val_ds.ann_file}' have different categories; "
            "train and val must share the category list"
        )
    torch.manual_seed(cfg.train.seed)
    ckpt = _load(ckpt_path) if ckpt_path.exists() else None
    model = build_detector(cfg, train_ds.num_classes, backbone_weights=ckpt is None).to(device)
    d, s, o = cfg.data, cfg.schedule, cfg.optim
    base_lr = o.lr * d.batch_size / o.reference_batch
    optimizer = torch.optim.SGD(_param_groups(model, o.weight_decay), lr=base_lr, momentum=o.momentum)
    start = 0
    cfg_dict = detection_config_to_dict(cfg)
    if ckpt is not None:
        if ckpt["config"]["model"] != cfg_dict["model"] or ckpt["config"]["schedule"] != cfg_dict["schedule"]:
            raise ValueError(
                f"checkpoint '{ckpt_path}' was trained with another model or schedule section; "
                "use a new output folder (or the checkpoint's config.yaml)"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start = int(ckpt["iter"])
        _trim_metrics(metrics_path, start)
    else:
        (out / "config.yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    stop = min(s.iters, stop_at) if stop_at is not None else s.iters

    def save(it: int) -> None:
        _atomic_save(
            {
                "format": CHECKPOINT_FORMAT,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "iter": it,
                "config": cfg_dict,
                "num_classes": train_ds.num_classes,
                "class_names": list(train_ds.class_names),
                "label_to_cat_id": dict(train_ds.label_to_cat_id),
            },
            ckpt_path,
        )

    val_loader = DataLoader(
        val_ds, batch_size=d.eval_batch_size, shuffle=False, num_workers=d.num_workers, collate_fn=collate_detection
    )

    def evaluate(it: int) -> dict[str, Any]:
        with _test_size(model, d.test_min_size):
            m = evaluate_coco(
                model,
                val_loader,
                val_ds.coco,
                out / "detections_val.json",
                label_to_cat_id=train_ds.label_to_cat_id,
                device=device,
                max_images=d.val_subset,
            )
        (out / "eval_summary.txt").write_text(f"iteration {it}\n{m['summary']}\n")
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"iter": it, "eval": _jsonable(m)}) + "\n")
        return m

    sampler = IterationBatchSampler(len(train_ds), d.batch_size, cfg.train.seed, start, stop)
    loader = DataLoader(
        train_ds,
        batch_sampler=sampler,
        num_workers=d.num_workers,
        collate_fn=collate_detection,
        persistent_workers=False,
    )
    model.train()
    bar = tqdm(total=stop, initial=start, desc=cfg.output.name, disable=not cfg.train.progress, dynamic_ncols=True)
    window: dict[str, float] = {}
    n_window, t_window, t_run = 0, time.perf_counter(), time.perf_counter()
    last_eval: dict[str, Any] | None = None
    done = start
    for it, (images, targets) in enumerate(loader, start=start):
        torch.manual_seed(_iter_seed(cfg.train.seed, it))
        images, targets = random_hflip_batch(images, [drop_crowd(t) for t in targets], d.hflip_prob)
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        lr = base_lr * lr_factor(it, s.warmup_iters, s.warmup_factor, s.steps, s.gamma)
        for g in optimizer.param_groups:
            g["lr"] = lr
        losses = model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            parts = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            raise FloatingPointError(
                f"non-finite loss at iteration {it + 1} ({parts}); last good state: '{ckpt_path}'. "
                "Try a lower optim.lr, a longer warm-up or optim.clip_grad_norm."
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if o.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad_norm)
        optimizer.step()
        done = it + 1
        for k, v in losses.items():
            window[k] = window.get(k, 0.0) + v.item()
        window["loss"] = window.get("loss", 0.0) + loss.item()
        n_window += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2g}")
        if done % cfg.train.log_every == 0 or done == stop:
            dt = time.perf_counter() - t_window
            rec = {"iter": done, "lr": lr, **{k: v / n_window for k, v in window.items()}}
            rec.update(s_per_iter=dt / n_window, eta_s=(s.iters - done) * dt / n_window)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            window, n_window, t_window = {}, 0, time.perf_counter()
        if done % cfg.train.ckpt_every_iters == 0 or done == stop:
            save(done)
        if (cfg.train.eval_every_iters and done % cfg.train.eval_every_iters == 0) or done == s.iters:
            last_eval = evaluate(done)
            model.train()
    bar.close()
    train_time = time.perf_counter() - t_run
    final = {
        "iters": done,
        "completed": done >= s.iters,
        "eval": _jsonable(last_eval) if last_eval is not None else None,
        "train_time_s": train_time,
        "s_per_iter": train_time / max(1, stop - start),
        "checkpoint": str(ckpt_path),
    }
    (out / "final.json").write_text(json.dumps(final, indent=2))
    return final


def load_detector(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the detector of a :func:`train_detector` checkpoint; returns ``(model, checkpoint)``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint '{path}': file not found")
    ckpt = _load(path)
    cfg = detection_config_from_dict(ckpt["config"])
    model = build_detector(cfg, int(ckpt["num_classes"]), backbone_weights=False)
    model.load_state_dict(ckpt["model"])
    model.to(torch.device(device)).eval()
    model.transform.min_size = (int(cfg.data.test_min_size),)
    return model, ckpt


def evaluate_detector_checkpoint(
    path: str | os.PathLike[str],
    *,
    data_root: str | None = None,
    out_json: str | os.PathLike[str] | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    max_images: int | None = None,
) -> dict[str, Any]:
    """COCO evaluation of a detection checkpoint on its config's val split (what ``dynwire eval`` will call).

    Detections are written in COCO results format to ``out_json`` (default: beside the
    checkpoint, ``<name>_detections.json``).
    """
    dev = _pick_device(device)
    model, ckpt = load_detector(path, dev)
    cfg = detection_config_from_dict(ckpt["config"])
    if data_root is not None:
        cfg.data.root = data_root
    images, ann = coco_split_paths(cfg.data.root, cfg.data.val_split)
    ds = CocoDetection(images, ann, skip_bad=cfg.data.skip_bad, check_images=cfg.data.check_images)
    loader = DataLoader(ds, batch_size=batch_size or cfg.data.eval_batch_size, collate_fn=collate_detection)
    out_json = Path(out_json) if out_json is not None else Path(path).with_name(Path(path).stem + "_detections.json")
    mapping = {int(k): int(v) for k, v in ckpt["label_to_cat_id"].items()}
    m = evaluate_coco(model, loader, ds.coco, out_json, label_to_cat_id=mapping, device=dev, max_images=max_images)
    m["detections_json"] = str(out_json)
    m["iter"] = int(ckpt["iter"])
    return m
