"""GPA, Group Preference Alignment (arXiv 2503.08035): group-specific preferences mined from
conversations, contrasted across groups, summarised into rubrics, used in context (GPA-CT) or to make
contrastive pairs for fine-tuning (GPA-FT), and measured by rubric adherence.

    jaxlm recipe gpa --preset mini --config.recipe.data.dir=PATH/TO/data
    jaxlm chat --checkpoint smollm2-135m-instruct --rubric runs/gpa-mini/rubrics.json --group developer

Stages (see `jaxlm recipe gpa --list`):
  conversations  read the conversations (bad rows counted with file:line), a seeded sample, a train /
                 eval split by conversation; a group and an intent per conversation from the judge
                 (JSON), from the rules (gpa_labels), or from fields of the data; an unparsable judge
                 reply falls back to the rules and is counted. Group x intent counts.
  extract        per train conversation, the judge lists the user's implicit preferences (a JSON list);
                 mode judge (rules when unparsable, counted), rules, or both (the union)
  normalise      statements -> canonical text (optionally rewritten by the judge) -> items: TF-IDF
                 cosine clustering (scikit-learn); items.jsonl keeps every member and its count,
                 mentions.jsonl maps every statement of every conversation to its item
  contrast       per intent (and all): each group against the rest, log-odds with an informative
                 Dirichlet prior (the pooled counts) and their z-scores (gpa_stats); JS divergence
                 between the groups' item distributions
  rubrics        per (group, intent): the top-k items with z >= z_min, rewritten by the judge into one
                 instruction each; rubrics.json (gpa_rubric) with every item's counts (provenance)
  pairs          GPA-FT data: per rubric, the teacher answers train prompts twice, once following the
                 rubric (chosen), once violating one named item (rejected); kept when the judge, shown
                 the rubric, prefers chosen in both orders
  align          per group: LN-DPO with fresh LoRA adapters on the student, on that group's pairs
  eval           held-out conversations per group (first user turn): base, GPA-CT (the group's rubric
                 as system prompt), GPA-FT (the group's adapter) and the cross-group control (another
                 group's adapter), each judged pairwise against base with the rubric (both orders);
                 win rates with 95% intervals, reply lengths; report.md + report.png
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict

from jaxlm.data.sources import read_records
from jaxlm.errors import ConfigError, DataError
from jaxlm.recipes import gpa_labels as L
from jaxlm.recipes import gpa_stats
from jaxlm.recipes.base import BadRows, Recipe, Stage
from jaxlm.recipes.common import conversation_problem
from jaxlm.recipes.gpa_eval import stage_eval
from jaxlm.recipes.gpa_rubric import FORMAT, rubric_system
from jaxlm.recipes.porover import data_path

ALL = "all"  # the contrast over every intent together
VIOLATE_SYSTEM = ("You are an assistant. Reply to the user's request, but deliberately do NOT follow this "
                  "guideline; do the opposite of it: {criterion}")
RUBRIC_PROMPT = (
    "Users who are {group} users and ask for {intent} differ from other users in these preferences:\n{items}\n\n"
    "Rewrite each one as a single instruction to an AI assistant answering such a user. Keep the numbering: "
    "one numbered line per preference, nothing else.")


def names(text: str, what: str) -> list[str]:
    out = [x.strip() for x in str(text).split(",") if x.strip()]
    if len(out) < 2 and what == "recipe.labels.groups":
        raise ConfigError(f"{what}: name at least two groups (comma-separated), got {text!r}")
    if not out:
        raise ConfigError(f"{what} is empty")
    return out


def _hash01(*parts) -> float:
    return int(hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12], 16) / 16 ** 12


# ----------------------------------------------------------------------------- conversations
def _label_names(cfg) -> tuple[list[str], list[str]]:
    groups = names(cfg.labels.groups, "recipe.labels.groups")
    intents = names(cfg.labels.intents, "recipe.labels.intents")
    if cfg.labels.mode in ("judge", "rules") and (not set(groups) <= set(L.RULE_GROUPS)
                                                  or not set(intents) <= set(L.RULE_INTENTS)):
        raise ConfigError(f"recipe.labels: the rules (and the judge's fallback) know the groups "
                          f"{', '.join(L.RULE_GROUPS)} and intents {', '.join(L.RULE_INTENTS)}",
                          hint="use labels.mode=field for other labels")
    if cfg.labels.mode not in ("judge", "rules", "field"):
        raise ConfigError(f"recipe.labels.mode must be judge, rules or field, not {cfg.labels.mode!r}")
    return groups, intents


def stage_conversations(run) -> dict:
    cfg, d, lab = run.cfg, run.cfg.data, run.cfg.labels
    groups, intents = _label_names(cfg)
    bad = BadRows("conversations", d.max_bad_fraction, field="recipe.data.max_bad_fraction")

    def problem(rec):
        p = conversation_problem(rec)
        if p is None and lab.mode == "field":
            if rec.get(lab.group_field) not in groups or rec.get(lab.intent_field) not in intents:
                return "bad group or intent field"
        return p

    records, reports = read_records(data_path(cfg, "conversations"), problem, what="conversations")
    for rep in reports:
        bad.add_report(rep)
    bad.check(len(records) + bad.total_bad)
    convs = []
    for rec in records:
        cid = str(rec.get("id") or rec["_origin"].rsplit(":", 1)[-1])
        msgs = [{"role": m["role"], "content": m["content"]} for m in rec["messages"] if m["role"] != "system"]
        fields = {"field_group": rec[lab.group_field], "field_intent": rec[lab.intent_field]} \
            if lab.mode == "field" else {}
        convs.append({"id": cid, "origin": rec["_origin"], "messages": msgs, **fields})
    if d.limit:  # a seeded sample, kept in file order
        order = sorted(range(len(convs)), key=lambda k: _hash01(cfg.seed, "sample", convs[k]["id"], k))
        if d.balance and lab.mode != "field":  # the same number of each rule group (as far as they go)
            by_group = defaultdict(list)
            for k in order:
                by_group[L.rule_group(convs[k]["messages"])].append(k)
            share = d.limit // len(groups)
            first = [k for g in groups for k in by_group.get(g, [])[:share]]
            order = first + [k for k in order if k not in set(first)]
        keep = set(order[:d.limit])
        convs = [c for k, c in enumerate(convs) if k in keep]
    unparsed: Counter = Counter()
    judged: list = [None] * len(convs)
    if lab.mode == "judge":
        complete = run.completer("judge", temperature=0, max_tokens=lab.max_tokens)
        prompts = [[{"role": "user", "content": L.LABEL_PROMPT.format(
            conversation=L.render(c["messages"], d.max_chars, d.max_total_chars), groups=", ".join(groups),
            intents=", ".join(intents), g0=groups[0], i0=intents[0])}] for c in convs]
        judged = [L.parse_label(r, groups, intents) for r in complete.many(prompts)]
    rows = []
    for c, j in zip(convs, judged):
        if lab.mode == "field":
            g, i, by = c.pop("field_group"), c.pop("field_intent"), {"group": "field", "intent": "field"}
        else:
            g, i = L.rule_group(c["messages"]), L.rule_intent(c["messages"])
            by = {"group": "rules", "intent": "rules"}
            if j is not None:
                for key, value in (("group", j[0]), ("intent", j[1])):
                    if value is None:
                        unparsed[key] += 1
                    else:
                        by[key] = "judge"
                        g, i = (value, i) if key == "group" else (g, value)
        rows.append({**c, "group": g, "intent": i, "labelled_by": by,
                     "rule_group": L.rule_group(c["messages"]), "rule_intent": L.rule_intent(c["messages"]),
                     "split": "eval" if _hash01(cfg.seed, "split", c["id"]) < d.eval_fraction else "train"})
    run.write_jsonl("conversations.jsonl", rows)
    table = {g: {i: sum(r["group"] == g and r["intent"] == i for r in rows) for i in intents} for g in groups}
    agree = sum(r["group"] == r["rule_group"] for r in rows)
    return {"conversations": len(rows), "train": sum(r["split"] == "train" for r in rows),
            "eval": sum(r["split"] == "eval" for r in rows), "group_x_intent": table,
            "label_unparsed": dict(unparsed), "group_agrees_with_rules": agree, **bad.summary()}


# ----------------------------------------------------------------------------- extract
def stage_extract(run) -> dict:
    cfg, ex = run.cfg, run.cfg.extract
    if ex.mode not in ("judge", "rules", "both"):
        raise ConfigError(f"recipe.extract.mode must be judge, rules or both, not {ex.mode!r}")
    convs = [c for c in run.read_jsonl("conversations.jsonl") if c["split"] == "train"]
    judged: list = [None] * len(convs)
    unparsed = 0
    bad = BadRows("preference extraction", ex.max_unparsed, field="recipe.extract.max_unparsed")
    if ex.mode in ("judge", "both"):
        complete = run.completer("judge", temperature=0, max_tokens=ex.max_tokens)
        prompts = [[{"role": "user", "content": L.EXTRACT_PROMPT.format(
            conversation=L.render(c["messages"], cfg.data.max_chars, cfg.data.max_total_chars), k=ex.max_items)}]
            for c in convs]
        judged = [L.parse_statements(r, ex.max_items) for r in complete.many(prompts)]
        for c, j in zip(convs, judged):
            if j is None:
                unparsed += 1
                bad.add("unparsed judge reply", c["origin"])
        if convs:
            bad.check(len(convs))
    rows, sources = [], Counter()
    for c, j in zip(convs, judged):
        statements = []
        if j is not None:
            statements += [(s, "judge") for s in j]
        if ex.mode in ("rules", "both") or (ex.mode == "judge" and j is None):
            statements += [(s, "rules") for s in L.rule_preferences(c["messages"])]
        for s, by in statements:
            sources[by] += 1
            rows.append({"conversation": c["id"], "group": c["group"], "intent": c["intent"], "statement": s,
                         "source": by})
    run.write_jsonl("statements.jsonl", rows)
    return {"conversations": len(convs), "statements": len(rows), "by_source": dict(sources),
            "judge_unparsed": unparsed, **bad.summary()}


# ----------------------------------------------------------------------------- normalise
def stage_normalise(run) -> dict:
    n = run.cfg.normalise
    rows = run.read_jsonl("statements.jsonl")
    canon = {s: L.canonical(s) for s in sorted({r["statement"] for r in rows})}
    rewritten = unparsed = 0
    if n.canonicalise and canon:
        complete = run.completer("judge", temperature=0, max_tokens=n.max_tokens)
        keys = sorted({v for v in canon.values() if v})
        replies = complete.many([[{"role": "user", "content": L.CANON_PROMPT.format(statement=k)}] for k in keys])
        better = {}
        for k, r in zip(keys, replies):
            p = L.parse_canonical(r)
            unparsed += p is None
            better[k] = L.canonical(p) if p else k
            rewritten += bool(p) and better[k] != k
        canon = {s: better.get(c, c) for s, c in canon.items()}
    # an item is counted once per conversation (a conversation that says it twice is one mention)
    per_conv = {(r["conversation"], canon[r["statement"]]) for r in rows if canon[r["statement"]]}
    freq = Counter(c for _, c in per_conv)
    rep = L.cluster(freq, n.similarity)
    reps = sorted(set(rep.values()), key=lambda s: (-sum(freq[m] for m in rep if rep[m] == s), s))
    item_of = {r: f"i{k}" for k, r in enumerate(reps)}
    items = []
    for r in reps:
        members = sorted(((m, freq[m]) for m in rep if rep[m] == r), key=lambda x: (-x[1], x[0]))
        items.append({"item": item_of[r], "label": r, "members": [{"text": m, "count": c} for m, c in members],
                      "statements": sorted(s for s, c in canon.items() if c and rep.get(c) == r)})
    mentions = []
    for r in rows:
        c = canon[r["statement"]]
        mentions.append({**r, "canonical": c, "item": item_of[rep[c]] if c else None})
    run.write_jsonl("items.jsonl", items)
    run.write_jsonl("mentions.jsonl", mentions)
    return {"statements": len(rows), "distinct": len(canon), "canonical": len(freq), "items": len(items),
            "judge_rewritten": rewritten, "judge_unparsed": unparsed, "similarity": n.similarity}


# ----------------------------------------------------------------------------- contrast
def item_counts(mentions: list[dict], intent: str | None) -> dict[str, Counter]:
    """{group: {item: conversations mentioning it}} over one intent (None: every intent)."""
    seen = {(m["group"], m["conversation"], m["item"]) for m in mentions
            if m["item"] and (intent is None or m["intent"] == intent)}
    out: dict[str, Counter] = defaultdict(Counter)
    for g, _, item in seen:
        out[g][item] += 1
    return out


def stage_contrast(run) -> dict:
    cfg, c = run.cfg, run.cfg.contrast
    groups, intents = _label_names(cfg)
    mentions = run.read_jsonl("mentions.jsonl")
    labels = {it["item"]: it["label"] for it in run.read_jsonl("items.jsonl")}
    convs = [x for x in run.read_jsonl("conversations.jsonl") if x["split"] == "train"]
    background = Counter()
    for counts in item_counts(mentions, None).values():
        background.update(counts)
    rows, js = [], {}
    for intent in [ALL, *intents]:
        counts = item_counts(mentions, None if intent == ALL else intent)
        counts = {g: counts.get(g, Counter()) for g in groups}
        n_conv = {g: sum(x["group"] == g and intent in (ALL, x["intent"]) for x in convs) for g in groups}
        js[intent] = gpa_stats.js_summary(counts) if sum(map(sum, (v.values() for v in counts.values()))) else {}
        if not background:
            continue
        z = gpa_stats.contrast(counts, background, c.prior_strength or None)
        for g in groups:
            n_g = sum(counts[g].values())
            for item, s in z[g].items():
                if s["y_i"] + s["y_j"] < c.min_count:
                    continue
                rows.append({"group": g, "intent": intent, "item": item, "label": labels[item],
                             "count_group": int(s["y_i"]), "n_group": n_g, "count_rest": int(s["y_j"]),
                             "n_rest": sum(sum(counts[h].values()) for h in groups if h != g),
                             "conversations": n_conv[g], "alpha": round(s["alpha"], 6),
                             "delta": round(s["delta"], 6), "var": round(s["var"], 6), "z": round(s["z"], 4)})
    rows.sort(key=lambda r: (r["intent"] != ALL, r["intent"], r["group"], -r["z"], r["item"]))
    run.write_jsonl("contrast.jsonl", rows)
    run.write_json("contrast.json", {"js_divergence": js, "prior": "pooled item counts of every group",
                                     "prior_strength": c.prior_strength, "min_count": c.min_count})
    top = {g: [[r["label"], r["z"]] for r in rows if r["group"] == g and r["intent"] == ALL][:3] for g in groups}
    return {"rows": len(rows), "js_all": js.get(ALL, {}), "top": top}


# ----------------------------------------------------------------------------- rubrics
def rubric_items(rows: list[dict], group: str, intent: str, top_k: int, z_min: float) -> list[dict]:
    picked = [r for r in rows if r["group"] == group and r["intent"] == intent and r["z"] >= z_min]
    return sorted(picked, key=lambda r: (-r["z"], r["item"]))[:top_k]


def parse_numbered(reply: str, n: int) -> list[str | None]:
    """Line k of a numbered reply ('1. ...', '2) ...') for k = 1..n; None where it is missing or is
    not an instruction of at least three words."""
    import re

    found = {}
    for m in re.finditer(r"(?m)^\s*\**(\d+)[.):]\**\s+(.+?)\s*$", str(reply or "")):
        k = int(m.group(1))
        line = m.group(2).strip()
        if 1 <= k <= n and k not in found and len(line) <= 300 and len(re.findall(r"[^\W\d_]{2,}", line)) >= 3:
            found[k] = line  # an instruction: at least three words (not '1.' or a bare number)
    return [found.get(k) for k in range(1, n + 1)]


def stage_rubrics(run) -> dict:
    cfg, rb = run.cfg, run.cfg.rubrics
    groups, intents = _label_names(cfg)
    rows = run.read_jsonl("contrast.jsonl")
    items = {it["item"]: it for it in run.read_jsonl("items.jsonl")}
    convs = [x for x in run.read_jsonl("conversations.jsonl") if x["split"] == "train"]
    plan, skipped = [], {}
    for g in groups:
        for i in intents:
            n = sum(x["group"] == g and x["intent"] == i for x in convs)
            picked = rubric_items(rows, g, i, rb.top_k, rb.z_min)
            if n < rb.min_conversations:
                skipped[f"{g}/{i}"] = f"{n} conversations < min_conversations {rb.min_conversations}"
            elif not picked:
                skipped[f"{g}/{i}"] = f"no item with z >= {rb.z_min}"
            else:
                plan.append((g, i, n, picked))
    replies = [None] * len(plan)
    if rb.write_with_judge and plan:
        complete = run.completer("judge", temperature=0, max_tokens=rb.max_tokens)
        replies = complete.many([[{"role": "user", "content": RUBRIC_PROMPT.format(
            group=g, intent=i, items="\n".join(f"{k + 1}. {r['label']}" for k, r in enumerate(picked)))}]
            for g, i, _, picked in plan])
    doc = {"format": FORMAT, "groups": groups, "intents": intents, "rubrics": {g: {} for g in groups},
           "skipped": skipped, "provenance": {"contrast": "contrast.jsonl", "items": "items.jsonl",
                                              "top_k": rb.top_k, "z_min": rb.z_min,
                                              "prior_strength": cfg.contrast.prior_strength}}
    unparsed = 0
    for (g, i, n, picked), reply in zip(plan, replies):
        lines = parse_numbered(reply, len(picked)) if reply is not None else [None] * len(picked)
        unparsed += sum(x is None for x in lines) if reply is not None else 0
        criteria, by = [], []
        for r, line in zip(picked, lines):
            criteria.append(line or f"The user {r['label']}.")
            by.append("judge" if line else "label")
        doc["rubrics"][g][i] = {
            "criteria": criteria, "written_by": by, "conversations": n,
            "items": [{k: r[k] for k in ("item", "label", "z", "delta", "count_group", "n_group", "count_rest",
                                         "n_rest")} | {"members": items[r["item"]]["members"]} for r in picked]}
    run.write_json("rubrics.json", doc)
    return {"rubrics": len(plan), "criteria": sum(len(p[3]) for p in plan), "judge_unparsed_lines": unparsed,
            "skipped": skipped}


# ----------------------------------------------------------------------------- pairs (GPA-FT data)
def first_user(conv: dict, max_chars: int) -> str:
    text = next(m["content"] for m in conv["messages"] if m["role"] == "user")
    return text[:max_chars]


def pair_plan(convs: list[dict], doc: dict, per_rubric: int, seed, max_chars: int) -> list[dict]:
    """Per (group, intent) rubric, up to per_rubric train prompts of that group and intent (seeded),
    each with the item its rejected reply violates (the rubric's items in turn)."""
    out = []
    for g, by_intent in sorted(doc["rubrics"].items()):
        for i, rub in sorted(by_intent.items()):
            pool = [c for c in convs if c["group"] == g and c["intent"] == i]
            pool.sort(key=lambda c: _hash01(seed, "pairs", c["id"]))
            for k, c in enumerate(pool[:per_rubric]):
                j = k % len(rub["criteria"])
                out.append({"id": c["id"], "group": g, "intent": i, "prompt": first_user(c, max_chars),
                            "violated": rub["items"][j]["item"], "criterion": rub["criteria"][j]})
    return out


def keep_pair(verdict_ab, verdict_ba, rule: str) -> bool:
    """both_orders: chosen wins shown first (A) and shown second (B); one_order: wins in either; none:
    every candidate is kept unvalidated (for a judge too weak to give verdicts; say so in a report)."""
    if rule == "none":
        return True
    if rule == "both_orders":
        return verdict_ab == "A" and verdict_ba == "B"
    if rule == "one_order":
        return verdict_ab == "A" or verdict_ba == "B"
    raise ConfigError(f"recipe.pairs.filter must be both_orders, one_order or none, not {rule!r}")


def stage_pairs(run) -> dict:
    from jaxlm.eval.judges import judge_pairwise

    cfg, p = run.cfg, run.cfg.pairs
    doc = json.loads(run.path("rubrics.json").read_text())
    convs = [x for x in run.read_jsonl("conversations.jsonl") if x["split"] == "train"]
    plan = pair_plan(convs, doc, p.per_rubric, cfg.seed, cfg.data.max_chars)
    requests = []
    for c in plan:
        seed = int(_hash01(cfg.seed, "teacher", c["id"]) * 2 ** 31)
        params = {"temperature": p.temperature, "max_tokens": p.max_tokens, "seed": seed}
        user = [{"role": "user", "content": c["prompt"]}]
        requests.append(([{"role": "system", "content": rubric_system(doc, c["group"], c["intent"])}] + user, params))
        requests.append(([{"role": "system", "content": VIOLATE_SYSTEM.format(criterion=c["criterion"])}] + user,
                         params))
    results = run.ask("teacher", requests, f"teacher: chosen and rejected for {len(plan)} prompts")
    bad = BadRows("pair generation", p.max_bad_fraction, field="recipe.pairs.max_bad_fraction")
    cands = []
    for k, c in enumerate(plan):
        chosen, rejected = results[2 * k], results[2 * k + 1]
        texts = []
        for r in (chosen, rejected):
            if isinstance(r, Exception):
                bad.add("teacher error", f"{c['id']}: {str(r)[:120]}")
            elif not (r.text or "").strip():
                bad.add("empty reply", c["id"])
            else:
                texts.append(r.text)
        if len(texts) == 2 and texts[0].strip() != texts[1].strip():
            cands.append({**c, "chosen": texts[0], "rejected": texts[1]})
        elif len(texts) == 2:
            bad.add("chosen equals rejected", c["id"])
    if plan:
        bad.check(len(plan))
    keep_pair(None, None, p.filter)  # a bad filter name fails before the judge is asked
    complete = run.completer("judge", temperature=0, max_tokens=p.judge_max_tokens)
    items = [] if p.filter == "none" else [{"prompt": c["prompt"], "a": c["chosen"], "b": c["rejected"],
              "rubric": "\n".join(f"- {x}" for x in doc["rubrics"][c["group"]][c["intent"]]["criteria"])}
             for c in cands]
    verdicts = judge_pairwise(complete, items, seed=cfg.seed, verdict=cfg.judge.verdict, tie_margin=cfg.judge.tie_margin)["records"] if items else \
        [{"verdict_ab": None, "verdict_ba": None}] * len(cands)
    rows, pairs = [], []
    for c, v in zip(cands, verdicts):
        keep = keep_pair(v["verdict_ab"], v["verdict_ba"], p.filter)
        rows.append({**c, "verdict_ab": v["verdict_ab"], "verdict_ba": v["verdict_ba"], "kept": keep})
        if keep:
            pairs.append({"prompt": [{"role": "user", "content": c["prompt"]}],
                          "chosen": [{"role": "assistant", "content": c["chosen"]}],
                          "rejected": [{"role": "assistant", "content": c["rejected"]}],
                          "id": c["id"], "group": c["group"], "intent": c["intent"], "violated": c["violated"]})
    run.write_jsonl("candidates.jsonl", rows)
    run.write_jsonl("pairs.jsonl", pairs)
    unparsed = sum((r["verdict_ab"] is None) + (r["verdict_ba"] is None) for r in rows) if items else 0
    return {"planned": len(plan), "candidates": len(cands), "judge_unparsed": unparsed, "filter": p.filter,
            "chosen_wins_as_A": sum(r["verdict_ab"] == "A" for r in rows),
            "chosen_wins_as_B": sum(r["verdict_ba"] == "B" for r in rows), "pairs": len(pairs),
            "per_group": dict(Counter(x["group"] for x in pairs)), **bad.summary()}


# ----------------------------------------------------------------------------- align (GPA-FT)
def stage_align(run) -> dict:
    from jaxlm.recipes import training

    cfg, a = run.cfg, run.cfg.align
    pairs = run.read_jsonl("pairs.jsonl")
    groups, _ = _label_names(cfg)
    models, skipped = {}, {}
    if not a.enabled:
        run.write_json("ft_models.json", {"models": {}, "skipped": {g: "align.enabled is false" for g in groups}})
        return {"trained": 0}
    for g in groups:
        rows = [x for x in pairs if x["group"] == g]
        if len(rows) < a.min_pairs:
            skipped[g] = f"{len(rows)} pairs < min_pairs {a.min_pairs}"
            continue
        data = run.path(f"pairs-{g}.jsonl")
        run.write_jsonl(data.name, rows)
        out = training.finetune(run, f"ft-{g}", a, init=cfg.student.checkpoint, data=str(data), examples=len(rows),
                                preference=True)
        models[g] = out
    if not models and groups:
        raise DataError("align: no group has enough pairs to train an adapter: "
                        + "; ".join(f"{g}: {why}" for g, why in skipped.items()),
                        hint="more prompts per rubric (recipe.pairs.per_rubric), or align.enabled=false")
    run.write_json("ft_models.json", {"models": models, "skipped": skipped})
    return {"trained": len(models), "skipped": skipped,
            **{f"{g}_loss": m["last"].get("loss") for g, m in models.items()}}


RECIPE = Recipe("gpa", [
    Stage("conversations", stage_conversations, config=("data", "labels", "judge", "seed"),
          outputs=("conversations.jsonl",),
          help="read, sample and split the conversations; group and intent per conversation (judge, rules or field)"),
    Stage("extract", stage_extract, config=("extract", "judge"), outputs=("statements.jsonl",),
          help="per train conversation, the user's implicit preferences as statements (judge and/or rules)"),
    Stage("normalise", stage_normalise, config=("normalise", "judge"), outputs=("items.jsonl", "mentions.jsonl"),
          help="canonical statements clustered into items (TF-IDF cosine); the statement -> item mapping"),
    Stage("contrast", stage_contrast, config=("contrast",), outputs=("contrast.jsonl", "contrast.json"),
          help="log-odds z-scores (informative Dirichlet prior) per group and intent; JS divergence"),
    Stage("rubrics", stage_rubrics, config=("rubrics", "judge"), outputs=("rubrics.json",),
          help="top distinguishing items per (group, intent) written into a rubric, with their counts"),
    Stage("pairs", stage_pairs, config=("pairs", "teacher", "judge"), outputs=("candidates.jsonl", "pairs.jsonl"),
          help="GPA-FT pairs: rubric-following vs one-item-violating replies, kept when the judge agrees both ways"),
    Stage("align", stage_align, config=("student", "align"), outputs=("ft_models.json",),
          help="per group, LN-DPO with fresh LoRA adapters on that group's pairs"),
    Stage("eval", stage_eval, config=("eval", "judge", "student"),
          outputs=("eval_replies.jsonl", "eval.json", "report.md", "report.png"),
          help="rubric adherence of base, GPA-CT, GPA-FT and the cross-group control on held-out prompts"),
], doc=__doc__)
