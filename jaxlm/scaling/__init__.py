"""Scaling laws as pure functions of their parameters, their fits, and the choices they imply.

* `multilingual`: per-language-family law L_i(N, D, p_i) (He et al., 2024); optimal sampling ratios.
* `lr_horizon`: optimal learning rate across token horizons, LR*(D) = B D^-beta (Bjorck et al., 2024).
* `fitting`: shared Huber/L-BFGS fitting, bootstrap intervals, results tables; `ScalingError`.
* `plots` (matplotlib, imported on use) and `cli` (`jaxlm fit ...`).
"""

from jaxlm.scaling import fitting, lr_horizon, multilingual
from jaxlm.scaling.fitting import ScalingError

__all__ = ["ScalingError", "fitting", "lr_horizon", "multilingual"]
