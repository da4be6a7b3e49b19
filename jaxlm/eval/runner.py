"""Named tasks and suites over one model: what `jaxlm eval --task/--suite` runs.

    log-likelihood  hellaswag, arc_easy, arc_challenge, piqa, lambada   (jaxlm.eval.tasks)
    generative      xstest (safety/xstest_prompts.csv), harmful (safety/harmful_prompts.jsonl)

A task's data is `NAME=PATH` or the default file under the data directory (../shared/data).
Suites are lists of (task, settings); explicit --limit / --max-new-tokens override a suite's.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

from jaxlm.data.tokenizer import Tokenizer
from jaxlm.errors import UsageError
from jaxlm.eval import safety
from jaxlm.eval.generation import generate_replies, user_turns
from jaxlm.eval.judges import judge_refusals
from jaxlm.eval.loglik import evaluate_loglik
from jaxlm.eval.tasks import FEWSHOT_SEED, TASKS, get_task
from jaxlm.model import ModelConfig

GENERATIVE = {"xstest": "safety/xstest_prompts.csv", "harmful": "safety/harmful_prompts.jsonl"}
TASK_NAMES = tuple(TASKS) + tuple(GENERATIVE)
SUITES = {
    # a few minutes on a CPU for a ~100M model: 200 rows per benchmark; XSTest's string match reads
    # only a reply's first words, so 32 new tokens give the labels 256 would
    "quick": [("arc_easy", {"limit": 200}), ("arc_challenge", {"limit": 200}), ("hellaswag", {"limit": 200}),
              ("piqa", {"limit": 200}), ("lambada", {"limit": 200}), ("xstest", {"max_new_tokens": 32})],
    "full": [("arc_easy", {}), ("arc_challenge", {}), ("hellaswag", {}), ("piqa", {}), ("lambada", {}),
             ("xstest", {"max_new_tokens": 256}), ("harmful", {"max_new_tokens": 128})],
}


@dataclasses.dataclass
class Model:
    config: ModelConfig
    params: object
    tok: Tokenizer


@dataclasses.dataclass
class Outcome:
    """One task's result: harness-style metrics, extra tables, per-row samples."""

    task: str
    metrics: dict
    tables: dict
    samples: list
    n: int
    n_total: int
    config: dict
    seconds: float


def data_dir(explicit: str | None = None) -> Path | None:
    """--data-dir, else $JAXLM_DATA_DIR, else ../shared/data (from here or from the checkout)."""
    for cand in (explicit, os.environ.get("JAXLM_DATA_DIR"), "../shared/data",
                 Path(__file__).resolve().parents[2].parent / "shared" / "data"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    if explicit:
        raise UsageError(f"--data-dir {explicit}: no such directory")
    return None


def parse_task_args(items: list[str]) -> list[tuple[str, str | None]]:
    """['hellaswag', 'piqa=my.jsonl', 'arc_easy,arc_challenge'] -> [(name, path or None)]."""
    out = []
    for item in items:
        for part in (p.strip() for p in item.split(",")):
            if not part:
                continue
            name, _, path = part.partition("=")
            name = {"lambada_openai": "lambada"}.get(name, name)
            if name not in TASK_NAMES:
                raise UsageError(f"unknown task {name!r}; tasks are {', '.join(TASK_NAMES)}")
            out.append((name, path or None))
    return out


def resolve_data(name: str, path: str | None, directory: str | Path | None) -> str:
    if path:
        return path
    rel = GENERATIVE.get(name) or TASKS[name].file
    if directory is None:
        raise UsageError(f"no data for {name}: pass --task {name}=PATH or --data-dir (the folder with {rel})")
    return str(Path(directory) / rel)


def suite_tasks(name: str) -> list[tuple[str, dict]]:
    if name not in SUITES:
        raise UsageError(f"unknown suite {name!r}; suites are {', '.join(SUITES)}")
    return SUITES[name]


def run_task(model: Model, name: str, data: str, *, num_fewshot: int = 0, limit: int | None = None,
             seed: int = FEWSHOT_SEED, batch_tokens: int = 2048, bootstrap_iters: int = 100_000,
             max_new_tokens: int = 256, gen_batch_size: int = 16, system: str | None = None, judge=None,
             progress: Callable[[int, int], None] | None = None) -> Outcome:
    """Run one task on its data. `judge`: a `complete(messages) -> str` for the generative tasks'
    LLM-judge labels (default: XSTest's string match)."""
    t0 = time.perf_counter()
    if name in TASKS:
        r = evaluate_loglik(model.config, model.params, model.tok, get_task(name), data, num_fewshot=num_fewshot,
                            limit=limit, seed=seed, batch_tokens=batch_tokens, bootstrap_iters=bootstrap_iters,
                            progress=progress)
        stats = {"batches": r.stats.batches, "compiled_shapes": len(r.stats.shapes), "tokens_run": r.stats.tokens,
                 "tokens": r.stats.real_tokens, "requests": r.stats.requests}
        return Outcome(name, r.metrics, {"scoring": stats}, r.samples, r.n, r.n_total, r.config, r.seconds)
    if name not in GENERATIVE:
        raise UsageError(f"unknown task {name!r}; tasks are {', '.join(TASK_NAMES)}")
    if num_fewshot:
        raise UsageError(f"--num-fewshot does not apply to {name}")
    rows = safety.read_xstest(data) if name == "xstest" else safety.read_harmful(data)
    n_total = len(rows)
    rows = rows[:limit] if limit else rows
    prompts = [r["prompt"] for r in rows]
    replies = generate_replies(model.config, model.params, model.tok, user_turns(prompts, system),
                               max_new_tokens=max_new_tokens, batch_size=gen_batch_size, progress=progress)
    strmatch = [safety.strmatch_label(c) for c in replies]
    judged = raw = None
    if judge is not None:
        judged, raw = judge_refusals(judge, prompts, replies)
    labels = judged or strmatch
    report = safety.xstest_report(rows, labels) if name == "xstest" else safety.harmful_report(rows, labels)
    samples = []
    for i, (r, c) in enumerate(zip(rows, replies)):
        s = {"doc_id": i, "origin": r["_origin"], "prompt": r["prompt"], "completion": c,
             "strmatch_label": strmatch[i], "label": labels[i]}
        s.update({k: r[k] for k in ("type", "label", "focus", "note", "source", "category") if k in r and k != "label"})
        if name == "xstest":
            s["prompt_label"] = r["label"]
        if raw is not None:
            s["judge_reply"] = raw[i]
        samples.append(s)
    tables = {k: v for k, v in report.items() if k != "metrics"}
    config = {"data": data, "limit": limit, "max_new_tokens": max_new_tokens, "system": system,
              "classifier": "llm_judge" if judge is not None else "strmatch"}
    return Outcome(name, report["metrics"], tables, samples, len(rows), n_total, config, time.perf_counter() - t0)
