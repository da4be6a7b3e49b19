"""`jaxlm convert` (Hugging Face <-> Orbax, GGUF -> Orbax, PEFT LoRA adapters <-> Orbax) and
`jaxlm tokenizer train`."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
from rich.markup import escape

from jaxlm import checkpoint
from jaxlm.checkpoint import model_from_checkpoint
from jaxlm.cli.common import console, non_negative_int, positive_int
from jaxlm.convert import gguf, hf, peft
from jaxlm.data.pipeline import train_tokenizer
from jaxlm.data.tokenizer import load_tokenizer, tokenizer_from_hf_folder
from jaxlm.errors import UsageError
from jaxlm.model import lora


def register(sub, name, help_text):
    if name == "convert":
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--from-hf", metavar="DIR", help="HF folder (config.json + safetensors) to read: "
                       "phi3, llama, mistral or qwen2")
        p.add_argument("--from-gguf", metavar="FILE", help="GGUF file (llama.cpp) to read: llama or qwen2, "
                       "F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q4_K/Q5_K/Q6_K")
        p.add_argument("--to-hf", action="store_true", help="write a HF folder (with its tokenizer) from --checkpoint")
        p.add_argument("--to-peft", action="store_true", help="write the LoRA adapter --adapter of --checkpoint as a "
                       "PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
        p.add_argument("--checkpoint", metavar="CKPT", help="jaxlm checkpoint or model name to read (--to-hf, --to-peft)")
        p.add_argument("--adapter", metavar="DIR|NAME", help="--from-hf: a PEFT LoRA adapter folder to load onto the "
                       "model; --to-peft: the name of the checkpoint's adapter to write")
        p.add_argument("--adapter-name", default="default", help="--from-hf --adapter: the adapter's name in jaxlm")
        p.add_argument("--merge-adapter", metavar="NAME", action="append",
                       help="--to-hf: merge this LoRA adapter into the weights (W + s B A; repeat to merge several)")
        p.add_argument("--out", required=True, help="output checkpoint (--from-hf, --from-gguf), HF folder (--to-hf) or "
                       "adapter folder (--to-peft)")
        p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast tensors (default: keep)")
        p.add_argument("--quantized", action="store_true", help="--from-gguf: keep Q8_0/Q4_0/Q4_1 weights as int8 "
                       "blocks (about 4x smaller; they load as the same float32 weights)")
        p.add_argument("--model-type", choices=list(hf.SUPPORTED_MODEL_TYPES),
                       help="--to-hf, --to-peft: the HF model type to write (default: the one it was converted from)")
        p.add_argument("--overwrite", action="store_true", help="replace what is at --out")
        p.set_defaults(func=cmd_convert)
        return
    p = sub.add_parser(name, help=help_text)
    p.add_argument("action", choices=["train"])
    p.add_argument("--data", required=True, help="sources, as data.train: 'PATH[@W], ...'")
    p.add_argument("--vocab-size", type=positive_int, default=4096)
    p.add_argument("--out", required=True, help="tokenizer.json to write")
    p.add_argument("--text-field", default="text")
    p.add_argument("--max-records", type=non_negative_int, default=0, help="records per source (evenly spaced; 0 = all)")
    p.set_defaults(func=cmd_tokenizer)


def _refuse_existing(out: Path, what: str, overwrite: bool):
    """Stop unless --out is new or empty; with --overwrite, remove what is there."""
    occupied = any(out.iterdir()) if out.is_dir() else out.exists()
    if not occupied:
        return
    if not overwrite:
        raise UsageError(f"--out {out} already exists and holds {what}", hint="pass --overwrite to replace it")
    if out.is_dir():
        shutil.rmtree(out)
    else:
        out.unlink()


def _saved_model_type(ckpt, given):
    return given or checkpoint.converted_from(ckpt).get("model_type")


def cmd_convert(args, overrides):
    if sum(map(bool, (args.from_hf, args.from_gguf, args.to_hf, args.to_peft))) != 1:
        raise UsageError("give exactly one of --from-hf DIR, --from-gguf FILE, --to-hf or --to-peft")
    if args.quantized and not args.from_gguf:
        raise UsageError("--quantized applies to --from-gguf only")
    if args.model_type and not (args.to_hf or args.to_peft):
        raise UsageError("--model-type applies to --to-hf and --to-peft only")
    if args.adapter and not (args.from_hf or args.to_peft):
        raise UsageError("--adapter applies to --from-hf (a PEFT folder) and --to-peft (an adapter name)")
    if args.merge_adapter and not args.to_hf:
        raise UsageError("--merge-adapter applies to --to-hf only")
    out = Path(args.out)
    if args.to_peft:
        return _to_peft(args, out)
    if args.from_gguf:
        if args.dtype:
            raise UsageError("--dtype does not apply to --from-gguf (weights are dequantised to float32)")
        _refuse_existing(out, "files (a checkpoint or a run)", args.overwrite)
        gguf.convert_gguf(args.from_gguf, out, quantized=args.quantized, log=lambda m: console.print(escape(str(m))))
    elif args.from_hf:
        _refuse_existing(out, "files (a checkpoint or a run)", args.overwrite)
        console.print(f"reading {escape(args.from_hf)}")
        if args.adapter:
            model_cfg, params = peft.load_adapter(args.from_hf, args.adapter, args.adapter_name, dtype=args.dtype)
            console.print(f"with LoRA adapter {escape(args.adapter_name)} from {escape(args.adapter)} "
                          f"({lora.count(params) / 1e6:.2f}M parameters)")
        elif peft.has_in_model_adapters(args.from_hf):  # Phi-4-multimodal: adapters inside the model folder
            model_cfg, params = peft.load_in_model(args.from_hf)
            console.print(f"with the model's own LoRA adapters {', '.join(model_cfg.lora.adapters)}")
        else:
            model_cfg, params = hf.load_hf(args.from_hf, dtype=args.dtype)
        tok = tokenizer_from_hf_folder(args.from_hf)
        console.print(f"{model_cfg.num_params / 1e6:.1f}M parameters; writing Orbax checkpoint {escape(str(out))}")
        saved = {"model": model_cfg.to_dict(), "convert": {"from": "hf", "model_type": hf.model_type_of(args.from_hf)}}
        checkpoint.save_params(out, params, saved, tok.spec() if tok else None)
    else:
        if not args.checkpoint:
            raise UsageError("--to-hf needs --checkpoint CKPT")
        _refuse_existing(out, "files", args.overwrite)
        model_cfg, params, spec = model_from_checkpoint(args.checkpoint)
        model_type = _saved_model_type(args.checkpoint, args.model_type)
        if args.merge_adapter:
            for name in args.merge_adapter:
                lora.index(model_cfg, name)  # refuses an unknown adapter, naming the model's adapters
            console.print(f"merging LoRA adapter(s) {escape(', '.join(args.merge_adapter))} into the weights")
            model_cfg, params = lora.strip(model_cfg, lora.merge(model_cfg, params, args.merge_adapter))
        elif model_cfg.lora.enabled:
            raise UsageError(f"checkpoint {args.checkpoint} has LoRA adapters {model_cfg.lora.adapters}: pass "
                             "--merge-adapter NAME to merge one into the weights, or write it with --to-peft")
        tok = load_tokenizer(spec) if spec else None
        if tok is None:
            console.print("[yellow]the checkpoint has no tokenizer: the export has none either[/yellow]")
        console.print(f"writing Hugging Face folder {escape(str(out))}")
        hf.save_hf(model_cfg, params, out, dtype=args.dtype, tokenizer=tok, model_type=model_type)
    console.print("[green]done[/green]")
    return 0


def _to_peft(args, out: Path):
    if not args.checkpoint or not args.adapter:
        raise UsageError("--to-peft needs --checkpoint CKPT and --adapter NAME")
    model_cfg, params, _ = model_from_checkpoint(args.checkpoint)
    if not model_cfg.lora.enabled:
        raise UsageError(f"checkpoint {args.checkpoint} has no LoRA adapters")
    lora.index(model_cfg, args.adapter)
    model_type = _saved_model_type(args.checkpoint, args.model_type) or hf.default_model_type(model_cfg)
    _refuse_existing(out, "files", args.overwrite)
    base = checkpoint.converted_from(args.checkpoint).get("name")
    peft.save_peft(model_cfg, jax.device_get(params), args.adapter, model_type, out, base_model=base)
    console.print(f"wrote PEFT adapter {escape(args.adapter)} for a {model_type} base to {escape(str(out))}")
    console.print("[green]done[/green]")
    return 0


def cmd_tokenizer(args, overrides):
    tok = train_tokenizer(args.data, args.vocab_size, text_field=args.text_field, max_records=args.max_records)
    if tok.vocab_size < args.vocab_size:
        console.print(f"[yellow]the data supports only {tok.vocab_size} tokens (asked for {args.vocab_size}): "
                      f"there are no more merges to learn[/yellow]")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tok.save(args.out)
    console.print(f"wrote a {tok.vocab_size}-token byte-level BPE to {escape(args.out)}")
    return 0
