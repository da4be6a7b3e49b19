"""Models inside a recipe: fine-tune a checkpoint on a stage's artefacts (SFT on chat records, preference
optimisation on pairs), then read the results back for replies and the KL / length analysis.

LoRA or full fine-tuning is one setting of the training section (`lora_rank`: 0 = every weight trains):
SFT puts fresh adapters on the base checkpoint and saves only them (with a reference to the base);
preference optimisation continues from the SFT checkpoint with its adapters, against the SFT model
(`reference=precomputed`, one cached pass) or the base under them (`reference=adapters_off`).

A training section (recipe.sft, recipe.po, ...) holds: steps (0 = from epochs), epochs, batch_size, lr,
warmup_steps, seq_len, seed, checkpoint_every, lora_rank, lora_alpha, lora_dropout; preference sections
add loss, beta, reference, max_prompt_length. Training runs in `run.work_dir(name)`, so a crashed stage
resumes from its last checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from jaxlm import checkpoint
from jaxlm.data.tokenizer import apply_chat_template, load_tokenizer
from jaxlm.errors import DataError
from jaxlm.model import lora


def _get(section, key, default):
    return section.get(key, default) if hasattr(section, "get") else getattr(section, key, default)


def chat_tokens(tok, messages) -> int:
    ids = apply_chat_template(tok, list(messages))
    return len(ids[0] if isinstance(ids, tuple) else ids)


def steps_for(section, rows: int) -> int:
    """section.steps, or enough steps of section.batch_size for section.epochs passes over `rows`."""
    if _get(section, "steps", 0):
        return int(section.steps)
    return max(1, math.ceil(float(_get(section, "epochs", 1.0)) * rows / int(section.batch_size)))


def run_config(section, *, init: str, data: str, log_dir, steps: int, preference: bool, console_is_terminal=False):
    """The RunConfig of one fine-tuning run of checkpoint `init` on `data` (a JSON Lines file)."""
    from jaxlm.train.config import RunConfig

    model = dict(checkpoint.load_config(init).get("model", {}))
    saved_lora = dict(model.get("lora") or {})
    if _get(section, "lora_rank", 0) and (not preference or not saved_lora.get("rank")):
        # fresh adapters on a checkpoint without any (SFT, or preference training straight from the
        # base); preference training from an SFT checkpoint keeps that model's own adapters
        saved_lora.update(rank=int(section.lora_rank), alpha=float(_get(section, "lora_alpha", 16.0)),
                          dropout=float(_get(section, "lora_dropout", 0.0)))
    model["lora"] = saved_lora
    if _get(section, "remat_policy", ""):  # optional: recompute activations (long rows in little memory)
        model["remat_policy"] = str(section.remat_policy)
    every = int(_get(section, "checkpoint_every", 0))
    d = {
        "model": model,
        "data": {"train": str(data), "eval": "", "seq_len": int(section.seq_len), "max_bad_fraction": 0.0,
                 "prefetch": 0},
        "train": {"steps": steps, "batch_size": int(section.batch_size), "lr": float(section.lr),
                  "grad_accum": int(_get(section, "grad_accum", 1)),
                  "warmup_steps": min(int(_get(section, "warmup_steps", 0)), max(steps - 1, 0)),
                  "schedule": "cosine" if not preference else "linear", "min_lr_ratio": 0.1 if not preference else 0.0,
                  "weight_decay": 0.0, "seed": int(_get(section, "seed", 0)), "eval_every": 0},
        "checkpoint": {"every": every if every and every < steps else 0, "keep": 1, "async_save": False},
        "log": {"dir": str(log_dir), "every": max(1, steps // 10), "tensorboard": False,
                "progress": console_is_terminal, "sample_prompt": ""},
    }
    if preference:
        d["align"] = {"loss": str(section.loss), "beta": float(section.beta), "reference": str(section.reference),
                      "max_prompt_length": int(section.max_prompt_length),
                      "ref_cache_dir": str(log_dir) + "/reference"}
    return RunConfig.from_dict(d)


def finetune(run, name: str, section, *, init: str, data: str, examples: int, rows: int | None = None,
             preference: bool = False) -> dict:
    """Train checkpoint `init` on `data` in RUN/NAME (resuming there when the stage crashed); returns
    {checkpoint, steps, last metrics, lora_rank}. An epoch is `rows` batch rows (packed SFT rows), or
    `examples` (records, pairs)."""
    from jaxlm.train.loop import train

    if examples == 0:
        raise DataError(f"{name}: no training examples in {data}",
                        hint="look at the counts of the stages before it (selection, judging)")
    work = run.work_dir(name)
    steps = steps_for(section, rows or examples)
    cfg = run_config(section, init=init, data=data, log_dir=work, steps=steps, preference=preference,
                     console_is_terminal=run.console.is_terminal)
    task = None
    if preference:
        from jaxlm.align.train import AlignTask

        task = AlignTask(cfg, init)
    what = f"LoRA rank {cfg.model.lora.rank}" if cfg.model.lora.enabled else "full fine-tuning"
    run.console.print(f"[dim]{name}[/dim] {steps} steps of {cfg.train.batch_size} on {examples} examples "
                      f"from {init} ({what})")
    resume = any(p.name.isdigit() for p in (work / "checkpoints").glob("*"))  # this stage crashed before
    result = train(cfg, resume=resume, init_from=init, task=task, console=run.console)
    last = {k: float(v) for k, v in (result.last or {}).items() if isinstance(v, int | float)}
    return {"checkpoint": str(work / "checkpoints"), "steps": steps, "examples": examples,
            "lora_rank": cfg.model.lora.rank, "last": last}


def sft_rows(tok, records: Sequence[dict], seq_len: int) -> int:
    """Packed rows of seq_len tokens that chat `records` fill (what one SFT epoch reads)."""
    tokens = sum(chat_tokens(tok, r["messages"]) + 1 for r in records)
    return max(1, math.ceil(tokens / seq_len))


# ----------------------------------------------------------------------------- reading models back
def load_chat_model(path: str):
    """(ModelConfig, params, Tokenizer) of a checkpoint, LoRA adapters merged into the weights (the
    result runs as a plain model: generation does not pay for the adapters)."""
    cfg, params, spec = checkpoint.model_from_checkpoint(path)
    if cfg.lora.enabled:
        params = lora.merge(cfg, params, list(cfg.lora.adapters))
        cfg = lora.off(cfg)
    return cfg, params, load_tokenizer(spec)


def replies(model, conversations, *, max_new_tokens: int, batch_size: int, progress=None) -> list[str]:
    """Greedy replies of a (config, params, tokenizer) model to chat conversations."""
    from jaxlm.eval.generation import generate_replies

    cfg, params, tok = model
    return generate_replies(cfg, params, tok, conversations, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            progress=progress)


def kl_and_length(policy, reference, conversations, *, max_new_tokens: int, samples: int = 1, seed: int = 0,
                  batch: int = 16) -> dict:
    """KL(policy || reference) and the policy's response lengths on `conversations`
    (jaxlm.align.analysis, temperature-1 samples of the policy), and the reference's lengths too."""
    from jaxlm.align import analysis
    from jaxlm.eval.generation import chat_ids, sampler, stop_tokens

    cfg, p_params, tok = policy
    r_cfg, r_params, _ = reference
    if cfg != r_cfg:
        raise DataError("the policy and its reference have different architectures")
    prompts = [chat_ids(tok, c) for c in conversations]
    stops = stop_tokens(cfg, tok)
    out = {}
    for name, params, other in (("policy", p_params, r_params), ("reference", r_params, p_params)):
        a = analysis.analyze(cfg, params, other, prompts, sampler(cfg, params, max_new_tokens, stops),
                             samples=samples, stop_tokens=stops, seed=seed, batch=batch)
        out[name] = a.summary()
    return out
