"""The package version, in one place (setuptools reads it from here without importing dynwire)."""

__version__ = "0.2.0"
