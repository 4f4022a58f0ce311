"""``python -m dynwire.study`` (same as ``dynwire study``)."""

import sys

from .cli import main_study

sys.exit(main_study())
