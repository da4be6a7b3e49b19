"""The cost of one preference step against two language-model steps on the same tokens, in one run.

    python bench/align_step.py [--config configs/dpo.py] [--pairs 8] [--steps 8]

A preference step over N pairs runs ONE forward/backward over 2N rows (chosen and rejected); the
baseline is two LM steps, one over the N chosen rows and one over the N rejected rows. With
precomputed reference log-probs the target is at most 1.1x; the in-step (frozen checkpoint)
reference adds a forward pass.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np


def timed(f, count, repeats):
    """Seconds per call of f(i), i cycling over range(count), after one warm-up call."""
    jax.block_until_ready(f(0))
    t = time.perf_counter()
    for i in range(repeats):
        out = f((i + 1) % count)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / repeats


def synthetic(path: Path, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    words = "the king queen lord love night day sword crown sea storm ghost".split()
    with open(path, "w") as f:
        for _ in range(n):
            def s(lo, hi):
                return " ".join(rng.choice(words, rng.integers(lo, hi)))
            f.write(json.dumps({"prompt": s(20, 60), "chosen": " " + s(40, 120), "rejected": " " + s(40, 120)}) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/dpo.py")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()

    import dataclasses

    from jaxlm import config as run_config
    from jaxlm import parallel
    from jaxlm.align.data import PrefConfig, load_pairs, make_rows
    from jaxlm.align.train import make_loss_fn
    from jaxlm.data.pipeline import BATCH_KEYS
    from jaxlm.data.tokenizer import load_tokenizer
    from jaxlm.train.loop import initial_params, make_trainer

    cfg = run_config.load(args.config, [f"--config.train.batch_size={args.pairs}", "--config.train.warmup_steps=0"])
    model_cfg = cfg.model
    tok = load_tokenizer(cfg.data.tokenizer)
    with tempfile.TemporaryDirectory() as d:
        synthetic(Path(d) / "p.jsonl", 4 * args.pairs)
        pairs = load_pairs(PrefConfig(str(Path(d) / "p.jsonl"), cfg.data.seq_len, cfg.align.max_prompt_length), tok)
    mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    n = args.pairs
    rows = [make_rows(pairs, np.arange(i * n, (i + 1) * n), cfg.data.seq_len) for i in range(4)]
    keys = BATCH_KEYS
    pref_batches = [{k: r[k] for k in keys + ("lengths",)} | {"ref_logps": np.zeros(2 * n, np.float32)} for r in rows]
    lm_batches = [{k: r[k][j::2] for k in keys} for r in rows for j in (0, 1)]

    lm = make_trainer(model_cfg, cfg, mesh)
    lm_state = lm.init_state()

    def lm_two(i_batch):
        nonlocal lm_state
        lm_state, m = lm(lm_state, lm_batches[2 * i_batch])
        lm_state, m = lm(lm_state, lm_batches[2 * i_batch + 1])
        return m

    t_lm = timed(lm_two, len(pref_batches), args.steps)
    results = {}
    ref = initial_params(model_cfg, 1, mesh, cfg.parallel.rules)
    for mode in ("precomputed", "checkpoint"):
        align = dataclasses.replace(cfg.align, reference=mode)
        frozen_sh = jax.tree.map(lambda x: x.sharding, ref) if mode == "checkpoint" else None
        tr = make_trainer(model_cfg, cfg, mesh, loss_fn=make_loss_fn(model_cfg, align, cfg.train.loss_chunk),
                          frozen_shardings=frozen_sh)
        state = tr.init_state()

        def step(i, tr=tr, mode=mode):
            nonlocal state
            state, m = tr(state, pref_batches[i], ref if mode == "checkpoint" else None)
            return m

        results[mode] = timed(step, len(pref_batches), args.steps)
    tokens = 2 * n * cfg.data.seq_len
    print(f"model {args.config}: {model_cfg.num_params / 1e6:.2f}M params; {n} pairs = {2 * n} rows x "
          f"{cfg.data.seq_len} tokens; {jax.device_count()} {jax.devices()[0].platform} device(s)")
    print(f"{'':38}{'s/step':>10}{'tokens/s':>12}{'ratio':>8}")
    print(f"{'two LM steps (chosen rows, rejected rows)':38}{t_lm:10.3f}{tokens / t_lm:12.0f}{1.0:8.2f}")
    for mode, t in results.items():
        name = f"preference step, {mode} reference"
        print(f"{name:38}{t:10.3f}{tokens / t:12.0f}{t / t_lm:8.2f}")


if __name__ == "__main__":
    main()
