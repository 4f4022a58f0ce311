"""The README's main job (placeholder until training lands): the Table 1 overhead profile."""
from dynwire.cli import main

raise SystemExit(main(["profile"]))
