"""The training loop: ``train(cfg)`` and ``evaluate(checkpoint)``.

One process or many (``torchrun``); CUDA when available, else CPU. A run
directory ``output.dir/output.name`` receives ``config.yaml``, ``run.json``,
``metrics.csv``/``metrics.jsonl``, TensorBoard events under ``tb/``,
``last.pt``, ``best.pt`` and ``final.json``.

Fault handling:

* a NaN/Inf loss (or gradient norm) raises :class:`TrainingDiverged` before
  the optimizer step, without touching ``last.pt``;
* SIGINT/SIGTERM finish the current step, save ``last.pt`` with the position
  inside the epoch and raise :class:`TrainingInterrupted` (exit code
  ``128 + signal``; a second signal aborts at once);
* ``train.resume=auto|PATH`` continues from a checkpoint exactly: the data
  order is a pure function of (seed, epoch), the batches already trained on
  are skipped and all RNG states are restored, so on CPU with
  ``data.num_workers=0`` a killed-and-resumed run ends with the same weights
  as an uninterrupted one.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
import random
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from .checkpoint import (
    atomic_torch_save,
    capture_rng_state,
    load_checkpoint,
    remove_stale_temp_files,
    restore_rng_state,
)
from .config import RunConfig, apply_overrides, config_from_dict, config_to_dict, save_config
from .distributed import DistInfo, all_reduce_sum, barrier, cleanup_distributed, init_distributed, pick_device
from .ema import ModelEma
from .logging import MetricsLogger, progress_bar
from .optim import WarmupCosineSchedule, build_optimizer
from .sampler import EpochBatchSampler, make_eval_loader, make_train_loader

__all__ = [
    "TrainingDiverged",
    "TrainingInterrupted",
    "train",
    "evaluate",
    "evaluate_model",
    "build_datasets",
    "build_split",
    "build_model",
    "seed_everything",
    "state_dict_sha256",
]

CKPT_VERSION = 1


class TrainingDiverged(FloatingPointError):
    """The loss or gradient norm became NaN/Inf; the last good checkpoint is kept."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM stopped training after saving ``last.pt``."""

    def __init__(self, message: str, signum: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.signum = signum
        self.checkpoint = checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


# --------------------------------------------------------------------------- helpers
def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_split(cfg: RunConfig, split: str, *, train: bool) -> tuple[Dataset, Any]:
    """One split from :func:`dynwire.data.build_dataset` (augmented when ``train``)."""
    from dynwire.data import build_dataset

    return build_dataset(
        cfg.data.name,
        cfg.data.root,
        split,
        augment=train,
        image_size=cfg.data.image_size,
        on_bad_image="skip" if cfg.data.skip_bad_images else "raise",
        subset=cfg.data.subset if train else cfg.data.val_subset,
        subset_seed=cfg.train.seed,
    )


def build_datasets(cfg: RunConfig, *, split: str = "val") -> tuple[Dataset, Dataset, Any]:
    """Training and evaluation datasets plus the ``DatasetInfo`` from :mod:`dynwire.data`."""
    train_ds, info = build_split(cfg, "train", train=True)
    val_ds, _ = build_split(cfg, split, train=False)
    return train_ds, val_ds, info


def build_model(cfg: RunConfig, info: Any) -> nn.Module:
    """``dynwire.create_model`` with channels/classes taken from the dataset info."""
    import dynwire

    create = getattr(dynwire, "create_model", None)
    if create is None:
        raise RuntimeError("dynwire.create_model is not available in this installation")
    return create(
        cfg.model.name,
        num_classes=int(info.num_classes),
        wiring=cfg.model.wiring,
        in_chans=int(info.in_chans),
        drop_rate=cfg.model.drop_rate,
        **cfg.model.wiring_kwargs,
    )


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for pkg in ("torchvision", "dynwire"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
    return out


def _input_size(info: Any, sample: Any) -> tuple[int, ...]:
    size = getattr(info, "input_size", None)
    if size is not None:
        return tuple(int(s) for s in size)
    return tuple(sample.shape)


class _SignalGuard:
    """Turns the first SIGINT/SIGTERM into a flag the loop checks after each step."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # second signal: give up at once
            self.uninstall()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(
            f"\n[dynwire] received {signal.Signals(signum).name}: finishing the current step and saving "
            f"last.pt (send it again to abort without saving)",
            file=sys.stderr,
            flush=True,
        )

    def install(self) -> _SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()


@dataclass
class _State:
    """Loop position and meters; saved in checkpoints."""

    epoch: int = 0  # current epoch (0-based)
    step_in_epoch: int = 0  # optimizer steps already done in `epoch`
    global_step: int = 0
    best_metric: float = -math.inf
    best_epoch: int = -1
    meter: dict[str, float] = field(
        default_factory=lambda: {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "time": 0.0}
    )
    train_times: list[float] = field(default_factory=list)  # seconds per finished epoch
    train_images: list[int] = field(default_factory=list)  # images per finished epoch (all ranks)


def _accuracy_counts(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int]) -> list[torch.Tensor]:
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(target.view(-1, 1))
    return [hit[:, : min(k, maxk)].any(dim=1).sum() for k in ks]


def _autocast(device: torch.device, amp: str) -> Any:
    if amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loader: Any,
    *,
    device: torch.device,
    dist_info: DistInfo | None = None,
    amp: str = "none",
    channels_last: bool = False,
) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy (percent) over ``loader``, summed over ranks."""
    info = dist_info or DistInfo(device=device)
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss_sum, top1, top5, n
    for images, target in loader:
        images = _to_device(images, device, channels_last)
        target = target.to(device, non_blocking=True)
        with _autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        loss = F.cross_entropy(logits, target, reduction="sum")
        c1, c5 = _accuracy_counts(logits, target, (1, 5))
        sums += torch.stack(
            [
                loss.double(),
                c1.double(),
                c5.double(),
                torch.tensor(float(len(target)), device=device, dtype=torch.float64),
            ]
        )
    all_reduce_sum(sums, info)
    model.train(was_training)
    loss_sum, top1, top5, n = sums.tolist()
    if n == 0:
        raise ValueError("evaluation set is empty")
    return {"loss": loss_sum / n, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "images": int(n)}


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """Digest of a state dict's names, dtypes, shapes and bytes (order-independent of device)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{k}|{t.dtype}|{tuple(state[k].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _broadcast_buffers(model: nn.Module, info: DistInfo) -> None:
    """Give every rank rank 0's buffers (BatchNorm stats drift apart under plain DDP)."""
    if info.distributed:
        for b in model.buffers():
            dist.broadcast(b.data, src=0)


# --------------------------------------------------------------------------- trainer
class _Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        info: DistInfo,
        datasets: tuple[Dataset, Dataset, Any] | None,
        model_fn: Callable[[RunConfig, Any], nn.Module] | None = None,
    ) -> None:
        self.cfg = cfg
        self.model_fn = model_fn or build_model
        self.dist = info
        self.device = info.device
        self.run_dir = cfg.run_dir
        self.is_main = info.is_main
        self.datasets = datasets

    # ------------------------------------------------------------------ setup
    def _resolve_resume(self) -> Path | None:
        resume = self.cfg.train.resume
        last = self.run_dir / "last.pt"
        if resume is None:
            if last.exists():
                raise ValueError(
                    f"run directory {str(self.run_dir)!r} already holds last.pt; continue it with --resume "
                    f"(train.resume=auto) or choose another output.name/output.dir"
                )
            return None
        if resume == "auto":
            return last if last.exists() else None
        path = Path(resume).expanduser()
        if not path.is_file():
            raise ValueError(f"train.resume={resume!r}: no such checkpoint file (use 'auto' or a path to last.pt)")
        return path

    def _agreed_resume_path(self) -> Path | None:
        """Rank 0 decides what to resume from (run dirs must be on storage all ranks can read)."""
        if not self.dist.distributed:
            return self._resolve_resume()
        box: list[Any] = [None]
        if self.is_main:
            try:
                found = self._resolve_resume()
                box[0] = ("ok", None if found is None else str(found))
            except ValueError as exc:
                box[0] = ("error", str(exc))
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise ValueError(value)
        return None if value is None else Path(value)

    def _write_run_json(self, resumed_from: Path | None, extra: dict[str, Any]) -> None:
        path = self.run_dir / "run.json"
        now = _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")
        entry = {
            "start_time": now,
            "command": list(sys.argv),
            "hostname": socket.gethostname(),
            "world_size": self.dist.world_size,
            "device": str(self.device),
            "torch_threads": torch.get_num_threads(),
            "backend": self.dist.backend,
            "versions": _versions(),
        }
        if self.device.type == "cuda":
            entry["gpu"] = torch.cuda.get_device_name(self.device)
        if resumed_from is not None and path.exists():
            data = json.loads(path.read_text(encoding="utf-8"))
            data.setdefault("resumes", []).append({**entry, "checkpoint": str(resumed_from)})
        else:
            data = {"seed": self.cfg.train.seed, **entry, **extra}
            if resumed_from is not None:
                data["resumed_from"] = str(resumed_from)
        tmp = path.with_name("run.json.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def setup(self) -> None:
        cfg, info = self.cfg, self.dist
        gb = cfg.data.batch_size
        if gb % info.world_size:
            raise ValueError(
                f"data.batch_size={gb}: the global batch must be divisible by the world size ({info.world_size})"
            )
        self.local_batch = gb // info.world_size
        if cfg.train.sync_bn and info.distributed and self.device.type != "cuda":
            raise ValueError("train.sync_bn=true: SyncBatchNorm needs CUDA devices; set train.sync_bn=false on CPU")
        self.resume_path = self._agreed_resume_path()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(self.run_dir)
        barrier(info)

        seed_everything(cfg.train.seed)
        if self.datasets is None:
            self.datasets = build_datasets(cfg)
        self.train_ds, self.val_ds, self.data_info = self.datasets
        model = self.model_fn(cfg, self.data_info)
        if cfg.train.sync_bn and info.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.device)
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        self.raw_model = model
        # Training-time randomness (augmentation, dropout) differs per rank.
        seed_everything(cfg.train.seed + info.rank)

        self.sampler = EpochBatchSampler(
            len(self.train_ds), gb, world_size=info.world_size, rank=info.rank, seed=cfg.train.seed
        )
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = self.steps_per_epoch * cfg.schedule.epochs
        self.warmup_steps = min(self.total_steps, int(round(cfg.schedule.warmup_epochs * self.steps_per_epoch)))
        self.lr = cfg.scaled_lr()
        self.optimizer = build_optimizer(
            model,
            lr=self.lr,
            momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay,
            nesterov=cfg.optim.nesterov,
            no_decay_norm_bias=cfg.optim.no_decay_norm_bias,
        )
        self.scheduler = WarmupCosineSchedule(
            self.optimizer, self.total_steps, self.warmup_steps, cosine=cfg.schedule.cosine
        )
        self.ema = ModelEma(model, cfg.train.ema_decay) if cfg.train.ema_decay is not None else None

        self.model: nn.Module = model
        if info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if cfg.train.compile:
            self.model = torch.compile(self.model)  # type: ignore[assignment]
        self.eval_model: nn.Module = torch.compile(model) if cfg.train.compile else model  # type: ignore[assignment]

        self.state = _State()
        if self.resume_path is not None:
            self._load(self.resume_path)

        self.val_loader = make_eval_loader(
            self.val_ds,
            self.local_batch,
            world_size=info.world_size,
            rank=info.rank,
            num_workers=cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        if self.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
            self._write_run_json(
                self.resume_path,
                {
                    "global_batch": gb,
                    "per_rank_batch": self.local_batch,
                    "lr": self.lr,
                    "steps_per_epoch": self.steps_per_epoch,
                    "total_steps": self.total_steps,
                    "warmup_steps": self.warmup_steps,
                    "train_images": len(self.train_ds),
                    "val_images": len(self.val_ds),
                },
            )
        self.logger = MetricsLogger(
            self.run_dir,
            enabled=self.is_main,
            resume_step=self.state.global_step if self.resume_path is not None else None,
        )

    # ------------------------------------------------------------------ checkpoints
    def _gather_rng(self) -> list[dict[str, Any]]:
        mine = capture_rng_state()
        if not self.dist.distributed:
            return [mine]
        out: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(out, mine)
        return out

    def _checkpoint(self) -> dict[str, Any]:
        s = self.state
        return {
            "version": CKPT_VERSION,
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.ema_state_dict() if self.ema is not None else None,
            "epoch": s.epoch,
            "step_in_epoch": s.step_in_epoch,
            "global_step": s.global_step,
            "best_metric": s.best_metric,
            "best_epoch": s.best_epoch,
            "meter": dict(s.meter),
            "train_times": list(s.train_times),
            "train_images": list(s.train_images),
            "world_size": self.dist.world_size,
            "rng": self._gather_rng(),
            "config": config_to_dict(self.cfg),
        }

    def save(self, *, best: bool = False) -> Path:
        """Write last.pt (and best.pt); collective in DDP (RNG states are gathered)."""
        ckpt = self._checkpoint()
        last = self.run_dir / "last.pt"
        if self.is_main:
            atomic_torch_save(ckpt, last)
            if best:
                self._link_or_copy(last, self.run_dir / "best.pt")
        return last

    @staticmethod
    def _link_or_copy(src: Path, dst: Path) -> None:
        tmp = dst.with_name(f".{dst.name}.link")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
            os.replace(tmp, dst)
        except OSError:
            tmp.unlink(missing_ok=True)
            atomic_torch_save(torch.load(src, map_location="cpu", weights_only=True), dst)

    def _load(self, path: Path) -> None:
        ckpt = load_checkpoint(path, map_location="cpu")
        for key in ("model", "optimizer", "scheduler", "epoch", "step_in_epoch", "global_step", "rng"):
            if key not in ckpt:
                raise ValueError(f"checkpoint {str(path)!r}: missing {key!r}; not a dynwire training checkpoint")
        try:
            self.raw_model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise ValueError(
                f"checkpoint {str(path)!r} does not match model {self.cfg.model.name!r} "
                f"(wiring {self.cfg.model.wiring!r}): {exc}"
            ) from exc
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.ema is not None:
            if ckpt.get("ema") is not None:
                self.ema.load_ema_state_dict(ckpt["ema"])
            else:
                warnings.warn("checkpoint has no EMA weights; starting the EMA from the loaded model", stacklevel=2)
                self.ema = ModelEma(self.raw_model, self.cfg.train.ema_decay)  # type: ignore[arg-type]
        s = self.state
        s.epoch = int(ckpt["epoch"])
        s.step_in_epoch = int(ckpt["step_in_epoch"])
        s.global_step = int(ckpt["global_step"])
        s.best_metric = float(ckpt.get("best_metric", -math.inf))
        s.best_epoch = int(ckpt.get("best_epoch", -1))
        s.meter = {k: float(v) for k, v in ckpt.get("meter", s.meter).items()}
        s.train_times = [float(x) for x in ckpt.get("train_times", [])]
        s.train_images = [int(x) for x in ckpt.get("train_images", [])]
        if s.step_in_epoch > self.steps_per_epoch:
            raise ValueError(
                f"checkpoint {str(path)!r} stopped at step {s.step_in_epoch} of an epoch but this run has only "
                f"{self.steps_per_epoch} steps per epoch (dataset or batch size changed)"
            )
        rng = ckpt["rng"]
        if int(ckpt.get("world_size", len(rng))) == self.dist.world_size and len(rng) == self.dist.world_size:
            restore_rng_state(rng[self.dist.rank])
        else:
            warnings.warn(
                f"checkpoint was written by {len(rng)} rank(s), this run has {self.dist.world_size}: "
                f"RNG streams are re-seeded, so the run is not bit-identical to an uninterrupted one",
                stacklevel=2,
            )
            seed_everything(self.cfg.train.seed + self.dist.rank + 7919 * s.global_step)
        if self.is_main:
            print(
                f"[dynwire] resumed from {path} at epoch {s.epoch + 1}, step {s.step_in_epoch}/{self.steps_per_epoch} "
                f"(global step {s.global_step})",
                file=sys.stderr,
                flush=True,
            )

    # ------------------------------------------------------------------ loop
    def _diverged(self, what: str, value: float) -> TrainingDiverged:
        s = self.state
        return TrainingDiverged(
            f"training diverged: {what} is {value} at global step {s.global_step + 1} "
            f"(epoch {s.epoch + 1}, step {s.step_in_epoch + 1}/{self.steps_per_epoch}, "
            f"lr {self.optimizer.param_groups[0]['lr']:.4g}). last.pt was not overwritten and still holds "
            f"the last good state. Try a lower optim.lr, more schedule.warmup_epochs, or "
            f"optim.clip_grad_norm (e.g. 5.0)."
        )

    def _train_epoch(self, guard: _SignalGuard) -> None:
        cfg, s = self.cfg, self.state
        self.model.train()
        self.sampler.set_epoch(s.epoch)
        self.sampler.set_start(s.step_in_epoch)
        loader = make_train_loader(
            self.train_ds,
            self.sampler,
            epoch=s.epoch,
            num_workers=cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        crit = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
        bar = progress_bar(
            self.steps_per_epoch,
            enabled=self.is_main,
            desc=f"epoch {s.epoch + 1}/{cfg.schedule.epochs}",
            initial=s.step_in_epoch,
        )
        window = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss_sum, correct, count
        t_window = time.perf_counter()
        t_epoch = time.perf_counter()
        epoch_time0 = s.meter["time"]
        flags = torch.zeros(2, device=self.device)
        try:
            for images, target in loader:
                images = _to_device(images, self.device, cfg.train.channels_last)
                target = target.to(self.device, non_blocking=True)
                with _autocast(self.device, cfg.train.amp):
                    logits = self.model(images)
                loss = crit(logits.float(), target)

                # One sync per step: non-finite loss on any rank / stop signal on any rank.
                flags[0] = (~torch.isfinite(loss.detach())).float()
                flags[1] = float(guard.signum is not None)
                all_reduce_sum(flags, self.dist)
                if flags[0].item() > 0:
                    raise self._diverged("the loss", float(loss.detach()))

                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.optim.clip_grad_norm is not None:
                    norm = nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.optim.clip_grad_norm)
                    if not torch.isfinite(norm):
                        raise self._diverged("the gradient norm", float(norm))
                self.optimizer.step()
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update(self.raw_model)

                n = target.shape[0]
                correct = (logits.detach().argmax(dim=1) == target).sum()
                window += torch.stack(
                    [
                        loss.detach().double() * n,
                        correct.double(),
                        torch.tensor(float(n), dtype=torch.float64, device=self.device),
                    ]
                )
                s.step_in_epoch += 1
                s.global_step += 1
                bar.update(1)

                if s.global_step % cfg.train.log_every == 0 or s.step_in_epoch == self.steps_per_epoch:
                    self._log_window(window, t_window, bar)
                    window.zero_()
                    t_window = time.perf_counter()
                s.meter["time"] = epoch_time0 + time.perf_counter() - t_epoch
                # DDP: act on the flag all ranks agreed on; one process: on the latest signal.
                stop = flags[1].item() > 0 if self.dist.distributed else guard.signum is not None
                if stop or (cfg.train.ckpt_every_steps and s.global_step % cfg.train.ckpt_every_steps == 0):
                    if window[2] > 0:
                        self._log_window(window, t_window, bar)
                        window.zero_()
                        t_window = time.perf_counter()
                    path = self.save()
                    if stop:
                        signum = guard.signum or signal.SIGTERM
                        raise TrainingInterrupted(
                            f"training interrupted by {signal.Signals(signum).name} at global step {s.global_step} "
                            f"(epoch {s.epoch + 1}, step {s.step_in_epoch}/{self.steps_per_epoch}); saved {path}. "
                            f"Continue with: dynwire train --config {self.run_dir / 'config.yaml'} --resume",
                            signum,
                            path,
                        )
        finally:
            bar.close()
        s.train_times.append(s.meter["time"])
        s.train_images.append(self.steps_per_epoch * cfg.data.batch_size)

    def _log_window(self, window: torch.Tensor, t0: float, bar: Any) -> None:
        """Reduce the window meters over ranks, add them to the epoch meter, log on rank 0."""
        w = window.clone()
        all_reduce_sum(w, self.dist)
        loss_sum, correct, count = w.tolist()
        s = self.state
        s.meter["loss_sum"] += loss_sum
        s.meter["correct"] += correct
        s.meter["count"] += count
        dt = max(time.perf_counter() - t0, 1e-9)
        rec = {
            "kind": "train",
            "epoch": s.epoch + 1,
            "step": s.global_step,
            "lr": self.optimizer.param_groups[0]["lr"],
            "loss": loss_sum / max(count, 1),
            "acc": 100.0 * correct / max(count, 1),
            "img_per_s": count / dt,
        }
        self.logger.log(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.1f}", img_s=f"{rec['img_per_s']:.0f}")

    def run(self) -> dict[str, Any]:
        cfg, s = self.cfg, self.state
        guard = _SignalGuard().install()
        last_val: dict[str, float] = {}
        last_ema: dict[str, float] = {}
        try:
            while s.epoch < cfg.schedule.epochs:
                self._train_epoch(guard)
                epoch_no = s.epoch + 1
                m = s.meter
                rec: dict[str, Any] = {
                    "kind": "epoch",
                    "epoch": epoch_no,
                    "step": s.global_step,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "train_loss": m["loss_sum"] / max(m["count"], 1),
                    "train_acc": 100.0 * m["correct"] / max(m["count"], 1),
                    "train_img_per_s": s.train_images[-1] / max(s.train_times[-1], 1e-9),
                    "epoch_time_s": s.train_times[-1],
                }
                is_best = False
                if epoch_no % cfg.train.eval_every == 0 or epoch_no == cfg.schedule.epochs:
                    _broadcast_buffers(self.raw_model, self.dist)
                    kw = dict(
                        device=self.device,
                        dist_info=self.dist,
                        amp=cfg.train.amp,
                        channels_last=cfg.train.channels_last,
                    )
                    last_val = evaluate_model(self.eval_model, self.val_loader, **kw)
                    rec.update({f"val_{k}": v for k, v in last_val.items() if k != "images"})
                    if self.ema is not None:
                        last_ema = evaluate_model(self.ema.module, self.val_loader, **kw)
                        rec.update({f"ema_val_{k}": v for k, v in last_ema.items() if k != "images"})
                    if last_val["top1"] > s.best_metric:
                        s.best_metric, s.best_epoch, is_best = last_val["top1"], epoch_no, True
                    rec["best_val_top1"] = s.best_metric
                self.logger.log(rec)
                if self.is_main:
                    shown = ", ".join(
                        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in rec.items()
                        if k not in ("kind",)
                    )
                    print(f"[dynwire] epoch {epoch_no}/{cfg.schedule.epochs}: {shown}", file=sys.stderr, flush=True)
                s.epoch += 1
                s.step_in_epoch = 0
                s.meter = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "time": 0.0}
                self.save(best=is_best)
                flags = torch.tensor([float(guard.signum is not None)], device=self.device)
                if all_reduce_sum(flags, self.dist).item() > 0:  # signal arrived during evaluation
                    raise TrainingInterrupted(
                        f"training interrupted by {signal.Signals(guard.signum or signal.SIGTERM).name} after "
                        f"epoch {epoch_no}; saved {self.run_dir / 'last.pt'}",
                        guard.signum or signal.SIGTERM,
                        self.run_dir / "last.pt",
                    )
        finally:
            guard.uninstall()
            self.logger.close()
        if not last_val:  # resumed a finished run: evaluate once for the summary
            _broadcast_buffers(self.raw_model, self.dist)
            last_val = evaluate_model(
                self.eval_model,
                self.val_loader,
                device=self.device,
                dist_info=self.dist,
                amp=cfg.train.amp,
                channels_last=cfg.train.channels_last,
            )
        return self._final(last_val, last_ema)

    def _final(self, val: dict[str, float], ema_val: dict[str, float]) -> dict[str, Any]:
        s = self.state
        imgs, secs = sum(s.train_images), sum(s.train_times)
        final: dict[str, Any] = {
            "run_dir": str(self.run_dir),
            "epochs": self.cfg.schedule.epochs,
            "global_step": s.global_step,
            "val": val,
            "best_val_top1": s.best_metric if math.isfinite(s.best_metric) else val.get("top1"),
            "best_epoch": s.best_epoch,
            "train_images_per_s": imgs / secs if secs > 0 else None,
            "train_time_s": secs,
            "world_size": self.dist.world_size,
            "device": str(self.device),
        }
        if ema_val:
            final["ema_val"] = ema_val
        digests = self._rank_digests()
        final["weights_sha256"] = digests[0]
        if self.dist.distributed:
            final["rank_weights_sha256"] = digests
            if len(set(digests)) != 1 and self.is_main:
                warnings.warn(f"ranks ended with different weights: {digests}", stacklevel=2)
        if self.is_main:
            final.update(self._profile())
            tmp = self.run_dir / "final.json.tmp"
            tmp.write_text(json.dumps(final, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, self.run_dir / "final.json")
        barrier(self.dist)
        return final

    def _rank_digests(self) -> list[str]:
        """SHA-256 of the model state (params + buffers) on every rank; all equal if DDP kept them in sync."""
        mine = state_dict_sha256(self.raw_model.state_dict())
        if not self.dist.distributed:
            return [mine]
        out: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(out, mine)
        return [str(d) for d in out]

    def _profile(self) -> dict[str, Any]:
        size = _input_size(self.data_info, self.val_ds[0][0])
        out: dict[str, Any] = {"input_size": list(size)}
        model = self.raw_model
        try:
            from dynwire.analysis.profile import count_macs, count_params
        except ImportError as exc:
            out["params"] = sum(p.numel() for p in model.parameters())
            out["macs"] = None
            out["profile_error"] = f"dynwire.analysis.profile unavailable: {exc}"
            return out
        was_training = model.training
        try:
            out["params"] = int(count_params(model))
            out["macs"] = int(count_macs(model, input_size=size))
        except Exception as exc:  # profiling must not lose a finished run
            warnings.warn(f"MAC counting failed: {exc}", stacklevel=2)
            out.setdefault("params", sum(p.numel() for p in model.parameters()))
            out["macs"] = None
            out["profile_error"] = f"{type(exc).__name__}: {exc}"
        finally:
            model.train(was_training)
        return out


def train(
    cfg: RunConfig,
    *,
    datasets: tuple[Dataset, Dataset, Any] | None = None,
    model_fn: Callable[[RunConfig, Any], nn.Module] | None = None,
) -> dict[str, Any]:
    """Train (or resume) a run described by ``cfg``; returns the ``final.json`` dict.

    ``datasets`` = ``(train_ds, val_ds, info)`` replaces :func:`build_datasets`
    (``info`` needs ``num_classes``, ``in_chans`` and ideally ``input_size``);
    ``model_fn(cfg, info)`` replaces :func:`build_model` (e.g. to pass
    ``norm_layer`` or other non-YAML arguments to ``create_model``).
    Raises :class:`TrainingDiverged` on NaN/Inf and :class:`TrainingInterrupted`
    on SIGINT/SIGTERM (after saving ``last.pt``).
    """
    if not isinstance(cfg, RunConfig):
        raise ValueError(f"train() expects a RunConfig (see dynwire.engine.load_config), got {type(cfg).__name__}")
    threads = torch.get_num_threads()
    if cfg.train.num_threads is not None:
        torch.set_num_threads(cfg.train.num_threads)
    info = init_distributed(cfg.train.device)
    try:
        trainer = _Trainer(cfg, info, datasets, model_fn)
        trainer.setup()
        return trainer.run()
    finally:
        cleanup_distributed(info)
        torch.set_num_threads(threads)


def evaluate(
    checkpoint_path: str | os.PathLike[str],
    *,
    data_dir: str | None = None,
    split: str = "val",
    batch_size: int | None = None,
    num_workers: int | None = None,
    subset: int | None = None,
    use_ema: bool = False,
    device: str = "auto",
    overrides: Sequence[str] = (),
    datasets: tuple[Dataset, Dataset, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint (``last.pt``/``best.pt``) on a split; returns loss/top1/top5.

    The model and data settings come from the config stored in the
    checkpoint; ``overrides`` (``key.sub=value``, e.g.
    ``model.wiring_kwargs.eval_gate=soft``), ``data_dir``, ``batch_size``,
    ``num_workers`` and ``subset`` change them.
    """
    ckpt = load_checkpoint(checkpoint_path, map_location="cpu")
    if "config" not in ckpt or "model" not in ckpt:
        raise ValueError(
            f"checkpoint {str(checkpoint_path)!r}: no config/model entry; not a dynwire training checkpoint"
        )
    raw = apply_overrides(ckpt["config"], list(overrides))
    raw["data"] = dict(raw.get("data") or {})
    if data_dir is not None:
        raw["data"]["root"] = str(data_dir)
    if batch_size is not None:
        raw["data"]["batch_size"] = batch_size
    if num_workers is not None:
        raw["data"]["num_workers"] = num_workers
    if subset is not None:
        raw["data"]["val_subset"] = subset
    cfg = config_from_dict(raw)
    dev = pick_device(device)
    threads = torch.get_num_threads()
    if cfg.train.num_threads is not None:
        torch.set_num_threads(cfg.train.num_threads)
    try:
        return _evaluate(ckpt, cfg, checkpoint_path, split, use_ema, dev, datasets)
    finally:
        torch.set_num_threads(threads)


def _evaluate(
    ckpt: dict[str, Any],
    cfg: RunConfig,
    checkpoint_path: Any,
    split: str,
    use_ema: bool,
    dev: torch.device,
    datasets: tuple[Dataset, Dataset, Any] | None,
) -> dict[str, Any]:
    if datasets is None:
        val_ds, info = build_split(cfg, split, train=False)
    else:
        _, val_ds, info = datasets
    seed_everything(cfg.train.seed)
    model = build_model(cfg, info)
    weights = ckpt["model"]
    if use_ema:
        if ckpt.get("ema") is None:
            raise ValueError(f"checkpoint {str(checkpoint_path)!r} has no EMA weights (train.ema_decay was off)")
        weights = ckpt["ema"]["weights"]
    model.load_state_dict(weights)
    model.to(dev)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    loader = make_eval_loader(
        val_ds, cfg.data.batch_size, num_workers=cfg.data.num_workers, pin_memory=dev.type == "cuda"
    )
    t0 = time.perf_counter()
    metrics = evaluate_model(model, loader, device=dev, amp=cfg.train.amp, channels_last=cfg.train.channels_last)
    dt = time.perf_counter() - t0
    return {
        "checkpoint": str(checkpoint_path),
        "split": split,
        "weights": "ema" if use_ema else "model",
        "epoch": int(ckpt.get("epoch", 0)),
        "global_step": int(ckpt.get("global_step", 0)),
        **metrics,
        "images_per_s": metrics["images"] / dt if dt > 0 else None,
    }
