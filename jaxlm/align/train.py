"""Preference training as a task of the one training loop (`jaxlm align`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import checkpoint, parallel
from jaxlm.align import reference as R
from jaxlm.align.data import KEYS, PairStream, PrefConfig, eval_rows, load_pairs
from jaxlm.align.losses import preference_loss, preference_metrics
from jaxlm.model import ModelConfig
from jaxlm.model.config import ConfigError
from jaxlm.train.loop import LMTask, Run, initial_params, params_shardings


def loss_kwargs(a) -> dict:
    kw = {"beta": a.beta}
    for k in ("label_smoothing", "gamma", "sft_weight"):
        if a[k]:
            kw[k] = a[k]
    return kw


def split_pairs(x):
    return x[0::2], x[1::2]


def make_loss_fn(model_cfg: ModelConfig, a, chunk: int):
    """loss_fn(params, batch, frozen) -> (summed pair losses, pairs, summed TRL metrics)."""
    mode = a.reference

    def loss_fn(params, batch, frozen):
        pc, pr = split_pairs(R.sequence_logps(model_cfg, params, batch, chunk))
        lc, lr = split_pairs(batch["lengths"])
        if mode == "precomputed":
            rc, rr = split_pairs(batch["ref_logps"])
        elif mode in ("checkpoint", "adapters_off"):
            ref_params = frozen if mode == "checkpoint" else R.adapters_off(params)
            rc, rr = split_pairs(jax.lax.stop_gradient(R.sequence_logps(model_cfg, ref_params, batch, chunk)))
        else:
            rc = rr = None
        losses = preference_loss(a.loss, pc, pr, rc, rr, lc, lr, **loss_kwargs(a))
        metrics = preference_metrics(pc, pr, rc, rr, lc, lr, beta=a.beta)
        n = jnp.asarray(losses.shape[0], jnp.float32)
        return losses.sum(), n, {k: v * n for k, v in metrics.items()}

    return loss_fn


class AlignTask(LMTask):
    """DPO, LN-DPO and the *PO family on preference pairs. train.batch_size counts pairs."""

    name = "align"

    def __init__(self, init_from: str | None = None):
        self.init_from = init_from
        self._ref_params = None
        self._precomputed = False

    def rows(self, cfg) -> int:
        return 2 * cfg.train.batch_size

    def pref_config(self, cfg, sources: str) -> PrefConfig:
        a = cfg.align
        return PrefConfig(sources, cfg.data.seq_len, a.max_prompt_length, a.prompt_field, a.chosen_field,
                          a.rejected_field, cfg.data.add_eos, cfg.data.max_bad_fraction)

    # -- the reference model ------------------------------------------------------------------
    def ref_checkpoint(self, cfg):
        return cfg.align.reference_checkpoint or self.init_from

    def reference_params(self, run: Run):
        if self._ref_params is None:
            cfg = run.cfg
            ckpt = self.ref_checkpoint(cfg)
            if ckpt:
                self._ref_params = checkpoint.load_params(
                    ckpt, params_shardings(run.model_cfg, run.mesh, cfg.parallel.rules))
            else:  # no --init: the policy starts from the seed's initial params, and so does the reference
                self._ref_params = initial_params(run.model_cfg, cfg.train.seed, run.mesh, cfg.parallel.rules)
        return self._ref_params

    def precomputed(self, run: Run, pairs, sources: str) -> np.ndarray:
        cfg = run.cfg
        ref_id = R.reference_id(self.ref_checkpoint(cfg), run.model_cfg, cfg.train.seed)
        path = R.cache_path(pairs, sources, ref_id, cfg.align.ref_cache_dir, run.log_dir)
        return R.cached_pair_logps(path, lambda: R.pair_logps(
            run.model_cfg, self.reference_params(run), pairs, cfg.train.batch_size, cfg.data.seq_len, run.mesh,
            cfg.parallel.rules, cfg.train.loss_chunk, run.tok.pad_id))

    # -- the task interface -------------------------------------------------------------------
    def data(self, run: Run):
        cfg = run.cfg
        if cfg.align.max_prompt_length >= cfg.data.seq_len:
            raise ConfigError(f"align.max_prompt_length {cfg.align.max_prompt_length} must be below "
                              f"data.seq_len {cfg.data.seq_len}: responses need room")
        self._precomputed = cfg.align.reference == "precomputed"
        pairs = load_pairs(self.pref_config(cfg, cfg.data.train), run.tok)
        if pairs.truncated:
            run.console.print(f"[dim]data[/dim] {pairs.truncated} of {len(pairs)} pairs truncated to "
                              f"data.seq_len={cfg.data.seq_len} (prompt end, response start kept)")
        extra = None
        if cfg.align.reference == "precomputed":
            ref = self.precomputed(run, pairs, cfg.data.train)
            extra = lambda index: {"ref_logps": ref[index, np.arange(len(index)) % 2].astype(np.float32)}  # noqa: E731
        shards = cfg.data.num_shards or jax.process_count()
        return PairStream(pairs, cfg.train.batch_size, shards, cfg.train.seed, cfg.data.seq_len, run.tok.pad_id,
                          extra)

    def batch_keys(self):
        keys = tuple(k for k in KEYS if k != "index")
        return keys + ("ref_logps",) if self._precomputed else keys

    def loss_fn(self, model_cfg, cfg):
        self._precomputed = cfg.align.reference == "precomputed"
        return make_loss_fn(model_cfg, cfg.align, cfg.train.loss_chunk)

    def frozen(self, run: Run):
        return self.reference_params(run) if run.cfg.align.reference == "checkpoint" else None

    def evaluate(self, run: Run, params) -> dict:
        """TRL's reward metrics and the mean loss over the held-out pairs (data.eval): sequence
        log-probs are gathered for every real pair, then the same pure loss and metrics run once."""
        cfg = run.cfg
        if not cfg.data.eval:
            return {}
        pairs = load_pairs(self.pref_config(cfg, cfg.data.eval), run.tok)
        mode = cfg.align.reference
        bp = cfg.train.batch_size
        per = 2 * bp // jax.process_count()
        lo = jax.process_index() * per
        chunk = cfg.train.loss_chunk
        if mode == "precomputed":
            ref = self.precomputed(run, pairs, cfg.data.eval)
            ref_params = None
        else:
            ref = None
            ref_params = self.reference_params(run) if mode == "checkpoint" else None
        seqs, refs, lengths, n = [], [], [], 0
        with parallel.sharding_context(run.mesh, cfg.parallel.rules):
            score = jax.jit(lambda p, b: R.sequence_logps(run.model_cfg, p, b, chunk),
                            out_shardings=parallel.replicated(run.mesh))
            for batch in eval_rows(pairs, bp, cfg.data.seq_len, run.tok.pad_id, cfg.train.eval_batches):
                real = int(batch["weight"].sum()) // 2
                local = parallel.global_batch({k: batch[k][lo:lo + per] for k in R.ROW_KEYS}, run.mesh)
                seqs.append(np.asarray(score(params, local))[:2 * real])
                if mode == "checkpoint":
                    refs.append(np.asarray(score(ref_params, local))[:2 * real])
                elif mode == "adapters_off":
                    refs.append(np.asarray(score(R.adapters_off(params), local))[:2 * real])
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
        a = cfg.align
        losses = preference_loss(a.loss, pc, pr, rc, rr, lc, lr, **loss_kwargs(a))
        out = {k: float(v) for k, v in preference_metrics(pc, pr, rc, rr, lc, lr, beta=a.beta).items()}
        return {"loss": float(np.mean(losses)), **out, "pairs": n}
