"""LoRA fine-tuning of a pretrained model: the model section is the checkpoint's own, with rank-8
adapters on every linear layer of its blocks; only the adapters train, and the run's checkpoints hold
only them (plus a reference to the base). The tokenizer is the checkpoint's.

    jaxlm train --config configs/lora.py:smollm2-135m-instruct --init smollm2-135m-instruct \\
        --config.data.train="../shared/data/multilingual/de.jsonl[:-80]" \\
        --config.data.eval="../shared/data/multilingual/de.jsonl[-80:]" \\
        --config.model.lora.adapters="('de',)" --config.log.dir=runs/lora-de

Short rows and a small batch fit a 135M model on a laptop CPU (bench/lora_languages.py measures the
step time); raise data.seq_len and train.batch_size on an accelerator.
"""

from jaxlm import checkpoint
from jaxlm import config as run_config
from jaxlm.model import LoraConfig, ModelConfig


def get_config(ckpt: str = "smollm2-135m-instruct"):
    cfg = run_config.defaults()
    model = ModelConfig.from_dict(checkpoint.load_config(ckpt).get("model", {}))
    cfg.model = run_config.as_configdict(model.replace(lora=LoraConfig(rank=8, alpha=16.0)))
    cfg.data.update(tokenizer="", seq_len=64, add_eos=True)
    cfg.train.update(steps=200, batch_size=4, lr=1e-3, warmup_steps=20, weight_decay=0.0, eval_every=0,
                     eval_batches=0, loss_chunk=64)
    cfg.checkpoint.update(every=0, keep=1)
    cfg.log.update(dir="runs/lora", every=20, sample_prompt="")
    return cfg
