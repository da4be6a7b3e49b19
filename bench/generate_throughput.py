"""Prefill and decode tokens/s: `jaxlm` generation against transformers `generate`, same weights, one run.

    python bench/generate_throughput.py [--config configs/tiny.py] [--batch 8] [--prompt-len 64] [--new 64]

Both sides run greedy with a KV cache on the CPU; each is warmed up once (compilation excluded).
HF's prefill is timed as a 1-token generate; its decode rate from (t_N - t_1) / (N - 1) tokens.
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
    ap.add_argument("--config", default="configs/tiny.py")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch
    import transformers

    from jaxlm import config as run_config
    from jaxlm.convert.hf import save_hf
    from jaxlm.infer.generate import Generator
    from jaxlm.model import init_params

    torch.set_num_threads(os.cpu_count())
    cfg = run_config.load(args.config).model
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, cfg.vocab_size, args.prompt_len)) for _ in range(args.batch)]

    gen = Generator(cfg)
    gen.generate(params, prompts, max_new_tokens=args.new)  # compile
    runs = [gen.generate(params, prompts, max_new_tokens=args.new) for _ in range(args.repeats)]
    j_prefill = min(r.prefill_seconds for r in runs)
    j_decode = min(r.decode_seconds for r in runs)

    with tempfile.TemporaryDirectory() as d:
        save_hf(cfg, params, d)
        model = transformers.Phi3ForCausalLM.from_pretrained(d).eval()
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def hf_time(n):
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)
            best = min(best, time.perf_counter() - t)
        return best

    hf_time(2)  # warm-up
    h1, hn = hf_time(1), hf_time(args.new)
    h_decode = (hn - h1) * args.new / (args.new - 1)

    b, p, n = args.batch, args.prompt_len, args.new
    rows = [
        ("prefill tok/s", b * p / j_prefill, b * p / h1),
        ("decode tok/s", b * n / j_decode, b * n / h_decode),
    ]
    print(f"model {args.config}: {cfg.num_params / 1e6:.2f}M params; batch {b}, prompt {p}, new {n}; "
          f"{jax.devices()[0].platform}, torch threads {torch.get_num_threads()}")
    print(f"{'':16}{'jaxlm':>12}{'transformers':>14}{'ratio':>8}")
    for name, j, h in rows:
        print(f"{name:16}{j:12.0f}{h:14.0f}{j / h:8.2f}x")


if __name__ == "__main__":
    main()
