"""How far a preference-trained policy moved from its reference, and how long it talks.

Ahrabian et al. (2025) find that DPO's responses grow long while staying close to the SFT model;
LN-DPO's stay shorter. On a prompt set this samples responses y ~ pi(.|x) (temperature 1, no
truncation, so the sample follows the policy exactly) and reports

  KL(pi || pi_ref) = E_x E_{y~pi} [ sum_t log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t) ],

estimated by the Monte-Carlo mean over prompts (per-prompt means when several samples are drawn),
with its standard error across prompts, plus response-length statistics (mean, median, p90 and a
histogram). Responses cut at max_new_tokens are scored as they are (the KL of the truncated
sequences) and counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from jaxlm.align.data import Pairs, PrefConfig, encode_pair, make_rows
from jaxlm.align.reference import sequence_logps
from jaxlm.data.pipeline import BATCH_KEYS
from jaxlm.data.sources import Report, read_records

# (prompts: list of token lists, seed) -> sampled responses (token lists, the stop token included when hit)
Sampler = Callable[[Sequence[Sequence[int]], int], list]


@dataclasses.dataclass
class Analysis:
    kl: float
    kl_se: float
    lengths: np.ndarray  # tokens per sampled response
    truncated: int  # responses that hit max_new_tokens
    prompts: int
    samples_per_prompt: int

    def length_stats(self, bins: int = 20) -> dict:
        return length_stats(self.lengths, bins)

    def summary(self) -> dict:
        s = self.length_stats()
        return {"kl": self.kl, "kl_se": self.kl_se, "len_mean": s["mean"], "len_median": s["median"],
                "len_p90": s["p90"], "truncated": self.truncated, "prompts": self.prompts,
                "samples_per_prompt": self.samples_per_prompt}


def kl_estimate(log_ratio: np.ndarray) -> tuple[float, float]:
    """log_ratio [prompts, samples] of summed log pi - log pi_ref -> (mean, standard error)."""
    per_prompt = np.asarray(log_ratio, np.float64).mean(axis=1)
    n = len(per_prompt)
    se = per_prompt.std(ddof=1) / np.sqrt(n) if n > 1 else float("nan")
    return float(per_prompt.mean()), float(se)


def length_stats(lengths, bins: int = 20) -> dict:
    x = np.asarray(lengths, np.float64)
    counts, edges = np.histogram(x, bins=bins)
    return {"mean": float(x.mean()), "median": float(np.median(x)), "p90": float(np.percentile(x, 90)),
            "hist": counts.tolist(), "edges": edges.tolist()}


def read_prompts(spec: str, tok, field: str = "prompt", limit: int = 0) -> list[list[int]]:
    """Prompt token ids from a source spec of records holding a prompt (a string or chat messages) or
    a preference pair (HH-RLHF shared-prefix pairs included); bad rows are errors with file:line."""
    cfg = PrefConfig(spec, prompt_field=field)

    def as_pair(rec):
        return {**rec, "chosen": "x", "rejected": "y"} if field in rec and "chosen" not in rec else rec

    def validate(rec):
        return encode_pair(tok, as_pair(rec), cfg)[3]

    records, reports = read_records(spec, validate, max_bad_fraction=0.0, what="prompts")
    out = [encode_pair(tok, as_pair(rec), cfg)[0] for rec in records]
    return out[:limit] if limit else out


def analyze(model_cfg, policy, reference, prompts: list[list[int]], sample: Sampler, *, samples: int = 1,
            stop_tokens=(), seed: int = 0, batch: int = 16, max_prompt: int = 0, chunk: int = 256) -> Analysis:
    """Sample responses from the policy with `sample` (for example `jaxlm.infer.generate.generate`
    at temperature 1 with the policy's params), score them under both models, and return the KL
    estimate and the lengths. A response without a stop token counts as cut at max_new_tokens."""
    if max_prompt:
        prompts = [p[-max_prompt:] for p in prompts]
    stops = set(int(s) for s in stop_tokens)
    responses, owners, truncated = [], [], 0
    for k in range(samples):
        for start in range(0, len(prompts), batch):
            chunk_prompts = prompts[start:start + batch]
            for i, toks in enumerate(sample(chunk_prompts, seed * 1_000_003 + k * 7919 + start)):
                if not toks or toks[-1] not in stops:
                    truncated += 1
                responses.append(np.asarray(toks or [stop_tokens[0] if stop_tokens else 0], np.int32))
                owners.append(start + i)
    # score every (prompt, response) under both models; responses are "chosen" rows of fake pairs
    n = len(responses)
    p_ids = [np.asarray(prompts[o], np.int32) for o in owners]
    pairs = Pairs(p_ids, responses, responses, [""] * n, Report("analysis"), 0, "")
    width = max(len(p) + len(r) for p, r in zip(p_ids, responses))
    width = -(-width // 16) * 16
    score = jax.jit(lambda params, b: sequence_logps(model_cfg, params, b, chunk))
    logp, logq = np.zeros(n), np.zeros(n)
    for start in range(0, n, batch):
        idx = np.arange(start, min(start + batch, n))
        rows = make_rows(pairs, idx, width)
        b = {k: rows[k][0::2] for k in BATCH_KEYS}
        logp[idx] = np.asarray(score(policy, b))
        logq[idx] = np.asarray(score(reference, b))
    ratio = (logp - logq).reshape(samples, len(prompts)).T
    kl, se = kl_estimate(ratio)
    lengths = np.asarray([len(r) for r in responses])
    return Analysis(kl, se, lengths, truncated, len(prompts), samples)


def plot(results: dict[str, Analysis], path) -> Path:
    """Length histograms and KL estimates (with 2 standard errors) of one or more policies."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    top = max(int(a.lengths.max()) for a in results.values()) + 1
    bins = np.linspace(0, top, 21)
    for name, a in results.items():
        ax1.hist(a.lengths, bins=bins, alpha=0.5, label=f"{name} (mean {a.lengths.mean():.1f})")
    ax1.set(xlabel="response length (tokens)", ylabel="responses", title="response lengths")
    ax1.legend()
    names = list(results)
    ax2.bar(names, [results[n].kl for n in names], yerr=[2 * results[n].kl_se for n in names], capsize=4)
    ax2.set(ylabel="KL(policy || reference), nats", title="sequence-level KL (±2 s.e.)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
