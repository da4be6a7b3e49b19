"""The grain pipeline's throughput (tokens/s) against what the trainer consumes, in one run.

    python bench/data_throughput.py [--config configs/quickstart.py] [--batches 200]
"""

from __future__ import annotations

import argparse
import time

import jax


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/quickstart.py")
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--train-steps", type=int, default=5)
    args = ap.parse_args()

    import dataclasses

    from jaxlm import config as run_config
    from jaxlm import parallel
    from jaxlm.data.pipeline import BATCH_KEYS, TrainData
    from jaxlm.data.tokenizer import load_tokenizer
    from jaxlm.train.loop import make_trainer

    cfg = run_config.load(args.config)
    tok = load_tokenizer(cfg.data.tokenizer)
    b, t = cfg.train.batch_size, cfg.data.seq_len
    rows = {}
    for prefetch in (0, cfg.data.prefetch):
        data = TrainData(dataclasses.replace(cfg.data, prefetch=prefetch), cfg.data.train, tok, b, 1, 0)
        it = data.iterator()
        next(it)  # open files, first tokenisation
        t0 = time.perf_counter()
        real = 0
        for _ in range(args.batches):
            real += int((next(it)["segment_ids"] > 0).sum())
        dt = time.perf_counter() - t0
        it.close() if hasattr(it, "close") else None
        rows[f"pipeline (prefetch {prefetch})"] = (args.batches * b * t / dt, real / (args.batches * b * t))

    mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    tr = make_trainer(cfg.model, cfg, mesh)
    state = tr.init_state()
    it = TrainData(dataclasses.replace(cfg.data, prefetch=0), cfg.data.train, tok, b, 1, 0).iterator()
    batches = [{k: v for k, v in next(it).items() if k in BATCH_KEYS} for _ in range(args.train_steps + 1)]
    state, m = tr(state, batches[0])
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for bt in batches[1:]:
        state, m = tr(state, bt)
    jax.block_until_ready(m)
    consume = args.train_steps * b * t / (time.perf_counter() - t0)

    print(f"config {args.config}: batch {b} x {t} tokens")
    for name, (tps, fill) in rows.items():
        print(f"{name:24}{tps:12.0f} tokens/s  ({tps / consume:.0f}x the trainer; rows {fill:.1%} filled)")
    print(f"{'trainer consumes':24}{consume:12.0f} tokens/s")


if __name__ == "__main__":
    main()
