"""SFT, the usual first stage before preference training: the quickstart model fine-tuned on the chosen
responses of HH-RLHF (harmless), with the loss on the response only.

    jaxlm train --config configs/quickstart.py
    jaxlm train --config configs/sft.py --init runs/quickstart/checkpoints

HH_RLHF points at the shared data folder of this project (../shared/data); pass your own with
--config.data.train=PATH. Chat data ({"messages": [...]}) works the same way: assistant turns only.
"""

from jaxlm.configs import quickstart

HH_RLHF = "../shared/data/preference/hh_rlhf_harmless_test.jsonl"


def get_config():
    cfg = quickstart.get_config()
    cfg.data.update(train=f"{HH_RLHF}[:2000]", eval=f"{HH_RLHF}[2000:]", text_field="chosen", prompt_field="prompt",
                    seq_len=256, max_bad_fraction=0.01)
    cfg.train.update(steps=200, batch_size=16, lr=1e-3, warmup_steps=20, eval_every=100, eval_batches=8)
    cfg.checkpoint.update(every=100, keep=1)
    cfg.log.update(dir="runs/sft", sample_prompt="")
    return cfg
