"""Package discovery only; all metadata lives in pyproject.toml.

`nl_lightning.callbacks` is sourced from the top-level `callbacks/` folder (SPEC §1), which
automatic discovery cannot see, so the list is the discovered `nl_lightning*` packages plus the
mapped ones.
"""

from setuptools import find_packages, setup

core = find_packages(include=["nl_lightning", "nl_lightning.*"])
mapped = ["nl_lightning.callbacks"] + [
    f"nl_lightning.callbacks.{name}" for name in find_packages(where="callbacks")
]
setup(packages=core + mapped)
