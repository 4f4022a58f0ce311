"""``python -m dynwire.analysis.connectivity``: the same as ``dynwire analyze``."""

import sys

from .cli import main_analyze

sys.exit(main_analyze())
