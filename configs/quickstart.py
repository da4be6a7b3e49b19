"""The quickstart: the tiny model on five Shakespeare plays shipped with jaxlm (The Tempest held out).

    jaxlm train --config configs/quickstart.py [--config.train.steps=100]
"""

from jaxlm.configs import tiny


def get_config():
    cfg = tiny.get_config()
    cfg.data.train = "asset:shakespeare/train.jsonl"
    cfg.data.eval = "asset:shakespeare/eval.jsonl"
    cfg.data.seq_len = 256
    cfg.train.update(steps=200, batch_size=16, lr=3e-3, warmup_steps=20, min_lr_ratio=0.1, weight_decay=0.1,
                     eval_every=100, eval_batches=8)
    cfg.checkpoint.update(every=100, keep=2)
    cfg.log.update(dir="runs/quickstart", every=20, sample_prompt="ROMEO.\n", sample_tokens=80)
    return cfg
