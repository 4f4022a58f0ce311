"""The training loop: ``train(cfg)``.

One process or many (``torchrun``); CUDA when available, else CPU. A run
directory ``output.dir/<run name>`` receives ``config.yaml``, ``run.json``,
``metrics.csv``/``metrics.jsonl``, TensorBoard events under ``tb/``,
``last.pt``, ``best.pt`` and ``final.json``.

Fault handling:

* a NaN/Inf loss or gradient norm raises :class:`TrainingDiverged` before
  the optimizer step, without touching ``last.pt``;
* SIGINT/SIGTERM finish the current step, save ``last.pt`` with the position
  inside the epoch and raise :class:`TrainingInterrupted` (exit code
  ``128 + signal``; a second signal aborts at once);
* ``train.resume=auto|PATH`` continues from a checkpoint exactly: the data
  order is a pure function of (seed, epoch) and augmentation a pure function
  of (seed, epoch, sample index), whatever the number of loader workers; the
  batches already trained on are skipped and all RNG states are restored
  (conditions: see the README's "Exact resume").
"""

from __future__ import annotations

import signal
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..analysis.profile import count_macs
from ..graph.budget import ComputeBudget
from .builders import build_datasets, build_loaders, build_model, build_optimization, seed_everything
from .checkpoint import (
    CKPT_VERSION,
    atomic_torch_save,
    capture_rng_state,
    config_node,
    load_checkpoint,
    restore_rng_state,
    state_dict_sha256,
    stored_config,
    with_explicit_node,
)
from .config import RunConfig, config_to_dict, save_config
from .distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    cleanup_distributed,
    init_distributed,
)
from .ema import ModelEma
from .evaluation import autocast, evaluate_model, to_device
from .files import atomic_link, atomic_write_json, remove_stale_temp_files
from .logging import MetricsLogger, Progress
from .meters import WindowMeter
from .optim import grad_norm
from .rundir import agreed_resume_path, data_info, final_summary, profile_summary, write_run_json
from .signals import SignalGuard, TrainingInterrupted
from .state import TrainState

__all__ = ["TrainingDiverged", "TrainingInterrupted", "train"]


class TrainingDiverged(FloatingPointError):
    """The loss or gradient norm became NaN/Inf; the last good checkpoint is kept."""


class _Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        info: DistInfo,
        datasets: tuple[Dataset, Dataset, Any] | None,
        model_fn: Callable[[RunConfig, Any], nn.Module],
    ) -> None:
        self.cfg, self.dist, self.datasets, self.model_fn = cfg, info, datasets, model_fn
        self.device = info.device
        self.run_dir = cfg.run_dir
        self.is_main = info.is_main

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg, info = self.cfg, self.dist
        gb = cfg.data.batch_size
        if gb % info.world_size:
            raise ValueError(
                f"data.batch_size={gb}: the global batch must be divisible by the world size ({info.world_size})"
            )
        if cfg.train.sync_bn and info.distributed and self.device.type != "cuda":
            raise ValueError("train.sync_bn=true: SyncBatchNorm needs CUDA devices; set train.sync_bn=false on CPU")
        self.resume_path = agreed_resume_path(cfg, info)
        seed_everything(cfg.train.seed)
        train_ds, val_ds, dinfo = self.datasets if self.datasets is not None else build_datasets(cfg)
        model = self.model_fn(cfg, dinfo)
        if self.is_main:  # the run folder appears only once data and model are in hand
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(self.run_dir)
        barrier(info)
        if cfg.train.sync_bn and info.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.device)
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        self.raw_model = model
        seed_everything(cfg.train.seed + info.rank)  # dropout differs per rank

        self.train_loader, self.val_loader = build_loaders(
            cfg, train_ds, val_ds, local_batch=gb // info.world_size, distributed=info.distributed
        )
        self.batches = self.train_loader.batch_sampler  # EpochBatchSampler: set_epoch / set_start
        self.steps_per_epoch = self.batches.steps_per_epoch
        self.optimizer, self.scheduler, self.schedule = build_optimization(cfg, model, self.steps_per_epoch)
        self.ema = ModelEma(model, cfg.train.ema_decay) if cfg.train.ema_decay is not None else None
        self.budget = ComputeBudget(model, **cfg.train.budget) if cfg.train.budget else None
        self._budget_fracs: list[float] = []
        self.model: nn.Module = model
        if info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if cfg.train.compile:
            self.model = torch.compile(self.model, mode=cfg.train.compile_mode)  # type: ignore[assignment]
        self.eval_model: nn.Module = (
            torch.compile(model, mode=cfg.train.compile_mode) if cfg.train.compile else model  # type: ignore[assignment]
        )

        self.state = TrainState()
        if self.resume_path is not None:
            self._load(self.resume_path)
        size = getattr(dinfo, "input_size", None) or tuple(val_ds[0][0].shape)
        self.data_info = data_info(dinfo, tuple(size))
        has_gates = any(hasattr(getattr(m, "edges", None), "tau") for m in model.modules())
        self.dense_macs = float(count_macs(model, tuple(size))) if has_gates and not cfg.train.compile else None
        if self.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
            s = self.schedule
            extra = {"global_batch": gb, "per_rank_batch": gb // info.world_size, "lr": s.lr}
            extra.update(steps_per_epoch=s.steps_per_epoch, total_steps=s.total_steps, warmup_steps=s.warmup_steps)
            extra["data"] = {**self.data_info, "train_images": len(train_ds), "val_images": len(val_ds)}
            write_run_json(cfg, info, self.resume_path, extra)
        resume_step = self.state.global_step if self.resume_path is not None else None
        self.logger = MetricsLogger(self.run_dir, enabled=self.is_main, resume_step=resume_step)
        self.progress = Progress(
            enabled=self.is_main,
            epochs=cfg.schedule.epochs,
            steps_per_epoch=self.steps_per_epoch,
            start_step=self.state.global_step,
        )

    # ------------------------------------------------------------------ checkpoints
    def save(self, *, best: bool = False) -> Path:
        """Write last.pt (and best.pt); collective in DDP (RNG states are gathered)."""
        ckpt = {
            "version": CKPT_VERSION,
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.ema_state_dict() if self.ema is not None else None,
            **self.state.state_dict(),
            "world_size": self.dist.world_size,
            "rng": all_gather_objects(capture_rng_state(), self.dist),
            "config": with_explicit_node(config_to_dict(self.cfg), self.raw_model),
            "data_info": self.data_info,
        }
        last = self.run_dir / "last.pt"
        if self.is_main:
            atomic_torch_save(ckpt, last)
            if best:
                atomic_link(last, self.run_dir / "best.pt")
        return last

    def _load(self, path: Path) -> None:
        ckpt = load_checkpoint(path, map_location="cpu")
        for key in ("model", "optimizer", "scheduler", "rng", *TrainState.REQUIRED):
            if key not in ckpt:
                raise ValueError(f"checkpoint {str(path)!r}: missing {key!r}; not a dynwire training checkpoint")
        if "config" in ckpt:
            _check_node_form(stored_config(ckpt), self.cfg, path)
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
        s.load_state_dict(ckpt)
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

    def _step(
        self, images: torch.Tensor, target: torch.Tensor, crit: nn.Module, flags: torch.Tensor, guard: SignalGuard
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step; returns (loss, logits, target). ``flags`` gets the ranks' stop requests."""
        cfg = self.cfg
        images = to_device(images, self.device, cfg.train.channels_last)
        target = target.to(self.device, non_blocking=True)
        with autocast(self.device, cfg.train.amp):
            logits = self.model(images)
        loss = crit(logits.float(), target)
        objective = loss
        if self.budget is not None:  # expected executed MACs toward the target fraction
            per_sample = None
            if self.budget.difficulty > 0:  # the difficulty of each sample: its loss (soft targets too)
                per_sample = F.cross_entropy(logits.detach().float(), target, reduction="none")
            progress = self.state.global_step / self.steps_per_epoch  # fractional epochs, for the warm-up
            term, frac = self.budget.loss(tuple(images.shape[1:]), per_sample, epoch=progress)
            objective = loss + term
            self._budget_fracs.append(frac)
        # One sync per step: non-finite loss on any rank / stop signal on any rank.
        flags[0] = (~torch.isfinite(loss.detach())).float()
        flags[1] = float(guard.signum is not None)
        all_reduce_sum(flags, self.dist)
        if flags[0].item() > 0:
            raise self._diverged("the loss", float(loss.detach()))
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        norm = grad_norm(self.raw_model, cfg.optim.clip_grad_norm)  # identical on all ranks after DDP
        if not torch.isfinite(norm):
            raise self._diverged("the gradient norm", float(norm))
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.raw_model)
        return loss, logits, target

    def _train_epoch(self, guard: SignalGuard) -> None:
        cfg, s = self.cfg, self.state
        self.model.train()
        self.batches.set_epoch(s.epoch)
        self.batches.set_start(s.step_in_epoch)
        crit = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
        meter = WindowMeter(self.device)
        t_epoch, epoch_time0 = time.perf_counter(), s.meter["time"]
        flags = torch.zeros(2, device=self.device)
        self.progress.start_epoch(s.epoch, s.step_in_epoch)
        try:
            for images, target in self.train_loader:
                loss, logits, target = self._step(images, target, crit, flags, guard)
                meter.add(loss, logits, target)
                s.step_in_epoch += 1
                s.global_step += 1
                self.progress.step()
                if s.global_step % cfg.train.log_every == 0 or s.step_in_epoch == self.steps_per_epoch:
                    self._log_window(meter)
                s.meter["time"] = epoch_time0 + time.perf_counter() - t_epoch
                # DDP: act on the flag all ranks agreed on; one process: on the latest signal.
                stop = flags[1].item() > 0 if self.dist.distributed else guard.signum is not None
                if stop or (cfg.train.ckpt_every_steps and s.global_step % cfg.train.ckpt_every_steps == 0):
                    if not meter.empty:
                        self._log_window(meter)
                    path = self.save()
                    if stop:
                        raise TrainingInterrupted(
                            f"training interrupted by {guard.name} at global step {s.global_step} "
                            f"(epoch {s.epoch + 1}, step {s.step_in_epoch}/{self.steps_per_epoch}); saved {path}. "
                            f"Continue with: dynwire train --config {self.run_dir / 'config.yaml'} --resume",
                            guard.signum or signal.SIGTERM,
                            path,
                        )
        finally:
            self.progress.end_epoch()
        s.train_times.append(s.meter["time"])
        s.train_images.append(self.steps_per_epoch * cfg.data.batch_size)

    def _log_window(self, meter: WindowMeter) -> None:
        """Reduce the window over ranks, add it to the epoch meter, log and report progress on rank 0."""
        loss_sum, correct, count, seconds = meter.reduce(self.dist)
        s = self.state
        s.meter["loss_sum"] += loss_sum
        s.meter["correct"] += correct
        s.meter["count"] += count
        rec = {
            "kind": "train",
            "epoch": s.epoch + 1,
            "step": s.global_step,
            "lr": self.optimizer.param_groups[0]["lr"],
            "loss": loss_sum / max(count, 1),
            "acc": 100.0 * correct / max(count, 1),
            "img_per_s": count / seconds,
        }
        if self._budget_fracs:
            rec["expected_mac_fraction"] = sum(self._budget_fracs) / len(self._budget_fracs)
            self._budget_fracs.clear()
        self.logger.log(rec)
        self.progress.report(
            epoch=s.epoch + 1,
            step=s.step_in_epoch,
            global_step=s.global_step,
            loss=rec["loss"],
            acc=rec["acc"],
            img_per_s=rec["img_per_s"],
        )

    def _evaluate(self, model: nn.Module) -> dict[str, Any]:
        cfg = self.cfg
        val = evaluate_model(
            model,
            self.val_loader,
            device=self.device,
            dist_info=self.dist,
            amp=cfg.train.amp,
            channels_last=cfg.train.channels_last,
            executed_macs=self.dense_macs is not None,
        )
        if "macs" in val:  # measured by the executor: nodes removed per sample cost nothing
            val["mac_fraction"] = val["macs"] / self.dense_macs
        return val

    def _end_epoch(self, guard: SignalGuard, val: dict[str, float], ema: dict[str, float]) -> tuple[dict, dict]:
        """Evaluate when due, log the epoch, save last.pt (and best.pt); returns the latest metrics."""
        cfg, s = self.cfg, self.state
        epoch_no = s.epoch + 1
        rec = s.epoch_record(lr=self.optimizer.param_groups[0]["lr"])
        is_best = False
        if epoch_no % cfg.train.eval_every == 0 or epoch_no == cfg.schedule.epochs:
            broadcast_buffers(self.raw_model, self.dist)
            val = self._evaluate(self.eval_model)
            rec.update({f"val_{k}": v for k, v in val.items() if k not in ("images", "removed")})
            rec.update({f"val_removed_{k}": v for k, v in val.get("removed", {}).items()})
            if self.ema is not None:
                ema = self._evaluate(self.ema.module)
                rec.update({f"ema_val_{k}": v for k, v in ema.items() if k != "images"})
            if val["top1"] > s.best_metric:
                s.best_metric, s.best_epoch, is_best = val["top1"], epoch_no, True
            rec["best_val_top1"] = s.best_metric
        self.logger.log(rec)
        if self.is_main:
            shown = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items() if k != "kind"
            )
            print(f"[dynwire] epoch {epoch_no}/{cfg.schedule.epochs}: {shown}", file=sys.stderr, flush=True)
        s.next_epoch()
        self.save(best=is_best)
        flags = torch.tensor([float(guard.signum is not None)], device=self.device)
        if all_reduce_sum(flags, self.dist).item() > 0:  # signal arrived during evaluation
            last = self.run_dir / "last.pt"
            msg = f"training interrupted by {guard.name} after epoch {epoch_no}; saved {last}"
            raise TrainingInterrupted(msg, guard.signum or signal.SIGTERM, last)
        return val, ema

    def run(self) -> dict[str, Any]:
        val: dict[str, float] = {}
        ema: dict[str, float] = {}
        try:
            with SignalGuard() as guard:
                while self.state.epoch < self.cfg.schedule.epochs:
                    self._train_epoch(guard)
                    val, ema = self._end_epoch(guard, val, ema)
        finally:
            self.logger.close()
        if not val:  # resumed a finished run: evaluate once for the summary
            broadcast_buffers(self.raw_model, self.dist)
            val = self._evaluate(self.eval_model)
        return self._final(val, ema)

    def _final(self, val: dict[str, float], ema_val: dict[str, float]) -> dict[str, Any]:
        # SHA-256 of the model state on every rank: all equal if DDP kept them in sync
        digests = all_gather_objects(state_dict_sha256(self.raw_model.state_dict()), self.dist)
        final = final_summary(self.cfg, self.state, self.dist, val, ema_val, digests)
        if self.is_main:
            final.update(profile_summary(self.raw_model, tuple(self.data_info["input_size"])))
            atomic_write_json(self.run_dir / "final.json", final)
        barrier(self.dist)
        return final


def _check_node_form(stored: dict, cfg: RunConfig, path: Path) -> None:
    """Refuse to resume a checkpoint in another node form: the weights would load (parameter names
    are the same in both forms) into a different network."""
    if cfg.model.wiring == "sequential":
        return
    was = config_node(stored.get("model"))
    now = config_node({"wiring_kwargs": cfg.model.wiring_kwargs})
    if was != now:
        raise ValueError(
            f"checkpoint {str(path)!r} was trained with node={was!r} but this run builds node={now!r}; "
            f"resume it with --set model.wiring_kwargs.node={was}"
        )


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
        trainer = _Trainer(cfg, info, datasets, model_fn or build_model)
        trainer.setup()
        return trainer.run()
    finally:
        cleanup_distributed(info)
        torch.set_num_threads(threads)
