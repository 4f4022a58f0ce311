"""Run configuration: a dataclass schema, YAML loading, ``--set`` overrides, validation.

A run config has six sections (``model``, ``data``, ``optim``, ``schedule``,
``train``, ``output``). :func:`load_config` reads a YAML file (a path or the
name of a config shipped in ``dynwire/configs``), applies ``key.sub=value``
overrides (values parsed with :func:`yaml.safe_load`) and validates every
field. Errors are :class:`ValueError` messages that name the key, the bad
value and what is allowed, e.g. ``optim.lr=-1: must be > 0``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import tempfile
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

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

#: Wirings understood by :func:`dynwire.create_model`.
WIRINGS = ("sequential", "dynamic", "static", "random-er", "random-ba", "random-ws")
#: Dataset names understood by :func:`dynwire.data.build_dataset`.
DATASETS = ("fashion_mnist", "cifar10", "cifar100", "imagenet")


# --------------------------------------------------------------------------- checks
# Each check returns None when the value is fine, else a short reason
# ("must be > 0"). They run after the type check, and are skipped for None.
Check = Callable[[Any], Optional[str]]


def _gt(bound: float) -> Check:
    return lambda v: None if v > bound else f"must be > {bound:g}"


def _ge(bound: float) -> Check:
    return lambda v: None if v >= bound else f"must be >= {bound:g}"


def _in_unit(closed_low: bool = True) -> Check:
    def check(v: float) -> Optional[str]:
        ok = (0.0 <= v < 1.0) if closed_low else (0.0 < v < 1.0)
        return None if ok else ("must be in [0, 1)" if closed_low else "must be in (0, 1)")

    return check


def _choice(options: tuple[str, ...]) -> Check:
    def check(v: str) -> Optional[str]:
        if v in options:
            return None
        hint = difflib.get_close_matches(str(v), options, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        return f"must be one of {', '.join(options)}{extra}"

    return check


def _nonempty(v: str) -> Optional[str]:
    return None if v.strip() else "must be a non-empty string"


def _opt(default: Any, *checks: Check, doc: str = "") -> Any:
    """A dataclass field with validation checks in its metadata."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"checks": checks, "doc": doc})
    return field(default=default, metadata={"checks": checks, "doc": doc})


# --------------------------------------------------------------------------- schema
@dataclass
class ModelConfig:
    """Which network to build; ``in_chans``/``num_classes`` come from the dataset."""

    name: str = _opt("cifar_resnet20", _nonempty, doc="model name for dynwire.create_model")
    wiring: str = _opt("dynamic", _choice(WIRINGS), doc="wiring of the stage graphs")
    wiring_kwargs: dict = _opt({}, doc="extra keyword arguments for create_model")
    drop_rate: float = _opt(0.0, _in_unit(), doc="dropout before the classifier")


@dataclass
class DataConfig:
    """Dataset and loader settings. ``batch_size`` is the GLOBAL batch (all ranks)."""

    name: str = _opt("fashion_mnist", _choice(DATASETS))
    root: Optional[str] = _opt(None, doc="dataset folder (None: $DYNWIRE_DATA_DIR, ./data, system dirs)")
    batch_size: int = _opt(128, _gt(0), doc="global batch size; split evenly across ranks")
    num_workers: int = _opt(0, _ge(0))
    subset: Optional[int] = _opt(None, _gt(0), doc="use this many training images")
    val_subset: Optional[int] = _opt(None, _gt(0), doc="use this many validation images")
    image_size: Optional[int] = _opt(None, _gt(0), doc="resize images (None: dataset default)")
    skip_bad_images: bool = _opt(False, doc="skip unreadable images instead of failing")


@dataclass
class OptimConfig:
    """SGD settings; the learning rate scales linearly with the global batch."""

    lr: float = _opt(0.1, _gt(0), doc="lr for reference_batch; used lr = lr * batch / reference_batch")
    reference_batch: int = _opt(256, _gt(0))
    momentum: float = _opt(0.9, _in_unit())
    weight_decay: float = _opt(1e-4, _ge(0))
    nesterov: bool = _opt(False)
    no_decay_norm_bias: bool = _opt(True, doc="no weight decay on 1-D params (norms, biases, thresholds)")
    label_smoothing: float = _opt(0.0, _in_unit())
    clip_grad_norm: Optional[float] = _opt(None, _gt(0), doc="max global grad norm (None: off)")


@dataclass
class ScheduleConfig:
    """Per-step learning-rate schedule: linear warm-up, then half-period cosine to 0."""

    epochs: int = _opt(10, _gt(0))
    warmup_epochs: float = _opt(0.0, _ge(0))
    cosine: bool = _opt(True, doc="cosine decay after warm-up (False: constant)")


@dataclass
class TrainConfig:
    """Loop settings: seeds, precision, EMA, logging and checkpoint cadence, resume."""

    seed: int = _opt(0, _ge(0))
    amp: str = _opt("none", _choice(("none", "bf16")))
    channels_last: bool = _opt(False)
    compile: bool = _opt(False)
    ema_decay: Optional[float] = _opt(None, _in_unit(closed_low=False), doc="EMA of weights (None: off)")
    sync_bn: bool = _opt(False, doc="SyncBatchNorm across ranks (CUDA only)")
    log_every: int = _opt(50, _gt(0), doc="log train metrics every N steps")
    eval_every: int = _opt(1, _gt(0), doc="evaluate every N epochs (and after the last)")
    ckpt_every_steps: Optional[int] = _opt(None, _gt(0), doc="also save last.pt every N steps")
    resume: Optional[str] = _opt(None, _nonempty, doc="'auto' (last.pt in the run dir) or a checkpoint path")
    device: str = _opt("auto", _choice(("auto", "cpu", "cuda")))
    num_threads: Optional[int] = _opt(None, _gt(0), doc="torch CPU threads per process (None: PyTorch default)")


@dataclass
class OutputConfig:
    """Where the run directory ``dir/name`` goes."""

    dir: str = _opt("runs", _nonempty)
    name: Optional[str] = _opt(None, _nonempty, doc="run name (None: <data>_<model>_<wiring>)")


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


# --------------------------------------------------------------------------- typing
def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_describe(a) for a in args) + " or null"
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    return {int: "an int", float: "a number", bool: "a bool (true/false)", str: "a string", dict: "a mapping"}.get(
        tp, str(tp)
    )


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Type-check (and lightly coerce) ``value`` for a field annotated ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            try:
                return _coerce(key, value, inner[0])
            except ValueError:
                raise ValueError(f"{key}={value!r}: expected {_describe(tp)}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and math.isfinite(value):
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError(f"{key}={value!r}: must be a finite number")
            return float(value)
        if isinstance(value, str):
            # PyYAML reads "4e-5" (no dot) as a string: accept numeric strings.
            try:
                parsed = float(value)
            except ValueError:
                pass
            else:
                if math.isfinite(parsed):
                    return parsed
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            bad = [k for k in value if not isinstance(k, str)]
            if bad:
                raise ValueError(f"{key}={value!r}: keys must be strings, got {bad[0]!r}")
            return copy.deepcopy(value)
    else:  # pragma: no cover - schema only uses the types above
        raise TypeError(f"unsupported annotation {tp!r} for {key}")
    raise ValueError(f"{key}={value!r}: expected {_describe(tp)}")


def _unknown_key(key: str, allowed: list[str]) -> ValueError:
    leaf = key.rsplit(".", 1)[-1]
    hint = difflib.get_close_matches(leaf, allowed, n=1)
    extra = f" (did you mean {hint[0]!r}?)" if hint else ""
    return ValueError(f"{key}: unknown key{extra}; allowed: {', '.join(allowed)}")


def _build_section(name: str, cls: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{name}={raw!r}: expected a mapping of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for k, v in raw.items():
        key = f"{name}.{k}"
        if k not in fields:
            raise _unknown_key(key, list(fields))
        value = _coerce(key, v, hints[k])
        if value is not None:
            for check in fields[k].metadata.get("checks", ()):
                reason = check(value)
                if reason:
                    raise ValueError(f"{key}={v!r}: {reason}")
        kwargs[k] = value
    return cls(**kwargs)


def _cross_check(cfg: RunConfig) -> None:
    if cfg.schedule.warmup_epochs > cfg.schedule.epochs:
        raise ValueError(
            f"schedule.warmup_epochs={cfg.schedule.warmup_epochs!r}: must be <= schedule.epochs ({cfg.schedule.epochs})"
        )
    name = cfg.output.name
    if name is not None and (os.sep in name or name in (".", "..")):
        raise ValueError(f"output.name={name!r}: must be a plain folder name without {os.sep!r}")


def config_from_dict(raw: Any) -> RunConfig:
    """Validate a nested dict (as read from YAML) and build a :class:`RunConfig`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"config: expected a mapping with sections {', '.join(_SECTIONS)}, got {type(raw).__name__}")
    for k in raw:
        if k not in _SECTIONS:
            raise _unknown_key(str(k), list(_SECTIONS))
    sections = {name: _build_section(name, cls, raw.get(name)) for name, cls in _SECTIONS.items()}
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
            raise _unknown_key(section, list(_SECTIONS))
        fields = {f.name for f in dataclasses.fields(_SECTIONS[section])}
        if leaf not in fields:
            raise _unknown_key(f"{section}.{leaf}", [f.name for f in dataclasses.fields(_SECTIONS[section])])
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
def shipped_configs() -> list[str]:
    """Names of the YAML configs shipped in ``dynwire/configs``."""
    root = resources.files("dynwire") / "configs"
    try:
        return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))
    except (FileNotFoundError, NotADirectoryError):
        return []


def resolve_config_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A config path, or the name of a shipped config (``fmnist_resnet20``)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = str(name_or_path)
    stem = name[:-5] if name.endswith(".yaml") else name
    if os.sep not in stem:
        candidate = resources.files("dynwire") / "configs" / f"{stem}.yaml"
        if candidate.is_file():
            return Path(str(candidate))
    names = shipped_configs()
    hint = difflib.get_close_matches(stem, names, n=1)
    extra = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise ValueError(
        f"config {name!r}: no such file and not a shipped config{extra}; shipped: {', '.join(names) or 'none'}"
    )


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config (path or shipped name; None: defaults), apply overrides, validate."""
    raw: Any = {}
    if path is not None:
        resolved = resolve_config_path(path)
        try:
            raw = yaml.safe_load(resolved.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ValueError(f"config {str(resolved)!r}: invalid YAML ({exc})") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ValueError(f"config {str(resolved)!r}: top level must be a mapping of sections")
    return config_from_dict(apply_overrides(raw, list(overrides)))


def save_config(cfg: RunConfig, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
