"""Model registry: ``@register_model``, ``create_model``, ``list_models``."""

from __future__ import annotations

import difflib
import fnmatch
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .graph.wiring import WiringConfig, resolve_wiring

__all__ = ["register_model", "create_model", "list_models", "get_model_cfg", "ModelCfg"]


@dataclass(frozen=True)
class ModelCfg:
    """Static facts about a registered model."""

    name: str
    family: str
    input_size: tuple[int, int, int] = (3, 224, 224)
    torchvision: str | None = None  # name of the torchvision builder, when torchvision has it
    paper: str = ""  # where in the paper this model appears
    tags: tuple[str, ...] = field(default_factory=tuple)


_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}
_CFGS: dict[str, ModelCfg] = {}


def register_model(
    *, family: str, input_size: tuple[int, int, int] = (3, 224, 224), torchvision: str | None = None, paper: str = ""
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a model builder under its function name; duplicate names are refused."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__
        if name in _ENTRYPOINTS:
            raise ValueError(f"a model named '{name}' is already registered ({_ENTRYPOINTS[name].__module__})")
        _ENTRYPOINTS[name] = fn
        _CFGS[name] = ModelCfg(
            name=name, family=family, input_size=tuple(input_size), torchvision=torchvision, paper=paper
        )
        return fn

    return deco


def list_models(pattern: str | Iterable[str] = "*", exclude: str | Iterable[str] = ()) -> list[str]:
    """Registered model names matching the shell-style ``pattern``(s), sorted."""
    pats = [pattern] if isinstance(pattern, str) else list(pattern)
    excl = [exclude] if isinstance(exclude, str) else list(exclude)
    names = [n for n in _ENTRYPOINTS if any(fnmatch.fnmatch(n, p) for p in pats)]
    names = [n for n in names if not any(fnmatch.fnmatch(n, p) for p in excl)]
    return sorted(names)


def _unknown(name: str) -> ValueError:
    close = difflib.get_close_matches(name, list(_ENTRYPOINTS), n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ValueError(f"unknown model '{name}'.{hint} See dynwire.list_models() for all {len(_ENTRYPOINTS)} names.")


def get_model_cfg(name: str) -> ModelCfg:
    """The registered facts about ``name`` (family, default input size, torchvision name, where in the paper)."""
    if name not in _CFGS:
        raise _unknown(name)
    return _CFGS[name]


def create_model(
    name: str,
    num_classes: int = 1000,
    wiring: str | WiringConfig | dict = "dynamic",
    *,
    checkpoint_path: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models` (torchvision naming, e.g. ``resnet50``).
        num_classes: classifier outputs (0 removes the classifier).
        wiring: ``sequential``, ``dynamic``, ``static``, ``random-er``, ``random-ba``,
            ``random-ws`` or a :class:`WiringConfig`. Wiring options (``router_bias``,
            ``tau_init``, ``eval_gate``, ``er_p``, ``ba_m``, ``ws_k``, ``ws_p``,
            ``graph_seed``, ``recompute``) may also be passed as keyword arguments.
        checkpoint_path: load weights from a run directory (``best.pt``, else ``last.pt``), a
            training checkpoint, a ``.safetensors`` export or a saved state dict (timm-style).
            A file that says which model it holds must match ``name``, ``wiring``,
            ``num_classes`` and ``in_chans`` (``ValueError`` otherwise). The model stays in
            training mode, as any new model; :func:`dynwire.load_model` rebuilds a file's own
            model for evaluation instead.
        **kwargs: family options: ``in_chans``, ``drop_rate``, ``norm_layer``, ``act_layer``...

    The returned model's ``build_config`` (a dict) records the name and options it was built
    with; exports write it into their metadata.
    """
    if not isinstance(name, str) or name not in _ENTRYPOINTS:
        raise _unknown(str(name))
    cfg, rest = resolve_wiring(wiring, **kwargs)
    try:
        model = _ENTRYPOINTS[name](num_classes=num_classes, wiring=cfg, **rest)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise ValueError(f"create_model('{name}'): {e}") from e
        raise
    from .deploy.files import describe_build, load_weights  # files never imports the registry back

    model.build_config = describe_build(name, num_classes, model, rest)
    if checkpoint_path is not None:
        load_weights(model, checkpoint_path)
    return model
