"""The sfcache version: one place, read by the package, the store's provenance and pyproject.toml."""

__version__ = "0.1.0"
