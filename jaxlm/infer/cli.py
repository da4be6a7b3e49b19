"""`jaxlm generate`: sampling from a checkpoint (or a fresh config), long inputs with retrieval
attention, and the KV-cache report."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

from jaxlm.cli import UsageError, add_config_args, console, load_config, model_from_checkpoint


def add_generate_command(sub):
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
    p.add_argument("--kv-report", action="store_true", help="print the KV cache's bytes per layer (S2: compressed)")
    p.add_argument("--long-input", metavar="FILE",
                   help="input of any length (FILE's text, then --prompt) read with retrieval attention; "
                        "settings: --config.model.attention.retrieval.top_k=... (jaxlm.infer.retrieval)")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args, overrides):
    import jax

    from jaxlm.data.tokenizer import apply_chat_template, load_tokenizer
    from jaxlm.infer.generate import generate

    if args.checkpoint:
        model_cfg, params, spec = model_from_checkpoint(args.checkpoint)
        if overrides:  # model settings: --config.model.attention.retrieval.top_k=32, ...s2.compressed_cache=false
            from jaxlm import config as C

            if any(not o.startswith("--config.model.") for o in overrides if o.startswith("--")):
                raise UsageError("with --checkpoint only --config.model.* overrides apply")
            cfg = C.from_dict({"model": model_cfg.to_dict()})
            C.apply_overrides(cfg, overrides)
            model_cfg = C.model_config(cfg)
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
    if args.long_input:  # one input of any length: the file's text, then the prompt (retrieval attention)
        if len(args.prompt or []) > 1:
            raise UsageError("--long-input takes at most one --prompt")
        args.prompt = [Path(args.long_input).read_text() + (args.prompt or [""])[0]]
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
    if args.long_input:
        from jaxlm.infer.retrieval import generate_long

        out = generate_long(model_cfg, params, ids[0], max_new_tokens=args.max_new_tokens, stop_tokens=stops,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        console.print(f"retrieval attention: {out.prompt_tokens} input tokens in {out.windows} windows, "
                      f"datastore {out.datastore_bytes / 2**20:.1f} MiB built in {out.datastore_seconds:.2f}s")
    else:
        out = generate(model_cfg, params, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, stop_tokens=stops, seed=args.seed)
    for prompt, toks in zip(prompts, out.tokens):
        text = tok.decode([t for t in toks if t not in stops])
        print(text if len(prompts) == 1 else f"--- {prompt!r}\n{text}")
    if out.cache_layers:
        print_cache_report(out.cache_layers, out.cache_full_layer, per_layer=args.kv_report)
    console.print(f"prefill {out.prompt_tokens} tokens in {out.prefill_seconds:.2f}s, "
                  f"decode {out.generated_tokens} tokens in {out.decode_seconds:.2f}s "
                  f"({out.generated_tokens / max(out.decode_seconds, 1e-9):.1f} tok/s, compile included)")


def print_cache_report(layers, full_layer, per_layer=False):
    """One line: the KV cache's size and, for S2 models, how much the compressed layers save; with
    per_layer a table of every layer."""
    from rich.table import Table

    total = sum(b for _, _, b in layers)
    kinds = {}
    for i, kind, b in layers:
        kinds.setdefault((kind, b), []).append(i)
    parts = [f"{len(ix)} {kind} layer{'s' * (len(ix) > 1)} x {b / 2**20:.2f} MiB" for (kind, b), ix in kinds.items()]
    line = f"KV cache {total / 2**20:.2f} MiB: " + ", ".join(parts)
    if any(kind == "s2" for _, kind, _ in layers):
        s2b = next(b for _, kind, b in layers if kind == "s2")
        line += (f"; an S2 layer keeps {s2b / full_layer:.0%} of a full layer's cache, the model "
                 f"{total / (full_layer * len(layers)):.0%} of a full cache")
    console.print(line, soft_wrap=True)
    if per_layer:
        table = Table("layer", "attention", "KV cache MiB", "of full", title="KV cache per layer")
        for i, kind, b in layers:
            table.add_row(str(i), kind, f"{b / 2**20:.3f}", f"{b / full_layer:.0%}")
        Console(stderr=True).print(table)
