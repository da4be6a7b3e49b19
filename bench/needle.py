"""Needle in a haystack with retrieval attention (Unlimiformer) on a tiny model trained on 512 tokens.

    python bench/needle.py [--dir runs/needle] [--seeds 0,1,2] [--steps 400] [--trials 6]

1. prepare: synthetic documents of 30-480 tokens (log-uniform lengths, so most are short): filler sentences with one pass key planted at a random
   depth ("The pass key is 42. Remember it. 42 is the pass key.", after Mohtashami & Jaggi, 2023), then
   "What is the pass key? The pass key is 42." (the loss is on that question only); and a 1024-token BPE
   trained on them with `jaxlm tokenizer train` (every value 10..99 is one token);
2. train: `jaxlm train --config configs/needle.py:DIR` (skipped when DIR/checkpoints exists);
3. needle: inputs of ~4K and ~16K tokens (filler, the pass key at 10/50/90 % depth, the question at
   the end); right when the first generated token is the pass key. Methods: truncation to the last
   C - N tokens (plain Generator), retrieval attention in all layers and in the default upper half
   (LongGenerator), full attention (Generator on the whole input, positions beyond the trained 512)
   where its prefill fits in --full-limit-gb;
4. scaling: time per generated token, prefill time and memory against input length, retrieval vs full.

Reproducible: the data and tokenizer come from --data-seed (fixed), each model from one training seed
(`train.seed` fixes its initialisation and the order of its batches), the haystacks from their
(length, depth, trial); the model is trained once per seed in DIR/seed{S} and the needle table gives
the mean and the spread (min-max) of every cell over the seeds. The scaling stage uses the first seed.

Why a pass key and not "The value of KEY is VALUE" among distractor facts: telling keys apart needs an
induction circuit (previous-token head + copying head), which a tiny model trained on 2 CPU cores did
not form in the minutes this bench may take (1,000 steps of key-value or copy data left the loss at
chance); finding the one number in the haystack and copying it is learned in a few hundred steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parent.parent
FILLER = [
    "The grass is green.", "The sky is blue.", "The sun is warm.", "Rain falls on the hill.",
    "A bird sings in the tree.", "The river runs to the sea.", "Snow is cold and white.",
    "The cat sleeps by the fire.", "A boat sails on the lake.", "The road goes over the hill.",
    "Wind moves the tall trees.", "The moon is bright at night.", "Bread is made from wheat.",
    "The dog runs in the field.", "Stars shine in the dark.", "The old house has a red door.",
]
VALUES = [str(v) for v in range(10, 100)]
QUESTION = "What is the pass key? The pass key is"


def needle_sentence(v):
    return f"The pass key is {v}. Remember it. {v} is the pass key."


def document(rng):
    """{"prompt": filler with the pass key (read, no loss), "text": the question and its answer}."""
    v = rng.choice(VALUES)
    n = round(math.exp(rng.uniform(math.log(3), math.log(75))))  # log-uniform: many short, some long
    sents = [rng.choice(FILLER) for _ in range(n)]
    sents.insert(rng.randint(0, len(sents)), needle_sentence(v))
    return {"prompt": " ".join(sents), "text": f" {QUESTION} {v}."}


def prepare(d: Path, docs: int, seed: int = 0):
    from jaxlm.cli import main

    d.mkdir(parents=True, exist_ok=True)
    if (d / "tokenizer.json").exists():
        return
    rng = random.Random(seed)
    for name, n in (("train", docs), ("eval", 200)):
        with open(d / f"{name}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps(document(rng)) + "\n")
    assert main(["tokenizer", "train", "--data", str(d / "train.jsonl"), "--text-field", "prompt",
                 "--vocab-size", "1024", "--out", str(d / "tokenizer.json")]) == 0


def haystack(tok, rng, n_tokens, depth):
    """(ids, pass key id): filler, the pass key at `depth` of the input, the question; ~n_tokens."""
    v = rng.choice(VALUES)
    budget = n_tokens - len(tok.encode(" " + QUESTION)) - len(tok.encode(" " + needle_sentence(v)))
    sents, used = [], 0
    while True:
        s = rng.choice(FILLER)
        used += len(tok.encode(" " + s))
        if used > budget:
            break
        sents.append(s)
    sents.insert(round(depth * len(sents)), needle_sentence(v))
    ids = tok.encode(" ".join(sents) + " " + QUESTION)
    (vid,) = tok.encode(" " + v)
    return ids, vid


def full_prefill_bytes(gen, params, n):
    """Temporary + output (cache) bytes of the full-attention prefill of n tokens (compiled, not run)."""
    import jax.numpy as jnp

    from jaxlm.infer.generate import bucket

    tok = jax.ShapeDtypeStruct((1, bucket(n)), jnp.int32)
    cache = jax.eval_shape(lambda: gen.new_cache(1, bucket(n) + 32))
    m = gen.prefill.lower(params, tok, tok, tok, cache).compile().memory_analysis()
    return m.temp_size_in_bytes + m.output_size_in_bytes


def retrieval_step_bytes(gen, params, ids, n_new):
    """Temporary bytes of one retrieval decode step (compiled, not run): the scores and the k rows."""
    import jax.numpy as jnp

    rctx, info = gen.datastore(params, ids, n_new)
    _, _, _, cache = gen._local(params, rctx, ids, info, n_new)
    one = jnp.zeros((1,), jnp.int32)
    return gen.step.lower((params, rctx), cache, one, one).compile().memory_analysis().temp_size_in_bytes


def retrieval_variants(cfg):
    """{name: config}: the configured retrieval layers, and every layer retrieving."""
    r = cfg.attention.retrieval
    every = tuple(range(cfg.num_layers))
    out = {f"retrieval {list(r.retrieval_layers(cfg.num_layers))}": cfg}
    if r.retrieval_layers(cfg.num_layers) != every:
        out[f"retrieval {list(every)}"] = cfg.replace(attention=dataclasses.replace(
            cfg.attention, retrieval=dataclasses.replace(r, layers=every)))
    return out


def needle(cfg, params, tok, args):
    """{(input tokens, depth, method): accuracy} of one model; methods in order."""
    from jaxlm.infer.generate import Generator
    from jaxlm.infer.retrieval import LongGenerator

    r = cfg.attention.retrieval
    ctx, n_new = r.context or cfg.max_position_embeddings, 2
    full_gen = Generator(cfg)
    longs = {name: LongGenerator(c) for name, c in retrieval_variants(cfg).items()}
    methods = ["truncation", *longs, "full attention"]
    acc = {}
    for n in [480] + args.lengths:
        need = full_prefill_bytes(full_gen, params, n)
        fits = need < args.full_limit_gb * 2**30
        for depth in (0.1, 0.5, 0.9):
            hits = dict.fromkeys(methods, 0)
            for t in range(args.trials):
                ids, vid = haystack(tok, random.Random(f"{n}-{depth}-{t}"), n, depth)
                trunc = full_gen.generate(params, [ids[-(ctx - n_new):]], max_new_tokens=n_new).tokens[0]
                hits["truncation"] += trunc[0] == vid
                for name, g in longs.items():
                    hits[name] += g.generate(params, ids, max_new_tokens=n_new).tokens[0][0] == vid
                if fits:
                    hits["full attention"] += full_gen.generate(params, [ids], max_new_tokens=n_new).tokens[0][0] == vid
            for m in methods:
                acc[(n, depth, m)] = hits[m] / args.trials if fits or m != "full attention" else None
            print(f"  {n} tokens, depth {depth:.0%}: " + ", ".join(f"{m} {hits[m]}/{args.trials}" for m in methods)
                  + ("" if fits else f" (full attention not run: its prefill needs {need / 2**30:.1f} GiB)"), flush=True)
    return methods, acc


def needle_table(methods, per_seed, trials):
    """Markdown: every cell the mean and min-max over the seeds."""
    seeds = list(per_seed)
    keys = list(per_seed[seeds[0]])
    lines = [f"pass-key accuracy, mean [min-max] over training seeds {seeds} ({trials} needles per cell and seed)",
             "| input tokens | depth | " + " | ".join(methods) + " |", "|---" * (len(methods) + 2) + "|"]
    rows = {}
    for n, depth, m in keys:
        vals = [per_seed[s][(n, depth, m)] for s in seeds]
        cell = "not run" if None in vals else (
            f"{100 * sum(vals) / len(vals):.0f}% [{100 * min(vals):.0f}-{100 * max(vals):.0f}]")
        rows.setdefault((n, depth), []).append(cell)
    for (n, depth), cells in rows.items():
        lines.append(f"| {n} | {depth:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scaling(cfg, params, tok, args, out):
    """Per input length: retrieval (datastore build, decode ms/token, datastore + loop memory) and full
    attention (prefill, decode ms/token, prefill memory); each measured on a second, warm call."""
    from jaxlm.infer.generate import Generator
    from jaxlm.infer.retrieval import LongGenerator
    from jaxlm.model import cache_bytes

    n_new = 32
    long_gen, full_gen = LongGenerator(cfg), Generator(cfg)
    rng = random.Random(1)
    rows = []
    for n in args.scaling:
        ids, _ = haystack(tok, rng, n - 8, 0.5)
        for _ in range(2):
            g = long_gen.generate(params, ids, max_new_tokens=n_new)
        row = {"tokens": len(ids), "ret_build_s": g.datastore_seconds, "ret_window_s": g.prefill_seconds -
               g.datastore_seconds, "ret_ms_per_token": 1e3 * g.decode_seconds / g.generated_tokens,
               "ret_datastore_mb": g.datastore_bytes / 2**20,
               "ret_step_temp_mb": retrieval_step_bytes(long_gen, params, ids, n_new) / 2**20}
        full_mb = full_prefill_bytes(full_gen, params, len(ids)) / 2**20
        row["full_prefill_mb"] = full_mb
        row["full_cache_mb"] = cache_bytes(cfg, 1, len(ids) + n_new) / 2**20
        if full_mb < args.full_limit_gb * 1024 and n <= args.full_max_tokens:
            for _ in range(2):
                f = full_gen.generate(params, [ids], max_new_tokens=n_new)
            row.update(full_prefill_s=f.prefill_seconds, full_ms_per_token=1e3 * f.decode_seconds / f.generated_tokens)
        rows.append(row)
        print(f"  {row}", flush=True)
    out["scaling"] = rows
    print("\n| input tokens | retrieval: datastore build s | datastore MiB | step temp MiB | ms / token | "
          "full: prefill s | prefill memory MiB | KV cache MiB | ms / token |\n" + "|---" * 9 + "|")
    for x in rows:
        fp = f"{x['full_prefill_s']:.2f}" if "full_prefill_s" in x else "-"
        fm = f"{x['full_ms_per_token']:.2f}" if "full_ms_per_token" in x else "-"
        print(f"| {x['tokens']} | {x['ret_build_s']:.2f} | {x['ret_datastore_mb']:.1f} | {x['ret_step_temp_mb']:.2f} "
              f"| {x['ret_ms_per_token']:.2f} "
              f"| {fp} | {x['full_prefill_mb']:.0f} | {x['full_cache_mb']:.1f} | {fm} |")


def train(d: Path, seed: int, steps: int) -> Path:
    """The model of one training seed (trained once, in d/seed{seed}): its checkpoint directory."""
    run = d / f"seed{seed}"
    ckpt = run / "checkpoints"
    if not ckpt.exists():
        from jaxlm.cli import main as jaxlm

        extra = [f"--config.train.steps={steps}"] if steps else []
        rc = jaxlm(["train", "--config", f"{ROOT / 'configs/needle.py'}:{d}", f"--config.train.seed={seed}",
                    f"--config.log.dir={run}", *extra])
        if rc:
            raise SystemExit(rc)
    return ckpt


def determinism(d: Path, steps: int) -> dict:
    """Train seed 0 twice for `steps` steps (fresh directories): the loss logs and the final params
    must be identical, bit for bit, or the seeds do not fix the run."""
    import shutil

    import numpy as np

    from jaxlm.checkpoint import model_from_checkpoint
    from jaxlm.cli import main as jaxlm

    runs = []
    for name in ("repeat_a", "repeat_b"):
        run = d / name
        shutil.rmtree(run, ignore_errors=True)
        rc = jaxlm(["train", "--config", f"{ROOT / 'configs/needle.py'}:{d}", "--config.train.seed=0",
                    f"--config.train.steps={steps}", f"--config.log.dir={run}", "--config.log.every=1"])
        if rc:
            raise SystemExit(rc)
        losses = [json.loads(x).get("loss") for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        runs.append((losses, model_from_checkpoint(run / "checkpoints")[1]))
    (la, pa), (lb, pb) = runs
    diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(pa), jax.tree.leaves(pb)))
    out = {"steps": steps, "losses_equal": la == lb, "max_abs_param_diff": diff,
           "losses": [x for x in la if x is not None]}
    print(f"determinism: two runs of seed 0, {steps} steps: losses equal {la == lb}, max |param diff| {diff:g}",
          flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="runs/needle")
    p.add_argument("--docs", type=int, default=6000, help="training documents")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the training data (the same for every model)")
    p.add_argument("--seeds", default="0,1,2", help="training seeds (initialisation and batch order)")
    p.add_argument("--steps", type=int, default=0, help="training steps (0: the config's)")
    p.add_argument("--trials", type=int, default=6, help="needles per (length, depth)")
    p.add_argument("--lengths", default="4096,16384", help="needle input lengths (tokens)")
    p.add_argument("--scaling", default="1024,2048,4096,8192,16384,32768", help="input lengths for timing")
    p.add_argument("--full-limit-gb", type=float, default=4.0, help="run full attention below this prefill memory")
    p.add_argument("--full-max-tokens", type=int, default=8192, help="time full attention up to this length")
    p.add_argument("--skip", default="", help="comma-separated stages to skip: needle, scaling")
    p.add_argument("--determinism", type=int, default=0, metavar="STEPS",
                   help="only train seed 0 twice for STEPS steps and compare (a quick reproducibility check)")
    args = p.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    args.scaling = [int(x) for x in args.scaling.split(",") if x]
    seeds = [int(x) for x in args.seeds.split(",") if x]
    d = Path(args.dir)
    t0 = time.perf_counter()
    prepare(d, args.docs, args.data_seed)
    if args.determinism:
        res = determinism(d, args.determinism)
        (d / "determinism.json").write_text(json.dumps(res, indent=1))
        return 0 if res["losses_equal"] and res["max_abs_param_diff"] == 0 else 1
    from jaxlm.checkpoint import model_from_checkpoint
    from jaxlm.data.tokenizer import load_tokenizer

    out = {"args": vars(args), "needle": {}}
    per_seed, methods = {}, []
    for seed in seeds:
        ts = time.perf_counter()
        cfg, params, spec = model_from_checkpoint(train(d, seed, args.steps))
        out.setdefault("train_seconds", {})[seed] = time.perf_counter() - ts
        tok = load_tokenizer(spec)
        r = cfg.attention.retrieval
        print(f"seed {seed}: model {cfg.num_params / 1e6:.2f}M params, context {r.context}; retrieval layers "
              f"{r.retrieval_layers(cfg.num_layers)}, top_k {r.top_k}, window {r.window}, overlap {r.overlap}",
              flush=True)
        if "needle" not in args.skip:
            methods, per_seed[seed] = needle(cfg, params, tok, args)
            out["needle"][seed] = [[n, depth, m, a] for (n, depth, m), a in per_seed[seed].items()]
        if "scaling" not in args.skip and seed == seeds[0]:
            scaling(cfg, params, tok, args, out)
    if per_seed:
        table = needle_table(methods, per_seed, args.trials)
        out["needle_table"] = table
        print("\n" + table)
    out["seconds"] = time.perf_counter() - t0
    res = d / "needle_results.json"
    res.write_text(json.dumps(out, indent=1, default=str))
    print(f"\ntotal {out['seconds'] / 60:.1f} min; {res}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
