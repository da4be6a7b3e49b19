"""SFT, the usual first stage before preference training: the quickstart model fine-tuned on the chosen
responses of HH-RLHF (harmless), with the loss on the response only.

    jaxlm train --config configs/quickstart.py
    jaxlm train --config configs/sft.py:PAIRS.jsonl --init runs/quickstart/checkpoints

PAIRS is a preference file with prompt and chosen fields (in this project's checkout:
../shared/data/preference/hh_rlhf_harmless_test.jsonl); its first 2000 records train, the rest are
held out. Or set --config.data.train / data.eval yourself. Chat data ({"messages": [...]}) works the
same way: assistant turns only.
"""

from jaxlm.configs import quickstart


def get_config(pairs: str = ""):
    cfg = quickstart.get_config()
    cfg.data.update(train=f"{pairs}[:2000]" if pairs else "", eval=f"{pairs}[2000:]" if pairs else "",
                    text_field="chosen", prompt_field="prompt", seq_len=256, max_bad_fraction=0.01)
    cfg.train.update(steps=200, batch_size=16, lr=1e-3, warmup_steps=20, eval_every=100, eval_batches=8)
    cfg.checkpoint.update(every=100, keep=1)
    cfg.log.update(dir="runs/sft", sample_prompt="")
    return cfg
