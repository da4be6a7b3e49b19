"""Reference log-probs for preference training, from one of three places:

1. `precomputed`: one pass of the reference model over the dataset before training, cached to disk
   (next to the data when that folder is writable, else in the run directory) and reused by later
   runs with the same data, tokenizer, lengths and reference model;
2. `checkpoint`: a frozen reference model evaluated inside the step (its params are the step's
   `frozen` argument, never trained);
3. `adapters_off`: for LoRA policies, the same weights with the adapters switched off (the policy's
   own base: no second copy of the model, no extra pass over the data).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import jax
import numpy as np

from jaxlm import parallel
from jaxlm.align.data import Pairs, eval_rows
from jaxlm.checkpoint import resolve
from jaxlm.data.pipeline import BATCH_KEYS
from jaxlm.data.sources import parse_spec, resolve_paths
from jaxlm.errors import ConfigError
from jaxlm.model import ModelConfig, lora
from jaxlm.train.steps import hidden_states, token_logprobs

log = logging.getLogger(__name__)


def sequence_logps(model_cfg: ModelConfig, params, batch, chunk: int, rng=None):
    """Summed log-probs of each row's loss-masked (response) tokens: [rows] float32 (`rng`: LoRA dropout)."""
    lp = token_logprobs(model_cfg, params, hidden_states(model_cfg, params, batch, rng), batch["targets"], chunk)
    return (lp * batch["loss_mask"]).sum(axis=-1)


def adapters_off(model_cfg: ModelConfig) -> ModelConfig:
    """The reference model of a LoRA policy: the policy's config with its adapters switched off. Run
    with the policy's own params, it reads only their base weights (jaxlm.model.lora.off)."""
    if not model_cfg.lora.enabled:
        raise ConfigError("align.reference=adapters_off needs a policy with LoRA adapters; this model has none",
                          hint="set --config.model.lora.rank (LoRA training) or use align.reference=precomputed")
    return lora.off(model_cfg)


def pair_logps(model_cfg: ModelConfig, params, pairs: Pairs, batch_pairs: int, max_length: int, mesh, rules,
               chunk: int, pad_id: int = 0) -> np.ndarray:
    """[n_pairs, 2] summed log-probs (chosen, rejected) of every pair, in order. Every process computes
    the same global batches and feeds its rows."""
    out = np.zeros((len(pairs), 2), np.float64)
    with parallel.sharding_context(mesh, rules):
        f = jax.jit(lambda p, b: sequence_logps(model_cfg, p, b, chunk), out_shardings=parallel.replicated(mesh))
        start = 0
        for batch in eval_rows(pairs, batch_pairs, max_length, pad_id):
            local = parallel.local_rows(batch, 2 * batch_pairs, BATCH_KEYS)
            seq = np.asarray(f(params, parallel.global_batch(local, mesh))).reshape(-1, 2)
            n = min(batch_pairs, len(pairs) - start)
            out[start:start + n] = seq[:n]
            start += n
    return out


def reference_id(checkpoint: str | None, model_cfg: ModelConfig, seed: int) -> str:
    """Identity of a reference model for the cache key: its checkpoint step folder (or the seed of
    the initial params) and its architecture."""
    if checkpoint:
        d, step = resolve(checkpoint)
        what = f"{Path(d).resolve()}/{step}"
    else:
        what = f"init-seed-{seed}"
    return hashlib.sha256(json.dumps([what, model_cfg.to_dict()], sort_keys=True).encode()).hexdigest()[:12]


def cache_path(pairs: Pairs, sources: str, ref_id: str, cache_dir: str, run_dir: Path) -> Path:
    first = Path(resolve_paths(parse_spec(sources)[0].path)[0])
    name = f"{first.name.split('.')[0]}.ref-{pairs.fingerprint}-{ref_id}.npy"
    if cache_dir:
        return Path(cache_dir) / name
    if os.access(first.parent, os.W_OK):
        return first.parent / name
    return run_dir / "reference" / name


def cached_pair_logps(path: Path, compute) -> np.ndarray:
    """Load the cache at `path`, or compute and write it (process 0, atomically)."""
    if path.exists():
        log.info("reference log-probs from cache %s", path)
        return np.load(path)
    values = compute()
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, values)
        os.replace(tmp, path)
        log.info("reference log-probs cached in %s", path)
    return values
