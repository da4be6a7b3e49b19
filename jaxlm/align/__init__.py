"""Alignment: pure preference losses (DPO, LN-DPO and the *PO family) and their metrics.

    >>> from jaxlm.align import preference_loss
    >>> loss = preference_loss("ln_dpo", s_c, s_r, ref_c, ref_r, len_c, len_r, beta=0.1).mean()
"""

from jaxlm.align.losses import (
    HYPERPARAMETERS,
    LENGTH_NORMALISED,
    NAMES,
    REFERENCE_FREE,
    preference_loss,
    preference_metrics,
    sft_nll,
)

__all__ = [
    "HYPERPARAMETERS", "LENGTH_NORMALISED", "NAMES", "REFERENCE_FREE", "preference_loss",
    "preference_metrics", "sft_nll",
]
