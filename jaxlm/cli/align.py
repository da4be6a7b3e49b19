"""`jaxlm align` (preference training) and `jaxlm analyze` (KL and lengths against a reference)."""

from __future__ import annotations

import json

import jax
from rich.markup import escape
from rich.table import Table

from jaxlm.align import analysis
from jaxlm.align.train import AlignTask
from jaxlm.checkpoint import model_from_checkpoint
from jaxlm.cli.common import (
    add_config_args,
    add_distributed_args,
    add_run_args,
    console,
    help_config_requested,
    load_run_config,
    non_negative_int,
    out,
    positive_int,
)
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.errors import UsageError
from jaxlm.eval.generation import sampler
from jaxlm.train.loop import train


def register(sub, name, help_text):
    if name == "align":
        p = sub.add_parser(name, help=help_text,
                           epilog="train.batch_size counts pairs; align.loss picks the loss (jaxlm.align.losses.NAMES)")
        add_config_args(p)
        add_run_args(p, "policy (and default reference) params, usually an SFT checkpoint")
        add_distributed_args(p)
        p.set_defaults(func=cmd_align)
        return
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--policy", action="append", required=True, metavar="[NAME=]CKPT",
                   help="policy checkpoint (repeat to compare several)")
    p.add_argument("--reference", required=True, metavar="CKPT", help="reference (SFT) checkpoint")
    p.add_argument("--prompts", required=True, help="prompts: JSON Lines (or any source spec) of prompts or pairs")
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--n", type=non_negative_int, default=64, help="prompts used (0 = all)")
    p.add_argument("--samples", type=positive_int, default=1, help="responses sampled per prompt")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--max-prompt-tokens", type=positive_int, default=192, help="keep the end of longer prompts")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--tokenizer", help="override the reference checkpoint's tokenizer")
    p.add_argument("--plot", help="write length histograms and KL bars to this PNG")
    p.add_argument("--out", help="write the numbers as JSON")
    p.set_defaults(func=cmd_analyze)


def cmd_align(args, overrides):
    if help_config_requested(args, overrides):
        return 0
    cfg = load_run_config(args, overrides)
    result = train(cfg, resume=args.resume, init_from=args.init, task=AlignTask(cfg, args.init), console=console)
    ev = result.eval
    if jax.process_index() == 0 and ev:
        console.print(f"[bold green]held-out pairs: reward accuracy {ev['rewards/accuracies']:.3f}, "
                      f"margin {ev['rewards/margins']:.3f}, loss {ev['loss']:.4f} ({ev['pairs']} pairs)[/bold green]")
    return 0


def cmd_analyze(args, overrides):
    ref_cfg, ref_params, spec = model_from_checkpoint(args.reference)
    tok = load_tokenizer(args.tokenizer or spec)
    prompts = analysis.read_prompts(args.prompts, tok, args.prompt_field, args.n)
    results = {}
    for item in args.policy:
        name, _, path = item.rpartition("=") if "=" in item else (item, "", item)
        cfg, params, _ = model_from_checkpoint(path)
        if cfg != ref_cfg:
            raise UsageError(f"policy {path} and reference {args.reference} have different architectures")
        console.print(f"sampling {args.samples} x {len(prompts)} responses from {escape(name)} ...")
        sample = sampler(cfg, params, args.max_new_tokens, tok.stop_ids)
        results[name or path] = analysis.analyze(cfg, params, ref_params, prompts, sample, samples=args.samples,
                                                 stop_tokens=tok.stop_ids, seed=args.seed,
                                                 max_prompt=args.max_prompt_tokens)
    table = Table("policy", "KL(pi||ref)", "s.e.", "mean len", "median", "p90", "cut at max",
                  title="policy vs reference")
    for name, a in results.items():
        s = a.length_stats()
        table.add_row(escape(name), f"{a.kl:.3f}", f"{a.kl_se:.3f}", f"{s['mean']:.1f}", f"{s['median']:.0f}",
                      f"{s['p90']:.0f}", f"{a.truncated}/{len(a.lengths)}")
    out.print(table)
    if args.plot:
        console.print(f"wrote {escape(str(analysis.plot(results, args.plot)))}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({n: {**a.summary(), "hist": a.length_stats()["hist"], "edges": a.length_stats()["edges"]}
                       for n, a in results.items()}, f, indent=2)
    return 0


__all__ = ["cmd_align", "cmd_analyze", "register", "sampler"]
