"""Preference training as a task of the one training loop (`jaxlm align`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import parallel
from jaxlm.align import reference
from jaxlm.align.config import AlignConfig
from jaxlm.align.data import PairStream, PrefConfig, eval_rows, load_pairs
from jaxlm.align.losses import preference_loss, preference_metrics
from jaxlm.data.pipeline import BATCH_KEYS
from jaxlm.errors import ConfigError
from jaxlm.model import ModelConfig
from jaxlm.train.config import RunConfig
from jaxlm.train.loop import Run, init_params_from, initial_params, params_shardings


def split_pairs(x):
    return x[0::2], x[1::2]


def make_loss_fn(model_cfg: ModelConfig, a: AlignConfig, chunk: int):
    """loss_fn(params, batch, frozen) -> (summed pair losses, pairs, summed TRL metrics)."""
    mode = a.reference
    # adapters_off: the policy's own params, read by the model without its adapters
    ref_cfg = reference.adapters_off(model_cfg) if mode == "adapters_off" else model_cfg

    def loss_fn(params, batch, frozen, rng=None):
        pc, pr = split_pairs(reference.sequence_logps(model_cfg, params, batch, chunk, rng))
        lc, lr = split_pairs(batch["lengths"])
        if mode == "precomputed":
            rc, rr = split_pairs(batch["ref_logps"])
        elif mode in ("checkpoint", "adapters_off"):
            ref_params = frozen if mode == "checkpoint" else params
            rc, rr = split_pairs(jax.lax.stop_gradient(reference.sequence_logps(ref_cfg, ref_params, batch, chunk)))
        else:
            rc = rr = None
        losses = preference_loss(a.loss, pc, pr, rc, rr, lc, lr, **a.loss_kwargs())
        metrics = preference_metrics(pc, pr, rc, rr, lc, lr, beta=a.beta)
        n = jnp.asarray(losses.shape[0], jnp.float32)
        return losses.sum(), n, {k: v * n for k, v in metrics.items()}

    return loss_fn


class AlignTask:
    """DPO, LN-DPO and the *PO family on preference pairs (a `jaxlm.train.loop.Task`).
    train.batch_size counts pairs; a batch is 2 x batch_size rows [c_1, r_1, c_2, r_2, ...]."""

    def __init__(self, cfg: RunConfig, init_from: str | None = None):
        self.align = cfg.align
        self.init_from = init_from
        self._ref_params = None
        self.batch_keys = BATCH_KEYS + ("lengths",) + (("ref_logps",) if self.align.reference == "precomputed" else ())
        if self.align.reference == "adapters_off":
            reference.adapters_off(cfg.model)  # refuses a model without adapters, at start-up
        if cfg.align.max_prompt_length >= cfg.data.seq_len:
            raise ConfigError(f"align.max_prompt_length {cfg.align.max_prompt_length} must be below "
                              f"data.seq_len {cfg.data.seq_len}: responses need room")

    def rows(self, cfg: RunConfig) -> int:
        return 2 * cfg.train.batch_size

    def pref_config(self, cfg: RunConfig, sources: str) -> PrefConfig:
        a = cfg.align
        return PrefConfig(sources, cfg.data.seq_len, a.max_prompt_length, a.prompt_field, a.chosen_field,
                          a.rejected_field, cfg.data.add_eos, cfg.data.max_bad_fraction)

    # -- the reference model ------------------------------------------------------------------
    def ref_checkpoint(self):
        return self.align.reference_checkpoint or self.init_from

    def reference_params(self, run: Run):
        if self._ref_params is None:
            cfg = run.cfg
            ckpt = self.ref_checkpoint()
            if ckpt:  # a LoRA policy from a base checkpoint: that base plus fresh adapters (B = 0), i.e. the base
                fresh = (initial_params(run.model_cfg, cfg.train.seed, run.mesh, cfg.parallel.rules)
                         if run.model_cfg.lora.enabled else None)
                self._ref_params = init_params_from(
                    ckpt, params_shardings(run.model_cfg, run.mesh, cfg.parallel.rules), fresh)
            else:  # no --init: the policy starts from the seed's initial params, and so does the reference
                self._ref_params = initial_params(run.model_cfg, cfg.train.seed, run.mesh, cfg.parallel.rules)
        return self._ref_params

    def precomputed(self, run: Run, pairs, sources: str) -> np.ndarray:
        cfg = run.cfg
        ref_id = reference.reference_id(self.ref_checkpoint(), run.model_cfg, cfg.train.seed)
        path = reference.cache_path(pairs, sources, ref_id, self.align.ref_cache_dir, run.log_dir)
        return reference.cached_pair_logps(path, lambda: reference.pair_logps(
            run.model_cfg, self.reference_params(run), pairs, cfg.train.batch_size, cfg.data.seq_len, run.mesh,
            cfg.parallel.rules, cfg.train.loss_chunk, run.tok.pad_id))

    # -- the task interface -------------------------------------------------------------------
    def data(self, run: Run):
        cfg = run.cfg
        pairs = load_pairs(self.pref_config(cfg, cfg.data.train), run.tok)
        if pairs.truncated:
            run.console.print(f"[dim]data[/dim] {pairs.truncated} of {len(pairs)} pairs truncated to "
                              f"data.seq_len={cfg.data.seq_len} (prompt end, response start kept)")
        extra = None
        if self.align.reference == "precomputed":
            ref = self.precomputed(run, pairs, cfg.data.train)
            extra = lambda index: {"ref_logps": ref[index, np.arange(len(index)) % 2].astype(np.float32)}  # noqa: E731
        shards = cfg.data.num_shards or jax.process_count()
        return PairStream(pairs, cfg.train.batch_size, shards, cfg.train.seed, cfg.data.seq_len, run.tok.pad_id,
                          extra)

    def loss_fn(self, run: Run):
        return make_loss_fn(run.model_cfg, self.align, run.cfg.train.loss_chunk)

    def frozen(self, run: Run):
        return self.reference_params(run) if self.align.reference == "checkpoint" else None

    def evaluate(self, run: Run, params) -> dict:
        """TRL's reward metrics and the mean loss over the held-out pairs (data.eval): sequence
        log-probs are gathered for every real pair, then the same pure loss and metrics run once."""
        cfg = run.cfg
        if not cfg.data.eval:
            return {}
        pairs = load_pairs(self.pref_config(cfg, cfg.data.eval), run.tok)
        mode = self.align.reference
        bp = cfg.train.batch_size
        chunk = cfg.train.loss_chunk
        ref = self.precomputed(run, pairs, cfg.data.eval) if mode == "precomputed" else None
        ref_params = self.reference_params(run) if mode == "checkpoint" else None
        seqs, refs, lengths, n = [], [], [], 0
        with parallel.sharding_context(run.mesh, cfg.parallel.rules):
            score = jax.jit(lambda p, b: reference.sequence_logps(run.model_cfg, p, b, chunk),
                            out_shardings=parallel.replicated(run.mesh))
            score_off = None
            if mode == "adapters_off":
                off_cfg = reference.adapters_off(run.model_cfg)
                score_off = jax.jit(lambda p, b: reference.sequence_logps(off_cfg, p, b, chunk),
                                    out_shardings=parallel.replicated(run.mesh))
            for batch in eval_rows(pairs, bp, cfg.data.seq_len, run.tok.pad_id, cfg.train.eval_batches):
                real = int(batch["weight"].sum()) // 2
                local = parallel.global_batch(parallel.local_rows(batch, 2 * bp, BATCH_KEYS), run.mesh)
                seqs.append(np.asarray(score(params, local))[:2 * real])
                if mode == "checkpoint":
                    refs.append(np.asarray(score(ref_params, local))[:2 * real])
                elif mode == "adapters_off":
                    refs.append(np.asarray(score_off(params, local))[:2 * real])
                lengths.append(batch["lengths"][:2 * real])
                n += real
        seq = np.concatenate(seqs)
        if ref is not None:
            refs = [ref[:n].reshape(-1)]
        r = np.concatenate(refs) if refs else None
        lens = np.concatenate(lengths)
        pc, pr = split_pairs(seq)
        rc, rr = split_pairs(r) if r is not None else (None, None)
        lc, lr = split_pairs(lens)
        a = self.align
        losses = preference_loss(a.loss, pc, pr, rc, rr, lc, lr, **a.loss_kwargs())
        out = {k: float(v) for k, v in preference_metrics(pc, pr, rc, rr, lc, lr, beta=a.beta).items()}
        return {"loss": float(np.mean(losses)), **out, "pairs": n}
