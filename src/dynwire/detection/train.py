"""The iteration-based detection training loop, on the engine's pieces.

Schedule as Detectron2's ``WarmupMultiStepLR``: linear warm-up from ``warmup_factor`` over
``warmup_iters``, then the lr is multiplied by ``gamma`` at each of ``steps``. SGD with
momentum; weight decay on conv/linear weights only (not on norms, biases, router biases,
thresholds or edge logits, as the classification recipes). Every iteration reseeds torch's RNG
from ``(seed, iteration)`` (the flip, the multi-scale size and the RPN/RoI samplers draw from
it) and the data order is a function of ``(seed, iteration)``, so a run resumed from its last
checkpoint reproduces the uninterrupted run's weights exactly.

Shared with classification runs (``dynwire.engine``): atomic writes of every file
(``files.atomic_write``), weights-only checkpoint loading, ``run.json`` (seed, command line,
host, versions) and the resolved ``config.yaml`` in the run folder, ``metrics.jsonl`` /
``metrics.csv`` / TensorBoard through ``MetricsLogger``, live progress through ``Progress`` (a
tqdm bar on a terminal, plain ``[dynwire] ...`` lines otherwise), SIGINT/SIGTERM (finish the
iteration, save ``last.pt``, raise ``TrainingInterrupted``: exit 128 + signal), a NaN/Inf loss or
gradient norm raises ``TrainingDiverged`` (exit 3) without touching ``last.pt``, and DDP under
``torchrun`` (``data.batch_size`` is the global batch; rank 0 writes; detections of all ranks
are gathered for COCOeval).

This module holds the training loop and re-exports the pieces: ``_builders`` (lr schedule, batch
sampler, datasets, detector) and ``_checkpoint`` (the checkpoint format, :func:`load_detector`,
:func:`evaluate_detector_checkpoint`).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..engine.checkpoint import (
    CKPT_VERSION,
    atomic_torch_save,
    config_node,
    state_dict_sha256,
    stored_config,
    with_explicit_node,
)
from ..engine.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    cleanup_distributed,
    init_distributed,
)
from ..engine.files import atomic_write, atomic_write_json, remove_stale_temp_files
from ..engine.logging import MetricsLogger, Progress
from ..engine.optim import grad_norm
from ..engine.rundir import agreed_resume_path, write_run_json
from ..engine.signals import SignalGuard, TrainingInterrupted
from ..engine.trainer import TrainingDiverged

# The pieces, re-exported: this module stays the public face of detection training (the CLI and
# tests import from it). ``_DetectionRun.setup`` reads ``build_detector`` from this module, so
# patching ``dynwire.detection.train.build_detector`` still changes the trained detector;
# ``load_detector`` reads it from ``_builders``.
from ._builders import (  # noqa: F401
    IterationBatchSampler,
    _iter_seed,
    _param_groups,
    build_detection_datasets,
    build_detector,
    lr_factor,
)
from ._checkpoint import (  # noqa: F401
    CHECKPOINT_FORMAT,
    _checkpoint_config,
    _load,
    _pick_device,
    evaluate_detector_checkpoint,
    is_detection_checkpoint,
    load_detector,
)
from ._transforms import hflip
from .coco import CocoDetection, collate_detection, drop_crowd
from .config import DetectionConfig, detection_config_from_dict, detection_config_to_dict
from .evaluate import TABLE2_COLUMNS, evaluate_coco

__all__ = [
    "train_detector",
    "build_detector",
    "build_detection_datasets",
    "load_detector",
    "evaluate_detector_checkpoint",
    "lr_factor",
    "IterationBatchSampler",
    "is_detection_checkpoint",
    "CHECKPOINT_FORMAT",
]


@contextmanager
def _test_size(model: nn.Module, size: int) -> Iterator[None]:
    """Evaluate at ``size`` (GeneralizedRCNNTransform uses ``min_size[-1]`` in eval mode)."""
    old = model.transform.min_size
    model.transform.min_size = (int(size),)
    try:
        yield
    finally:
        model.transform.min_size = old


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k != "summary"}


def _node_explicit(model: dict | None) -> dict | None:
    """A detection config's model section with the node form spelled out (as checkpoints store it)."""
    if not isinstance(model, dict):
        return model
    return {**model, "wiring_kwargs": {**(model.get("wiring_kwargs") or {}), "node": config_node(model)}}


def train_detector(
    cfg: DetectionConfig | dict[str, Any],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    resume: bool | str = True,
    stop_at: int | None = None,
    datasets: tuple[CocoDetection, CocoDetection] | None = None,
) -> dict[str, Any]:
    """Train Faster R-CNN + FPN as ``cfg`` says, in ``out_dir`` (default ``output.dir/output.name``).

    ``resume``: True continues from ``out_dir/last.pt`` when it exists, False refuses to
    overwrite a run folder that holds one, a path continues from that checkpoint. ``stop_at``
    ends the run after that many iterations (the schedule is still ``schedule.iters`` long: an
    interruption, for tests). Under ``torchrun`` every process calls this (DDP, ``data.batch_size``
    is the global batch). Returns the final metrics (also in ``final.json``); raises
    ``TrainingInterrupted`` on SIGINT/SIGTERM after saving ``last.pt`` and ``TrainingDiverged``
    on a NaN/Inf loss or gradient norm.
    """
    cfg = detection_config_from_dict(cfg)
    out = Path(out_dir) if out_dir is not None else Path(cfg.output.dir) / cfg.output.name
    threads = torch.get_num_threads()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    info = init_distributed(cfg.train.device)
    try:
        run = _DetectionRun(cfg, out, info, resume, stop_at)
        run.setup(datasets)
        return run.run()
    finally:
        cleanup_distributed(info)
        torch.set_num_threads(threads)


class _DetectionRun:
    def __init__(
        self, cfg: DetectionConfig, out: Path, info: DistInfo, resume: bool | str, stop_at: int | None
    ) -> None:
        self.cfg, self.out, self.dist = cfg, out, info
        self.device = info.device
        self.is_main = info.is_main
        self.resume = "auto" if resume is True else None if resume is False else str(resume)
        s = cfg.schedule
        self.stop = min(s.iters, stop_at) if stop_at is not None else s.iters
        self.ckpt_path = out / "last.pt"
        self.cfg_dict = detection_config_to_dict(cfg)

    # ------------------------------------------------------------------ setup
    def setup(self, datasets: tuple[CocoDetection, CocoDetection] | None) -> None:
        cfg, info = self.cfg, self.dist
        d, o = cfg.data, cfg.optim
        if d.batch_size % info.world_size:
            raise ValueError(
                f"data.batch_size={d.batch_size}: the global batch must be divisible by the world size "
                f"({info.world_size})"
            )
        if cfg.model.norm == "sync_bn" and info.distributed and self.device.type != "cuda":
            raise ValueError("model.norm=sync_bn: SyncBatchNorm needs CUDA devices; use model.norm=bn on CPU")
        where = SimpleNamespace(run_dir=self.out, train=SimpleNamespace(seed=cfg.train.seed, resume=self.resume))
        self.resume_path = agreed_resume_path(where, info)  # type: ignore[arg-type]
        train_ds, val_ds = datasets if datasets is not None else build_detection_datasets(cfg)
        if train_ds.label_to_cat_id != val_ds.label_to_cat_id:
            raise ValueError(
                f"'{train_ds.ann_file}' and '{val_ds.ann_file}' have different categories; "
                "train and val must share the category list"
            )
        self.train_ds, self.val_ds = train_ds, val_ds
        ckpt = _load(self.resume_path) if self.resume_path is not None else None
        if ckpt is not None:
            c = stored_config(ckpt) if "config" in ckpt else {}
            if (
                _node_explicit(c.get("model")) != _node_explicit(self.cfg_dict["model"])
                or c.get("schedule") != self.cfg_dict["schedule"]
            ):
                raise ValueError(
                    f"checkpoint '{self.resume_path}' was trained with another model or schedule section; "
                    "use a new output folder (or the checkpoint's config.yaml)"
                )
            if int(ckpt["num_classes"]) != train_ds.num_classes:
                raise ValueError(
                    f"checkpoint '{self.resume_path}' has {ckpt['num_classes']} classes, the data "
                    f"{train_ds.num_classes}: another dataset?"
                )
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        model = build_detector(cfg, train_ds.num_classes, backbone_weights=ckpt is None).to(self.device)
        self.base_lr = o.lr * d.batch_size / o.reference_batch
        self.optimizer = torch.optim.SGD(_param_groups(model, o.weight_decay), lr=self.base_lr, momentum=o.momentum)
        self.start, self.pending_eval = 0, False
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.start, self.pending_eval = int(ckpt["iter"]), bool(ckpt.get("pending_eval", False))
        self.raw_model = model
        self.model: nn.Module = model
        if info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if self.is_main:  # the run folder appears only once data and model are in hand
            self.out.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(self.out)
            atomic_write(self.out / "config.yaml", yaml.safe_dump(self.cfg_dict, sort_keys=False))
            write_run_json(where, info, self.resume_path, self._run_info())  # type: ignore[arg-type]
            if self.resume_path is not None:
                print(
                    f"[dynwire] resumed from {self.resume_path} at iteration {self.start}/{cfg.schedule.iters}",
                    file=sys.stderr,
                    flush=True,
                )
        barrier(info)
        self.logger = MetricsLogger(
            self.out,
            enabled=self.is_main,
            tensorboard=cfg.train.tensorboard,
            resume_step=self.start if self.resume_path is not None else None,
        )
        self.progress = Progress(
            enabled=self.is_main and cfg.train.progress,
            epochs=1,
            steps_per_epoch=cfg.schedule.iters,
            start_step=self.start,
        )

    def _run_info(self) -> dict[str, Any]:
        cfg, info, s = self.cfg, self.dist, self.cfg.schedule
        return {
            "task": "detection",
            "global_batch": cfg.data.batch_size,
            "per_rank_batch": cfg.data.batch_size // info.world_size,
            "lr": self.base_lr,
            "iters": s.iters,
            "warmup_iters": s.warmup_iters,
            "steps": list(s.steps),
            "data": {
                "name": cfg.data.name,
                "root": cfg.data.root,
                "num_classes": self.train_ds.num_classes,
                "class_names": list(self.train_ds.class_names),
                "train_images": len(self.train_ds),
                "val_images": len(self.val_ds),
            },
        }

    # ------------------------------------------------------------------ checkpoints, evaluation
    def _save(self, it: int, pending_eval: bool = False) -> Path:
        if self.is_main:
            atomic_torch_save(
                {
                    "format": CHECKPOINT_FORMAT,
                    "version": CKPT_VERSION,  # 2: the node form is explicit (engine.checkpoint.stored_config)
                    "model": self.raw_model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "iter": it,
                    "pending_eval": pending_eval,
                    "world_size": self.dist.world_size,
                    "config": with_explicit_node(self.cfg_dict, self.raw_model),
                    "num_classes": self.train_ds.num_classes,
                    "class_names": list(self.train_ds.class_names),
                    "label_to_cat_id": dict(self.train_ds.label_to_cat_id),
                },
                self.ckpt_path,
            )
        return self.ckpt_path

    def _evaluate(self, it: int) -> dict[str, Any]:
        """COCOeval on the val split (sharded over ranks, gathered on rank 0); logged. Collective."""
        d, info = self.cfg.data, self.dist
        broadcast_buffers(self.raw_model, info)
        n = len(self.val_ds) if d.val_subset is None else min(d.val_subset, len(self.val_ds))
        shard = Subset(self.val_ds, list(range(info.rank, n, info.world_size)))
        loader = DataLoader(
            shard, batch_size=d.eval_batch_size, shuffle=False, num_workers=d.num_workers, collate_fn=collate_detection
        )
        with _test_size(self.raw_model, d.test_min_size):
            m = evaluate_coco(
                self.raw_model,
                loader,
                self.val_ds.coco,
                self.out / "detections_val.json",
                label_to_cat_id=self.train_ds.label_to_cat_id,
                device=self.device,
                dist_info=info,
            )
        rec = {"kind": "eval", "step": it, "iter": it, **{f"val_{k}": m[k] for k in (*TABLE2_COLUMNS, "AR100")}}
        self.logger.log({**rec, "eval": _jsonable(m)})
        if self.is_main:
            atomic_write(self.out / "eval_summary.txt", f"iteration {it}\n{m['summary']}\n")
            shown = ", ".join(f"{k}={'-' if m[k] is None else format(m[k], '.2f')}" for k in TABLE2_COLUMNS)
            print(f"[dynwire] iteration {it}/{self.cfg.schedule.iters}: {shown}", file=sys.stderr, flush=True)
        return m

    # ------------------------------------------------------------------ loop
    def _diverged(self, it: int, what: str, value: str) -> TrainingDiverged:
        return TrainingDiverged(
            f"training diverged: {what} is {value} at iteration {it + 1}; last.pt was not overwritten and still "
            f"holds the last good state ('{self.ckpt_path}'). Try a lower optim.lr, a longer warm-up "
            "(schedule.warmup_iters) or optim.clip_grad_norm."
        )

    def _interrupted(self, guard: SignalGuard, it: int, path: Path) -> TrainingInterrupted:
        return TrainingInterrupted(
            f"training interrupted by {guard.name} at iteration {it}/{self.cfg.schedule.iters}; saved {path}. "
            f"Continue with: dynwire train --config {self.out / 'config.yaml'} --resume",
            guard.signum or signal.SIGTERM,
            path,
        )

    def _agreed_signal(self, guard: SignalGuard) -> bool:
        flag = torch.tensor([float(guard.signum is not None)], device=self.device)
        return all_reduce_sum(flag, self.dist).item() > 0

    def run(self) -> dict[str, Any]:
        t_run = time.perf_counter()
        last_eval: dict[str, Any] | None = None
        try:
            with SignalGuard() as guard:
                if self.pending_eval:  # interrupted between the last iteration and its evaluation
                    last_eval = self._evaluate(self.start)
                    if self._agreed_signal(guard):
                        raise self._interrupted(guard, self.start, self._save(self.start))
                    self._save(self.start)
                done, evaluated = self._loop(guard)
                last_eval = evaluated or last_eval
        finally:
            self.logger.close()
            self.progress.end_epoch()
        s = self.cfg.schedule
        if last_eval is None and done >= s.iters:  # resumed a finished run: its final evaluation
            found = [r["eval"] for r in self.logger.records if r.get("kind") == "eval" and r["step"] == done]
            last_eval = all_gather_objects(found[-1] if found else None, self.dist)[0]
            if last_eval is None:
                last_eval = self._evaluate(done)
        train_time = time.perf_counter() - t_run
        broadcast_buffers(self.raw_model, self.dist)
        digests = all_gather_objects(state_dict_sha256(self.raw_model.state_dict()), self.dist)
        final: dict[str, Any] = {
            "run_dir": str(self.out),
            "iters": done,
            "completed": done >= s.iters,
            "eval": _jsonable(last_eval) if last_eval is not None else None,
            "train_time_s": train_time,
            "s_per_iter": train_time / max(1, self.stop - self.start),
            "checkpoint": str(self.ckpt_path),
            "world_size": self.dist.world_size,
            "device": str(self.device),
            "weights_sha256": digests[0],
        }
        if self.dist.distributed:
            final["rank_weights_sha256"] = digests
        if self.is_main:
            atomic_write_json(self.out / "final.json", final)
        barrier(self.dist)
        return final

    def _loop(self, guard: SignalGuard) -> tuple[int, dict[str, Any] | None]:
        cfg, info = self.cfg, self.dist
        d, s, o, t = cfg.data, cfg.schedule, cfg.optim, cfg.train
        sampler = IterationBatchSampler(
            len(self.train_ds), d.batch_size, t.seed, self.start, self.stop, info.rank, info.world_size
        )
        loader = DataLoader(
            self.train_ds,
            batch_sampler=sampler,
            num_workers=d.num_workers,
            collate_fn=collate_detection,
            persistent_workers=False,
        )
        self.model.train()
        self.progress.start_epoch(0, self.start)
        flags = torch.zeros(2, device=self.device)
        window: dict[str, float] = {}
        n_window, t_window = 0, time.perf_counter()
        last_eval: dict[str, Any] | None = None
        done = self.start
        for it, (images, targets) in enumerate(loader, start=self.start):
            torch.manual_seed(_iter_seed(t.seed, it))
            # one flip draw per image of the global batch; this rank takes its share
            flips = (torch.rand(d.batch_size) < d.hflip_prob).tolist()[info.rank :: info.world_size]
            pairs = [
                hflip(im, drop_crowd(tg)) if f else (im, drop_crowd(tg)) for im, tg, f in zip(images, targets, flips)
            ]
            images = [im.to(self.device, non_blocking=True) for im, _ in pairs]
            targets = [{k: v.to(self.device) for k, v in tg.items()} for _, tg in pairs]
            lr = self.base_lr * lr_factor(it, s.warmup_iters, s.warmup_factor, s.steps, s.gamma)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            losses = self.model(images, targets)
            loss = sum(losses.values())
            # one sync per iteration: a non-finite loss / a stop signal on any rank
            flags[0] = (~torch.isfinite(loss.detach())).float()
            flags[1] = float(guard.signum is not None)
            all_reduce_sum(flags, info)
            if flags[0].item() > 0:
                parts = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                raise self._diverged(it, "the loss", f"non-finite on some rank (here: {parts})")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = grad_norm(self.raw_model, o.clip_grad_norm)  # identical on every rank after DDP
            if not torch.isfinite(norm):
                raise self._diverged(it, "the gradient norm", str(float(norm)))
            self.optimizer.step()
            done = it + 1
            for k, v in losses.items():
                window[k] = window.get(k, 0.0) + v.item()
            window["loss"] = window.get("loss", 0.0) + loss.item()
            n_window += 1
            self.progress.step()
            if done % t.log_every == 0 or done == self.stop:
                self._log_window(done, lr, window, n_window, time.perf_counter() - t_window)
                window, n_window, t_window = {}, 0, time.perf_counter()
            # DDP: act on the flag all ranks agreed on; one process: on the latest signal
            stop = flags[1].item() > 0 if info.distributed else guard.signum is not None
            eval_due = bool(t.eval_every_iters and done % t.eval_every_iters == 0) or done == s.iters
            if eval_due and not stop:
                last_eval = self._evaluate(done)
                self.model.train()
                eval_due = False
                stop = self._agreed_signal(guard)
            if stop or done % t.ckpt_every_iters == 0 or done == self.stop:
                path = self._save(done, pending_eval=eval_due)
                if stop:
                    raise self._interrupted(guard, done, path)
        return done, last_eval

    def _log_window(self, done: int, lr: float, window: dict[str, float], n: int, seconds: float) -> None:
        """Average the window over iterations and ranks; log it and report progress on rank 0."""
        keys = sorted(window)
        sums = torch.tensor([window[k] for k in keys] + [float(n), seconds], dtype=torch.float64)
        all_reduce_sum(sums, self.dist)
        w = self.dist.world_size
        n_all, secs = sums[-2].item(), sums[-1].item() / w  # iterations summed over ranks; mean time
        rec: dict[str, Any] = {"kind": "train", "step": done, "iter": done, "lr": lr}
        rec.update({k: sums[i].item() / n_all for i, k in enumerate(keys)})
        per_iter = secs / max(n, 1)
        rec.update(
            s_per_iter=per_iter,
            img_per_s=self.cfg.data.batch_size / per_iter if per_iter > 0 else None,
            eta_s=(self.cfg.schedule.iters - done) * per_iter,
        )
        self.logger.log(rec)
        self.progress.report(
            epoch=1, step=done, global_step=done, loss=rec["loss"], acc=None, img_per_s=rec["img_per_s"] or 0.0
        )
