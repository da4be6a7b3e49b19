"""LN-DPO (Ahrabian et al., 2025): DPO with each sequence log-ratio divided by its response length.

    jaxlm align --config configs/ln_dpo.py:PAIRS.jsonl --init runs/sft/checkpoints

Length normalisation shrinks the log-ratios by ~1/|y|, so LN-DPO's beta is larger than DPO's for the
same implicit-reward scale (the paper sweeps beta per method).
"""

from jaxlm.configs import dpo


def get_config(pairs: str = ""):
    cfg = dpo.get_config(pairs)
    cfg.align.update(loss="ln_dpo", beta=2.0)
    cfg.log.dir = "runs/ln_dpo"
    return cfg
