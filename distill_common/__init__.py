"""Small utilities shared by every stage: typed config loading, logging, atomic files,
progress lines and the offline asset cache. Nothing here imports training code."""

__version__ = "0.1.0"
"""The package's version: `distill --version`, and pyproject.toml reads it from here."""
