"""Packaged configs (installed as jaxlm.configs): `jaxlm train --config NAME` or `--config configs/NAME.py`."""
