"""Phi-4-multimodal's mixture of LoRAs on text: one LoRA per language on SmolLM2-135M-Instruct (an
English-only model), routed per example in one batch.

    python bench/lora_languages.py [--steps 200] [--batch 4] [--seq-len 64] [--rank 8] [--out runs/lora_languages]

The README's figures: `--steps 30 --lr 3e-3 --held-out 40 --repeats 2 --eval-records 20`, the three
adapters trained in parallel processes (`--train-only de|fr|es`), then `--part eval` and `--part speed`
side by side (both reuse the trained adapters), on a 2-core machine
shared with other jobs (a LoRA step of batch 4 x 64 took 15-60 s there, so a few hundred steps per
language did not fit the time; the speed table gives the step time to plan `--steps` with).

1. For German, French and Spanish (../shared/data/multilingual/xx.jsonl; the last 80 records of each
   are held out) the one training loop (`jaxlm train --config configs/lora.py --init ...`) fits one
   adapter on the frozen base: the same rank, alpha, steps, batch and learning rate for each. Each
   run's checkpoint holds only its adapter and a reference to the base.
2. The three adapters join into one model (model.lora.adapters = de, fr, es). The held-out rows of
   the three languages are scored in mixed batches, every row routed to an adapter: its own
   (matching), each other one (mismatched), none (base); then with all three merged into the weights.
   A mixed batch is checked against each language's rows run alone with their adapter.
3. Speed, on the same model and batch: a LoRA training step against a full fine-tuning step (time,
   XLA's memory estimate, optimizer state), and inference with unmerged adapters (one adapter, three
   routed) against merged weights (forward pass and KV-cache decoding).

Prints tables and writes OUT/results.json. Step times are medians of interleaved repeats, so both
sides of a comparison see the same load from other processes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "multilingual"
LANGS = ("de", "fr", "es")
HELD_OUT = 80
BASE = "smollm2-135m-instruct"


def train_adapters(args, out: Path) -> dict:
    """Train one adapter per language with the one training loop; {lang: (checkpoint dir, seconds, final metrics)}."""
    from jaxlm import config as run_config
    from jaxlm.train.loop import train

    runs = {}
    for lang in ([args.train_only] if args.train_only else LANGS):
        log_dir = out / f"lora-{lang}"
        ckpt = log_dir / "checkpoints"
        if (ckpt / str(args.steps)).is_dir():
            print(f"{lang}: reusing {ckpt}", flush=True)
            meta = json.loads((log_dir / "summary.json").read_text())
            runs[lang] = (ckpt, meta["seconds"], meta)
            continue
        cfg = run_config.load(f"{REPO}/configs/lora.py:{BASE}", [
            f"--config.data.train={DATA}/{lang}.jsonl[:-{args.held_out}]",
            f"--config.model.lora.adapters=('{lang}',)", f"--config.model.lora.rank={args.rank}",
            f"--config.model.lora.alpha={2.0 * args.rank}", f"--config.train.steps={args.steps}",
            f"--config.train.batch_size={args.batch}", f"--config.data.seq_len={args.seq_len}",
            f"--config.train.lr={args.lr}", f"--config.train.warmup_steps={args.warmup}",
            f"--config.log.dir={log_dir}", "--config.log.progress=false",
            "--config.log.tensorboard=false", f"--config.checkpoint.every={args.steps}"])
        t0 = time.perf_counter()
        result = train(cfg, init_from=BASE)
        seconds = time.perf_counter() - t0
        meta = {"seconds": seconds, "loss": result.last.get("loss"),
                "tokens": int(args.steps * args.batch * args.seq_len)}
        (log_dir / "summary.json").write_text(json.dumps(meta))
        print(f"{lang}: {args.steps} steps in {seconds / 60:.1f} min, final loss {meta['loss']:.3f}", flush=True)
        runs[lang] = (ckpt, seconds, meta)
    return runs


def held_out_batches(tok, seq_len: int, batch: int, held_out: int, records: int = 0) -> dict:
    """{lang: [batch dict]} of the held-out records, packed into rows as the trainer's evaluation does."""
    from jaxlm.data.config import DataConfig
    from jaxlm.data.pipeline import eval_batches

    data = DataConfig(seq_len=seq_len, add_eos=True)
    end = -(held_out - records) if 0 < records < held_out else ""
    return {lang: [b for b, _ in eval_batches(data, f"{DATA}/{lang}.jsonl[-{held_out}:{end}]", tok, batch)]
            for lang in LANGS}


def make_scorer(chunk: int):
    from jaxlm.train.steps import hidden_states, token_logprobs

    cache = {}

    def score(cfg, params, batch, ids=None):
        """Per-row (summed NLL, loss tokens) with rows routed by `ids`."""
        if cfg not in cache:
            def f(params, batch):
                h = hidden_states(cfg, params, batch)
                lp = token_logprobs(cfg, params, h, batch["targets"], chunk)
                m = batch["loss_mask"].astype(jnp.float32)
                return -(lp * m).sum(-1), m.sum(-1)
            cache[cfg] = jax.jit(f)
        b = {k: jnp.asarray(batch[k]) for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
        if ids is not None:
            b["adapter_ids"] = jnp.asarray(ids, jnp.int32)
        nll, n = cache[cfg](params, b)
        return np.asarray(nll, np.float64), np.asarray(n, np.float64)

    return score


def mixed_batches(per_lang: dict):
    """Mixed batches: the k-th batch of every language side by side; (batch, lang index per row)."""
    n = max(len(v) for v in per_lang.values())
    for k in range(n):
        parts, ids = [], []
        for i, lang in enumerate(LANGS):
            bs = per_lang[lang]
            b = bs[k] if k < len(bs) else {key: np.zeros_like(v) for key, v in bs[0].items()}
            parts.append(b)
            ids += [i] * b["tokens"].shape[0]
        yield {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}, np.asarray(ids, np.int32)


def evaluate(cfg, params, per_lang: dict, chunk: int, mismatches: int = 2) -> dict:
    """Per-language held-out perplexity: base, matching adapter, `mismatches` mismatched adapters
    (language i scored with adapter i+1, i+2), all adapters merged."""
    from jaxlm.model import lora

    score = make_scorer(chunk)
    conds = {"base": None, "matching": 0, **{f"mismatched +{k}": k for k in range(1, mismatches + 1)}}
    sums = {c: np.zeros((len(LANGS), 2)) for c in (*conds, "merged all")}
    merged = lora.merge(cfg, params, list(LANGS))
    off = lora.off(cfg)
    routing_diff = 0.0
    t0 = time.perf_counter()
    for k, (batch, lang_ids) in enumerate(mixed_batches(per_lang)):
        for name, shift in conds.items():
            ids = np.full_like(lang_ids, lora.NONE) if shift is None else (lang_ids + shift) % len(LANGS)
            nll, n = score(cfg, params, batch, ids)
            for i in range(len(LANGS)):
                sums[name][i] += [nll[lang_ids == i].sum(), n[lang_ids == i].sum()]
            if name == "matching" and k == 0:  # the mixed batch against each language run alone
                for i, _lang in enumerate(LANGS):
                    alone = {key: v[lang_ids == i] for key, v in batch.items()}
                    nll_i, _ = score(cfg, params, alone, np.full(alone["tokens"].shape[0], i, np.int32))
                    routing_diff = max(routing_diff, float(np.abs(nll_i - nll[lang_ids == i]).max()))
        nll, n = score(off, merged, batch)
        for i in range(len(LANGS)):
            sums["merged all"][i] += [nll[lang_ids == i].sum(), n[lang_ids == i].sum()]
    ppl = {c: {lang: float(np.exp(s[i, 0] / s[i, 1])) for i, lang in enumerate(LANGS)} for c, s in sums.items()}
    tokens = {lang: int(sums["base"][i, 1]) for i, lang in enumerate(LANGS)}
    return {"ppl": ppl, "tokens": tokens, "routing_max_abs_nll_diff": routing_diff,
            "eval_seconds": time.perf_counter() - t0}


def _median_interleaved(fns: dict, repeats: int) -> dict:
    for f in fns.values():  # warm-up (compilation)
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def _tree_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def train_speed(cfg1, params1, batch, repeats: int) -> dict:
    """A LoRA step against a full fine-tuning step on the same model and batch."""
    from jaxlm.model import lora
    from jaxlm.train import state as ts
    from jaxlm.train import steps
    from jaxlm.train.config import TrainConfig

    out, fns = {}, {}
    for mode in ("lora", "full"):
        t = TrainConfig(steps=100, warmup_steps=10, lr=1e-4)
        mc = cfg1 if mode == "lora" else lora.off(cfg1)
        p = params1 if mode == "lora" else lora.base_params(params1)
        tx = ts.optimizer(t, mc)  # LoRA: the adapters alone train (train.trainable defaults to them)
        opt = tx.init(p)
        step = jax.jit(steps.make_train_step(mc, tx, 1, 64, trainable=ts.trainable_pattern(t, mc)))
        b = {k: jnp.asarray(batch[k]) for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
        state = ts.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=opt, rng=jax.random.key(0))
        mem = step.lower(state, b).compile().memory_analysis()
        holder = {"state": state}

        def run(step=step, b=b, holder=holder):
            s, m = step(holder["state"], b)
            jax.block_until_ready(m)
            holder["state"] = s

        fns[mode] = run
        trainable = sum(x.size for x in jax.tree.leaves(lora.split(p)[1])) if mode == "lora" else \
            sum(x.size for x in jax.tree.leaves(p))
        out[mode] = {"trainable_params": int(trainable), "opt_state_bytes": _tree_bytes(opt),
                     "param_bytes": _tree_bytes(p),
                     "xla_temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0)),
                     "xla_argument_bytes": int(getattr(mem, "argument_size_in_bytes", 0)),
                     "xla_output_bytes": int(getattr(mem, "output_size_in_bytes", 0))}
    times = _median_interleaved(fns, repeats)
    for mode in out:
        out[mode]["step_seconds"] = times[mode]
    return out


def infer_speed(cfg, params, batch, lang_ids, repeats: int, new_tokens: int) -> dict:
    """Unmerged adapters (one; three routed) against merged weights: forward pass and decoding."""
    from jaxlm.infer.generate import Generator
    from jaxlm.model import Decoder, lora

    b = {k: jnp.asarray(batch[k]) for k in ("tokens", "segment_ids", "positions")}
    one = lora.only(cfg, LANGS[0])
    merged1 = lora.merge(cfg, params, LANGS[0])
    off = lora.off(cfg)
    ids = jnp.asarray(lang_ids)

    def fwd(c):
        f = jax.jit(lambda p, b, ids: Decoder(c).apply({"params": p}, b["tokens"], b["positions"], b["segment_ids"],
                                                       adapter_ids=ids))
        return f

    f_off, f_one, f_routed = fwd(off), fwd(one), fwd(cfg)
    fns = {"merged (= base cost)": lambda: jax.block_until_ready(f_off(merged1, b, None)),
           "unmerged, 1 adapter": lambda: jax.block_until_ready(f_one(params, b, None)),
           "unmerged, 3 routed": lambda: jax.block_until_ready(f_routed(params, b, ids))}
    fwd_t = _median_interleaved(fns, repeats)
    tokens = int(np.prod(batch["tokens"].shape))
    prompts = [list(map(int, batch["tokens"][i][batch["segment_ids"][i] > 0][:16])) for i in range(3)]
    gens = {"merged (= base cost)": (Generator(off), merged1, None),
            "unmerged, 1 adapter": (Generator(one), params, None),
            "unmerged, 3 routed": (Generator(cfg), params, np.arange(3, dtype=np.int32))}
    dec = {}
    for _name, (g, p, i) in gens.items():
        g.generate(p, prompts, max_new_tokens=new_tokens, adapter_ids=i)  # compile
    for _ in range(max(1, repeats // 2)):
        for name, (g, p, i) in gens.items():
            r = g.generate(p, prompts, max_new_tokens=new_tokens, adapter_ids=i)
            dec.setdefault(name, []).append(r.generated_tokens / r.decode_seconds)
    return {"forward_seconds": fwd_t, "forward_tokens": tokens,
            "decode_tokens_per_s": {k: float(np.median(v)) for k, v in dec.items()}, "decode_batch": 3,
            "decode_new_tokens": new_tokens}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=None, help="warmup steps (default: a tenth of --steps)")
    ap.add_argument("--held-out", type=int, default=HELD_OUT, help="last records of each language held out")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--train-only", choices=LANGS, help="train this language's adapter and stop (to train "
                    "several in parallel processes; a later full run reuses them)")
    ap.add_argument("--eval-records", type=int, default=0, help="score only the first N held-out records (0 = all)")
    ap.add_argument("--mismatches", type=int, choices=(1, 2), default=2, help="mismatched adapters scored per language")
    ap.add_argument("--part", choices=("all", "eval", "speed"), default="all",
                    help="after training: both parts, or one (two processes can run them side by side)")
    ap.add_argument("--out", default=str(REPO / "runs" / "lora_languages"))
    args = ap.parse_args(argv)
    if args.warmup is None:
        args.warmup = max(1, args.steps // 10)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    jax.config.update("jax_default_matmul_precision", "highest")
    from jaxlm.checkpoint import load_params, load_tokenizer_spec, model_from_checkpoint
    from jaxlm.data.tokenizer import load_tokenizer
    from jaxlm.model import LoraConfig, lora

    if not DATA.is_dir():
        sys.exit(f"no data in {DATA}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = train_adapters(args, out)
    if args.train_only:
        return

    base_cfg, _, spec = model_from_checkpoint(BASE)
    tok = load_tokenizer(load_tokenizer_spec(BASE) or spec)
    cfg = base_cfg.replace(lora=LoraConfig(rank=args.rank, alpha=2.0 * args.rank, adapters=LANGS))
    params = None
    for lang in LANGS:  # each run's adapter-only checkpoint comes back joined with the base
        p = load_params(runs[lang][0])
        params = p if params is None else lora.join(params, lora.split(p)[1])
    print(f"model: {base_cfg.num_params / 1e6:.1f}M base params, {lora.count(params) / 1e6:.2f}M adapter params "
          f"({len(LANGS)} adapters of rank {args.rank})", flush=True)

    per_lang = held_out_batches(tok, args.seq_len, 8, args.held_out, args.eval_records)
    results = {"args": vars(args), "train": {lang: runs[lang][2] for lang in LANGS},
               "adapter_params": lora.count(params)}
    if args.part in ("all", "eval"):
        results.update(run_eval(args, cfg, params, per_lang))
    if args.part in ("all", "speed"):
        results.update(run_speed(args, cfg, params, per_lang))
    name = "results.json" if args.part == "all" else f"results_{args.part}.json"
    (out / name).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out / name}")


def run_eval(args, cfg, params, per_lang) -> dict:
    ev = evaluate(cfg, params, per_lang, 64, args.mismatches)
    mism = {lang: float(np.mean([ev["ppl"][f"mismatched +{k}"][lang] for k in range(1, args.mismatches + 1)]))
            for lang in LANGS}
    n = args.eval_records or args.held_out
    print(f"\nheld-out perplexity ({n} held-out records per language, {args.seq_len}-token rows, mixed batches, "
          "every row routed):")
    print(f"{'lang':6}{'tokens':>8}{'base':>10}{'matching':>10}{'mismatched':>12}{'merged all':>12}")
    for lang in LANGS:
        p = ev["ppl"]
        print(f"{lang:6}{ev['tokens'][lang]:>8}{p['base'][lang]:>10.2f}{p['matching'][lang]:>10.2f}{mism[lang]:>12.2f}"
              f"{p['merged all'][lang]:>12.2f}")
    print(f"mixed batch vs each language alone: max |row NLL difference| {ev['routing_max_abs_nll_diff']:.2e}",
          flush=True)
    return {"eval": ev, "mismatched_mean": mism}


def run_speed(args, cfg, params, per_lang) -> dict:
    from jaxlm.model import lora

    batch = per_lang[LANGS[0]][0]
    small = {k: v[:args.batch] for k, v in batch.items()}
    one_cfg = lora.only(cfg, LANGS[0])
    base_p, ads = lora.split(params)
    one_params = lora.join(base_p, {"layers": {o: {"lora": {LANGS[0]: v["lora"][LANGS[0]]}}
                                               for o, v in ads["layers"].items()}})
    ts_ = train_speed(one_cfg, one_params, small, args.repeats)
    mixed, lang_ids = next(mixed_batches({lang: [{k: v[:4] for k, v in per_lang[lang][0].items()}] for lang in LANGS}))
    inf = infer_speed(cfg, params, mixed, lang_ids, args.repeats, 32)

    mib = 2 ** 20
    print(f"\ntraining step, batch {args.batch} x {args.seq_len} tokens (median of {args.repeats}, interleaved):")
    for mode, r in ts_.items():
        print(f"  {mode:5}: {r['step_seconds']:.2f} s/step; trainable {r['trainable_params'] / 1e6:.2f}M; "
              f"optimizer state {r['opt_state_bytes'] / mib:.1f} MiB; XLA temp {r['xla_temp_bytes'] / mib:.0f} MiB, "
              f"arguments {r['xla_argument_bytes'] / mib:.0f} MiB")
    ratio = ts_["lora"]["opt_state_bytes"] / ts_["full"]["opt_state_bytes"]
    print(f"  optimizer state LoRA / full = {ratio:.4f}; step time LoRA / full = "
          f"{ts_['lora']['step_seconds'] / ts_['full']['step_seconds']:.2f}")
    print(f"\ninference, mixed batch of {mixed['tokens'].shape[0]} rows x {args.seq_len} tokens:")
    for k, v in inf["forward_seconds"].items():
        print(f"  forward {k:22}: {v * 1000:7.0f} ms ({inf['forward_tokens'] / v:,.0f} tok/s); decode "
              f"{inf['decode_tokens_per_s'][k]:.1f} tok/s (batch 3, {inf['decode_new_tokens']} new tokens)")
    return {"train_speed": ts_, "opt_state_ratio": ratio, "inference": inf}


if __name__ == "__main__":
    main()
