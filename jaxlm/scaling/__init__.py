"""Scaling laws as pure functions of their parameters, their fits, and the choices they imply.

* `multilingual`: per-language-family law L_i(N, D, p_i) (He et al., 2024); optimal sampling ratios.
* `lr_horizon`: optimal learning rate across token horizons, LR*(D) = B D^-beta (Bjorck et al., 2024).
* `fitting`: shared Huber/L-BFGS fitting, bootstrap intervals, results tables; `ScalingError`.
* `plots` (matplotlib, imported on use); the command is `jaxlm fit` (jaxlm.cli.fit).

Submodules load on first use (scipy is only needed to fit).
"""

import importlib

from jaxlm.errors import ScalingError

__all__ = ["ScalingError", "fitting", "lr_horizon", "multilingual"]


def __getattr__(name):
    if name in ("fitting", "lr_horizon", "multilingual", "plots"):
        return importlib.import_module(f"jaxlm.scaling.{name}")
    raise AttributeError(name)
