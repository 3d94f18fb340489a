"""Data only: the shipped recipes (``configs/``, task recipes in ``configs/tasks/``) and the
cluster profiles and templates (``cluster/``).

The repository keeps them as top-level folders; a built wheel maps them into this package
(pyproject.toml, ``[tool.setuptools.package-dir]``), so an installed copy carries them.
``distill_common.resources.shipped_folder`` finds them in either place.
"""
