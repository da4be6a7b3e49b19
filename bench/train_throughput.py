"""Training throughput: jaxlm against transformers' Phi3ForCausalLM + torch.optim.AdamW, same tiny
architecture and batch, one run on this machine's CPU.

    python bench/train_throughput.py [--config configs/quickstart.py] [--steps 10]

Prints tokens/s for each, the ratio, and jaxlm's achieved FLOP/s against a measured fp32 matmul peak.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import numpy as np  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/quickstart.py")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=0, help="rows (default: the config's)")
    args = ap.parse_args()

    import torch
    import transformers

    from jaxlm import config as run_config
    from jaxlm import parallel
    from jaxlm.convert.hf import save_hf
    from jaxlm.data.pipeline import BATCH_KEYS, TrainData
    from jaxlm.data.tokenizer import load_tokenizer
    from jaxlm.train.loop import make_trainer
    from jaxlm.train.metrics import measured_matmul_flops

    overrides = ["--config.train.warmup_steps=0"] + ([f"--config.train.batch_size={args.batch}"] if args.batch else [])
    cfg = run_config.load(args.config, overrides)
    model_cfg = cfg.model
    b, t = cfg.train.batch_size, cfg.data.seq_len
    data = TrainData(cfg.data, cfg.data.train, load_tokenizer(cfg.data.tokenizer), b, 1, 0)
    it = data.iterator()
    batches = [{k: v for k, v in next(it).items() if k in BATCH_KEYS} for _ in range(args.steps + 2)]
    it.close()

    mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    tr = make_trainer(model_cfg, cfg, mesh)
    state = tr.init_state()
    for bt in batches[:2]:
        state, m = tr(state, bt)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for bt in batches[2:]:
        state, m = tr(state, bt)
    jax.block_until_ready(m)
    j_tps = args.steps * b * t / (time.perf_counter() - t0)

    torch.set_num_threads(os.cpu_count())
    with tempfile.TemporaryDirectory() as d:
        save_hf(model_cfg, jax.device_get(state.params), d)
        model = transformers.Phi3ForCausalLM.from_pretrained(d)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(cfg.train.b1, cfg.train.b2),
                            weight_decay=cfg.train.weight_decay)

    def hf_step(bt):
        ids = torch.tensor(bt["tokens"], dtype=torch.long)
        labels = torch.tensor(np.where(bt["loss_mask"] > 0, bt["targets"], -100), dtype=torch.long)
        logits = model(input_ids=ids).logits  # HF has no packed-segment masking: plain causal rows
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_norm)
        opt.step()
        opt.zero_grad()
        return float(loss.detach())

    for bt in batches[:2]:
        hf_step(bt)
    t0 = time.perf_counter()
    for bt in batches[2:]:
        hf_step(bt)
    h_tps = args.steps * b * t / (time.perf_counter() - t0)

    peak = measured_matmul_flops()
    flops = j_tps * model_cfg.flops_per_token(t) / jax.device_count()
    print(f"model {args.config}: {model_cfg.num_params / 1e6:.2f}M params, batch {b} x {t} tokens, "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s), torch threads {torch.get_num_threads()}")
    print(f"{'':22}{'tokens/s':>12}")
    print(f"{'jaxlm':22}{j_tps:12.0f}")
    print(f"{'transformers + AdamW':22}{h_tps:12.0f}")
    print(f"ratio jaxlm / transformers: {j_tps / h_tps:.2f}x")
    print(f"jaxlm achieved {flops / 1e9:.1f} GFLOP/s/device = {flops / peak:.1%} of a measured fp32 matmul "
          f"peak of {peak / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
