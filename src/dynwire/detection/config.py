"""Detection recipe: dataclasses mirroring the engine's YAML sections (``task: detection``).

A recipe is a YAML file with ``model``, ``data``, ``optim``, ``schedule``, ``train`` and
``output`` sections, like the classification configs, plus ``task: detection``. Unknown keys
and invalid values are refused at start-up, naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DetectionConfig",
    "DetModelConfig",
    "DetDataConfig",
    "DetOptimConfig",
    "DetScheduleConfig",
    "DetTrainConfig",
    "DetOutputConfig",
    "load_detection_config",
    "detection_config_from_dict",
    "detection_config_to_dict",
    "apply_detection_override",
    "is_detection_recipe",
]


@dataclass
class DetModelConfig:
    name: str = "resnet50"  # backbone: any dynwire.list_models() name
    wiring: str = "dynamic"
    wiring_kwargs: dict[str, Any] = field(default_factory=dict)  # router_bias, eval_gate, ...
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # family options: stem, stem_width, ...
    norm: str = "frozen_bn"  # frozen_bn | bn | sync_bn
    trainable_stages: int = 3
    returned_stages: list[Any] | None = None
    backbone_weights: str | None = None  # a dynwire classification checkpoint or torchvision state dict
    fpn_channels: int = 256
    anchor_sizes: list[list[int]] | None = None
    representation_size: int = 1024
    detector_kwargs: dict[str, Any] = field(default_factory=dict)  # any other FasterRCNN argument


@dataclass
class DetDataConfig:
    name: str = "coco"  # coco | fmnist_scenes (same COCO layout)
    root: str | None = None  # root/<split>/ images, root/annotations/instances_<split>.json
    train_split: str = "train2017"
    val_split: str = "val2017"
    batch_size: int = 16  # images per iteration
    eval_batch_size: int = 4
    num_workers: int = 4
    train_min_size: list[int] = field(default_factory=lambda: [640, 672, 704, 736, 768, 800])
    test_min_size: int = 800
    max_size: int = 1333
    hflip_prob: float = 0.5
    skip_bad: bool = False
    check_images: str = "header"
    remove_empty: bool = True  # drop training images without (non-crowd) boxes, as Detectron2
    val_subset: int | None = None  # evaluate on the first N val images only


@dataclass
class DetOptimConfig:
    lr: float = 0.02
    reference_batch: int = 16  # lr is scaled by batch_size / reference_batch
    momentum: float = 0.9
    weight_decay: float = 1.0e-4
    clip_grad_norm: float | None = None


@dataclass
class DetScheduleConfig:
    iters: int = 90000
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    steps: list[int] = field(default_factory=lambda: [60000, 80000])
    gamma: float = 0.1


@dataclass
class DetTrainConfig:
    seed: int = 0
    device: str = "auto"
    num_threads: int | None = None
    log_every: int = 20
    eval_every_iters: int = 0  # 0: evaluate at the end only
    ckpt_every_iters: int = 1000
    progress: bool = True  # live progress on rank 0 (tqdm on a terminal, plain lines otherwise)
    tensorboard: bool = True  # TensorBoard events under <run>/tb/


@dataclass
class DetOutputConfig:
    dir: str = "runs"
    name: str = "detection"


@dataclass
class DetectionConfig:
    task: str = "detection"
    model: DetModelConfig = field(default_factory=DetModelConfig)
    data: DetDataConfig = field(default_factory=DetDataConfig)
    optim: DetOptimConfig = field(default_factory=DetOptimConfig)
    schedule: DetScheduleConfig = field(default_factory=DetScheduleConfig)
    train: DetTrainConfig = field(default_factory=DetTrainConfig)
    output: DetOutputConfig = field(default_factory=DetOutputConfig)

    def validate(self) -> DetectionConfig:
        from .model import NORMS

        errs = []
        s, d, o = self.schedule, self.data, self.optim
        if self.task != "detection":
            errs.append(f"task={self.task!r}: must be 'detection'")
        if self.model.norm not in NORMS:
            errs.append(f"model.norm={self.model.norm!r}: choose one of {', '.join(NORMS)}")
        if s.iters < 1:
            errs.append(f"schedule.iters={s.iters}: must be >= 1")
        if not 0 <= s.warmup_iters <= s.iters:
            errs.append(f"schedule.warmup_iters={s.warmup_iters}: must be in [0, schedule.iters]")
        if list(s.steps) != sorted(s.steps) or any(not 0 < x for x in s.steps):
            errs.append(f"schedule.steps={s.steps}: must be increasing positive iterations")
        if not 0 < s.warmup_factor <= 1:
            errs.append(f"schedule.warmup_factor={s.warmup_factor}: must be in (0, 1]")
        if d.batch_size < 1 or d.eval_batch_size < 1:
            errs.append("data.batch_size and data.eval_batch_size must be >= 1")
        if not d.train_min_size or any(int(x) < 1 for x in d.train_min_size):
            errs.append(f"data.train_min_size={d.train_min_size}: a non-empty list of positive sizes")
        if not 0 <= d.hflip_prob <= 1:
            errs.append(f"data.hflip_prob={d.hflip_prob}: must be in [0, 1]")
        if o.lr <= 0 or o.reference_batch < 1 or o.weight_decay < 0 or not 0 <= o.momentum < 1:
            errs.append("optim: lr > 0, reference_batch >= 1, weight_decay >= 0, 0 <= momentum < 1")
        if self.train.device not in ("auto", "cpu", "cuda"):
            errs.append(f"train.device={self.train.device!r}: choose one of auto, cpu, cuda")
        if self.train.log_every < 1 or self.train.ckpt_every_iters < 1 or self.train.eval_every_iters < 0:
            errs.append("train: log_every >= 1, ckpt_every_iters >= 1, eval_every_iters >= 0")
        if errs:
            raise ValueError("invalid detection config: " + "; ".join(errs))
        return self


_SECTIONS = {f.name: f.type for f in dataclasses.fields(DetectionConfig)}
_CLASSES = {
    "model": DetModelConfig,
    "data": DetDataConfig,
    "optim": DetOptimConfig,
    "schedule": DetScheduleConfig,
    "train": DetTrainConfig,
    "output": DetOutputConfig,
}


def _unknown(key: str, allowed: list[str]) -> ValueError:
    close = difflib.get_close_matches(key.split(".")[-1], allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"unknown config key {key!r}{hint}; allowed: {', '.join(allowed)}")


def detection_config_from_dict(raw: dict[str, Any] | DetectionConfig) -> DetectionConfig:
    """Build and validate a :class:`DetectionConfig` from nested dicts (missing keys: defaults)."""
    if isinstance(raw, DetectionConfig):
        return raw.validate()
    if not isinstance(raw, dict):
        raise ValueError(f"a detection config must be a mapping, got {type(raw).__name__}")
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "task":
            kwargs["task"] = value
            continue
        if key not in _CLASSES:
            raise _unknown(key, list(_SECTIONS))
        cls = _CLASSES[key]
        names = [f.name for f in dataclasses.fields(cls)]
        value = value or {}
        if not isinstance(value, dict):
            raise ValueError(f"config section {key!r} must be a mapping, got {type(value).__name__}")
        for k in value:
            if k not in names:
                raise _unknown(f"{key}.{k}", names)
        defaults = cls()
        sec = {}
        for k, v in value.items():
            ref = getattr(defaults, k)
            if isinstance(ref, bool) and not isinstance(v, bool):
                raise ValueError(f"config key {key}.{k}={v!r}: expected true or false")
            if isinstance(ref, float) and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if (
                isinstance(ref, int)
                and not isinstance(ref, bool)
                and not (isinstance(v, int) and not isinstance(v, bool))
            ):
                raise ValueError(f"config key {key}.{k}={v!r}: expected an integer")
            sec[k] = v
        kwargs[key] = cls(**sec)
    return DetectionConfig(**kwargs).validate()


def detection_config_to_dict(cfg: DetectionConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _resolve(name_or_path: str | os.PathLike[str]) -> Path:
    from ..engine.config import resolve_config_path  # shipped names, with a suggestion for typos

    return resolve_config_path(name_or_path)


def _read(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"detection config '{path}': invalid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"config '{path}': top level must be a mapping of sections")
    return raw


def is_detection_recipe(name_or_path: str | os.PathLike[str]) -> bool:
    """Whether a recipe (path or shipped name) says ``task: detection`` (what ``dynwire train`` routes on)."""
    return _read(_resolve(name_or_path)).get("task") == "detection"


def apply_detection_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``section.key=value`` override (value parsed as YAML) to a raw config dict, in place."""
    if "=" not in item:
        raise ValueError(f"override {item!r}: expected section.key=value")
    key, text = item.split("=", 1)
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {p} is not a section")
    node[parts[-1]] = yaml.safe_load(text)


def load_detection_config(
    name_or_path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()
) -> DetectionConfig:
    """Read a detection recipe (path or shipped name, e.g. ``det_fmnist_scenes``), apply ``a.b=value`` overrides."""
    raw = _read(_resolve(name_or_path))
    for item in overrides:
        apply_detection_override(raw, item)
    return detection_config_from_dict(raw)
