"""GenTool's eval stage: base, stage-2-only and two-stage models on the held-out tools, per scenario.

Every eval example is asked twice, greedily: with the stage-1 prompt (rank the candidates) and with
the stage-2 prompt (call one; `jaxlm serve`'s tool format). Per scenario and model, with counts and
95% Wilson intervals:

    selection  the first call names the expected tool; a reply that is no call counts as
               `generate_response` (BFCL's irrelevance rule: no call passes)
    AST        selection and, when a tool is expected, the call passes BFCL's AST rules
               (jaxlm.recipes.bfcl_ast) against the possible answer
    top-1      the ranking reply puts the expected tool first
    NDCG       of the ranking reply against the example's relevance grades (mean)

Replies are kept per model in RUN/eval/ while the stage runs, so a crash resumes with the models
already done. With eval.serve_requests > 0 the two-stage checkpoint is served by `jaxlm serve` and
asked through the `openai` package with `tools=`: the report counts the replies that came back as
`tool_calls`.
"""

from __future__ import annotations

import json

from jaxlm.recipes import gentool_data as gd
from jaxlm.recipes.bfcl_ast import check_calls, norm_name
from jaxlm.recipes.report import bar_chart, markdown_table, rate, wilson

MODELS = ("base", "stage2_only", "two_stage")
ORDER = (*gd.SCENARIOS, *gd.EVAL_ONLY)


# ----------------------------------------------------------------------------- scoring (pure)
def score(example: dict, call_reply: str, rank_reply: str) -> dict:
    """The verdicts of one example's two replies."""
    tools = example["tools"]
    calls = gd.parse_calls(call_reply, tools)
    chosen = calls[0]["name"] if calls else gd.DEFAULT
    expected = example["expected"]
    selected = norm_name(chosen) == norm_name(expected)
    if expected == gd.DEFAULT:
        ast_ok, why = selected and (not calls or len(calls) == 1), "" if selected else f"called {chosen}"
    elif not calls:
        ast_ok, why = False, "no call"
    else:
        ast_ok, why = check_calls(tools, calls, example["answer"])
    ranking = gd.parse_ranking(rank_reply, [t["name"] for t in tools])
    grades = {**example["grades"]}
    return {"chosen": chosen, "selected": selected, "ast": bool(ast_ok), "why": why,
            "top1": bool(ranking) and ranking[0] == expected, "ndcg": round(gd.ndcg(ranking, grades), 6),
            "ranked": len(ranking)}


def metrics(rows: list[dict]) -> dict:
    """{scenario: {n, selected, ast, top1, ndcg}} of one model's scored rows."""
    out = {}
    for sc in ORDER:
        rs = [r for r in rows if r["scenario"] == sc]
        if rs:
            out[sc] = {"n": len(rs), "selected": sum(r["selected"] for r in rs), "ast": sum(r["ast"] for r in rs),
                       "top1": sum(r["top1"] for r in rs), "ndcg": sum(r["ndcg"] for r in rs) / len(rs)}
    return out


def eval_examples(examples: list[dict], per_scenario: int, seed) -> list[dict]:
    """The held-out examples, at most `per_scenario` of each scenario (a seeded sample, file order)."""
    out = []
    for sc in ORDER:
        group = [e for e in examples if e["split"] == "eval" and e["scenario"] == sc]
        if per_scenario and len(group) > per_scenario:
            order = list(range(len(group)))
            gd.rng(seed, "eval", sc).shuffle(order)
            keep = set(order[:per_scenario])
            group = [e for i, e in enumerate(group) if i in keep]
        out += group
    return out


# ----------------------------------------------------------------------------- the stage
def _replies(run, name, ckpt, examples, ev) -> list[dict]:
    from jaxlm.recipes import training

    cache = run.path("eval") / f"replies-{name}.jsonl"
    if cache.exists():
        return [json.loads(line) for line in open(cache)]
    model = training.load_chat_model(ckpt)
    rank = training.replies(model, [gd.prompt_messages(e["question"], e["tools"], rank=True) for e in examples],
                            max_new_tokens=ev.rank_max_new_tokens, batch_size=ev.batch_size)
    call = training.replies(model, [gd.prompt_messages(e["question"], e["tools"]) for e in examples],
                            max_new_tokens=ev.call_max_new_tokens, batch_size=ev.batch_size)
    rows = [{"model": name, "id": e["id"], "scenario": e["scenario"], "expected": e["expected"],
             "call_reply": c, "rank_reply": r, **score(e, c, r)} for e, c, r in zip(examples, call, rank)]
    tmp = cache.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    tmp.replace(cache)
    return rows


def serve_check(run, ckpt: str, examples: list[dict], n: int) -> dict:
    """Ask `jaxlm serve` of `ckpt` through the openai package with tools; count tool_calls replies."""
    import openai

    from jaxlm.errors import JaxlmError
    from jaxlm.recipes.base import LocalServer

    picked = [e for e in examples if e["expected"] != gd.DEFAULT][:n]
    out = {"requests": len(picked), "tool_calls": 0, "expected_tool": 0, "examples": [], "error": None}
    try:
        with LocalServer(ckpt, run.dir / "logs" / "serve-eval.log", run.console, slots=4, max_len=2048) as url:
            client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
            for e in picked:
                r = client.chat.completions.create(model=ckpt, messages=e["question"],
                                                   tools=gd.openai_tools(e["tools"]), temperature=0,
                                                   max_tokens=run.cfg.eval.call_max_new_tokens)
                msg = r.choices[0].message
                calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in msg.tool_calls or []]
                out["tool_calls"] += bool(calls)
                out["expected_tool"] += bool(calls) and norm_name(calls[0]["name"]) == norm_name(e["expected"])
                if len(out["examples"]) < 3:
                    out["examples"].append({"id": e["id"], "finish_reason": r.choices[0].finish_reason,
                                            "tool_calls": calls, "content": msg.content})
    except (JaxlmError, openai.OpenAIError) as err:  # the check is reported, not fatal
        out["error"] = str(err)[:300]
        run.console.print(f"[yellow]serve check failed: {str(err)[:200]}[/yellow]")
    return out


def stage_eval(run) -> dict:
    cfg, ev = run.cfg, run.cfg.eval
    examples = eval_examples(run.read_jsonl("scenarios.jsonl"), ev.per_scenario, cfg.seed)
    ckpts = {"base": cfg.student.checkpoint,
             "stage2_only": json.loads(run.path("stage2_only_model.json").read_text())["checkpoint"],
             "two_stage": json.loads(run.path("stage2_model.json").read_text())["checkpoint"]}
    run.work_dir("eval")
    rows, m = [], {name: {} for name in MODELS}
    for name in MODELS:
        if not ckpts[name]:  # the ablation was not trained
            continue
        model_rows = _replies(run, name, ckpts[name], examples, ev)
        rows += model_rows
        m[name] = metrics(model_rows)
        run.console.print(f"[dim]eval[/dim] {name}: " + ", ".join(
            f"{sc} {x['ast']}/{x['n']}" for sc, x in m[name].items()))
    served = None
    if ev.serve_requests:
        served_file = run.path("eval") / "serve.json"
        if served_file.exists():
            served = json.loads(served_file.read_text())
        else:
            served = serve_check(run, ckpts["two_stage"], examples, ev.serve_requests)
            served_file.write_text(json.dumps(served, indent=2))
    run.write_jsonl("eval_replies.jsonl", rows)
    doc = {"metrics": m, "checkpoints": ckpts, "examples": len(examples), "serve": served}
    run.write_json("eval.json", doc)
    write_report(run, doc)
    return {f"{n}_{sc}_ast": round(x["ast"] / x["n"], 4) for n in MODELS for sc, x in m[n].items()}


def _rate(x: dict, key: str) -> str:
    return rate(x[key], x["n"]) if x else "-"


# ----------------------------------------------------------------------------- report
def _summary(run, stage: str) -> dict:
    path = run.path("state.json")
    stages = json.loads(path.read_text()).get("stages", {}) if path.exists() else {}
    return (stages.get(stage) or {}).get("summary", {})


def write_report(run, doc: dict):
    cfg, m = run.cfg, doc["metrics"]
    scen = [sc for sc in ORDER if any(sc in m[n] for n in MODELS)]
    lines = ["# GenTool on held-out BFCL tools", "",
             f"Student `{cfg.student.checkpoint}`; {doc['examples']} held-out examples (at most "
             f"{cfg.eval.per_scenario or 'all'} per scenario), greedy replies; every tool in them is unseen in "
             f"training. Rates with 95% Wilson intervals and counts.", ""]
    for key, title in (("selected", "Tool selection accuracy (no call = generate_response)"),
                       ("ast", "Call accuracy (selection + BFCL AST rules)"), ("top1", "Ranking top-1")):
        trows = [[sc] + [_rate(m[n].get(sc), key) for n in MODELS] for sc in scen]
        lines += [f"## {title}", "", markdown_table(["scenario", *MODELS], trows), ""]
    trows = [[sc] + [f"{m[n][sc]['ndcg']:.3f}" if sc in m[n] else "-" for n in MODELS] for sc in scen]
    lines += ["## Ranking NDCG (mean)", "", markdown_table(["scenario", *MODELS], trows), ""]
    irr = [[n] + [_rate(m[n].get(sc), "selected") for sc in ("irrelevance", "zero_to_one_absent")] for n in MODELS]
    lines += ["## Irrelevance accuracy (no suitable tool: no call or generate_response)", "",
              markdown_table(["model", "BFCL irrelevance", "zero-to-one, tool absent"], irr), ""]
    if doc.get("serve"):
        s = doc["serve"]
        lines += ["## Through `jaxlm serve` (openai package, `tools=`)", "",
                  f"The two-stage model: {s['tool_calls']} of {s['requests']} requests answered with `tool_calls` "
                  f"({s['expected_tool']} naming the expected tool)."
                  + (f" The check failed: {s['error']}" if s.get("error") else ""), ""]
    t, v, sc_, f = (_summary(run, k) for k in ("tools", "variants", "scenarios", "format"))
    lines += ["## Pipeline", "",
              f"- tools: {t.get('rows')} rows {json.dumps(t.get('sizes', {}))}; gold tools {json.dumps(t.get('gold_tools'))}; "
              f"catalogue {json.dumps(t.get('catalogue'))}; left out as too long {json.dumps(t.get('too_big'))}; "
              f"bad rows {json.dumps(t.get('bad', {}))}",
              f"- variants: {v.get('weak_variants')} weak variants, rules {json.dumps(v.get('rules'))}, unchanged "
              f"{v.get('unchanged')}; {v.get('paraphrases')} paraphrases; labels {json.dumps(v.get('labels'))}",
              f"- scenarios: {json.dumps(sc_.get('sizes', {}))}",
              f"- format: {f.get('stage1')} stage-1 and {f.get('stage2')} stage-2 records"]
    for st in ("stage1", "stage2", "stage2_only"):
        s = _summary(run, st)
        if s.get("skipped"):
            lines.append(f"- {st}: skipped (recipe.ablation is False)")
            continue
        lines.append(f"- {st}: {s.get('steps')} steps on {s.get('examples')} examples ({s.get('rows')} packed rows), "
                     f"final loss {s.get('loss')}")
    lines += ["", "![call accuracy by scenario](report.png)", ""]
    run.path("report.md").write_text("\n".join(lines))
    shown = [n for n in MODELS if m[n]]
    series = {n: [m[n][sc]["ast"] / m[n][sc]["n"] if sc in m[n] else 0.0 for sc in scen] for n in shown}
    errors = {n: [wilson(m[n][sc]["ast"], m[n][sc]["n"]) if sc in m[n] else (0.0, 0.0) for sc in scen] for n in shown}
    bar_chart(run.path("report.png"), [sc.replace("_", "\n") for sc in scen], series, ylabel="call accuracy (AST)",
              title="GenTool on unseen tools (95% CI)", errors=errors)
