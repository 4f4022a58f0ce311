"""A resumable multi-seed study: a grid of ``dynwire train`` runs and its paired statistics.

``dynwire study --config study.yaml [--jobs N] [--dry-run] [--aggregate-only]`` (or
``python -m dynwire.study ...``) expands a grid (model x wiring x options x seeds)
into runs with stable names, runs them as ``dynwire train`` subprocesses, one per core, and
aggregates the finished ones. The study can be stopped (Ctrl-C, SIGTERM, even SIGKILL) and
started again any number of times:

* a run with ``final.json`` is never rerun; one with ``last.pt`` is continued (``--resume``:
  exact resume); a run whose resolved config no longer matches the study file is reported as
  ``stale`` and left alone;
* each running run holds a lock on ``<run>/.study.lock`` (inherited by the trainer process), so two
  runners never train the same run; the trainer receives SIGTERM when its runner dies, and
  saves ``last.pt`` before exiting;
* runs are ordered by seed first, so a study stopped early has complete seeds for every cell.

The study file::

    name: my-study
    recipe: {config: fmnist_resnet20, set: [data.subset=20000]}   # shared by every run
    output: runs/study              # run directories (relative to the working directory)
    results: experiments/study      # results.csv, summary.md, summary.json, plots
    estimates_s: {cifar_resnet20: 300}   # per-run seconds on one core, for --dry-run and the ETA
    groups:
      - name: core
        models: [cifar_resnet20]
        wirings: [sequential, static, dynamic]
        seeds: 10                   # 0..9, or a list
      - name: router_bias
        models: [cifar_resnet20]
        wirings: [dynamic]
        options:                    # label -> extra overrides; runs with equal overrides are shared
          "bias +3": []
          "bias 0": [model.wiring_kwargs.router_bias=0]
        seeds: 3
        reference: "bias +3"        # also report paired differences against this option
        compare: [dynamic]          # ... and against these option-free wirings (any group's runs)
        curves: true                # plot training-loss curves (mean over seeds)
      - name: randwire
        models: [cifar_randwire_small]
        wirings: [random-ws, dynamic]
        graph_per_seed: true        # random-* runs of seed s use graph_seed=s (a new graph per seed)

Aggregation: per cell mean, sample std, n and the 95% t interval of the mean; paired differences
(same seed) against ``sequential`` and ``static`` of the same model, and the group's ``compare``
wirings (option-free runs, from any group), with 95% t intervals; written as ``results.csv`` (one row per run), ``summary.json``,
``summary.md`` and PNG plots.

The package, in its order: ``spec`` (the study file, its runs and their expected config),
``runner`` (run status, locks, the trainer processes), ``aggregate`` (results and ``summary.md``),
``plots``, and ``cli`` (``dynwire study``); this module re-exports their public names.
"""

from __future__ import annotations

# The pieces, re-exported: this module stays the public face of the study (tests, the CLI and
# scripts import from it). Patch a name in the module that reads it, e.g.
# ``dynwire.study.spec.TRAIN_COMMAND`` or ``dynwire.study.runner.subprocess``.
from .aggregate import (  # noqa: F401
    EXECUTED_MACS_FILE,
    RESULT_FIELDS,
    aggregate,
    run_executed_macs,
)
from .cli import STUDY_DESCRIPTION, add_arguments, build_parser, main_study, run_cli  # noqa: F401
from .runner import (  # noqa: F401
    LOCK_FILE,
    LOG_FILE,
    STATUS_FILE,
    RunnerReport,
    _estimator,
    _finished_durations,
    _fmt_s,
    _lock_busy,
    run_status,
    run_study,
)
from .spec import (  # noqa: F401
    TRAIN_COMMAND,
    Cell,
    Group,
    RunSpec,
    Study,
    config_mismatch,
    expected_config,
    load_study,
    study_from_dict,
)

__all__ = [
    "RunSpec",
    "Cell",
    "Group",
    "Study",
    "load_study",
    "run_status",
    "expected_config",
    "run_study",
    "aggregate",
    "main_study",
]
