"""Evaluation: lm-evaluation-harness-exact benchmarks, refusal and safety evals, and judged evals.

    tasks.py       hellaswag, arc_easy, arc_challenge, piqa, lambada (OpenAI) as the harness defines them:
                   templates, preprocessing, target delimiter, seeded few-shot sampling
    scoring.py     log-likelihoods with the harness's tokenisation; each question's context computed
                   once (KV cache) for all its choices, length-bucketed batches
    metrics.py     acc, acc_norm, perplexity and the harness's standard errors (its exact bootstrap)
    loglik.py      one task: rows -> questions -> scores -> metrics and --log_samples-style rows
    safety.py      XSTest's string-match classifier; XSTest and harmful-prompt reports
    judges.py      LLM judges over a `complete(messages) -> str` callable: XSTest classes, pairwise
                   comparison with swapped order and a confidence interval
    generation.py  chat-template replies of a local model (generative evals, local judges)
    runner.py      named tasks and suites (`jaxlm eval --task / --suite`)
    report.py      results files, the summary table and the before/after comparison

Perplexity per group (`jaxlm eval --data`) lives with the training loop's evaluation
(`jaxlm.train.loop.evaluate_lm`).
"""

from jaxlm.eval.judges import ClientJudge, judge_pairwise, judge_refusals, parse_verdict, parse_xstest_label
from jaxlm.eval.loglik import TaskResult, evaluate_loglik
from jaxlm.eval.runner import SUITES, TASK_NAMES, Model, Outcome, run_task
from jaxlm.eval.safety import strmatch_label
from jaxlm.eval.scoring import encode_pair, score_requests
from jaxlm.eval.tasks import TASKS, build_questions, get_task, read_docs

__all__ = [
    "SUITES", "TASKS", "TASK_NAMES", "ClientJudge", "Model", "Outcome", "TaskResult", "build_questions", "encode_pair",
    "evaluate_loglik", "get_task", "judge_pairwise", "judge_refusals", "parse_verdict", "parse_xstest_label",
    "read_docs", "run_task", "score_requests", "strmatch_label",
]
