"""`jaxlm train`: language-model training (pretraining, SFT on chat or prompt/completion data)."""

from __future__ import annotations

import jax
from rich.markup import escape

from jaxlm.cli.common import (
    add_config_args,
    add_distributed_args,
    add_run_args,
    console,
    help_config_requested,
    load_run_config,
    out,
)
from jaxlm.infer.generate import generate
from jaxlm.train.loop import train


def register(sub, name, help_text):
    p = sub.add_parser(name, help=help_text,
                       epilog="Overrides follow the config: --config.train.steps=100 --config.model.num_layers=2")
    add_config_args(p)
    add_run_args(p, "start from the params of this checkpoint (for example SFT)")
    add_distributed_args(p)
    p.set_defaults(func=cmd_train)


def print_sample(cfg, params, tok):
    ids = tok.encode(cfg.log.sample_prompt)
    stops = [tok.eos_id] if tok.eos_id >= 0 else []
    gen = generate(cfg.model, params, [ids], max_new_tokens=cfg.log.sample_tokens, temperature=0.8, top_k=40,
                   stop_tokens=stops, seed=cfg.train.seed)
    out.print("[bold]sample[/bold]")
    out.print(cfg.log.sample_prompt + tok.decode(t for t in gen.tokens[0] if t not in stops), markup=False,
              highlight=False)


def cmd_train(args, overrides):
    if help_config_requested(args, overrides):
        return 0
    cfg = load_run_config(args, overrides)
    result = train(cfg, resume=args.resume, init_from=args.init, console=console)
    if jax.process_index() != 0:
        return 0
    ev = result.eval
    if ev:
        console.print(f"[bold green]held-out perplexity {ev['ppl']:.2f}[/bold green] "
                      f"(loss {ev['loss']:.4f} over {ev['tokens']} tokens)")
    if cfg.log.sample_prompt:
        print_sample(cfg, result.state.params, result.run.tok)
    console.print(f"checkpoints in {escape(cfg.checkpoint_dir)}, TensorBoard logs in {escape(cfg.log.dir)}/tensorboard, "
                  f"metrics in {escape(cfg.log.dir)}/metrics.jsonl")
    return 0
