"""The *PO robustness study in miniature (Ahrabian et al., 2025): a beta x learning-rate grid for DPO,
LN-DPO and SimPO on the quickstart model after SFT, tabulating held-out reward accuracy, KL(policy ||
SFT) and mean response length per cell.

    jaxlm train --config configs/quickstart.py
    jaxlm train --config configs/sft.py:PAIRS.jsonl --init runs/quickstart/checkpoints
    jaxlm sweep run configs/sweeps/po_robustness.py:PAIRS.jsonl
    python bench/po_robustness.py runs/sweeps/po_robustness/results.jsonl   # the table

beta is per method: the length-normalised losses see log-ratios ~|y| times smaller than DPO's.
"""

import ml_collections

from jaxlm.errors import ConfigError
from jaxlm.sweep import axis, named, product

BETAS = {"dpo": (0.05, 0.5), "ln_dpo": (1.0, 5.0), "simpo": (1.0, 5.0)}
LRS = (2e-5, 2e-4)


def get_config(pairs: str = ""):
    if not pairs:
        raise ConfigError("the po_robustness sweep needs its preference pairs: configs/sweeps/po_robustness.py:PAIRS.jsonl "
                          "(e.g. ../shared/data/preference/hh_rlhf_harmless_test.jsonl)")
    s = ml_collections.ConfigDict()
    s.name = "po_robustness"
    s.base = f"configs/dpo.py:{pairs}"
    s.command = "align"
    s.init = "runs/sft/checkpoints"
    s.dir = "runs/sweeps/po_robustness"
    s.record = "align"
    s.fixed = (("train.steps", 120), ("train.eval_every", 120), ("train.eval_batches", 0),
               ("checkpoint.every", 120), ("align.ref_cache_dir", "runs/reference"))
    methods = named({f"{loss}_b{beta}": {"align.loss": loss, "align.beta": beta,
                                         "align.reference": "none" if loss == "simpo" else "precomputed"}
                     for loss, betas in BETAS.items() for beta in betas})
    s.points = product(methods, axis("train.lr", LRS))
    s.analysis = ml_collections.ConfigDict({"prompts": pairs, "n": 48, "max_new_tokens": 96, "samples": 2,
                                            "max_prompt": 160})
    return s
