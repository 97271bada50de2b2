"""The package version, in a module of its own so that any module (and pyproject.toml) can read it."""

__version__ = "0.1.0"
