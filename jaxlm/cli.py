"""The `jaxlm` command: one subcommand per job, each a thin shell over a library call.

Subcommands that take a config accept ml_collections overrides after it:
    jaxlm train --config configs/quickstart.py --config.train.steps=100
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

console = Console(stderr=True)


class UsageError(Exception):
    """Bad input from the command line; printed without a traceback."""


# ----------------------------------------------------------------------------- helpers
def add_config_args(p: argparse.ArgumentParser, required: bool = True):
    p.add_argument("--config", required=required, help="config file (configs/x.py[:arg]) or packaged config name")
    p.add_argument("--help-config", action="store_true", help="list every config field with its default and help")


def load_config(args, overrides):
    from jaxlm import config as C

    return C.load(args.config, overrides)


def print_config_help():
    from rich.table import Table

    from jaxlm import config as C

    table = Table("field", "default", "help")
    flat = C.to_dict(C.defaults())

    def walk(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                table.add_row(prefix + k, repr(v), C.help_table().get(prefix + k, ""))
    walk(flat)
    Console().print(table)


def model_from_checkpoint(path):
    """(ModelConfig, params, tokenizer spec or None) from an Orbax checkpoint."""
    from jaxlm import checkpoint, config

    saved = checkpoint.load_config(path)
    model_cfg = config.model_config(saved)
    params = checkpoint.load_params(path)
    spec = checkpoint.load_tokenizer_spec(path) or (saved.get("data", {}) or {}).get("tokenizer") or None
    return model_cfg, params, spec


# ----------------------------------------------------------------------------- convert
def cmd_convert(args, overrides):
    from jaxlm import checkpoint
    from jaxlm.convert import hf

    if bool(args.from_hf) == bool(args.to_hf):
        raise UsageError("give exactly one of --from-hf DIR or --to-hf")
    if args.from_hf:
        from pathlib import Path

        from jaxlm.data.tokenizer import HFTokenizer

        console.print(f"reading {args.from_hf}")
        model_cfg, params = hf.load_hf(args.from_hf, dtype=args.dtype)
        tok_file = Path(args.from_hf) / "tokenizer.json"
        tokenizer = HFTokenizer.from_file(tok_file).spec() if tok_file.exists() else None
        console.print(f"{model_cfg.num_params / 1e6:.1f}M parameters; writing Orbax checkpoint {args.out}")
        checkpoint.save_params(args.out, params, {"model": model_cfg.to_dict()}, tokenizer)
    else:
        if not args.checkpoint:
            raise UsageError("--to-hf needs --checkpoint CKPT")
        model_cfg, params, _ = model_from_checkpoint(args.checkpoint)
        console.print(f"writing Hugging Face folder {args.out}")
        hf.save_hf(model_cfg, params, args.out, dtype=args.dtype)
    console.print("[green]done[/green]")


# ----------------------------------------------------------------------------- train / eval
def add_distributed_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("multi-host (jax.distributed; auto-detected on TPU pods and SLURM)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="coordinator address (process 0)")
    g.add_argument("--num-processes", type=int, help="processes in the job")
    g.add_argument("--process-id", type=int, help="this process's index")


def apply_distributed_args(cfg, args):
    if args.coordinator:
        cfg.parallel.coordinator_address = args.coordinator
    if args.num_processes:
        cfg.parallel.num_processes = args.num_processes
    if args.process_id is not None:
        cfg.parallel.process_id = args.process_id


def print_sample(cfg, params, tok, console_out: Console):
    from jaxlm import config as C
    from jaxlm.infer.generate import generate

    ids = tok.encode(cfg.log.sample_prompt)
    out = generate(C.model_config(cfg), params, [ids], max_new_tokens=cfg.log.sample_tokens, temperature=0.8,
                   top_k=40, stop_tokens=[tok.eos_id] if tok.eos_id >= 0 else [], seed=cfg.train.seed)
    console_out.print("[bold]sample[/bold]")
    console_out.print(cfg.log.sample_prompt + tok.decode(t for t in out.tokens[0] if t != tok.eos_id),
                      markup=False, highlight=False)


def cmd_train(args, overrides):
    import jax

    from jaxlm.train.loop import train

    cfg = load_config(args, overrides)
    apply_distributed_args(cfg, args)
    result = train(cfg, resume=args.resume, init_from=args.init, console=console)
    ev = result["eval"]
    if jax.process_index() == 0:
        if ev:
            console.print(f"[bold green]held-out perplexity {ev['ppl']:.2f}[/bold green] "
                          f"(loss {ev['loss']:.4f} over {ev['tokens']} tokens)")
        if cfg.log.sample_prompt:
            print_sample(cfg, result["state"].params, result["run"].tok, Console())
        console.print(f"checkpoints in {cfg.checkpoint.dir or cfg.log.dir + '/checkpoints'}, "
                      f"TensorBoard logs in {cfg.log.dir}/tensorboard, metrics in {cfg.log.dir}/metrics.jsonl")


def cmd_align(args, overrides):
    import jax

    from jaxlm.align.train import AlignTask
    from jaxlm.train.loop import train

    cfg = load_config(args, overrides)
    apply_distributed_args(cfg, args)
    result = train(cfg, resume=args.resume, init_from=args.init, task=AlignTask(args.init), console=console)
    if jax.process_index() == 0 and result["eval"]:
        ev = result["eval"]
        console.print(f"[bold green]held-out pairs: reward accuracy {ev['rewards/accuracies']:.3f}, "
                      f"margin {ev['rewards/margins']:.3f}, loss {ev['loss']:.4f} ({ev['pairs']} pairs)[/bold green]")


def cmd_analyze(args, overrides):
    import json

    from rich.table import Table

    from jaxlm.align import analysis
    from jaxlm.data.tokenizer import load_tokenizer

    if overrides:
        raise UsageError(f"unrecognized arguments: {' '.join(overrides)}")
    ref_cfg, ref_params, spec = model_from_checkpoint(args.reference)
    tok = load_tokenizer(args.tokenizer or spec)
    prompts = analysis.read_prompts(args.prompts, tok, args.prompt_field, args.n)
    results = {}
    for item in args.policy:
        name, _, path = item.rpartition("=") if "=" in item else (item, "", item)
        cfg, params, _ = model_from_checkpoint(path)
        if cfg != ref_cfg:
            raise UsageError(f"policy {path} and reference {args.reference} have different architectures")
        console.print(f"sampling {args.samples} x {len(prompts)} responses from {name} ...")
        results[name or path] = analysis.analyze(
            cfg, params, ref_params, prompts, max_new_tokens=args.max_new_tokens, samples=args.samples,
            stop_tokens=tok.stop_ids, seed=args.seed, max_prompt=args.max_prompt_tokens)
    table = Table("policy", "KL(pi||ref)", "s.e.", "mean len", "median", "p90", "cut at max", title="policy vs reference")
    for name, a in results.items():
        s = a.length_stats()
        table.add_row(name, f"{a.kl:.3f}", f"{a.kl_se:.3f}", f"{s['mean']:.1f}", f"{s['median']:.0f}",
                      f"{s['p90']:.0f}", f"{a.truncated}/{len(a.lengths)}")
    Console().print(table)
    if args.plot:
        console.print(f"wrote {analysis.plot(results, args.plot)}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({n: {**a.summary(), **{"hist": a.length_stats()["hist"], "edges": a.length_stats()["edges"]}}
                       for n, a in results.items()}, f, indent=2)


def cmd_sweep(args, overrides):
    from rich.table import Table

    from jaxlm import sweep

    if overrides:
        raise UsageError(f"unrecognized arguments: {' '.join(overrides)}")
    s = sweep.load(args.sweep)
    if args.action == "list":
        done = sweep.finished(Path(s.dir) / "results.jsonl")
        table = Table("run", "overrides", "done", title=f"sweep {s.name}: {len(s.points)} runs of {s.base}")
        for point in s.points:
            name = sweep.run_name(point)
            table.add_row(name, " ".join(f"{f}={v}" for f, v in sweep.overrides(point))[:120],
                          "yes" if name in done else "")
        Console().print(table)
    elif args.action == "run":
        results = sweep.run(s, console)
        console.print(f"[green]sweep {s.name} finished[/green]; results in {results}")
    else:
        if not args.target:
            raise UsageError("sweep launch needs --target tpu|slurm")
        cmds = sweep.launch_commands(s, args.target, args.sweep)
        text = ("#!/usr/bin/env bash\n# generated by jaxlm sweep launch\nset -euo pipefail\n"
                + sweep.LAUNCH_HEADER[args.target] + "\n" + "\n".join(cmds) + "\n")
        if args.out:
            Path(args.out).write_text(text)
            console.print(f"wrote {len(cmds)} launch commands to {args.out}")
        else:
            print(text, end="")


def cmd_tokenizer(args, overrides):
    from jaxlm.data.pipeline import DataConfig, open_sources
    from jaxlm.data.tokenizer import train_bpe

    if overrides:
        raise UsageError(f"unrecognized arguments: {' '.join(overrides)}")
    _, sources = open_sources(DataConfig(args.data, tokenizer=None, text_field=args.text_field, max_bad_fraction=1.0))

    def texts():
        for src in sources:
            step = max(1, len(src) // args.max_records) if args.max_records else 1
            for i in range(0, len(src), step):
                yield src[i][args.text_field]

    tok = train_bpe(texts(), args.vocab_size)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tok.save(args.out)
    console.print(f"wrote a {tok.vocab_size}-token byte-level BPE to {args.out}")


def cmd_eval(args, overrides):
    import json

    import jax

    from jaxlm import checkpoint, parallel
    from jaxlm import config as C
    from jaxlm.data.tokenizer import load_tokenizer
    from jaxlm.train.loop import evaluate_lm, params_shardings

    saved = checkpoint.load_config(args.checkpoint)
    cfg = C.from_dict({k: v for k, v in saved.items() if k in ("model", "data")})
    C.apply_overrides(cfg, overrides)
    apply_distributed_args(cfg, args)
    parallel.initialize(cfg.parallel.coordinator_address or None, cfg.parallel.num_processes or None,
                        cfg.parallel.process_id)
    for k in ("batch_size", "seq_len"):
        v = getattr(args, k)
        if v:
            (cfg.train if k == "batch_size" else cfg.data)[k] = v
    cfg.train.eval_batches = args.max_batches
    C.validate(cfg)  # --config.parallel.* overrides choose this run's mesh, whatever mesh wrote the checkpoint
    model_cfg = C.model_config(cfg)
    mesh = parallel.make_mesh(cfg.parallel)
    parallel.check_batch(cfg.train.batch_size, mesh)
    spec = args.tokenizer or checkpoint.load_tokenizer_spec(args.checkpoint) or cfg.data.tokenizer
    if not spec:
        raise UsageError("no tokenizer in the checkpoint: pass --tokenizer")
    tok = load_tokenizer(spec)
    params = checkpoint.load_params(args.checkpoint, params_shardings(model_cfg, mesh, cfg.parallel.rules))
    res = evaluate_lm(model_cfg, params, cfg, mesh, tok, args.data, args.max_batches, args.group_field or "")
    if jax.process_index() != 0:
        return
    from rich.table import Table

    table = Table("data", "tokens", "loss", "perplexity", title=f"eval of {args.checkpoint}")
    table.add_row("all", str(res["tokens"]), f"{res['loss']:.4f}", f"{res['ppl']:.3f}")
    for name, g in sorted(res.get("groups", {}).items()):
        table.add_row(f"{args.group_field}={name}", str(g["tokens"]), f"{g['loss']:.4f}", f"{g['ppl']:.3f}")
    Console().print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps({"checkpoint": str(args.checkpoint), "data": args.data, **res}) + "\n")


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxlm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="Hugging Face <-> Orbax checkpoint conversion")
    p.add_argument("--from-hf", metavar="DIR", help="HF folder (config.json + safetensors) to read")
    p.add_argument("--to-hf", action="store_true", help="write a HF folder from --checkpoint")
    p.add_argument("--checkpoint", metavar="CKPT", help="jaxlm checkpoint to read (with --to-hf)")
    p.add_argument("--out", required=True, help="output checkpoint (--from-hf) or HF folder (--to-hf)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast tensors (default: keep)")
    p.set_defaults(func=cmd_convert)

    from jaxlm.infer.cli import add_generate_command

    add_generate_command(sub)

    p = sub.add_parser("train", help="train a model (language modelling; chat data trains on assistant turns)",
                       epilog="Overrides follow the config: --config.train.steps=100 --config.model.num_layers=2")
    add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run directory")
    p.add_argument("--init", metavar="CKPT", help="start from the params of this checkpoint (for example SFT)")
    add_distributed_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("align", help="preference training: DPO, LN-DPO, SimPO and the *PO family",
                       epilog="train.batch_size counts pairs; align.loss picks the loss (jaxlm.align.losses.NAMES)")
    add_config_args(p)
    p.add_argument("--init", metavar="CKPT", help="policy (and default reference) params, usually an SFT checkpoint")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run directory")
    add_distributed_args(p)
    p.set_defaults(func=cmd_align)

    p = sub.add_parser("analyze", help="KL(policy || reference) and response lengths on a prompt set")
    p.add_argument("--policy", action="append", required=True, metavar="[NAME=]CKPT",
                   help="policy checkpoint (repeat to compare several)")
    p.add_argument("--reference", required=True, metavar="CKPT", help="reference (SFT) checkpoint")
    p.add_argument("--prompts", required=True, help="JSON Lines of prompts (or preference pairs)")
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--n", type=int, default=64, help="prompts used (0 = all)")
    p.add_argument("--samples", type=int, default=1, help="responses sampled per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-prompt-tokens", type=int, default=192, help="keep the end of longer prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="override the reference checkpoint's tokenizer")
    p.add_argument("--plot", help="write length histograms and KL bars to this PNG")
    p.add_argument("--out", help="write the numbers as JSON")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("sweep", help="a grid of runs: list it, run it here, or write its launch commands")
    p.add_argument("action", choices=["list", "run", "launch"])
    p.add_argument("sweep", help="sweep file (configs/sweeps/x.py)")
    p.add_argument("--target", choices=["tpu", "slurm"], help="launch: where the runs go")
    p.add_argument("--out", help="launch: write the commands to this script (default: stdout)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on data")
    p.add_argument("action", choices=["train"])
    p.add_argument("--data", required=True, help="sources, as data.train: 'PATH[@W], ...'")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--out", required=True, help="tokenizer.json to write")
    p.add_argument("--text-field", default="text")
    p.add_argument("--max-records", type=int, default=0, help="records per source (evenly spaced; 0 = all)")
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("eval", help="perplexity of a checkpoint on data, overall and per group")
    p.add_argument("--checkpoint", required=True, metavar="CKPT")
    p.add_argument("--data", required=True, help="sources, as data.train: 'PATH[@W], ...'")
    p.add_argument("--group-field", help="report perplexity per value of this record field (e.g. family)")
    p.add_argument("--batch-size", type=int, help="rows per batch (default: the checkpoint's)")
    p.add_argument("--seq-len", type=int, help="tokens per row (default: the checkpoint's)")
    p.add_argument("--max-batches", type=int, default=0, help="stop after N batches (0 = all data)")
    p.add_argument("--tokenizer", help="override the checkpoint's tokenizer")
    p.add_argument("--out", help="append the results as one JSON line to this file")
    add_distributed_args(p)
    p.set_defaults(func=cmd_eval, takes_overrides=True)  # --config.parallel.fsdp=8 etc. pick the mesh

    from jaxlm.scaling.cli import add_commands as add_fit_commands

    add_fit_commands(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "help_config", False):
        print_config_help()
        return 0
    if extra and not (hasattr(args, "config") or getattr(args, "takes_overrides", False)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from jaxlm.checkpoint import CheckpointError
    from jaxlm.convert.hf import ConversionError
    from jaxlm.data.sources import DataError
    from jaxlm.data.tokenizer import TokenizerError
    from jaxlm.model.config import ConfigError
    from jaxlm.scaling.errors import ScalingError
    from jaxlm.train.loop import TrainingError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args, extra)
    except (UsageError, ConfigError, ConversionError, CheckpointError, TokenizerError, FileNotFoundError,
            DataError, TrainingError, ScalingError) as e:
        console.print("[red]error:[/red] " + escape(str(e)))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
