"""Only the package list lives here; all metadata is in pyproject.toml.

The top-level kernels/ and configs/ folders are installed as ``jaxlm.kernels`` and ``jaxlm.configs``
(see [tool.setuptools] package-dir), which setuptools' automatic discovery cannot express, so the
list is built by hand. jaxlm/assets holds data only (namespace packages).
"""

from setuptools import find_namespace_packages, find_packages, setup

packages = find_packages(include=["jaxlm", "jaxlm.*"])
packages += ["jaxlm.kernels"] + ["jaxlm.kernels." + p for p in find_packages("kernels")]
packages += ["jaxlm.configs"] + ["jaxlm.configs." + p for p in find_packages("configs")]
assets = find_namespace_packages(include=["jaxlm.assets", "jaxlm.assets.*"])
packages += [p for p in assets if p not in packages]

setup(packages=packages, package_data={p: ["*.json", "*.jsonl", "*.md"] for p in assets})
