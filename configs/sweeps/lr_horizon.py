"""Optimal learning rate across token horizons (Bjorck et al., 2024): learning rates x horizons x sizes on
the quickstart text; each run's final held-out loss goes to the results table.

    jaxlm sweep run configs/sweeps/lr_horizon.py
    jaxlm fit lr-horizon runs/sweeps/lr_horizon/results.jsonl
"""

import ml_collections

from jaxlm.sweep import axis, named, product

LRS = (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2)
HORIZONS = (60, 120, 240)  # steps of 8 x 128 tokens
SIZES = {"xs": dict(hidden_size=64, intermediate_size=192, num_layers=2, num_heads=2, num_kv_heads=1)}


def get_config():
    s = ml_collections.ConfigDict()
    s.name = "lr_horizon"
    s.base = "configs/quickstart.py"
    s.command = "train"
    s.init = ""
    s.dir = "runs/sweeps/lr_horizon"
    s.record = "lm"
    s.fixed = (("data.seq_len", 128), ("train.batch_size", 8), ("train.eval_batches", 16),
               ("log.sample_prompt", ""), ("checkpoint.keep", 1), ("train.warmup_steps", 10))
    sizes = named({name: {f"model.{k}": v for k, v in m.items()} for name, m in SIZES.items()})
    horizons = named({f"d{steps}": {"train.steps": steps, "train.eval_every": steps, "checkpoint.every": steps}
                      for steps in HORIZONS})
    s.points = product(sizes, horizons, axis("train.lr", LRS))
    return s
