"""DPO on real preference pairs (HH-RLHF harmless) with the quickstart model, after SFT:

    jaxlm align --config configs/dpo.py:PAIRS.jsonl --init runs/sft/checkpoints
    jaxlm align --config configs/dpo.py:PAIRS.jsonl --config.align.loss=ln_dpo --config.align.beta=0.1 --init ...

PAIRS holds preference pairs (in this project's checkout: ../shared/data/preference/hh_rlhf_harmless_test.jsonl).
The first 2000 pairs train, the rest are held out (reward accuracy and margins are reported).
"""

from jaxlm.configs import quickstart


def get_config(pairs: str = ""):
    cfg = quickstart.get_config()
    cfg.data.update(train=f"{pairs}[:2000]" if pairs else "", eval=f"{pairs}[2000:]" if pairs else "", seq_len=256)
    cfg.align.update(loss="dpo", beta=0.1, reference="precomputed", max_prompt_length=160,
                     ref_cache_dir="runs/reference")
    cfg.train.update(steps=150, batch_size=8, lr=5e-5, warmup_steps=10, schedule="linear", min_lr_ratio=0.0,
                     weight_decay=0.0, eval_every=50, eval_batches=0)
    cfg.checkpoint.update(every=150, keep=1)
    cfg.log.update(dir="runs/dpo", sample_prompt="")
    return cfg
