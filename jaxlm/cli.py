"""The `jaxlm` command: one subcommand per job, each a thin shell over a library call.

Subcommands that take a config accept ml_collections overrides after it:
    jaxlm train --config configs/quickstart.py --config.train.steps=100
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

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


# ----------------------------------------------------------------------------- generate
def cmd_generate(args, overrides):
    import jax

    from jaxlm.data.tokenizer import apply_chat_template, load_tokenizer
    from jaxlm.infer.generate import generate

    if args.checkpoint:
        model_cfg, params, spec = model_from_checkpoint(args.checkpoint)
    elif args.config:
        from jaxlm import config as C
        from jaxlm.model import init_params

        cfg = load_config(args, overrides)
        model_cfg = C.model_config(cfg)
        params = init_params(model_cfg, jax.random.key(args.seed))
        spec = cfg.data.tokenizer or None
        console.print("[yellow]no checkpoint: sampling from a freshly initialised model[/yellow]")
    else:
        raise UsageError("give --checkpoint CKPT (or --config CONFIG for a freshly initialised model)")
    spec = args.tokenizer or spec
    if not spec:
        raise UsageError("no tokenizer in the checkpoint or config: pass --tokenizer")
    tok = load_tokenizer(spec)
    prompts = args.prompt or [sys.stdin.read()]
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        ids = [apply_chat_template(tok, system + [{"role": "user", "content": p}], add_generation_prompt=True)[0]
               for p in prompts]
    else:
        ids = [tok.encode(p) for p in prompts]
    for i, p in enumerate(ids):
        if not p:
            raise UsageError(f"prompt {i} is empty after tokenization")
        if max(p) >= model_cfg.vocab_size:
            raise UsageError(f"prompt {i} has token id {max(p)} outside the model's vocabulary ({model_cfg.vocab_size})")
    stops = [] if args.no_stop else tok.stop_ids
    out = generate(model_cfg, params, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, stop_tokens=stops, seed=args.seed)
    for prompt, toks in zip(prompts, out.tokens):
        text = tok.decode([t for t in toks if t not in stops])
        print(text if len(prompts) == 1 else f"--- {prompt!r}\n{text}")
    console.print(f"prefill {out.prompt_tokens} tokens in {out.prefill_seconds:.2f}s, "
                  f"decode {out.generated_tokens} tokens in {out.decode_seconds:.2f}s "
                  f"({out.generated_tokens / max(out.decode_seconds, 1e-9):.1f} tok/s, compile included)")


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

    p = sub.add_parser("generate", help="sample a continuation from a checkpoint")
    p.add_argument("--checkpoint", metavar="CKPT", help="Orbax checkpoint directory (latest step) or step folder")
    add_config_args(p, required=False)
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch; default: stdin)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the Phi chat template")
    p.add_argument("--system", help="system message for --chat")
    p.add_argument("--tokenizer", help="override the checkpoint's tokenizer")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-stop", action="store_true", help="do not stop at <|end|> / <|endoftext|>")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv=None):
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "help_config", False):
        print_config_help()
        return 0
    if extra and not hasattr(args, "config"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from jaxlm.checkpoint import CheckpointError
    from jaxlm.convert.hf import ConversionError
    from jaxlm.data.tokenizer import TokenizerError
    from jaxlm.model.config import ConfigError

    try:
        args.func(args, extra)
    except (UsageError, ConfigError, ConversionError, CheckpointError, TokenizerError, FileNotFoundError) as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
