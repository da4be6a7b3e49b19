"""Pass-key retrieval for kNN-retrieval attention (Unlimiformer): a tiny model trained on 512 tokens.

    python bench/needle.py                               # data + tokenizer, training, evaluation
    jaxlm train --config configs/needle.py:runs/needle   # the training alone (once the data exists)

bench/needle.py writes the data: documents of 60-480 tokens, filler sentences with one pass key
("The pass key is 42. Remember it. 42 is the pass key.") at a random depth, then the question
"What is the pass key? The pass key is 42." with the loss on the question only (`data.prompt_field`).
Packing puts one to eight documents in each 512-token row, positions restarting in each. The model
learns to find the one number in its context and copy it in a few hundred steps on a CPU; the bench
then asks it for pass keys hidden in 4K and 16K tokens, 8-32 times its context. Training ignores the
retrieval settings (without a datastore the retrieval core is dense attention); generation uses them.
"""

from jaxlm.configs import tiny


def get_config(run_dir: str = "runs/needle"):
    cfg = tiny.get_config()
    cfg.model.update(vocab_size=1024, hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_position_embeddings=512, original_max_position_embeddings=512)
    cfg.model.attention.impl = "retrieval"
    cfg.model.attention.retrieval.update(layers=(), top_k=16, window=128, overlap=64, context=512)
    cfg.data.update(tokenizer=f"{run_dir}/tokenizer.json", train=f"{run_dir}/train.jsonl",
                    eval=f"{run_dir}/eval.jsonl", prompt_field="prompt", seq_len=512, long_records="truncate")
    cfg.train.update(steps=400, batch_size=16, lr=5e-3, warmup_steps=30, min_lr_ratio=0.2, weight_decay=0.1,
                     eval_every=0, eval_batches=4, seed=0)
    cfg.checkpoint.update(every=100, keep=1)
    cfg.log.update(dir=run_dir, every=20, sample_prompt="", tensorboard=False)
    return cfg
