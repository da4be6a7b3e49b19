"""Run one log-likelihood task: rows -> questions -> token requests -> scores -> metrics and samples.

The metrics dict and the per-row samples use lm-evaluation-harness's names and layout (`acc`,
`acc_stderr`, `acc_norm`, ...; samples with doc_id, doc, target, arguments, filtered_resps and the
doc / prompt / target hashes of `--log_samples`), so any row can be set beside the harness's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable

import numpy as np

from jaxlm.data.tokenizer import Tokenizer
from jaxlm.errors import DataError
from jaxlm.eval import metrics as M
from jaxlm.eval.scoring import ScoreStats, encode_pair, make_encoder, score_requests
from jaxlm.eval.tasks import FEWSHOT_SEED, Question, Task, build_questions, get_task, read_docs
from jaxlm.model import ModelConfig


@dataclasses.dataclass
class TaskResult:
    task: str
    metrics: dict  # {"acc": x, "acc_stderr": y, ...}
    samples: list[dict]
    n: int  # rows evaluated
    n_total: int  # rows in the data
    config: dict  # data, num_fewshot, limit, seed
    seconds: float
    stats: ScoreStats


def _hash(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def grade(task: Task, q: Question, scores: list[tuple[float, bool]]) -> dict:
    """The harness's process_results for one row: {metric: value} plus what the sample shows."""
    lls = [ll for ll, _ in scores]
    if task.output_type == "loglikelihood":
        ll, greedy = scores[0]
        return {"perplexity": ll, "acc": int(greedy)}
    lens = np.array([float(len(c)) for c in q.choices])
    pred = int(np.argmax(lls))
    pred_norm = int(np.argmax(np.asarray(lls) / lens))
    return {"acc": 1.0 if pred == q.gold else 0.0, "acc_norm": 1.0 if pred_norm == q.gold else 0.0,
            "_pred": pred, "_pred_norm": pred_norm}


def sample_record(task: Task, q: Question, scores, graded: dict) -> dict:
    """One row as the harness's --log_samples writes it (plus origin, gold and predictions)."""
    doc_json = json.dumps(q.doc, indent=2, ensure_ascii=False, default=str)
    rec = {"doc_id": q.doc_id, "doc": q.doc, "target": q.target,
           "arguments": [[q.context, c] for c in q.continuations],
           "resps": [[[ll, g]] for ll, g in scores], "filtered_resps": [[ll, g] for ll, g in scores],
           "filter": "none", "metrics": [m for m in task.metrics],
           "doc_hash": _hash(doc_json), "prompt_hash": _hash(q.context), "target_hash": _hash(str(q.target)),
           "origin": q.origin, "gold": q.gold}
    rec.update({k: v for k, v in graded.items() if not k.startswith("_")})
    if "_pred" in graded:
        rec.update(pred=graded["_pred"], pred_norm=graded["_pred_norm"])
    return rec


def aggregate(task: Task, graded: list[dict], bootstrap_iters: int = M.BOOTSTRAP_ITERS) -> dict:
    out = {}
    for m in task.metrics:
        xs = [g[m] for g in graded]
        if m == "perplexity":
            out[m] = M.perplexity(xs)
            out[f"{m}_stderr"] = M.perplexity_stderr(xs, bootstrap_iters)
        else:
            out[m] = M.mean(xs)
            out[f"{m}_stderr"] = M.mean_stderr(xs)
    return out


def evaluate_loglik(config: ModelConfig, params, tok: Tokenizer, task: Task | str, data: str, *,
                    num_fewshot: int = 0, limit: int | None = None, seed: int = FEWSHOT_SEED,
                    batch_tokens: int = 2048, bootstrap_iters: int = M.BOOTSTRAP_ITERS,
                    progress: Callable[[int, int], None] | None = None) -> TaskResult:
    """Score `task` on the rows of `data` (a path or 'PATH[a:b]'): the first `limit` rows, with
    `num_fewshot` examples drawn as the harness draws them."""
    task = get_task(task) if isinstance(task, str) else task
    t0 = time.perf_counter()
    docs = read_docs(task, data)
    questions = build_questions(task, docs, num_fewshot=num_fewshot, limit=limit, seed=seed)
    encode = make_encoder(tok)
    requests = []
    for q in questions:
        pairs = [encode_pair(encode, q.context, c) for c in q.continuations]
        if any(not cont for _, cont in pairs):
            raise DataError(f"{q.origin}: a continuation of this {task.name} row has no tokens of its own "
                            f"(the tokenizer merged it into the context)")
        ctx = pairs[0][0]
        requests.append((ctx, [cont for _, cont in pairs]))
    stats = ScoreStats()
    scores = score_requests(config, params, requests, batch_tokens=batch_tokens, progress=progress, stats=stats)
    graded = [grade(task, q, s) for q, s in zip(questions, scores)]
    samples = [sample_record(task, q, s, g) for q, s, g in zip(questions, scores, graded)]
    metrics = aggregate(task, graded, bootstrap_iters)
    return TaskResult(task=task.name, metrics=metrics, samples=samples, n=len(questions), n_total=len(docs),
                      config={"data": data, "num_fewshot": num_fewshot, "limit": limit, "fewshot_seed": seed,
                              "output_type": task.output_type, "target_delimiter": " "},
                      seconds=time.perf_counter() - t0, stats=stats)
