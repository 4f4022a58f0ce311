"""Moved to :mod:`dynwire.study` (its own package); this name keeps working.

``python -m dynwire.analysis.study`` runs ``dynwire study`` as before.
"""

import sys

from ..study import *  # noqa: F403
from ..study import __all__  # noqa: F401
from ..study.aggregate import EXECUTED_MACS_FILE, RESULT_FIELDS, run_executed_macs  # noqa: F401
from ..study.cli import STUDY_DESCRIPTION, add_arguments, build_parser, run_cli  # noqa: F401
from ..study.runner import LOCK_FILE, LOG_FILE, STATUS_FILE, RunnerReport, _lock_busy  # noqa: F401
from ..study.spec import TRAIN_COMMAND, config_mismatch, study_from_dict  # noqa: F401

if __name__ == "__main__":  # pragma: no cover
    from ..study.cli import main_study

    sys.exit(main_study())
