"""The study file of :mod:`dynwire.study`: its runs, cells and groups, and the config a run trains with.

:func:`load_study` / :func:`study_from_dict` validate a study description and expand its grid
(model x wiring x options x seeds) into :class:`RunSpec` runs with stable names;
:func:`expected_config` and :func:`config_mismatch` compare a run's stored ``config.yaml`` with
the study (a mismatch makes the run ``stale``).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..engine.config import config_from_dict, config_to_dict, load_config
from ..graph.wiring import WIRINGS, WiringConfig

#: The command that trains one run (``python -m dynwire.cli train``).
TRAIN_COMMAND: tuple[str, ...] = ("-m", "dynwire.cli", "train")
#: Config entries that may differ between a run's stored config and the study without making it stale.
_VOLATILE = {
    ("output", "dir"),
    ("output", "name"),
    ("train", "resume"),
    ("train", "num_threads"),
    ("train", "device"),
    ("data", "root"),
    ("data", "num_workers"),
}
_SAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


# --------------------------------------------------------------------------- study description
@dataclass(frozen=True)
class RunSpec:
    """One training run: its stable name is ``model__wiring[__options]__s<seed>``."""

    model: str
    wiring: str
    overrides: tuple[str, ...]
    seed: int

    @property
    def options_slug(self) -> str:
        parts = []
        for o in sorted(self.overrides):
            key, _, value = o.partition("=")
            parts.append(_SAFE.sub("_", f"{key.split('.')[-1]}={value.strip()}"))
        return "_".join(parts)

    @property
    def name(self) -> str:
        slug = self.options_slug
        return f"{self.model}__{self.wiring}" + (f"__{slug}" if slug else "") + f"__s{self.seed}"

    @property
    def options_text(self) -> str:
        return " ".join(self.overrides)


@dataclass
class Cell:
    """A (model, wiring, option) combination of a group, with one run per seed."""

    group: str
    model: str
    wiring: str
    option: str  # label ("" when the group has no options)
    overrides: tuple[str, ...]
    runs: list[RunSpec]

    @property
    def label(self) -> str:
        return self.wiring + (f" [{self.option}]" if self.option else "")


@dataclass
class Group:
    name: str
    title: str
    cells: list[Cell]
    reference: str | None = None
    curves: bool = False
    paper: dict[str, str] = field(default_factory=dict)
    contrast: str | None = None  # name of another group: compare gains (vs sequential) seed by seed
    note: str = ""
    compare: list[str] = field(default_factory=list)  # more option-free wirings to pair against


@dataclass
class Study:
    path: Path | None
    name: str
    recipe: str
    recipe_set: list[str]
    output: Path
    results: Path
    data_dir: str | None
    estimates_s: dict[str, float]
    groups: list[Group]
    max_attempts: int = 3
    #: finished runs recorded in other studies' ``results.csv`` (``imports:``), by run name: they
    #: stand in for runs whose folder is absent (same recipe and seeds, trained elsewhere)
    imported: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def runs(self) -> list[RunSpec]:
        """Unique runs, ordered by seed, then by their first appearance in the groups."""
        seen: dict[str, tuple[int, RunSpec]] = {}
        for g in self.groups:
            for c in g.cells:
                for r in c.runs:
                    if r.name not in seen:
                        seen[r.name] = (len(seen), r)
        return [r for _, r in sorted(seen.values(), key=lambda t: (t[1].seed, t[0]))]

    def run_dir(self, run: RunSpec) -> Path:
        return self.output / run.name

    def command(self, run: RunSpec, *, python: str | None = None) -> list[str]:
        cmd = [python or sys.executable, *TRAIN_COMMAND, "--config", self.recipe, "--resume"]
        if self.data_dir:
            cmd += ["--data-dir", str(self.data_dir)]
        cmd += [
            "--set",
            *self.recipe_set,
            f"model.name={run.model}",
            f"model.wiring={run.wiring}",
            *run.overrides,
            f"train.seed={run.seed}",
            "train.num_threads=1",
            f"output.dir={self.output}",
            f"output.name={run.name}",
        ]
        return cmd

    def estimate(self, run: RunSpec) -> float | None:
        v = self.estimates_s.get(run.model)
        return float(v) if v is not None else None


def _graph_override(wiring: str, seed: int, per_seed: bool) -> tuple[str, ...]:
    """``graph_per_seed``: seed ``s`` of a random wiring draws graph ``s`` (RandWire's mean +- std is
    over graph instances); the fixed wirings have no graph to draw."""
    if per_seed and WiringConfig(kind=wiring).is_random:
        return (f"model.wiring_kwargs.graph_seed={seed}",)
    return ()


def _as_list(v: Any, what: str) -> list:
    if v is None:
        return []
    if isinstance(v, (str, int)):
        return [v]
    if isinstance(v, list):
        return v
    raise ValueError(f"{what}: expected a value or a list, got {type(v).__name__}")


def _seeds(v: Any, where: str) -> list[int]:
    if isinstance(v, bool):
        raise ValueError(f"{where}: seeds must be a count or a list of ints")
    if isinstance(v, int):
        if v < 1:
            raise ValueError(f"{where}: seeds={v} must be >= 1")
        return list(range(v))
    if isinstance(v, list) and v and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in v):
        if len(set(v)) != len(v):
            raise ValueError(f"{where}: repeated seeds {v}")
        return list(v)
    raise ValueError(f"{where}: seeds must be a count (0..n-1) or a non-empty list of ints >= 0, got {v!r}")


def _check_override(o: Any, where: str) -> str:
    if not isinstance(o, str) or "=" not in o or "." not in o.partition("=")[0]:
        raise ValueError(f"{where}: override {o!r} must look like section.key=value")
    key = o.partition("=")[0].strip()
    if key in ("model.name", "model.wiring", "train.seed", "output.dir", "output.name"):
        raise ValueError(f"{where}: {key} is set by the study runner; use the grid's models/wirings/seeds")
    return o.strip()


def study_from_dict(
    raw: dict[str, Any], *, path: Path | None = None, output: str | None = None, results: str | None = None
) -> Study:
    """Validate a study description (as read from YAML) and expand its grid."""
    where = str(path) if path else "study"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping")
    known = {
        "name",
        "recipe",
        "output",
        "results",
        "data_dir",
        "estimates_s",
        "groups",
        "max_attempts",
        "notes",
        "imports",
    }
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(known)}")
    recipe = raw.get("recipe") or {}
    if isinstance(recipe, str):
        recipe = {"config": recipe}
    if not isinstance(recipe, dict) or "config" not in recipe:
        raise ValueError(f"{where}: recipe needs a config (a shipped config name or a YAML path)")
    config = str(recipe["config"])
    if path is not None and not os.path.isabs(config) and (path.parent / config).is_file():
        config = str((path.parent / config).resolve())
    recipe_set = [_check_override(o, f"{where}: recipe.set") for o in _as_list(recipe.get("set"), "recipe.set")]
    groups: list[Group] = []
    names: dict[str, RunSpec] = {}
    for gi, g in enumerate(_as_list(raw.get("groups"), "groups")):
        if not isinstance(g, dict):
            raise ValueError(f"{where}: groups[{gi}] must be a mapping")
        gname = str(g.get("name") or f"group{gi}")
        gw = f"{where}: group {gname!r}"
        allowed = {
            "name",
            "title",
            "models",
            "wirings",
            "options",
            "seeds",
            "reference",
            "curves",
            "paper",
            "contrast",
            "note",
            "compare",
            "graph_per_seed",
        }
        if set(g) - allowed:
            raise ValueError(f"{gw}: unknown key(s) {sorted(set(g) - allowed)}; allowed: {sorted(allowed)}")
        models = [str(m) for m in _as_list(g.get("models"), f"{gw}.models")]
        wirings = [str(w) for w in _as_list(g.get("wirings"), f"{gw}.wirings")]
        if not models or not wirings:
            raise ValueError(f"{gw}: needs models and wirings")
        for w in wirings:
            if w not in WIRINGS:
                raise ValueError(f"{gw}: unknown wiring {w!r}; choose from {', '.join(WIRINGS)}")
        options_raw = g.get("options") or {"": []}
        if not isinstance(options_raw, dict):
            raise ValueError(f"{gw}: options must map a label to a list of overrides")
        options = {
            str(k): tuple(_check_override(o, f"{gw}.options[{k}]") for o in _as_list(v, f"{gw}.options"))
            for k, v in options_raw.items()
        }
        seeds = _seeds(g.get("seeds", 3), gw)
        graph_per_seed = g.get("graph_per_seed", False)
        if not isinstance(graph_per_seed, bool):
            raise ValueError(f"{gw}: graph_per_seed must be true or false, got {graph_per_seed!r}")
        cells = []
        for m in models:
            for w in wirings:
                for label, ovr in options.items():
                    runs = [RunSpec(m, w, ovr + _graph_override(w, s, graph_per_seed), s) for s in seeds]
                    for r in runs:
                        prev = names.setdefault(r.name, r)
                        if prev != r:
                            raise ValueError(f"{gw}: runs {prev} and {r} would share the folder {r.name!r}")
                    cells.append(Cell(gname, m, w, label, ovr, runs))
        ref = g.get("reference")
        if ref is not None and str(ref) not in options:
            raise ValueError(f"{gw}: reference {ref!r} is not one of the options {list(options)}")
        compare = g.get("compare") or []
        if not isinstance(compare, list) or any(str(w) not in WIRINGS for w in compare):
            raise ValueError(f"{gw}: compare must be a list of wirings ({', '.join(WIRINGS)}), got {compare!r}")
        paper = g.get("paper") or {}
        if not isinstance(paper, dict):
            raise ValueError(f"{gw}: paper must map a cell label to a text")
        groups.append(
            Group(
                name=gname,
                title=str(g.get("title") or gname),
                cells=cells,
                reference=None if ref is None else str(ref),
                curves=bool(g.get("curves", False)),
                paper={str(k): str(v) for k, v in paper.items()},
                contrast=None if g.get("contrast") is None else str(g["contrast"]),
                note=str(g.get("note") or ""),
                compare=[str(w) for w in compare],
            )
        )
    if not groups:
        raise ValueError(f"{where}: no groups")
    if len({g.name for g in groups}) != len(groups):
        raise ValueError(f"{where}: group names must be unique")
    for g in groups:
        if g.contrast is not None and g.contrast not in {x.name for x in groups}:
            raise ValueError(f"{where}: group {g.name!r}: contrast {g.contrast!r} is not a group")
    est = raw.get("estimates_s") or {}
    if not isinstance(est, dict):
        raise ValueError(f"{where}: estimates_s must map a model name to seconds")
    out = Path(output or raw.get("output") or "runs/study").expanduser().resolve()
    res = Path(results or raw.get("results") or out / "results").expanduser().resolve()
    max_attempts = int(raw.get("max_attempts", 3))
    imported = _read_imports(_as_list(raw.get("imports"), "imports"), path, where)
    return Study(
        path=path,
        name=str(raw.get("name") or (path.stem if path else "study")),
        recipe=config,
        recipe_set=recipe_set,
        output=out,
        results=res,
        data_dir=None if raw.get("data_dir") is None else str(raw["data_dir"]),
        estimates_s={str(k): float(v) for k, v in est.items()},
        groups=groups,
        max_attempts=max_attempts,
        imported=imported,
    )


def _read_imports(paths: list[Any], study_path: Path | None, where: str) -> dict[str, dict[str, str]]:
    """Finished rows of other studies' ``results.csv`` files (relative paths: to the study file)."""
    import csv

    rows: dict[str, dict[str, str]] = {}
    for p in paths:
        f = Path(str(p)).expanduser()
        if not f.is_absolute() and study_path is not None:
            f = study_path.parent / f
        if not f.is_file():
            raise ValueError(f"{where}: imports: {str(f)!r} not found (a results.csv written by `dynwire study`)")
        with open(f, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if row.get("status") == "done" and row.get("run"):
                    rows.setdefault(row["run"], row)
    return rows


def load_study(path: str | os.PathLike[str], *, output: str | None = None, results: str | None = None) -> Study:
    """Read a study YAML file (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"study file {str(p)!r} not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"study file {str(p)!r}: invalid YAML ({exc})") from None
    return study_from_dict(raw, path=p, output=output, results=results)


# --------------------------------------------------------------------------- run state
def expected_config(study: Study, run: RunSpec) -> dict[str, Any]:
    """The resolved config a run of this study trains with (as ``config.yaml`` stores it)."""
    cmd = study.command(run)
    overrides = cmd[cmd.index("--set") + 1 :]
    return config_to_dict(load_config(study.recipe, overrides))


def _strip_volatile(cfg: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for section, values in cfg.items():
        if isinstance(values, dict):
            out[section] = {k: v for k, v in values.items() if (section, k) not in _VOLATILE}
        else:
            out[section] = values
    return out


def config_mismatch(study: Study, run: RunSpec) -> list[str]:
    """Entries in which the run's stored ``config.yaml`` differs from the study (empty: none or no file)."""
    path = study.run_dir(run) / "config.yaml"
    if not path.is_file():
        return []
    try:
        stored = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return ["config.yaml unreadable"]
    want = _strip_volatile(expected_config(study, run))
    try:  # fields added to the config since the run was made take their defaults
        stored = config_to_dict(config_from_dict(stored))
    except (TypeError, ValueError):
        pass  # compared as stored: every difference is reported
    have = _strip_volatile(stored)
    diffs = []
    for section in sorted(set(want) | set(have)):
        a, b = want.get(section) or {}, have.get(section) or {}
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                diffs.append(f"{section}.{k}: study {a.get(k)!r}, run {b.get(k)!r}")
    return diffs
