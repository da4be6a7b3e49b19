"""`jaxlm serve` under load: 1, 8 and 32 concurrent streaming clients, continuous batching against
sequential serving (one request at a time) and static batching (a batch runs to its end; the next
waits for a full batch), on one server over localhost.

    python bench/serve_load.py [--checkpoint smollm2-135m-instruct] [--clients 1 8 32] [--slots 16]
        [--requests-per-client 2] [--max-tokens 16:96] [--time-limit 240] [--json out.json]

One in-process server (FastAPI on uvicorn, a free 127.0.0.1 port) and one engine, switched between the
three modes, so all share the compiled programs; the engine is warmed up on every prompt and batch
bucket first (compilation excluded). Each client is an asyncio task that streams its requests one
after another (httpx, SSE). Replies run with ignore_eos and a max_tokens drawn per request from
--max-tokens (seeded), so every mode does the same work; chat prompts are short questions through the
model's chat template. A cell stops sending new requests after --time-limit seconds.

Reported per cell: requests/s, completion tokens/s, time to first token (TTFT) and request latency
(p50 / p99), failures (HTTP errors, broken streams, or a reply shorter than asked), and the sequences
decoded per step (the batch's occupancy, which does not depend on how busy the CPU is). The last
columns compare tokens/s with sequential serving and with static batching at the same client count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time

import numpy as np

QUESTIONS = [
    "What is the capital of France?", "Give me three tips for learning to cook.",
    "Why is the sky blue?", "Write a haiku about autumn.", "Explain what a hash table is.",
    "How do vaccines work?", "Summarise the plot of Hamlet in two sentences.", "What is 17 times 23?",
    "Suggest a name for a pet turtle.", "What causes ocean tides?", "How do I boil an egg?",
    "Describe a sunset to someone who cannot see.", "What is machine learning?",
    "List four planets of the solar system.", "How does a bicycle stay upright?", "What is a prime number?",
]


async def one_request(http, url, model, question, max_tokens, seed):
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0.7, "seed": seed, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True}
    t0 = time.perf_counter()
    ttft, tokens, done, err = None, 0, False, ""
    try:
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                return {"ok": False, "error": f"HTTP {resp.status_code}", "latency": time.perf_counter() - t0}
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    err = chunk["error"]["message"]
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if ttft is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        err = f"{type(e).__name__}: {e}"
    latency = time.perf_counter() - t0
    ok = done and not err and tokens == max_tokens
    return {"ok": ok, "error": err or ("" if ok else f"{tokens} of {max_tokens} tokens, done={done}"),
            "ttft": ttft, "latency": latency, "tokens": tokens}


async def run_cell(url, model, clients, per_client, lengths, time_limit, seed):
    import httpx

    rng = random.Random(seed)
    plan = [[(rng.choice(QUESTIONS), rng.randint(*lengths), rng.randrange(1 << 30)) for _ in range(per_client)]
            for _ in range(clients)]
    results = []
    start = time.perf_counter()
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as http:
        async def client(reqs):
            for q, n, s in reqs:
                if time.perf_counter() - start > time_limit:
                    return
                results.append(await one_request(http, url, model, q, n, s))

        await asyncio.gather(*(client(p) for p in plan))
    wall = time.perf_counter() - start
    good = [r for r in results if r["ok"]]
    ttft = [r["ttft"] for r in good if r["ttft"] is not None]
    lat = [r["latency"] for r in good]
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
    return {"clients": clients, "requests": len(results), "failed": len(results) - len(good), "wall_s": wall,
            "req_per_s": len(good) / wall, "tok_per_s": sum(r["tokens"] for r in good) / wall,
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "lat_p50": pct(lat, 50), "lat_p99": pct(lat, 99),
            "errors": sorted({r["error"] for r in results if not r["ok"]})[:5]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="smollm2-135m-instruct")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--modes", nargs="+", default=["sequential", "static", "continuous"])
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=256, help="context per slot")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", default="16:96", help="each request's max_tokens, drawn from LO:HI")
    ap.add_argument("--time-limit", type=float, default=240.0, help="seconds per cell before clients stop sending")
    ap.add_argument("--static-wait", type=float, default=2.0, help="static batching: longest wait for a full batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    lo, hi = map(int, args.max_tokens.split(":"))

    import portpicker

    from jaxlm.checkpoint import model_from_checkpoint
    from jaxlm.data.tokenizer import apply_chat_template, load_tokenizer
    from jaxlm.infer.engine import Engine
    from jaxlm.infer.server import Background, Server

    cfg, params, spec = model_from_checkpoint(args.checkpoint)
    tok = load_tokenizer(spec)
    longest = max(len(apply_chat_template(tok, [{"role": "user", "content": q}], add_generation_prompt=True)[0])
                  for q in QUESTIONS)
    engine = Engine(cfg, params, slots=args.slots, max_len=args.max_len, pad_id=tok.pad_id, max_queue=1024,
                    static_wait=args.static_wait)
    t0 = time.perf_counter()
    engine.warmup(max_prompt=longest, max_total=longest + hi)
    print(f"# {args.checkpoint}: warm-up (compilation) {time.perf_counter() - t0:.0f}s; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    server = Server(engine, tok, model_name="bench", max_n=1)
    rows = []
    with Background(server.app(), portpicker.pick_unused_port()) as bg:
        asyncio.run(run_cell(bg.url, "bench", 2, 1, (lo, lo), args.time_limit, -1))  # the HTTP path, once
        for clients in args.clients:
            for mode in args.modes:
                engine.static = mode == "static"
                engine.active = 1 if mode == "sequential" else min(args.slots, clients) if mode == "static" \
                    else args.slots
                before = dict(engine.stats)
                cell = asyncio.run(run_cell(bg.url, "bench", clients, args.requests_per_client, (lo, hi),
                                            args.time_limit, args.seed + clients))
                steps = engine.stats["steps"] - before["steps"]
                decoded = engine.stats["tokens"] - before["tokens"] - (engine.stats["prefills"] - before["prefills"])
                cell["rows_per_step"] = decoded / max(steps, 1)  # batch occupancy: independent of the CPU's speed
                cell["mode"] = mode
                cell["load"] = os.getloadavg()[0]
                rows.append(cell)
                print(f"# {mode:10s} {clients:3d} clients: {cell['requests']} requests, {cell['failed']} failed, "
                      f"{cell['tok_per_s']:.1f} tok/s, load {cell['load']:.1f}", file=sys.stderr)
    by = {(r["mode"], r["clients"]): r for r in rows}
    print(f"\n{args.checkpoint}, {args.slots} slots, max_tokens {lo}..{hi} (ignore_eos), "
          f"{args.requests_per_client} requests per client, CPU\n")
    print("| mode | clients | requests | failed | req/s | tok/s | TTFT p50 | TTFT p99 | latency p50 | latency p99 "
          "| sequences per step | tok/s vs sequential | tok/s vs static |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        seq, sta = by.get(("sequential", r["clients"])), by.get(("static", r["clients"]))
        ratio = lambda b, r=r: f"{r['tok_per_s'] / b['tok_per_s']:.2f}x" if b and b["tok_per_s"] else "-"  # noqa: E731
        print(f"| {r['mode']} | {r['clients']} | {r['requests']} | {r['failed']} | {r['req_per_s']:.2f} | "
              f"{r['tok_per_s']:.1f} | {r['ttft_p50']:.2f}s | {r['ttft_p99']:.2f}s | {r['lat_p50']:.1f}s | "
              f"{r['lat_p99']:.1f}s | {r['rows_per_step']:.1f} | {ratio(seq)} | {ratio(sta)} |")
    failed = sum(r["failed"] for r in rows)
    if failed:
        print(f"\n{failed} failed requests: {[e for r in rows for e in r['errors']]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "stats": engine.stats}, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
