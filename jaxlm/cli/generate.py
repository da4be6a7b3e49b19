"""`jaxlm generate`: sampling from a checkpoint (or a fresh config), long inputs with retrieval
attention, and the KV-cache report."""

from __future__ import annotations

import sys

import jax
import ml_collections
from rich.markup import escape
from rich.table import Table

from jaxlm import config as run_config
from jaxlm.checkpoint import model_from_checkpoint
from jaxlm.cli.common import (
    add_config_args,
    add_sampling_args,
    console,
    help_config_requested,
    load_run_config,
)
from jaxlm.data.tokenizer import apply_chat_template, load_tokenizer
from jaxlm.errors import UsageError
from jaxlm.infer.generate import generate
from jaxlm.infer.retrieval import chat_input, generate_long, read_long_input
from jaxlm.model import ModelConfig, init_params, lora


def register(sub, name, help_text):
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--checkpoint", metavar="CKPT", help="Orbax checkpoint directory (latest step) or step folder")
    add_config_args(p, required=False)
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch; default: stdin)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    p.add_argument("--system", help="system message for --chat")
    p.add_argument("--tokenizer", help="override the checkpoint's tokenizer")
    add_sampling_args(p, max_new_tokens=64)
    p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-turn / end-of-text tokens")
    p.add_argument("--kv-report", action="store_true", help="print the KV cache's bytes per layer (S2: compressed)")
    p.add_argument("--adapter", metavar="NAME", help="a model with LoRA adapters: the one to use ('none': the base "
                   "model; default: the first)")
    p.add_argument("--long-input", metavar="FILE",
                   help="input of any length read with retrieval attention: FILE's text, then --prompt (with "
                        "--chat: the text in the user turn, the prompt after it); settings: "
                        "--config.model.attention.retrieval.top_k=... (jaxlm.infer.retrieval)")
    p.set_defaults(func=cmd_generate)


def model_and_tokenizer(args, overrides):
    """(ModelConfig, params, tokenizer) from --checkpoint (with --config.model.* overrides) or a fresh
    model of --config."""
    if args.checkpoint:
        model_cfg, params, spec = model_from_checkpoint(args.checkpoint)
        if overrides:  # model settings: --config.model.attention.retrieval.top_k=32, ...s2.compressed_cache=false
            if any(not o.startswith("--config.model.") for o in overrides if o.startswith("--")):
                raise UsageError("with --checkpoint only --config.model.* overrides apply")
            cfg = ml_collections.ConfigDict({"model": run_config.as_configdict(model_cfg)})
            run_config.apply_overrides(cfg, overrides)
            model_cfg = ModelConfig.from_dict(cfg.model)  # the model section alone: the rest is not used
    elif args.config:
        cfg = load_run_config(args, overrides)
        model_cfg = cfg.model
        params = init_params(model_cfg, jax.random.key(args.seed))
        spec = cfg.data.tokenizer or None
        console.print("[yellow]no checkpoint: sampling from a freshly initialised model[/yellow]")
    else:
        raise UsageError("give --checkpoint CKPT (or --config CONFIG for a freshly initialised model)")
    spec = args.tokenizer or spec
    if not spec:
        raise UsageError("no tokenizer in the checkpoint or config: pass --tokenizer")
    return model_cfg, params, load_tokenizer(spec)


def cmd_generate(args, overrides):
    if help_config_requested(args, overrides):
        return 0
    model_cfg, params, tok = model_and_tokenizer(args, overrides)
    if args.long_input:
        if args.adapter:
            raise UsageError("--adapter cannot be combined with --long-input (merge the adapter first: jaxlm convert)")
        return long_input(args, model_cfg, params, tok)
    prompts = args.prompt or [sys.stdin.read()]
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        ids = [apply_chat_template(tok, system + [{"role": "user", "content": p}], add_generation_prompt=True)[0]
               for p in prompts]
    else:
        ids = [tok.encode(p) for p in prompts]
    for i, p in enumerate(ids):
        check_ids(p, f"prompt {i}", model_cfg)
        if len(p) > model_cfg.max_position_embeddings:
            raise UsageError(f"prompt {i} has {len(p)} tokens, more than the model's context of "
                             f"{model_cfg.max_position_embeddings}",
                             hint="read it with retrieval attention: --long-input FILE")
    if max(map(len, ids)) + args.max_new_tokens > model_cfg.max_position_embeddings:
        console.print(f"[yellow]warning: prompt + --max-new-tokens exceeds the model's context of "
                      f"{model_cfg.max_position_embeddings}; tokens past it are out of distribution[/yellow]")
    stops = [] if args.no_stop else tok.stop_ids
    adapter_ids = None
    if args.adapter:
        adapter_ids = lora.NONE if args.adapter == "none" else lora.index(model_cfg, args.adapter)
    gen = generate(model_cfg, params, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, stop_tokens=stops, seed=args.seed, adapter_ids=adapter_ids)
    for prompt, toks in zip(prompts, gen.tokens):
        text = tok.decode([t for t in toks if t not in stops])
        print(text if len(prompts) == 1 else f"--- {prompt!r}\n{text}")
    if gen.cache_layers:
        print_cache_report(gen.cache_layers, gen.cache_full_layer, per_layer=args.kv_report)
    print_speed(gen)
    return 0


def check_ids(ids, what, model_cfg):
    if not ids:
        raise UsageError(f"{what} is empty after tokenization")
    if max(ids) >= model_cfg.vocab_size:
        raise UsageError(f"{what} has token id {max(ids)} outside the model's vocabulary ({model_cfg.vocab_size})")


def long_input(args, model_cfg, params, tok):
    """One input of any length read with retrieval attention: FILE's text, then the --prompt. With
    --chat the text fills the user turn and the prompt follows it, and only the text's tokens go into
    the datastore (the template's tokens and the question stay in the local cache of every layer)."""
    if len(args.prompt or []) > 1:
        raise UsageError("--long-input takes at most one --prompt")
    text, question = read_long_input(args.long_input), (args.prompt or [""])[0]
    if args.chat:
        ids, span = chat_input(tok, text, question, args.system)
    else:
        ids, span = tok.encode(text + question), None
        if tok.chat_template:
            console.print("[yellow]note: the text and the prompt are read as plain text; --chat puts them in the "
                          "model's chat template (the text in the user turn, the prompt after it)[/yellow]")
    check_ids(ids, f"long input {args.long_input}", model_cfg)
    stops = [] if args.no_stop else tok.stop_ids
    gen = generate_long(model_cfg, params, ids, max_new_tokens=args.max_new_tokens, stop_tokens=stops,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, span=span)
    print(tok.decode([t for t in gen.tokens[0] if t not in stops]))
    r = model_cfg.attention.retrieval
    console.print(escape(f"retrieval attention: {gen.prompt_tokens} input tokens, {gen.datastore_entries} in the "
                         f"datastore of layers {list(r.retrieval_layers(model_cfg.num_layers))} (top_k {r.top_k}), "
                         f"{gen.windows} windows; datastore {gen.datastore_bytes / 2**20:.1f} MiB built in "
                         f"{gen.datastore_seconds:.2f}s" + ("" if gen.exact_positions else "; positions rescaled")))
    print_speed(gen)
    return 0


def print_speed(gen):
    console.print(f"prefill {gen.prompt_tokens} tokens in {gen.prefill_seconds:.2f}s, "
                  f"decode {gen.generated_tokens} tokens in {gen.decode_seconds:.2f}s "
                  f"({gen.generated_tokens / max(gen.decode_seconds, 1e-9):.1f} tok/s, compile included)")


def print_cache_report(layers, full_layer, per_layer=False):
    """One line: the KV cache's size and, for S2 models, how much the compressed layers save; with
    per_layer a table of every layer."""
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
    console.print(escape(line))
    if per_layer:
        table = Table("layer", "attention", "KV cache MiB", "of full", title="KV cache per layer")
        for i, kind, b in layers:
            table.add_row(str(i), kind, f"{b / 2**20:.3f}", f"{b / full_layer:.0%}")
        console.print(table)

