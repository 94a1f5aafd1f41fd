"""The package version (also in pyproject.toml), in a core module so that any layer may name it."""

__version__ = "0.4.0"
