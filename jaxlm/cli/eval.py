"""`jaxlm eval`: perplexity of a checkpoint on data (overall and per group), lm-evaluation-harness
benchmarks, refusal/safety evals, judged pairwise comparisons, suites and before/after tables.

    jaxlm eval --checkpoint CKPT --data eval.jsonl [--group-field family]        perplexity
    jaxlm eval --checkpoint CKPT --task hellaswag,arc_easy [--limit 500] [--num-fewshot 5]
               [--output results.json] [--samples samples.jsonl]
    jaxlm eval --checkpoint CKPT --task xstest,harmful [--judge JUDGE_CKPT | --judge URL --judge-model NAME]
    jaxlm eval --checkpoint CKPT --suite quick|full --output results.json
    jaxlm eval --compare before.json after.json
    jaxlm eval --pairwise A B --judge JUDGE [--data prompts.jsonl]              A, B: response files or checkpoints
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import jax
import jax.numpy as jnp
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from jaxlm import checkpoint, parallel
from jaxlm import config as run_config
from jaxlm.cli.common import (
    add_distributed_args,
    check_overrides,
    console,
    distributed_overrides,
    non_negative_int,
    out,
    positive_int,
)
from jaxlm.data.sources import read_all_or_fail
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.errors import DataError, UsageError
from jaxlm.eval import report
from jaxlm.eval.generation import LocalChat, generate_replies, user_turns
from jaxlm.eval.judges import ClientJudge, judge_pairwise
from jaxlm.eval.report import compare_rows, fmt, read_results, summary_rows
from jaxlm.eval.runner import (
    GENERATIVE,
    TASKS,
    Model,
    data_dir,
    parse_task_args,
    resolve_data,
    run_task,
    suite_tasks,
)
from jaxlm.train.loop import evaluate_lm, params_shardings

__all__ = ["ClientJudge", "cmd_eval", "load_model", "make_judge", "progress_bar", "register"]

TASKS_HELP = "hellaswag, arc_easy, arc_challenge, piqa, lambada, xstest, harmful"


def register(sub, name, help_text):
    p = sub.add_parser(name, help=help_text, description=__doc__.split("\n\n")[0],
                       epilog="--config.parallel.* overrides choose this run's mesh, whatever mesh wrote the checkpoint")
    p.add_argument("--checkpoint", metavar="CKPT", help="the model to evaluate")
    p.add_argument("--data", help="perplexity: sources 'PATH[@W], ...'; one --task: its rows; --pairwise of "
                                  "checkpoints: the prompts")
    p.add_argument("--tokenizer", help="override the checkpoint's tokenizer")
    g = p.add_argument_group("perplexity")
    g.add_argument("--group-field", default="", help="report perplexity per value of this record field (e.g. family)")
    g.add_argument("--batch-size", type=positive_int, help="rows per batch (default: the checkpoint's)")
    g.add_argument("--seq-len", type=positive_int, help="tokens per row (default: the checkpoint's)")
    g.add_argument("--max-batches", type=non_negative_int, default=0, help="stop after N batches (0 = all data)")
    g.add_argument("--out", help="append the results as one JSON line to this file")
    g = p.add_argument_group("benchmarks and safety (lm-evaluation-harness conventions)")
    g.add_argument("--task", action="append", metavar="NAME[=PATH]",
                   help=f"tasks, comma-separated or repeated: {TASKS_HELP}; =PATH: the rows (default: --data-dir)")
    g.add_argument("--suite", choices=("quick", "full"), help="a named set of tasks (see jaxlm.eval.runner.SUITES)")
    g.add_argument("--data-dir", help="folder with benchmarks/*.jsonl and safety/* (default: ../shared/data)")
    g.add_argument("--num-fewshot", type=non_negative_int, default=0, help="few-shot examples (seeded, as the harness)")
    g.add_argument("--fewshot-seed", type=int, default=1234, help="the few-shot sampler's seed (harness default 1234)")
    g.add_argument("--limit", type=positive_int, help="evaluate the first N rows of each task")
    g.add_argument("--output", metavar="RESULTS.json", help="write the results (the harness's layout) here")
    g.add_argument("--samples", metavar="SAMPLES.jsonl", help="write every row (scores, prediction, gold) here")
    g.add_argument("--batch-tokens", type=positive_int, default=2048, help="tokens per scoring call (memory vs speed)")
    g.add_argument("--bootstrap-iters", type=non_negative_int, default=100_000,
                   help="bootstrap resamples for perplexity's stderr (harness default; 0 = none)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype (float32 gives the harness's float32 numbers)")
    g = p.add_argument_group("generative evals and judges")
    g.add_argument("--max-new-tokens", type=positive_int, help="reply length (default 256; a suite sets its own)")
    g.add_argument("--gen-batch-size", type=positive_int, default=16, help="prompts generated together")
    g.add_argument("--system-prompt", help="a system turn before each prompt")
    g.add_argument("--judge", metavar="CKPT|URL",
                   help="LLM judge: a jaxlm checkpoint (run locally) or an OpenAI-protocol URL")
    g.add_argument("--judge-model", default="", help="model name at the judge URL")
    g.add_argument("--judge-max-tokens", type=positive_int, default=512, help="longest judge reply")
    g.add_argument("--judge-verdict", choices=("text", "logprobs"), default="text",
                   help="--pairwise verdicts: text (the judge writes [[A]]/[[B]]/[[C]]) or logprobs (log P(A) - "
                        "log P(B) of a one-letter answer, both orders: for weak judges; needs a --judge URL)")
    g.add_argument("--pairwise", nargs=2, metavar=("A", "B"),
                   help="judge two models' replies: response files (.jsonl: prompt, response[, checklist, rubric]) "
                        "or checkpoints (replies to --data prompts)")
    g.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="before/after table of two results files")
    add_distributed_args(p)
    p.set_defaults(func=cmd_eval, takes_overrides=True)


def cmd_eval(args, overrides):
    check_overrides(overrides)
    if args.compare:
        return cmd_compare(args)
    if args.pairwise:
        return cmd_pairwise(args)
    if args.task or args.suite:
        return cmd_tasks(args)
    if not args.checkpoint or not args.data:
        raise UsageError("give --checkpoint and --data (perplexity), --task/--suite, --pairwise or --compare")
    return cmd_perplexity(args, overrides)


# ----------------------------------------------------------------------------- perplexity
def cmd_perplexity(args, overrides):
    saved = checkpoint.load_config(args.checkpoint)
    cfg_dict = run_config.from_dict({k: v for k, v in saved.items() if k in ("model", "data", "train")})
    cfg_dict.train.eval_batches = args.max_batches
    if args.batch_size:
        cfg_dict.train.batch_size = args.batch_size
    if args.seq_len:
        cfg_dict.data.seq_len = args.seq_len
    run_config.apply_overrides(cfg_dict, list(overrides) + distributed_overrides(args))
    cfg = run_config.build(cfg_dict)
    parallel.initialize_from(cfg.parallel)
    mesh = parallel.make_mesh(cfg.parallel)
    parallel.check_batch(cfg.train.batch_size, mesh)
    spec = args.tokenizer or checkpoint.load_tokenizer_spec(args.checkpoint) or cfg.data.tokenizer
    if not spec:
        raise UsageError("no tokenizer in the checkpoint: pass --tokenizer")
    tok = load_tokenizer(spec)
    params = checkpoint.load_params(args.checkpoint, params_shardings(cfg.model, mesh, cfg.parallel.rules))
    res = evaluate_lm(cfg.model, params, cfg.data, args.data, tok, mesh, cfg.parallel.rules, cfg.train.batch_size,
                      cfg.train.loss_chunk, args.max_batches, args.group_field)
    if jax.process_index() != 0:
        return 0
    table = Table("data", "tokens", "loss", "perplexity", title=f"eval of {escape(str(args.checkpoint))}")
    table.add_row("all", str(res["tokens"]), f"{res['loss']:.4f}", f"{res['ppl']:.3f}")
    for name, g in sorted(res.get("groups", {}).items()):
        table.add_row(escape(f"{args.group_field}={name}"), str(g["tokens"]), f"{g['loss']:.4f}", f"{g['ppl']:.3f}")
    out.print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps({"checkpoint": str(args.checkpoint), "data": args.data, **res}) + "\n")
    return 0


# ----------------------------------------------------------------------------- shared pieces
def load_model(path, tokenizer=None, dtype="float32"):
    """jaxlm.eval.Model of a checkpoint, computing in `dtype`."""
    model_cfg, params, spec = checkpoint.model_from_checkpoint(path)
    spec = tokenizer or spec
    if not spec:
        raise UsageError(f"no tokenizer in checkpoint {path}: pass --tokenizer")
    if model_cfg.dtype != dtype or model_cfg.param_dtype != dtype:
        model_cfg = model_cfg.replace(dtype=dtype, param_dtype=dtype)
        params = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), params)
    return Model(model_cfg, params, load_tokenizer(spec))


def make_judge(args):
    """The `complete(messages) -> str` of --judge, or None."""
    if not args.judge:
        return None
    if args.judge.startswith(("http://", "https://")):
        if not args.judge_model:
            raise UsageError("--judge URL needs --judge-model NAME (the model the server serves)")
        return ClientJudge(args.judge, args.judge_model, max_tokens=args.judge_max_tokens)
    m = load_model(args.judge)
    return LocalChat(m.config, m.params, m.tok, max_new_tokens=args.judge_max_tokens, batch_size=args.gen_batch_size)


@contextmanager
def progress_bar(description: str):
    """A callback progress(done, total): a bar on terminals, a line per quarter otherwise."""
    if console.is_terminal:
        bar = Progress(TextColumn(f"[bold]{escape(description)}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)
        task = bar.add_task(description, total=None)
        with bar:
            yield lambda done, total: bar.update(task, completed=done, total=total)
        return
    shown = {-1}

    def cb(done, total):
        q = 4 * done // max(total, 1)
        if q not in shown:
            shown.add(q)
            console.print(f"{escape(description)}: {done}/{total}")

    yield cb


# ----------------------------------------------------------------------------- tasks and suites
def cmd_tasks(args):
    if not args.checkpoint:
        raise UsageError("--task / --suite need --checkpoint CKPT")
    plan = [(name, path, {}) for name, path in parse_task_args(args.task or [])]
    if args.suite:
        named = {n for n, _, _ in plan}
        plan += [(name, None, {**opts, "suite": args.suite}) for name, opts in suite_tasks(args.suite)
                 if name not in named]
    if args.data:
        if len(plan) != 1 or plan[0][1]:
            raise UsageError("--data gives one task's rows: use --task NAME=PATH for several tasks")
        plan = [(plan[0][0], args.data, plan[0][2])]
    directory = data_dir(args.data_dir) if any(p is None for _, p, _ in plan) else None
    jobs = [(name, resolve_data(name, path, directory), opts) for name, path, opts in plan]
    for _, path, _ in jobs:
        if not Path(path.split("[")[0]).exists():
            raise DataError(f"data file {path} not found")
    if args.num_fewshot and any(name in GENERATIVE for name, _, opts in plan if not opts.get("suite")):
        raise UsageError(f"--num-fewshot applies to the log-likelihood tasks only ({', '.join(TASKS)})")
    judge = make_judge(args) if any(name in GENERATIVE for name, _, _ in jobs) else None
    t_load = time.perf_counter()
    model = load_model(args.checkpoint, args.tokenizer, args.dtype)
    console.print(f"loaded {escape(str(args.checkpoint))} ({model.config.num_params / 1e6:.1f}M parameters) "
                  f"in {time.perf_counter() - t_load:.1f}s")
    outcomes = []
    for name, path, opts in jobs:
        limit = args.limit or opts.get("limit")
        max_new = args.max_new_tokens or opts.get("max_new_tokens") or 256
        with progress_bar(name) as cb:
            shots = args.num_fewshot if name in TASKS else 0  # a suite's generative tasks take no shots
            o = run_task(model, name, path, num_fewshot=shots, limit=limit, seed=args.fewshot_seed,
                         batch_tokens=args.batch_tokens, bootstrap_iters=args.bootstrap_iters, max_new_tokens=max_new,
                         gen_batch_size=args.gen_batch_size, system=args.system_prompt, judge=judge, progress=cb)
        console.print(f"{name}: {o.n} rows in {o.seconds:.1f}s")
        outcomes.append(o)
    doc = report.results_document(outcomes, {"checkpoint": str(args.checkpoint), "num_fewshot": args.num_fewshot,
                                             "dtype": args.dtype, "suite": args.suite})
    print_summary(doc, f"eval of {args.checkpoint}")
    for o in outcomes:
        print_tables(o)
    if args.output:
        Path(args.output).write_text(json.dumps(doc, indent=2, default=str) + "\n")
        console.print(f"results: {escape(args.output)}")
    if args.samples:
        with open(args.samples, "w") as f:
            for o in outcomes:
                for s in o.samples:
                    f.write(json.dumps({"task": o.task, **s}, ensure_ascii=False, default=str) + "\n")
        console.print(f"samples: {escape(args.samples)}")
    return 0


def print_summary(doc, title):
    table = Table("task", "metric", "value", "± stderr", "n", title=escape(str(title)))
    for task, metric, value, se, n in summary_rows(doc):
        table.add_row(escape(task), metric, fmt(value), fmt(se), str(n))
    out.print(table)


def print_tables(o):
    if "by_type" in o.tables:
        t = Table("type", "n", "compliance", "full refusal", "partial refusal", title=f"{o.task} by prompt type")
        for typ, r in o.tables["by_type"].items():
            t.add_row(escape(typ), str(r["n"]), fmt(r["compliance"], 3), fmt(r["full_refusal"], 3),
                      fmt(r["partial_refusal"], 3))
        out.print(t)
    for key in ("by_source", "by_category"):
        if key in o.tables:
            t = Table(key[3:], "n", "refusal", title=f"{o.task} refusals by {key[3:]}")
            for g, r in o.tables[key].items():
                t.add_row(escape(g), str(r["n"]), fmt(r["refusal"], 3))
            out.print(t)


# ----------------------------------------------------------------------------- compare
def cmd_compare(args):
    a, b = (read_results(p) for p in args.compare)
    rows = compare_rows(a, b)
    if not rows:
        raise DataError(f"{args.compare[0]} and {args.compare[1]} share no task metric to compare")
    table = Table("task", "metric", "A", "B", "B - A", "± stderr", "",
                  title=f"A = {escape(args.compare[0])}, B = {escape(args.compare[1])}")
    for task, m, va, vb, d, se, mark in rows:
        table.add_row(escape(task), m, fmt(va), fmt(vb), f"{d:+.4f}", fmt(se), mark)
    out.print(table)
    console.print("[dim]+ / -: better / worse by more than twice the combined standard error[/dim]")
    return 0


# ----------------------------------------------------------------------------- pairwise
def _read_responses(path):
    def check(rec):
        if not isinstance(rec.get("prompt"), str):
            return "missing field 'prompt'"
        if not isinstance(rec.get("response"), str):
            return "missing field 'response'"
        return None

    return read_all_or_fail(path, check)


def _replies_of(args, source, prompts_rows):
    """Rows {prompt, response, ...} of a response file, or of a checkpoint answering the prompts."""
    if Path(source).is_file():
        return _read_responses(source)
    if prompts_rows is None:
        raise UsageError(f"{source} is a checkpoint: give the prompts with --data PROMPTS.jsonl")
    m = load_model(source, args.tokenizer, args.dtype)
    prompts = [r["prompt"] for r in prompts_rows]
    with progress_bar(f"replies of {source}") as cb:
        replies = generate_replies(m.config, m.params, m.tok, user_turns(prompts, args.system_prompt),
                                   max_new_tokens=args.max_new_tokens or 256, batch_size=args.gen_batch_size,
                                   progress=cb)
    return [dict(r, response=c) for r, c in zip(prompts_rows, replies)]


def cmd_pairwise(args):
    if not args.judge:
        raise UsageError("--pairwise needs --judge CKPT|URL")
    if args.judge_verdict == "logprobs" and not args.judge.startswith(("http://", "https://")):
        raise UsageError("--judge-verdict logprobs reads log-probabilities from an OpenAI-protocol server: "
                         "give --judge URL (e.g. `jaxlm serve JUDGE_CKPT`)")
    prompts = None
    if args.data:
        prompts = read_all_or_fail(args.data, lambda r: None if isinstance(r.get("prompt"), str) else "missing field 'prompt'")
        prompts = prompts[:args.limit] if args.limit else prompts
    a_rows = _replies_of(args, args.pairwise[0], prompts)
    b_rows = _replies_of(args, args.pairwise[1], prompts)
    b_by_prompt = {r["prompt"]: r for r in b_rows}
    items = []
    for r in a_rows[:args.limit] if args.limit else a_rows:
        other = b_by_prompt.get(r["prompt"])
        if other is None:
            raise DataError(f"{r['_origin']}: this prompt has no response in {args.pairwise[1]}")
        items.append({"prompt": r["prompt"], "a": r["response"], "b": other["response"],
                      "checklist": r.get("checklist") or other.get("checklist"),
                      "rubric": r.get("rubric") or other.get("rubric")})
    judge = make_judge(args)
    with progress_bar("judging") as cb:
        res = judge_pairwise(judge, items, verdict=args.judge_verdict, progress=cb)
    m = res["metrics"]
    table = Table("n", "win", "tie", "loss", "win rate", "95% CI", "unparsed pairs", "unparsed judgments",
                  "first-position pref.", title=f"A = {escape(args.pairwise[0])} vs B = {escape(args.pairwise[1])}")
    lo, hi = m["win_rate_ci95"]
    table.add_row(str(m["n"]), fmt(m["win"], 3), fmt(m["tie"], 3), fmt(m["loss"], 3), fmt(m["win_rate"], 3),
                  f"[{fmt(lo, 3)}, {fmt(hi, 3)}]", str(m["unparsed_pairs"]), str(m["unparsed_judgments"]),
                  fmt(m["first_position_preference"], 3))
    out.print(table)
    if args.output:
        doc = {"results": {"judge_pairwise": {"alias": "judge_pairwise",
                                              **{f"{k},none": v for k, v in m.items()}}},
               "jaxlm": {"a": args.pairwise[0], "b": args.pairwise[1], "judge": args.judge}}
        Path(args.output).write_text(json.dumps(doc, indent=2) + "\n")
    if args.samples:
        with open(args.samples, "w") as f:
            for rec in res["records"]:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return 0
