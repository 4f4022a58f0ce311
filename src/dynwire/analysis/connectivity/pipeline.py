"""The whole analysis of a checkpoint: collect (:mod:`.collect`), accumulate (:mod:`.stats`), report
(:mod:`.report`, which draws the figures of :mod:`.plots`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._plots import require_matplotlib
from .collect import analyze_model, load_for_eval, torch_threads
from .report import write_report

__all__ = ["analyze_checkpoint"]


def analyze_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    data_dir: str | None = None,
    split: str = "val",
    max_images: int | None = None,
    batch_size: int | None = None,
    per_class: int = 2,
    top_k: int = 4,
    device: str = "auto",
    overrides: Sequence[str] = (),
    use_ema: bool = False,
    num_threads: int | None = None,
    plots: bool = True,
    reference: str | Path | None = None,
) -> dict[str, Any]:
    """Rebuild the model and evaluation split from a training checkpoint, analyze, write the report.

    ``max_images`` takes a fixed random subset of the split (seeded by the run's ``train.seed``,
    as ``data.val_subset`` does). ``reference``: another training checkpoint on the same data (e.g.
    the dense sequential network) run on the same images; its per-sample loss is the difficulty that
    executed MACs are rank-correlated with. Returns the ``analysis.json`` dict. Writes ``analysis.json``,
    ``analysis.md`` and, with ``plots``, the PNGs (Figs. 5-7 and more) into ``out_dir``.
    """
    if plots:
        require_matplotlib()  # before any work, not after the pass over the data
    ld = load_for_eval(
        checkpoint,
        data_dir=data_dir,
        split=split,
        max_images=max_images,
        batch_size=batch_size,
        overrides=overrides,
        use_ema=use_ema,
        device=device,
    )
    ref_model = None
    if reference is not None:
        ref = load_for_eval(
            reference,
            data_dir=data_dir,
            split=split,
            max_images=max_images,
            batch_size=batch_size,
            overrides=(),
            use_ema=False,
            device=device,
        )
        if int(ref.info.num_classes) != int(ld.info.num_classes) or ref.cfg.data.name != ld.cfg.data.name:
            raise ValueError(
                f"--reference {str(reference)!r}: trained on {ref.cfg.data.name} ({ref.info.num_classes} classes), "
                f"the analyzed model on {ld.cfg.data.name} ({ld.info.num_classes}); give a reference of the same data"
            )
        ref_model = ref.model
    with torch_threads(num_threads if num_threads is not None else ld.cfg.train.num_threads):
        t0 = time.perf_counter()
        acc = analyze_model(
            ld.model,
            ld.loader,
            num_classes=int(ld.info.num_classes),
            device=ld.device,
            per_class=per_class,
            top_k=top_k,
            progress=True,
            reference=ref_model,
        )
        seconds = time.perf_counter() - t0
    ckpt, cfg, ds = ld.ckpt, ld.cfg, ld.dataset
    class_names = getattr(ds, "classes", None)
    meta = {
        "checkpoint": str(checkpoint),
        "epoch": int(ckpt.get("epoch", 0)),
        "global_step": int(ckpt.get("global_step", 0)),
        "model": cfg.model.name,
        "wiring": cfg.model.wiring,
        "wiring_kwargs": dict(cfg.model.wiring_kwargs),
        "dataset": cfg.data.name,
        "split": split,
        "max_images": max_images,
        "subset_seed": cfg.train.seed,
        "weights": "ema" if use_ema else "model",
        "overrides": list(overrides),
        "reference": None if reference is None else str(reference),
        "seconds": round(seconds, 2),
    }
    return write_report(acc, out_dir, meta=meta, class_names=class_names, plots=plots)
