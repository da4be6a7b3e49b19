"""GPA's eval stage: rubric adherence on held-out conversations, and report.md + report.png.

Per group, the first user turn of up to eval.per_group held-out conversations of that group is answered
greedily by
    base   the student
    ct     the student with the group's rubric (for the conversation's intent, else every intent of
           the group) as system prompt (GPA-CT)
    ft     the student with the group's GPA-FT adapter (merged)
    cross  the student with another group's adapter (the control: a rubric-specific effect shows as
           ft winning more often than cross)
and each of ct, ft and cross is judged pairwise against base by `jaxlm.eval.judges.judge_pairwise`,
shown the group's rubric, in both orders (ties count half; 95% bootstrap interval). Replies are kept
in RUN/eval/ while the stage runs, so a crash resumes with the models already done.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from jaxlm.errors import ConfigError
from jaxlm.recipes.gpa_rubric import criteria_for, rubric_system
from jaxlm.recipes.report import bar_chart, markdown_table

MODELS = ("base", "ct", "ft", "cross")


def _h(*parts) -> float:
    return int(hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12], 16) / 16 ** 12


def eval_items(convs: list[dict], doc: dict, per_group: int, seed, max_chars: int) -> list[dict]:
    """Held-out prompts per group that has a rubric (seeded choice, per_group each; 0 = all)."""
    out = []
    for g in doc["groups"]:
        if not doc["rubrics"].get(g):
            continue
        pool = sorted((c for c in convs if c["group"] == g), key=lambda c: _h(seed, "eval", c["id"]))
        for c in pool[:per_group or None]:
            intent = c["intent"] if c["intent"] in doc["rubrics"][g] else None
            prompt = next(m["content"] for m in c["messages"] if m["role"] == "user")[:max_chars]
            out.append({"id": c["id"], "group": g, "intent": c["intent"], "rubric_intent": intent, "prompt": prompt,
                        "rubric": "\n".join(f"- {x}" for x in criteria_for(doc, g, intent))})
    return out


def cross_group(groups: list[str], trained: list[str], g: str) -> str | None:
    """The adapter of the cross-group control for group g: the next trained group after g, in order."""
    others = [h for h in groups[groups.index(g) + 1:] + groups[:groups.index(g)] if h in trained]
    return others[0] if others else None


def _rename_adapter(tree, old: str, new: str):
    if not isinstance(tree, dict):
        return tree
    return {k: ({new if a == old else a: v2 for a, v2 in v.items()} if k == "lora" else _rename_adapter(v, old, new))
            for k, v in tree.items()}


def combine_adapters(models: dict):
    """One mixture-of-LoRAs model from per-group fine-tuned models {group: (config, params)} that share
    their base weights and adapter settings: adapter i is group i (in the dict's order), so
    `adapter_ids` routes each example to its group's adapter inside one batch. Returns (config, params)."""
    import jax
    import numpy as np

    from jaxlm.errors import DataError
    from jaxlm.model import lora

    names = list(models)
    cfg0, p0 = models[names[0]]
    base0, _ = lora.split(p0)
    adapters: dict = {}
    for g in names:
        cfg, params = models[g]
        if len(cfg.lora.adapters) != 1 or cfg.lora.rank != cfg0.lora.rank or cfg.lora.alpha != cfg0.lora.alpha:
            raise DataError(f"the adapters of group {g} do not match the others' (one adapter, rank, alpha)")
        base, ad = lora.split(params)
        same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), base, base0)
        if not all(jax.tree.leaves(same)):
            raise DataError(f"the model of group {g} has other base weights than group {names[0]}'s")
        adapters = lora.join(adapters, _rename_adapter(ad, cfg.lora.adapters[0], g)) if adapters else \
            _rename_adapter(ad, cfg.lora.adapters[0], g)
    cfg = cfg0.replace(lora=cfg0.lora.replace(adapters=tuple(names), ranks=(), alphas=(), dropouts=()))
    return cfg, lora.join(base0, adapters)


def load_mixture(paths: dict):
    """(config, params, tokenizer) of the mixture of the groups' fine-tuned checkpoints {group: path}."""
    from jaxlm.checkpoint import model_from_checkpoint
    from jaxlm.data.tokenizer import load_tokenizer

    models, spec = {}, None
    for g, path in paths.items():
        cfg, params, spec = model_from_checkpoint(path)
        models[g] = (cfg, params)
    cfg, params = combine_adapters(models)
    return cfg, params, load_tokenizer(spec)


def routed_replies(model, conversations, adapters: list[str], *, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy replies of a mixture model (combine_adapters) with conversation i answered through
    adapter adapters[i], in mixed batches."""
    from jaxlm.eval.generation import chat_ids, stop_tokens
    from jaxlm.infer.generate import generate
    from jaxlm.model import lora

    cfg, params, tok = model
    prompts = [chat_ids(tok, c) for c in conversations]
    ids = lora.adapter_ids(cfg, adapters)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    stops = stop_tokens(cfg, tok)
    out = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        gen = generate(cfg, params, [prompts[i] for i in idx], max_new_tokens=max_new_tokens, stop_tokens=stops,
                       adapter_ids=ids[idx])
        for i, toks in zip(idx, gen.tokens):
            toks = toks[:-1] if toks and toks[-1] in stops else toks
            out[i] = tok.decode(toks, skip_special=True)
    return out


def stage_eval(run) -> dict:
    from jaxlm.eval.judges import judge_pairwise
    from jaxlm.recipes import training

    cfg, ev = run.cfg, run.cfg.eval
    wanted = [m.strip() for m in str(ev.models).split(",") if m.strip()]
    if "base" not in wanted or any(m not in MODELS for m in wanted):
        raise ConfigError(f"recipe.eval.models: a comma-separated subset of {', '.join(MODELS)} with base, "
                          f"got {ev.models!r}")
    doc = json.loads(run.path("rubrics.json").read_text())
    ft = json.loads(run.path("ft_models.json").read_text())["models"]
    convs = [c for c in run.read_jsonl("conversations.jsonl") if c["split"] == "eval"]
    items = eval_items(convs, doc, ev.per_group, cfg.seed, cfg.data.max_chars)
    groups = doc["groups"]
    work = run.work_dir("eval")

    def generate(name, checkpoint, subset, with_rubric=False):
        cache = work / f"replies-{name}.jsonl"
        if cache.exists():
            return [json.loads(line)["reply"] for line in open(cache)]
        convs_ = []
        for it in subset:
            sys_msg = [{"role": "system", "content": rubric_system(doc, it["group"], it["rubric_intent"])}] \
                if with_rubric else []
            convs_.append(sys_msg + [{"role": "user", "content": it["prompt"]}])
        model = training.load_chat_model(checkpoint)
        out = training.replies(model, convs_, max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size) \
            if convs_ else []
        tmp = cache.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"id": it["id"], "reply": r}) + "\n" for it, r in zip(subset, out)))
        tmp.replace(cache)
        return out

    replies: dict[str, list] = {m: [None] * len(items) for m in wanted}
    replies["base"] = generate("base", cfg.student.checkpoint, items)
    if "ct" in wanted:
        replies["ct"] = generate("ct", cfg.student.checkpoint, items, with_rubric=True)
    routes = []  # (model name, item index, adapter): ft answers through the item's group's adapter, cross another's
    for k, it in enumerate(items):
        for name, adapter in (("ft", it["group"] if it["group"] in ft else None),
                              ("cross", cross_group(groups, list(ft), it["group"]))):
            if name in wanted and adapter is not None:
                routes.append((name, k, adapter))
    if routes and ev.routing:  # one mixture-of-LoRAs model, routed per example
        cache = work / "replies-routed.jsonl"
        if cache.exists():
            out = [json.loads(line)["reply"] for line in open(cache)]
        else:
            model = load_mixture({g: ft[g]["checkpoint"] for g in groups if g in ft})
            out = routed_replies(model, [[{"role": "user", "content": items[k]["prompt"]}] for _, k, _ in routes],
                                 [a for _, _, a in routes], max_new_tokens=ev.max_new_tokens,
                                 batch_size=ev.batch_size)
            del model
            tmp = cache.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps({"route": [n, items[k]["id"], a], "reply": r}) + "\n"
                                   for (n, k, a), r in zip(routes, out)))
            tmp.replace(cache)
        for (name, k, _), r in zip(routes, out):
            replies[name][k] = r
    else:  # each group's adapter merged into its own model
        for g in groups:
            idx = [(name, k) for name, k, a in routes if a == g]
            if not idx:
                continue
            out = generate(f"adapter-{g}", ft[g]["checkpoint"], [items[k] for _, k in idx])
            for (name, k), r in zip(idx, out):
                replies[name][k] = r
    complete = run.completer("judge", temperature=0, max_tokens=ev.judge_max_tokens)
    results, rows = {}, []
    for g in groups:
        idx = [k for k, it in enumerate(items) if it["group"] == g]
        if not idx:
            continue
        results[g] = {"n": len(idx), "words": {m: _words([replies[m][k] for k in idx]) for m in wanted
                                               if all(replies[m][k] is not None for k in idx)}}
        for m in wanted:
            if m == "base" or any(replies[m][k] is None for k in idx):
                continue
            adapter = g if m == "ft" else cross_group(groups, list(ft), g) if m == "cross" else None
            judged = judge_pairwise(complete, [{"prompt": items[k]["prompt"], "a": replies[m][k],
                                                "b": replies["base"][k], "rubric": items[k]["rubric"]} for k in idx],
                                    seed=cfg.seed, verdict=cfg.judge.verdict, tie_margin=cfg.judge.tie_margin)
            results[g][m] = {**judged["metrics"], "adapter": adapter}
            for k, rec in zip(idx, judged["records"]):
                rows.append({"id": items[k]["id"], "group": g, "intent": items[k]["intent"], "model": m,
                             "adapter": adapter, "prompt": items[k]["prompt"], "reply": replies[m][k],
                             "base": replies["base"][k], "outcome": rec["outcome"], "verdict_ab": rec["verdict_ab"],
                             "verdict_ba": rec["verdict_ba"]})
    run.write_jsonl("eval_replies.jsonl", rows)
    out = {"results": results, "models": wanted, "judge_failures": len(complete.failures),
           "adapters": {g: ft[g]["checkpoint"] for g in ft}}
    run.write_json("eval.json", out)
    write_report(run, out)
    return {f"{g}_{m}_win_rate": (r[m]["win_rate"] if r[m]["win_rate"] is None else round(r[m]["win_rate"], 4))
            for g, r in results.items() for m in wanted if m in r}


def _words(texts) -> float:
    return float(np.mean([len(str(t).split()) for t in texts])) if texts else 0.0


# ----------------------------------------------------------------------------- report.md
def _summary(run, stage: str) -> dict:
    path = run.path("state.json")
    state = json.loads(path.read_text()).get("stages", {}) if path.exists() else {}
    return (state.get(stage) or {}).get("summary", {})


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def write_report(run, doc: dict):
    cfg = run.cfg
    rubrics = json.loads(run.path("rubrics.json").read_text())
    contrast = run.read_jsonl("contrast.jsonl")
    js = json.loads(run.path("contrast.json").read_text())["js_divergence"]
    conv, ex, nm, pr = (_summary(run, s) for s in ("conversations", "extract", "normalise", "pairs"))
    groups = rubrics["groups"]
    lines = ["# GPA: group preference alignment", "",
             f"Judge `{cfg.judge.get('model') or cfg.judge.get('checkpoint')}`, teacher "
             f"`{cfg.teacher.get('model') or cfg.teacher.get('checkpoint')}`, student `{cfg.student.checkpoint}`; "
             f"labels by {cfg.labels.mode}, preferences by {cfg.extract.mode}.", "",
             "## Groups and intents (conversations)", ""]
    table = conv.get("group_x_intent", {})
    intents = rubrics["intents"]
    lines += [markdown_table(["group", *intents, "all"],
                             [[g, *[table.get(g, {}).get(i, 0) for i in intents], sum(table.get(g, {}).values())]
                              for g in groups]), "",
              f"Label replies the judge left unparsed (rules used): {json.dumps(conv.get('label_unparsed', {}))}; "
              f"group agrees with the rules on {conv.get('group_agrees_with_rules')} of {conv.get('conversations')}. "
              f"Statements: {ex.get('statements')} ({json.dumps(ex.get('by_source', {}))}, judge unparsed "
              f"{ex.get('judge_unparsed')}) -> {nm.get('items')} items.", "",
              "## Most distinguishing items (all intents; log-odds z, informative Dirichlet prior)", ""]
    trows = []
    for g in groups:
        for r in [r for r in contrast if r["group"] == g and r["intent"] == "all"][:cfg.rubrics.top_k]:
            trows.append([g, r["label"], f"{r['z']:.2f}", f"{r['count_group']}/{r['n_group']}",
                          f"{r['count_rest']}/{r['n_rest']}"])
    lines += [markdown_table(["group", "item", "z", "group count / mentions", "rest count / mentions"], trows), "",
              "Jensen–Shannon divergence (base 2) between the groups' item distributions: "
              + ", ".join(f"{i}: " + ", ".join(f"{k} {v:.3f}" for k, v in js[i].items() if v is not None)
                          for i in js if any(v is not None for v in js[i].values())), "", "## Rubrics", ""]
    for g in groups:
        for i, rub in sorted(rubrics["rubrics"].get(g, {}).items()):
            lines.append(f"**{g} / {i}** ({rub['conversations']} conversations)")
            lines += [f"- {c} _(item {it['item']} '{it['label']}', z {it['z']:.2f}, {it['count_group']}/"
                      f"{it['n_group']} vs {it['count_rest']}/{it['n_rest']})_" for c, it in zip(rub["criteria"],
                                                                                               rub["items"])]
            lines.append("")
    lines += [f"Pairs: {pr.get('candidates')} candidates, {pr.get('pairs')} kept ({cfg.pairs.filter}); "
              f"judge unparsed verdicts {pr.get('judge_unparsed')}; per group {json.dumps(pr.get('per_group', {}))}.",
              "", "## Rubric adherence against base (judged pairwise with the group's rubric, both orders)", ""]
    rows, series, errors = [], {}, {}
    models = [m for m in doc["models"] if m != "base"]
    for g, r in doc["results"].items():
        for m in models:
            if m not in r:
                continue
            x = r[m]
            lo, hi = x["win_rate_ci95"]
            ci = "-" if lo is None else f"[{100 * lo:.1f}, {100 * hi:.1f}]"
            rows.append([g, m + (f" ({x['adapter']} adapter)" if x.get("adapter") else ""), x["n"],
                         f"{x['wins']}/{x['ties']}/{x['losses']}", _pct(x["win_rate"]), ci, x["unparsed_pairs"],
                         f"{r['words'].get(m, 0):.1f}", f"{r['words'].get('base', 0):.1f}"])
    lines += [markdown_table(["group", "model", "n", "win/tie/loss", "win rate", "95% CI", "unparsed",
                              "words", "base words"], rows), "", "![rubric adherence](report.png)", ""]
    run.path("report.md").write_text("\n".join(lines))
    for m in models:
        vals, errs = [], []
        for g in groups:
            x = doc["results"].get(g, {}).get(m)
            v = x["win_rate"] if x and x["win_rate"] is not None else 0.0
            lo, hi = (x["win_rate_ci95"] if x and x["win_rate_ci95"][0] is not None else (v, v))
            vals.append(v)
            errs.append((min(lo, v), max(hi, v)))
        series[m], errors[m] = vals, errs
    bar_chart(run.path("report.png"), groups, series or {"none": [0.0] * len(groups)},
              ylabel="win rate vs base (ties half)", title="GPA rubric adherence (95% CI)", errors=errors or None)
