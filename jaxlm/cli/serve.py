"""`jaxlm serve`: an OpenAI-compatible server (chat and text completions, streaming, tools) over a
checkpoint, with continuous batching.

    jaxlm serve --checkpoint smollm2-135m-instruct --port 8000
    OPENAI_BASE_URL=http://127.0.0.1:8000/v1 python my_pipeline.py
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from rich.markup import escape

from jaxlm.cli.common import add_config_args, console, help_config_requested, positive_int
from jaxlm.cli.generate import model_and_tokenizer
from jaxlm.errors import UsageError
from jaxlm.infer.engine import Engine
from jaxlm.infer.server import Server, serve
from jaxlm.recipes.gpa_rubric import system_from_args


def port_number(text: str) -> int:
    try:
        x = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 < x < 65536:
        raise argparse.ArgumentTypeError(f"a port is 1..65535, got {x}")
    return x


def register(sub, name, help_text):
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--checkpoint", metavar="CKPT|NAME", help="checkpoint directory or a pulled model's name")
    add_config_args(p, required=False)
    p.add_argument("--tokenizer", help="override the checkpoint's tokenizer")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, default=8000)
    p.add_argument("--model-name", help="the model id clients send and /v1/models lists (default: the checkpoint's name)")
    p.add_argument("--api-key", default=os.environ.get("JAXLM_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default: $JAXLM_API_KEY; none = open)")
    p.add_argument("--slots", type=positive_int, default=8, help="sequences decoded together (continuous batching)")
    p.add_argument("--max-len", type=positive_int, default=2048,
                   help="context per sequence, prompt + completion (at most the model's)")
    p.add_argument("--max-n", type=positive_int, default=8, help="cap on a request's n")
    p.add_argument("--max-queue", type=positive_int, default=256, help="queued requests before answering 429")
    p.add_argument("--batching", choices=("continuous", "static"), default="continuous",
                   help="static: a batch runs to its end before new requests join (a baseline)")
    p.add_argument("--warmup", action="store_true",
                   help="compile every prompt and batch bucket before listening (no compile pauses later)")
    p.add_argument("--rubric", metavar="FILE", help="GPA rubrics (rubrics.json of `jaxlm recipe gpa`): with --group, "
                   "the group's rubric is added to every chat request's system message (GPA-CT)")
    p.add_argument("--group", help="the user group whose rubric --rubric applies")
    p.add_argument("--intent", help="only the rubric of this intent (default: every intent of the group)")
    p.set_defaults(func=cmd_serve, seed=0)


def model_name(checkpoint: str | None) -> str:
    if not checkpoint:
        return "jaxlm"
    path = Path(checkpoint)
    return path.resolve().name if path.exists() else checkpoint


def cmd_serve(args, overrides):
    if help_config_requested(args, overrides):
        return 0
    if not args.checkpoint and not args.config:
        raise UsageError("give --checkpoint CKPT|NAME (or --config CONFIG for a freshly initialised model)")
    system = system_from_args(args.rubric, args.group, args.intent)  # before the model loads: fail fast
    model_cfg, params, tok = model_and_tokenizer(args, overrides)
    if not tok.stop_ids:
        console.print("[yellow]warning: the tokenizer has no end-of-turn token: replies end only at max_tokens "
                      "or a stop string[/yellow]")
    max_len = min(args.max_len, model_cfg.max_position_embeddings)
    engine = Engine(model_cfg, params, slots=args.slots, max_len=max_len, pad_id=tok.pad_id,
                    static=args.batching == "static", max_queue=args.max_queue)
    if args.warmup:
        t0 = time.perf_counter()
        engine.warmup(max_prompt=max_len)
        console.print(f"compiled in {time.perf_counter() - t0:.0f}s")
    name = args.model_name or model_name(args.checkpoint)
    server = Server(engine, tok, model_name=name, api_key=args.api_key, max_n=args.max_n, system_prompt=system)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    for logger in ("jaxlm.serve", "jaxlm.engine"):
        logging.getLogger(logger).addHandler(handler)
        logging.getLogger(logger).setLevel(logging.INFO)
        logging.getLogger(logger).propagate = False
    console.print(escape(f"serving {name} on http://{args.host}:{args.port}/v1 ({args.slots} slots x {engine.max_len} "
                         f"tokens, {args.batching} batching{', API key required' if args.api_key else ''})"))
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        console.print("[yellow]warning: listening beyond this machine without --api-key[/yellow]")
    serve(server.app(), host=args.host, port=args.port, log_level="warning")
    return 0
