"""Run configuration: a dataclass schema, YAML recipes with a ``_base_``, ``--set`` overrides, validation.

A run config has six sections (``model``, ``data``, ``optim``, ``schedule``,
``train``, ``output``); the schema holds every default. :func:`load_config`
reads a YAML recipe (a path or the name of a config shipped in
``dynwire/configs``), merges it over the recipe named by its ``_base_`` key
(recursively), applies ``key.sub=value`` overrides (values parsed with
:func:`yaml.safe_load`) and validates every field. Errors are
:class:`ValueError` messages that name the key, the bad value and what is
allowed, e.g. ``optim.lr=-1: must be > 0``.

Why not OmegaConf: its structured configs convert before validating, so a
message could no longer show the value the user typed (``optim.lr=-1.0`` for
``-1``); it reads ``nan`` as a float, and a ``--set`` without ``=`` as null.
The checks, choices and messages below would stay, so it would add a
dependency without making this module smaller.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml

from ..data import DATASET_NAMES as DATASETS
from ..data import canonical_dataset_name
from ..graph.wiring import WIRINGS, WiringConfig, resolve_wiring
from ._fields import build_section, choice, ge, gt, in_unit, nonempty, opt, unknown_key
from .files import atomic_write

__all__ = [
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "OutputConfig",
    "RunConfig",
    "WIRINGS",
    "DATASETS",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "resolve_config_path",
    "shipped_configs",
    "save_config",
    "config_to_dict",
]

#: The key naming the recipe a YAML file is merged over.
BASE_KEY = "_base_"


def _dataset(v: str) -> Optional[str]:
    try:
        canonical_dataset_name(v)
    except ValueError:
        return choice(DATASETS)(v)
    return None


# --------------------------------------------------------------------------- schema
@dataclass
class ModelConfig:
    """Which network to build; ``in_chans``/``num_classes`` come from the dataset."""

    name: str = opt("cifar_resnet20", nonempty, doc="model name for dynwire.create_model")
    wiring: str = opt("dynamic", choice(WIRINGS), doc="wiring of the stage graphs")
    wiring_kwargs: dict = opt({}, doc="wiring options of create_model (router_bias, tau_init, eval_gate, ...)")
    drop_rate: float = opt(0.0, in_unit(), doc="dropout before the classifier")


@dataclass
class DataConfig:
    """Dataset and loader settings. ``batch_size`` is the GLOBAL batch (all ranks)."""

    name: str = opt("fashion_mnist", _dataset, convert=canonical_dataset_name, doc="dataset (aliases: fmnist, ...)")
    root: Optional[str] = opt(None, doc="dataset folder (None: $DYNWIRE_DATA_DIR, ./data, system dirs)")
    batch_size: int = opt(128, gt(0), doc="global batch size; split evenly across ranks")
    num_workers: int = opt(0, ge(0))
    subset: Optional[int] = opt(None, gt(0), doc="use this many training images")
    val_subset: Optional[int] = opt(None, gt(0), doc="use this many validation images")
    image_size: Optional[int] = opt(None, gt(0), doc="input side (None: dataset default; imagefolder: from the images)")
    skip_bad_images: bool = opt(False, doc="skip unreadable images instead of failing")


@dataclass
class OptimConfig:
    """SGD settings; the learning rate scales linearly with the global batch."""

    lr: float = opt(0.1, gt(0), doc="lr for reference_batch; used lr = lr * batch / reference_batch")
    reference_batch: int = opt(256, gt(0))
    momentum: float = opt(0.9, in_unit())
    weight_decay: float = opt(1e-4, ge(0))
    nesterov: bool = opt(False)
    no_decay_norm_bias: bool = opt(True, doc="no weight decay on 1-D params (norms, biases, thresholds)")
    label_smoothing: float = opt(0.0, in_unit())
    clip_grad_norm: Optional[float] = opt(None, gt(0), doc="max global grad norm (None: off)")


@dataclass
class ScheduleConfig:
    """Per-step learning-rate schedule: linear warm-up, then half-period cosine to 0."""

    epochs: int = opt(10, gt(0))
    warmup_epochs: float = opt(0.0, ge(0))
    cosine: bool = opt(True, doc="cosine decay after warm-up (False: constant)")


@dataclass
class TrainConfig:
    """Loop settings: seeds, precision, EMA, logging and checkpoint cadence, resume."""

    seed: int = opt(0, ge(0))
    amp: str = opt("none", choice(("none", "bf16")))
    channels_last: bool = opt(False)
    compile: bool = opt(False)
    compile_mode: str = opt(
        "default",
        choice(("default", "reduce-overhead", "max-autotune")),
        doc="torch.compile mode with compile=true; 'reduce-overhead' replays CUDA graphs (bench/gpu.py)",
    )
    ema_decay: Optional[float] = opt(None, in_unit(closed_low=False), doc="EMA of weights (None: off)")
    sync_bn: bool = opt(False, doc="SyncBatchNorm across ranks (CUDA only)")
    log_every: int = opt(50, gt(0), doc="log train metrics every N steps")
    eval_every: int = opt(1, gt(0), doc="evaluate every N epochs (and after the last)")
    ckpt_every_steps: Optional[int] = opt(None, gt(0), doc="also save last.pt every N steps")
    resume: Optional[str] = opt(None, nonempty, doc="'auto' (last.pt in the run dir) or a checkpoint path")
    device: str = opt("auto", choice(("auto", "cpu", "cuda")))
    num_threads: Optional[int] = opt(None, gt(0), doc="torch CPU threads per process (None: PyTorch default)")
    budget: dict = opt(
        {},
        doc="compute budget: {target: MAC fraction in (0, 1], weight: >= 0, temperature: > 0, "
        "difficulty: in [0, 1], per-sample targets by loss rank, warmup_epochs: >= 0, linear ramp of the "
        "weight, per_stage: 0 or 1, each stage spends the same share of its removable MACs} (empty: off)",
    )


@dataclass
class OutputConfig:
    """Where the run directory ``dir/name`` goes."""

    dir: str = opt("runs", nonempty)
    name: Optional[str] = opt(None, nonempty, doc="run name (None: <data>_<model>_<wiring>)")


@dataclass
class RunConfig:
    """A whole training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    # ------------------------------------------------------------------ derived
    @property
    def run_name(self) -> str:
        """``output.name`` or a stable default derived from data/model/wiring."""
        return self.output.name or f"{self.data.name}_{self.model.name}_{self.model.wiring}"

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir) / self.run_name

    def scaled_lr(self) -> float:
        """Learning rate for the configured global batch (linear scaling rule)."""
        return self.optim.lr * self.data.batch_size / self.optim.reference_batch

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "train": TrainConfig,
    "output": OutputConfig,
}


_BUDGET_KEYS = ("target", "weight", "temperature", "difficulty", "warmup_epochs", "per_stage")


def _cross_check(cfg: RunConfig) -> None:
    if cfg.schedule.warmup_epochs > cfg.schedule.epochs:
        raise ValueError(
            f"schedule.warmup_epochs={cfg.schedule.warmup_epochs!r}: must be <= schedule.epochs ({cfg.schedule.epochs})"
        )
    name = cfg.output.name
    if name is not None and (os.sep in name or name in (".", "..")):
        raise ValueError(f"output.name={name!r}: must be a plain folder name without {os.sep!r}")
    budget = cfg.train.budget
    for k, v in budget.items():
        if k not in _BUDGET_KEYS:
            raise ValueError(f"train.budget.{k}: unknown key; allowed: {', '.join(_BUDGET_KEYS)}")
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"train.budget.{k}={v!r}: must be a number")
    if budget and "target" not in budget:
        raise ValueError("train.budget: needs a target (the executed-MAC fraction to aim for, e.g. 0.6)")
    if budget and not 0.0 < budget["target"] <= 1.0:
        raise ValueError(f"train.budget.target={budget['target']!r}: must be in (0, 1]")
    if budget and (budget.get("weight", 1.0) < 0 or budget.get("temperature", 0.2) <= 0):
        raise ValueError("train.budget: weight must be >= 0 and temperature > 0")
    if budget and not 0.0 <= budget.get("difficulty", 0.0) <= 1.0:
        raise ValueError(f"train.budget.difficulty={budget['difficulty']!r}: must be in [0, 1] (0: one target for all)")
    if budget and budget.get("warmup_epochs", 0.0) < 0:
        raise ValueError(f"train.budget.warmup_epochs={budget['warmup_epochs']!r}: must be >= 0 (0: no warm-up)")
    if budget and budget.get("per_stage", 0) not in (0, 1):
        raise ValueError(f"train.budget.per_stage={budget['per_stage']!r}: must be 0 (one term) or 1 (one per stage)")
    if budget and cfg.model.wiring not in ("dynamic", "static"):
        raise ValueError(f"train.budget: needs thresholds to close edges; model.wiring={cfg.model.wiring!r} has none")
    kwargs = cfg.model.wiring_kwargs
    allowed = [f.name for f in dataclasses.fields(WiringConfig) if f.name != "kind"]
    for k in kwargs:
        if k not in allowed:
            hint = difflib.get_close_matches(k, allowed, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(f"model.wiring_kwargs.{k}: unknown wiring option{extra}; allowed: {', '.join(allowed)}")
    try:
        resolve_wiring(cfg.model.wiring, **kwargs)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"model.wiring_kwargs={kwargs!r}: {exc}") from None


def config_from_dict(raw: Any) -> RunConfig:
    """Validate a nested dict (as read from YAML) and build a :class:`RunConfig`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"config: expected a mapping with sections {', '.join(_SECTIONS)}, got {type(raw).__name__}")
    for k in raw:
        if k not in _SECTIONS:
            raise unknown_key(str(k), list(_SECTIONS))
    sections = {name: build_section(name, cls, raw.get(name)) for name, cls in _SECTIONS.items()}
    cfg = RunConfig(**sections)
    _cross_check(cfg)
    return cfg


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain nested dict of the config (only str/int/float/bool/None/dict values)."""
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------- overrides
def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``section.key=value`` overrides applied.

    Values are parsed with :func:`yaml.safe_load` (``1e-3`` -> str, ``0.001`` ->
    float, ``null`` -> None, ``[1,2]`` -> list). Keys inside the ``dict`` field
    ``model.wiring_kwargs`` may be set one by one: ``model.wiring_kwargs.k=4``.
    """
    out = copy.deepcopy(raw) if raw else {}
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"override {item!r}: expected key.sub=value (e.g. optim.lr=0.1)")
        key, _, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if len(parts) < 2 or not all(parts):
            raise ValueError(f"override {item!r}: key {key!r} must look like section.key (e.g. optim.lr)")
        section, leaf = parts[0], parts[1]
        if section not in _SECTIONS:
            raise unknown_key(section, list(_SECTIONS))
        fields = {f.name for f in dataclasses.fields(_SECTIONS[section])}
        if leaf not in fields:
            raise unknown_key(f"{section}.{leaf}", [f.name for f in dataclasses.fields(_SECTIONS[section])])
        if len(parts) > 2 and typing.get_type_hints(_SECTIONS[section])[leaf] is not dict:
            raise ValueError(f"override {item!r}: {section}.{leaf} is not a mapping, so {key!r} is not a valid key")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ValueError(f"override {item!r}: cannot parse value {text!r} as YAML ({exc})") from None
        node = out.setdefault(section, {})
        if node is None:
            node = out[section] = {}
        if not isinstance(node, dict):
            raise ValueError(f"{section}={node!r}: expected a mapping")
        for p in parts[1:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ValueError(f"override {item!r}: {p} is not a mapping")
            node = nxt
        node[parts[-1]] = value
    return out


# --------------------------------------------------------------------------- files
def _configs_dir() -> Any:
    return resources.files("dynwire") / "configs"


def _recipe_task(path: Any) -> str:
    """A recipe's top-level ``task`` (``classification`` when absent or unreadable)."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return "classification"
    return str(raw.get("task", "classification")) if isinstance(raw, dict) else "classification"


def shipped_configs(task: str | None = "classification") -> list[str]:
    """Names of the recipes shipped in ``dynwire/configs`` (``_``-prefixed bases excluded).

    ``task``: only recipes for this task (a recipe's top-level ``task`` key, default
    ``classification``; detection recipes say ``task: detection`` and load with
    ``dynwire.detection.load_detection_config``); None: all of them.
    """
    try:
        files = [p for p in _configs_dir().iterdir() if p.name.endswith(".yaml") and not p.name.startswith("_")]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(p.name[: -len(".yaml")] for p in files if task is None or _recipe_task(p) == task)


def resolve_config_path(name_or_path: str | os.PathLike[str], relative_to: Path | None = None) -> Path:
    """A config path (tried next to ``relative_to`` first), or the name of a shipped config."""
    path = Path(name_or_path).expanduser()
    for candidate in ([relative_to / path] if relative_to is not None and not path.is_absolute() else []) + [path]:
        if candidate.is_file():
            return candidate
    name = str(name_or_path)
    stem = name[:-5] if name.endswith(".yaml") else name
    if os.sep not in stem:
        shipped = _configs_dir() / f"{stem}.yaml"
        if shipped.is_file():
            return Path(str(shipped))
    names = shipped_configs(task=None)
    hint = difflib.get_close_matches(stem, names, n=1)
    extra = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise ValueError(
        f"config {name!r}: no such file and not a shipped config{extra}; shipped: {', '.join(names) or 'none'}"
    )


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _read_recipe(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML recipe merged over its ``_base_`` chain."""
    if path.resolve() in chain:
        raise ValueError(f"config {str(path)!r}: {BASE_KEY} cycle through {' -> '.join(map(str, chain))}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"config {str(path)!r}: invalid YAML ({exc})") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ValueError(f"config {str(path)!r}: top level must be a mapping of sections")
    base = raw.pop(BASE_KEY, None)
    if base is None:
        return raw
    try:
        base_path = resolve_config_path(str(base), relative_to=path.parent)
    except ValueError as exc:
        raise ValueError(f"config {str(path)!r}: {BASE_KEY}={base!r}: {exc}") from None
    return _merge(_read_recipe(base_path, (*chain, path.resolve())), raw)


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML recipe (path or shipped name; None: the schema defaults), apply overrides, validate."""
    raw = _read_recipe(resolve_config_path(path)) if path is not None else {}
    return config_from_dict(apply_overrides(raw, list(overrides)))


def save_config(cfg: RunConfig, path: str | os.PathLike[str]) -> None:
    """Write the complete resolved config (every key) as YAML, atomically."""
    atomic_write(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False))
