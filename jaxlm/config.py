"""The run configuration: one ml_collections ConfigDict with a section per concern.

Every field has a default and a one-line help text (`jaxlm <cmd> --help-config` prints them).
Config files are Python files with `get_config()` (ml_collections convention, optional `:arg`);
overrides use the ml_collections syntax `--config.train.steps=100`. `validate` fails at start-up
with a message that names the field.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from jaxlm.model.config import ConfigError, ModelConfig
from jaxlm.model.config import help_texts as model_help

# logical axis -> mesh axis (or axes); for each array dimension the first rule whose mesh axes are
# still unused in that array wins, so activations' 'embed' stays replicated when 'batch' took fsdp.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("length", None),
    ("head_dim", None),
    ("layers", None),
)

# section -> field -> (default, help). The model section comes from ModelConfig.
SECTIONS: dict[str, dict[str, tuple[Any, str]]] = {
    "data": {
        "tokenizer": ("", "tokenizer: a tokenizer.json, a .tiktoken file, PRESET:path (phi4, o200k_base, gpt2), asset:NAME"),
        "train": ("", "training sources: 'PATH[@WEIGHT], ...'; PATH may be a glob, .jsonl[.gz], .parquet, "
                      "arrayrecord:PATH, tfds:NAME[/CONFIG]:SPLIT, asset:NAME"),
        "eval": ("", "held-out sources (same syntax); '' for none"),
        "text_field": ("text", "record field holding plain text"),
        "messages_field": ("messages", "record field holding chat messages (Phi template, assistant-only loss)"),
        "prompt_field": ("", "record field of a prompt put before the text with no loss (SFT on "
                             "prompt/completion pairs: text_field is the completion)"),
        "group_field": ("", "record field to report eval perplexity by (for example 'family')"),
        "seq_len": (256, "tokens per packed row"),
        "long_records": ("split", "records longer than seq_len: split | truncate"),
        "add_eos": (True, "append <|endoftext|> to every document"),
        "packing_bins": (8, "open rows the first-fit packer fills before emitting"),
        "num_shards": (0, "independent input streams; 0 = one per process. Fix it to make batches "
                          "independent of the process count"),
        "max_bad_fraction": (0.01, "stop when more than this fraction of a source's records is bad"),
        "prefetch": (2, "batches prefetched by a background thread (bounded); 0 = off"),
        "num_workers": (0, "grain worker processes for tokenizing and packing; 0 = in the main process"),
    },
    "train": {
        "steps": (1000, "optimizer steps"),
        "batch_size": (8, "global batch size in rows of seq_len tokens"),
        "grad_accum": (1, "micro-batches per step (the batch is split, gradients summed)"),
        "lr": (3e-4, "peak learning rate"),
        "schedule": ("cosine", "after warmup: cosine | linear | constant"),
        "warmup_steps": (100, "linear warmup from 0"),
        "min_lr_ratio": (0.1, "final learning rate as a fraction of lr (cosine, linear)"),
        "weight_decay": (0.1, "AdamW decoupled weight decay (not applied to norms)"),
        "b1": (0.9, "Adam beta1"),
        "b2": (0.95, "Adam beta2"),
        "eps": (1e-8, "Adam epsilon"),
        "clip_norm": (1.0, "global gradient-norm clip; 0 = off"),
        "trainable": ("", "regex over parameter paths ('layers/attn/q'); only matches train. '' = all"),
        "loss_chunk": (256, "sequence chunk of the memory-lean log-softmax (tokens); 0 = whole sequence"),
        "seed": (0, "seed of initialisation, shuffling and sampling"),
        "eval_every": (200, "evaluate every N steps (and at the end); 0 = only at the end"),
        "eval_batches": (20, "held-out batches per evaluation; 0 = the whole eval set"),
    },
    "parallel": {
        "data": (-1, "data-parallel mesh axis size (within a slice); -1 = the remaining devices"),
        "fsdp": (1, "fully-sharded (ZeRO-3) mesh axis size (within a slice); -1 = the remaining devices"),
        "tensor": (1, "tensor-parallel mesh axis size"),
        "dcn_data": (1, "data-parallel factor across slices (TPU multislice) or node groups; the data "
                        "axis is data*dcn_data"),
        "dcn_fsdp": (1, "fsdp factor across slices or node groups; the fsdp axis is fsdp*dcn_fsdp"),
        "rules": (DEFAULT_RULES, "logical axis -> mesh axes table (first unused match wins)"),
        "coordinator_address": ("", "jax.distributed coordinator host:port ('' = auto-detect or single process)"),
        "num_processes": (0, "processes in the job (0 = auto-detect)"),
        "process_id": (-1, "this process's index (-1 = auto-detect)"),
    },
    "align": {
        "loss": ("dpo", "preference loss: dpo | ln_dpo | ipo | simpo | hinge | robust | ... (jaxlm.align.losses.NAMES)"),
        "beta": (0.1, "inverse temperature of the implicit reward (appears once in every loss)"),
        "label_smoothing": (0.0, "flip rate eps (conservative DPO, robust, exo_pair)"),
        "gamma": (0.0, "SimPO's target reward margin (raw, not gamma/beta)"),
        "sft_weight": (0.0, "RPO: weight of the chosen response's per-token NLL added to the loss"),
        "reference": ("precomputed", "reference log-probs: precomputed (cached pass) | checkpoint (in-step) | "
                                     "adapters_off (LoRA policy without adapters) | none (reference-free)"),
        "reference_checkpoint": ("", "reference model ('' = the --init checkpoint, else the initial params)"),
        "ref_cache_dir": ("", "cache of precomputed reference log-probs ('' = next to the data if writable, "
                              "else LOG_DIR/reference)"),
        "max_prompt_length": (128, "prompt tokens kept (its end) when prompt + response exceed data.seq_len"),
        "prompt_field": ("prompt", "record field of the prompt (string or messages)"),
        "chosen_field": ("chosen", "record field of the preferred response"),
        "rejected_field": ("rejected", "record field of the dispreferred response"),
    },
    "checkpoint": {
        "dir": ("", "checkpoint directory ('' = LOG_DIR/checkpoints)"),
        "every": (500, "save every N steps (and at the end); 0 = only at the end"),
        "keep": (3, "checkpoints kept"),
        "async_save": (True, "write checkpoints in the background"),
    },
    "log": {
        "dir": ("runs/default", "run directory: metrics.jsonl, TensorBoard events, checkpoints"),
        "every": (10, "log metrics every N steps"),
        "tensorboard": (True, "write TensorBoard event files"),
        "progress": (True, "show a progress bar with ETA"),
        "peak_flops": (0.0, "per-device peak FLOP/s for MFU; 0 = from the platform table (CPU: measured)"),
        "sample_prompt": ("", "after training, print a sample that continues this prompt ('' = none)"),
        "sample_tokens": (64, "length of that sample in tokens"),
    },
}


def _dataclass_section(obj) -> ml_collections.ConfigDict:
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = _dataclass_section(v) if dataclasses.is_dataclass(v) else v
    return ml_collections.ConfigDict(out)


def defaults() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.model = _dataclass_section(ModelConfig())
    for name, fields in SECTIONS.items():
        cfg[name] = ml_collections.ConfigDict({k: v for k, (v, _) in fields.items()})
    return cfg


def help_table() -> dict[str, str]:
    table = {f"model.{k}": v for k, v in model_help().items()}
    for name, fields in SECTIONS.items():
        table.update({f"{name}.{k}": h for k, (_, h) in fields.items()})
    return table


# ----------------------------------------------------------------------------- loading
def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`configs/x.py`, `configs/x.py:arg`, or a packaged config name (`quickstart`), then overrides."""
    path, _, arg = str(spec).partition(":")
    if path.endswith(".py"):
        file = Path(path)
        if not file.exists():
            raise ConfigError(f"config file {file} not found")
        mod_spec = importlib.util.spec_from_file_location(f"_jaxlm_config_{file.stem}", file)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(f"jaxlm.configs.{path}")
        except ModuleNotFoundError as e:
            raise ConfigError(f"no config file {path!r} and no packaged config jaxlm.configs.{path}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config {spec} defines no get_config()")
    cfg = module.get_config(arg) if arg else module.get_config()
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def _field_names(cfg, prefix="") -> list[str]:
    out = []
    for k, v in cfg.items():
        out += _field_names(v, f"{prefix}{k}.") if isinstance(v, ml_collections.ConfigDict) else [prefix + k]
    return out


def _parse_value(key: str, text: str, current):
    try:
        if isinstance(current, bool):
            low = text.lower()
            if low not in ("true", "false", "1", "0"):
                raise ValueError
            return low in ("true", "1")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return text
        value = ast.literal_eval(text)
        if isinstance(current, tuple):
            value = tuple(value) if isinstance(value, list | tuple) else (value,)
        return value
    except (ValueError, SyntaxError):
        raise ConfigError(f"--config.{key}: cannot read {text!r} as {type(current).__name__}") from None


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Apply `--config.a.b=value` (or `--config.a.b value`) overrides in place."""
    names = _field_names(cfg)
    items = list(overrides)
    i = 0
    while i < len(items):
        arg = items[i]
        if not arg.startswith("--config."):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --config.train.steps=100")
        key, eq, text = arg[len("--config."):].partition("=")
        if not eq:
            if i + 1 >= len(items):
                raise ConfigError(f"--config.{key} needs a value")
            text = items[i + 1]
            i += 1
        i += 1
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"unknown config field {key!r}{hint}")
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = _parse_value(key, text, node[leaf])


# ----------------------------------------------------------------------------- views
def to_dict(cfg: ml_collections.ConfigDict) -> dict:
    """JSON-able dict (tuples become lists)."""
    def conv(v):
        if isinstance(v, ml_collections.ConfigDict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, tuple | list):
            return [conv(x) for x in v]
        return v
    return conv(cfg)


def _deep_tuple(v):
    return tuple(_deep_tuple(x) for x in v) if isinstance(v, list | tuple) else v


def from_dict(d: dict) -> ml_collections.ConfigDict:
    """Rebuild a config (for example one saved in a checkpoint) on top of today's defaults."""
    cfg = defaults()

    def merge(node, src, prefix):
        for k, v in src.items():
            if k not in node:
                raise ConfigError(f"unknown config field {prefix}{k!r} in saved config")
            if isinstance(node[k], ml_collections.ConfigDict):
                merge(node[k], v, f"{prefix}{k}.")
            else:
                node[k] = _deep_tuple(v) if isinstance(node[k], tuple) else v
    merge(cfg, d, "")
    return cfg


def model_config(cfg) -> ModelConfig:
    section = cfg["model"] if "model" in cfg else cfg
    return ModelConfig.from_dict(to_dict(section) if isinstance(section, ml_collections.ConfigDict) else section)


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Static checks; those that need the device count live in jaxlm.parallel.make_mesh."""
    m = model_config(cfg)  # ModelConfig validates itself, naming model.* fields

    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    d, t, pa = cfg.data, cfg.train, cfg.parallel
    need(d.long_records in ("split", "truncate"), f"data.long_records must be split | truncate, got {d.long_records!r}")
    need(d.seq_len > 1, f"data.seq_len must be > 1, got {d.seq_len}")
    need(d.seq_len <= m.max_position_embeddings,
         f"data.seq_len {d.seq_len} exceeds model.max_position_embeddings {m.max_position_embeddings}")
    need(0.0 <= d.max_bad_fraction <= 1.0, f"data.max_bad_fraction must be in [0, 1], got {d.max_bad_fraction}")
    need(d.packing_bins >= 1, f"data.packing_bins must be >= 1, got {d.packing_bins}")
    need(t.schedule in ("cosine", "linear", "constant"), f"unknown train.schedule {t.schedule!r}")
    need(t.steps >= 1, f"train.steps must be >= 1, got {t.steps}")
    need(t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}")
    need(t.batch_size % t.grad_accum == 0,
         f"train.batch_size {t.batch_size} is not divisible by train.grad_accum {t.grad_accum}")
    if d.num_shards:
        need(t.batch_size % d.num_shards == 0,
             f"train.batch_size {t.batch_size} is not divisible by data.num_shards {d.num_shards}")
    need(t.loss_chunk >= 0, f"train.loss_chunk must be >= 0, got {t.loss_chunk}")
    a = cfg.align
    from jaxlm.align.losses import NAMES, REFERENCE_FREE

    need(a.loss in NAMES, f"unknown align.loss {a.loss!r}; choose from {', '.join(NAMES)}")
    need(a.reference in ("precomputed", "checkpoint", "adapters_off", "none"),
         f"unknown align.reference {a.reference!r}: precomputed | checkpoint | adapters_off | none")
    need(a.reference != "none" or a.loss in REFERENCE_FREE,
         f"align.reference=none needs a reference-free loss ({', '.join(sorted(REFERENCE_FREE))}), not {a.loss}")
    need(a.beta > 0, f"align.beta must be positive, got {a.beta}")
    need(a.max_prompt_length > 0, f"align.max_prompt_length must be positive, got {a.max_prompt_length}")
    for axis in ("data", "fsdp", "tensor"):
        need(pa[axis] == -1 or pa[axis] >= 1, f"parallel.{axis} must be -1 or >= 1, got {pa[axis]}")
    need([pa.data, pa.fsdp, pa.tensor].count(-1) <= 1, "only one of parallel.data/fsdp/tensor may be -1")
    for f in ("dcn_data", "dcn_fsdp"):
        need(pa[f] >= 1, f"parallel.{f} must be >= 1 (the factor across slices), got {pa[f]}")
    if pa.tensor > 1:
        for name, n in (("num_kv_heads", m.num_kv_heads), ("num_heads", m.num_heads),
                        ("intermediate_size", m.intermediate_size), ("vocab_size", m.vocab_size)):
            need(n % pa.tensor == 0, f"model.{name} {n} is not divisible by parallel.tensor {pa.tensor}")
