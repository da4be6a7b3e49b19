"""Unlimiformer on a real model: SmolLM2-135M-Instruct (8,192-token context) reads Shakespeare far past
its context and answers questions about needles hidden in it.

    python bench/long_input.py [--lengths 8192,16384] [--depths 0.1,0.5,0.9] [--haystacks 1]
                               [--decode-lengths 8192,16384,32768,65536] [--out runs/long_input]

1. tasks: a haystack of n tokens of ../shared/data/english/shakespeare.jsonl (the plays in file order,
   from a seeded start), with two needles planted next to each other at depth 10/50/90 %:
   (a) a pass key ("The pass key is 58213. Remember it. 58213 is the pass key.") and
   (b) a needle sentence ("The secret ingredient in the royal cake is saffron."). The haystack fills
   the user turn of the model's ChatML template and a question follows it: "What is the pass key?"
   resp. "What is the secret ingredient mentioned in the text?"; right when the greedy answer
   (up to --new tokens) contains the number resp. the word. The assistant turn starts with an answer
   prefix ("The pass key is", as RULER does; --no-prime asks without it). Both questions share one
   haystack, so one datastore build serves both.
   Methods: truncation (the template, the last tokens of the text that fit the context, the
   question), retrieval attention in the upper half of the layers (15-29, the default) and in all 30,
   and full attention where the input fits the context (there it is the same input as truncation).
   One all-layer datastore is built per haystack; the upper-half one is its slice (the same encoder
   pass).
2. speed: the datastore build (chunked, batched prefill of the text) in tokens/s against a plain
   prefill (the truncated input, the same causal attention in query blocks) in the same process.
3. decode: ms per generated token against the datastore's length (8K-64K), with a datastore of random
   attention inputs of that length (the step's cost does not depend on the values), warm, upper half
   and all layers; datastore memory.

Everything runs in float32 on whatever the machine has; on a 2-core CPU a 8K-token encoder pass takes
minutes, so the defaults are small (see the README for the counts actually run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
HAYSTACK = ROOT.parent / "shared" / "data" / "english" / "shakespeare.jsonl"
MODEL = "smollm2-135m-instruct"
INGREDIENTS = ["saffron", "cardamom", "cinnamon", "nutmeg", "lavender", "ginger", "vanilla", "rosemary"]
QUESTIONS = {
    "pass key": "What is the pass key? Answer with the number only.",
    "needle": "What is the secret ingredient mentioned in the text? Answer in a few words.",
}
# RULER-style answer prefixes: the assistant turn starts with them (--prime), so the greedy reply is the
# answer itself rather than a preamble; a small model's failure is then a retrieval failure
PRIMES = {"pass key": "The pass key is", "needle": "The secret ingredient in the royal cake is"}


def load_text(path: Path) -> str:
    with open(path) as f:
        return "\n\n".join(json.loads(line)["text"] for line in f if line.strip())


def haystack(tok, corpus_ids, n_text: int, depth: float, seed: int):
    """(text, {task: answer}) : ~n_text tokens of the corpus from a seeded start, both needles at `depth`
    (at a line break)."""
    rng = random.Random(f"haystack-{n_text}-{depth}-{seed}")
    start = rng.randrange(0, max(1, len(corpus_ids) - n_text))
    key = str(rng.randrange(10000, 100000))
    word = rng.choice(INGREDIENTS)
    needles = (f"The pass key is {key}. Remember it. {key} is the pass key.\n"
               f"The secret ingredient in the royal cake is {word}.")
    budget = n_text - len(tok.encode(needles, special=False)) - 2
    text = tok.decode(corpus_ids[start:start + budget])
    at = text.rfind("\n", 0, round(depth * len(text)) + 1)
    at = at + 1 if at >= 0 else 0
    return text[:at] + "\n" + needles + "\n\n" + text[at:], {"pass key": key, "needle": word}


def right(task: str, answer: str, reply: str) -> bool:
    return answer.lower() in reply.lower()


class Bench:
    def __init__(self, args):
        from jaxlm.checkpoint import model_from_checkpoint
        from jaxlm.data.tokenizer import load_tokenizer
        from jaxlm.infer.retrieval import LongGenerator, as_retrieval

        self.args = args
        cfg, self.params, spec = model_from_checkpoint(args.model)
        self.tok = load_tokenizer(spec)
        self.stops = self.tok.stop_ids
        cfg = as_retrieval(cfg)
        r = cfg.attention.retrieval
        all_layers = tuple(range(cfg.num_layers))
        self.cfg = {
            "upper": cfg.replace(attention=dataclasses.replace(cfg.attention, retrieval=dataclasses.replace(
                r, layers=(), top_k=args.top_k, context=args.context))),
            "all": cfg.replace(attention=dataclasses.replace(cfg.attention, retrieval=dataclasses.replace(
                r, layers=all_layers, top_k=args.top_k, context=args.context))),
        }
        self.gen = {k: LongGenerator(c) for k, c in self.cfg.items()}
        self.context = self.gen["all"].context
        self.upper_layers = self.cfg["upper"].attention.retrieval.retrieval_layers(cfg.num_layers)

    # -- methods -----------------------------------------------------------------------------
    def dense(self, prefix, text_ids, suffixes):
        """Truncation / full attention: prefix + the last text tokens that fit + each suffix, one
        shared prefill of prefix + text (in chunks of --prefill-chunk through the KV cache), then each
        question. (replies, prefill s, prefill tokens, ms/token, truncated?)."""
        from jaxlm.infer.generate import bucket

        g, n_new = self.gen["all"], self.args.new
        keep = self.context - len(prefix) - max(map(len, suffixes)) - n_new
        head = list(prefix) + list(text_ids[-keep:] if keep < len(text_ids) else text_ids)
        chunk = self.args.prefill_chunk
        slots = len(head) // chunk * chunk + (bucket(len(head) % chunk, 16) if len(head) % chunk else 0)
        suf = bucket(max(map(len, suffixes)), 16)
        cache0 = g.new_cache(1, slots + suf + n_new)
        t0 = time.perf_counter()
        hist, chunk = [], self.args.prefill_chunk
        for i in range(0, len(head), chunk):  # in chunks through the KV cache: the peak memory of one chunk
            part = head[i:i + chunk]
            _, cache0, t = g.extend((self.params, {}), cache0, part, np.arange(i, i + len(part)),
                                    len(part) if len(part) == chunk else bucket(len(part), 16), last=1)
            hist.append(t)
        hist = np.concatenate(hist, axis=1)
        jax.block_until_ready(cache0)
        prefill = time.perf_counter() - t0
        replies, ms = [], []
        for s in suffixes:
            logits, cache, t = g.extend((self.params, {}), cache0, s, np.arange(len(head), len(head) + len(s)), suf)
            t1 = time.perf_counter()
            row, _ = g.finish((self.params, {}), cache, logits[-1], len(head) + len(s),
                              np.concatenate([hist, t], axis=1), max_new_tokens=n_new, stop_tokens=self.stops)
            ms.append(1e3 * (time.perf_counter() - t1) / max(len(row), 1))
            replies.append(self.tok.decode([t for t in row if t not in self.stops]))
        return replies, prefill, len(head), ms[-1], len(head) < len(prefix) + len(text_ids)

    def retrieval(self, ids_by_q, span):
        """One all-layer datastore of the text (span) shared by the questions; the upper-half one is its
        slice. {method: (replies, ms/token warm)}, build seconds, windows, bytes {method: bytes}."""
        from jaxlm.infer.retrieval import position_plan
        from jaxlm.model.retrieval import datastore_bytes, make_datastore

        n_new = self.args.new
        t0 = time.perf_counter()
        base, info = self.gen["all"].datastore(self.params, ids_by_q[0], n_new, span)
        jax.block_until_ready(base)
        build = time.perf_counter() - t0
        out, nbytes = {}, {}
        for method in ("upper", "all"):
            h = base["h"] if method == "all" else base["h"][jax.numpy.asarray(self.upper_layers)]
            replies, ms = [], []
            for ids in ids_by_q:
                pos, start, exact = position_plan(len(ids), span, n_new, self.context)
                p = np.zeros(base["pos"].shape, np.int32)
                p[0, :span[1]] = pos[:span[1]]
                rctx = make_datastore(self.cfg[method], h, base["valid"], p)
                nbytes[method] = datastore_bytes(rctx)
                inf = dict(info, pos=pos, start=start, exact=exact)
                g = self.gen[method].generate(self.params, ids, max_new_tokens=n_new, stop_tokens=self.stops,
                                              span=span, datastore=(rctx, inf))
                replies.append(self.tok.decode([t for t in g.tokens[0] if t not in self.stops]))
                ms.append(1e3 * g.decode_seconds / max(g.generated_tokens, 1))
            out[method] = (replies, ms[-1])
        return out, build, info["windows"], nbytes

    def question(self, text, q):
        """(ids, span) of the haystack and question q in the chat template; with --prime the assistant
        turn starts with the answer prefix."""
        from jaxlm.infer.retrieval import chat_input

        ids, span = chat_input(self.tok, text, QUESTIONS[q])
        if self.args.prime:
            ids = ids + self.tok.encode(PRIMES[q], special=False)
        return ids, span

    # -- stages ------------------------------------------------------------------------------
    def check(self, log):
        """On an input that fits the context, retrieval with k covering the text equals full attention:
        the question's logits (max abs difference) and the greedy tokens."""
        import jax.numpy as jnp

        from jaxlm.infer.retrieval import LongGenerator, chat_input
        from jaxlm.model import forward

        text = load_text(Path(self.args.haystack))[:2000]
        ids, (a, b) = chat_input(self.tok, text, QUESTIONS["needle"])
        cfg = self.cfg["all"].replace(attention=dataclasses.replace(self.cfg["all"].attention, retrieval=dataclasses.replace(
            self.cfg["all"].attention.retrieval, top_k=b - a)))
        gen = LongGenerator(cfg)
        logits = gen.prompt_logits(self.params, ids, max_new_tokens=8, span=(a, b))
        full = forward(cfg, self.params, jnp.asarray([ids]))[0, b:]
        diff = float(jnp.max(jnp.abs(logits - full)))
        ret = gen.generate(self.params, ids, max_new_tokens=8, span=(a, b)).tokens[0]
        dense = gen.generate_dense(self.params, ids, max_new_tokens=8).tokens[0]
        row = {"check_tokens": len(ids), "entries": b - a, "max_abs_logit_diff": diff, "greedy_equal": ret == dense,
               "reply": self.tok.decode(ret)}
        log(row)
        print(json.dumps(row), flush=True)
        return row

    def tasks(self, log):
        args, tok = self.args, self.tok
        corpus = tok.encode(load_text(Path(args.haystack)), special=False)
        print(f"haystack corpus: {len(corpus)} tokens", flush=True)
        rows = []
        for depth in args.depths:
            for n in args.lengths:
                for seed in range(args.haystacks):
                    text, answers = haystack(tok, corpus, n, depth, seed)
                    built = {q: self.question(text, q) for q in QUESTIONS}
                    (ids0, span) = built["pass key"]
                    prefix, text_ids = ids0[:span[0]], ids0[span[0]:span[1]]
                    suffixes = [ids[span[1]:] for ids, _ in built.values()]
                    assert all(ids[:span[1]] == ids0[:span[1]] for ids, _ in built.values())
                    t0 = time.perf_counter()
                    if args.no_dense:  # retrieval only (memory: no 8K-token plain prefill in the same process)
                        dense, prefill_s, prefill_tokens, dense_ms, truncated = None, float("nan"), 0, float("nan"), True
                    else:
                        dense, prefill_s, prefill_tokens, dense_ms, truncated = self.dense(prefix, text_ids, suffixes)
                    ret, build_s, windows, nbytes = self.retrieval([ids for ids, _ in built.values()], span)
                    row = {"length": n, "depth": depth, "seed": seed, "input_tokens": len(ids0),
                           "text_tokens": span[1] - span[0], "answers": answers,
                           "truncated": truncated, "dense_prefill_s": prefill_s, "dense_prefill_tokens": prefill_tokens,
                           "dense_ms_per_token": dense_ms, "build_s": build_s, "build_tokens": span[1],
                           "windows": windows, "datastore_mib": {k: v / 2**20 for k, v in nbytes.items()},
                           "ms_per_token": {k: v[1] for k, v in ret.items()}, "replies": {}, "right": {}}
                    methods = {**({"truncation": dense} if dense else {}),
                               **{f"retrieval {k}": v[0] for k, v in ret.items()}}
                    if not truncated:
                        methods["full attention"] = dense
                    for m, replies in methods.items():
                        row["replies"][m] = dict(zip(QUESTIONS, replies))
                        row["right"][m] = {q: right(q, answers[q], r) for q, r in zip(QUESTIONS, replies)}
                    row["seconds"] = time.perf_counter() - t0
                    rows.append(row)
                    log(row)
                    print(json.dumps({k: row[k] for k in ("length", "depth", "input_tokens", "right", "seconds")}),
                          flush=True)
        return rows

    def decode(self, log):
        """ms per generated token against the datastore length, random datastore contents."""
        from jaxlm.infer.retrieval import chat_input, position_plan, store_size
        from jaxlm.model.retrieval import datastore_bytes, make_datastore

        rows, n_new = [], 16
        for n in self.args.decode_lengths:
            text = " ".join(["word"] * 8)
            ids, (a, b) = chat_input(self.tok, text, QUESTIONS["pass key"])
            ids = ids[:a] + [ids[a]] * n + ids[b:]
            span = (a, a + n)
            row = {"datastore_tokens": n}
            for method in ("upper", "all"):
                cfg = self.cfg[method]
                layers = len(cfg.attention.retrieval.retrieval_layers(cfg.num_layers))
                size = store_size(span[1], cfg.attention.retrieval.top_k)
                if layers * size * cfg.hidden_size * 4 > self.args.decode_max_mib * 2**20:
                    continue
                block = jax.random.normal(jax.random.key(0), (layers, 1, 1024, cfg.hidden_size), np.float32)
                h = jax.numpy.tile(block, (1, 1, size // 1024, 1))  # random rows without a 2x temporary
                valid = np.zeros((1, size), bool)
                valid[0, a:span[1]] = True
                pos, start, exact = position_plan(len(ids), span, n_new, self.context)
                p = np.zeros((1, size), np.int32)
                p[0, :span[1]] = pos[:span[1]]
                rctx = make_datastore(cfg, h, valid, p)
                info = {"windows": 0, "span": span, "pos": pos, "start": start, "exact": exact}
                for _ in range(2):  # the second call is warm
                    g = self.gen[method].generate(self.params, ids, max_new_tokens=n_new, span=span,
                                                  datastore=(rctx, info))
                row[method] = {"ms_per_token": 1e3 * g.decode_seconds / g.generated_tokens,
                               "datastore_mib": datastore_bytes(rctx) / 2**20}
                del h, rctx
            rows.append(row)
            log(row)
            print(json.dumps(row), flush=True)
        return rows


def report(rows, decode_rows):
    methods = ["truncation", "retrieval upper", "retrieval all", "full attention"]
    if rows:
        print("\naccuracy (right / needles) per input length and depth; each cell: pass key, needle sentence")
        print("| input tokens | depth | " + " | ".join(methods) + " |\n" + "|---" * (len(methods) + 2) + "|")
        cells = {}
        for r in rows:
            cells.setdefault((r["length"], r["depth"]), []).append(r)
        for (n, depth), rs in sorted(cells.items()):
            line = f"| {n / 1024:.0f}K ({np.mean([r['input_tokens'] for r in rs]):.0f}) | {depth:.0%} |"
            for m in methods:
                if m not in rs[0]["right"]:
                    line += " - |"
                    continue
                hits = [sum(r["right"][m][q] for r in rs) for q in QUESTIONS]
                line += " " + ", ".join(f"{h}/{len(rs)}" for h in hits) + " |"
            print(line)
        print("\n| input tokens | datastore build s | build tok/s | plain prefill tok/s | ratio | windows | "
              "datastore MiB (upper / all) | ms/token trunc / upper / all |\n" + "|---" * 8 + "|")
        for r in rows:
            b = r["build_tokens"] / r["build_s"]
            d = r["dense_prefill_tokens"] / r["dense_prefill_s"]
            mt = r["ms_per_token"]
            print(f"| {r['input_tokens']} | {r['build_s']:.1f} | {b:.0f} | {d:.0f} | {d / b:.2f}x | {r['windows']} "
                  f"| {r['datastore_mib']['upper']:.0f} / {r['datastore_mib']['all']:.0f} "
                  f"| {r['dense_ms_per_token']:.0f} / {mt['upper']:.0f} / {mt['all']:.0f} |")
    if decode_rows:
        print("\n| datastore tokens | upper: ms/token | MiB | all: ms/token | MiB |\n" + "|---" * 5 + "|")
        for r in decode_rows:
            cell = [f"{r[m]['ms_per_token']:.1f} | {r[m]['datastore_mib']:.0f}" if m in r else "not run | -"
                    for m in ("upper", "all")]
            print(f"| {r['datastore_tokens']} | {cell[0]} | {cell[1]} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=MODEL)
    p.add_argument("--haystack", default=str(HAYSTACK))
    p.add_argument("--lengths", default="8000,16000", help="input text lengths (tokens); 8000 + template fits 8K")
    p.add_argument("--depths", default="0.1,0.5,0.9")
    p.add_argument("--haystacks", type=int, default=1, help="haystacks per (length, depth); 2 questions each")
    p.add_argument("--decode-lengths", default="8192,16384,32768,65536")
    p.add_argument("--decode-max-mib", type=float, default=2400, help="skip random datastores larger than this")
    p.add_argument("--context", type=int, default=0, help="retrieval window (0: the model's context)")
    p.add_argument("--no-dense", action="store_true", help="retrieval only: no truncation / full attention")
    p.add_argument("--prefill-chunk", type=int, default=4096, help="plain prefill in chunks of this many tokens")
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--new", type=int, default=20, help="tokens generated per answer")
    p.add_argument("--no-prime", dest="prime", action="store_false",
                   help="ask without the answer prefix in the assistant turn (default: RULER-style prefix)")
    p.add_argument("--skip", default="", help="comma-separated stages to skip: check, tasks, decode")
    p.add_argument("--out", default="runs/long_input")
    args = p.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    args.depths = [float(x) for x in args.depths.split(",") if x]
    args.decode_lengths = [int(x) for x in args.decode_lengths.split(",") if x]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bench = Bench(args)
    log_path = out / "rows.jsonl"

    def log(row):
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    rows = bench.tasks(log) if "tasks" not in args.skip else []
    check = bench.check(log) if "check" not in args.skip else None
    decode_rows = bench.decode(log) if "decode" not in args.skip else []
    report(rows, decode_rows)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "check": check, "tasks": rows, "decode": decode_rows,
                                                  "seconds": time.perf_counter() - t0}, indent=1))
    print(f"\ntotal {(time.perf_counter() - t0) / 60:.1f} min; {out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
