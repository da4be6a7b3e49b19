"""WildFeedback (Shi et al., arXiv 2408.15549): user satisfaction signals in real conversations ->
preference pairs -> DPO -> checklist-guided evaluation.

    jaxlm recipe wildfeedback --preset mini --config.recipe.data.dir=PATH/TO/data

Stages (see `jaxlm recipe wildfeedback --list`):
  conversations  read the conversations (bad rows, e.g. non-alternating roles or missing content,
                 counted with file:line), split them by conversation into train / eval (seeded)
  signals        SPUR categories of every user turn that follows an assistant turn, from the rule
                 classifier and the LLM judge (JSON verdict; unparsable replies counted, and those
                 turns fall back to the rules); histogram, share of conversations with a signal,
                 Cohen's kappa judge vs rules, and both against the hand-labelled gold set
  preferences    for each DSAT turn, the judge writes what the user wanted as a checklist
  pairs          train conversations: prompt = the conversation up to the reply that drew the DSAT,
                 rejected = that reply, chosen = the teacher's reply with the checklist in its system
                 prompt, kept only when the checklist judge prefers it in both orders; optionally SAT
                 pairs the other way round (chosen = the satisfying reply, rejected = a reply that
                 ignores the user's needs); yield at each filter
  align          DPO / LN-DPO with fresh LoRA adapters on the student, on the pairs
  eval           held-out conversations' DSAT turns: base and aligned replies, judged pairwise with
                 the turn's checklist and without it (win / tie / loss, 95% interval), reply lengths;
                 report.md + report.png

The signals the later stages use are recipe.signals.use: judge (the paper's; unparsable judge replies
fall back to the rules), rules, or both (a turn is DSAT only when both say so).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from jaxlm.data.sources import read_records
from jaxlm.errors import ConfigError
from jaxlm.recipes import spur
from jaxlm.recipes.base import BadRows, Recipe, Stage
from jaxlm.recipes.common import conversation_problem
from jaxlm.recipes.porover import data_path
from jaxlm.recipes.spur import context, render
from jaxlm.recipes.wildfeedback_eval import stage_eval

GOLD = Path(__file__).resolve().parent.parent / "assets" / "wildfeedback_gold" / "gold.jsonl"

CHECKLIST_SYSTEM = ("You are a helpful assistant. The user has stated preferences about your reply. Make sure your "
                    "reply meets every item of this checklist:\n{items}")
IGNORE_SYSTEM = ("You are an assistant that gives a short, generic reply. Do not follow the specific requirements, "
                 "details or constraints the user states.")


# ----------------------------------------------------------------------------- conversations (pure)
def in_eval(seed, conv_id: str, fraction: float) -> bool:
    h = int(hashlib.sha256(f"{seed}:split:{conv_id}".encode()).hexdigest()[:12], 16)
    return h / 16 ** 12 < fraction


def feedback_turns(messages: list[dict]) -> list[int]:
    """Indices of the user turns that follow an assistant turn (the ones that can carry feedback)."""
    return [j for j in range(1, len(messages))
            if messages[j]["role"] == "user" and messages[j - 1]["role"] == "assistant"]


# ----------------------------------------------------------------------------- signals (pure)
def final_categories(rules: list[str], judge: list[str] | None, use: str) -> tuple[list[str], str]:
    """(categories the later stages use, which classifier gave them)."""
    if use == "rules":
        return rules, "rules"
    if use == "judge":
        return (judge, "judge") if judge is not None else (rules, "rules")
    if use == "both":  # a polarity counts only where both classifiers give it
        if judge is None:
            return [], "both (judge unparsed)"
        if spur.polarity(rules) == spur.polarity(judge):
            return [c for c in spur.CATEGORIES if c in set(rules) | set(judge)], "both"
        return [], "both (disagree)"
    raise ConfigError(f"recipe.signals.use must be judge, rules or both, not {use!r}")


def signal_stats(turns: list[dict], key: str) -> dict:
    """Category histogram (turns per category), turns per polarity and the share of conversations
    with any signal / any SAT / any DSAT, from the categories under `key` (None entries skipped)."""
    hist, pol, convs = Counter(), Counter(), {}
    for t in turns:
        cats = t.get(key)
        if cats is None:
            continue
        hist.update(cats)
        p = spur.polarity(cats)
        pol[p] += 1
        c = convs.setdefault(t["conversation"], set())
        c.add(p)
    n = len({t["conversation"] for t in turns}) or 1
    return {"turns": sum(pol.values()), "histogram": {c: hist[c] for c in spur.CATEGORIES},
            "polarity": {p: pol[p] for p in spur.POLARITIES},
            "conversations": len(convs),
            "share_any": round(sum(bool(s - {"none"}) for s in convs.values()) / n, 4),
            "share_sat": round(sum("sat" in s for s in convs.values()) / n, 4),
            "share_dsat": round(sum("dsat" in s for s in convs.values()) / n, 4)}


# ----------------------------------------------------------------------------- pairs (pure)
def pair_candidates(convs: dict[str, dict], prefs: list[dict], signals: list[dict], *, keep: int, max_chars: int,
                    sat_pairs: bool) -> tuple[list[dict], Counter]:
    """One candidate per DSAT turn with a checklist (and per SAT turn when sat_pairs) of the train
    split: {kind, prompt (messages), original (the assistant turn before the feedback), checklist},
    and the counts of turns skipped, by reason. The original is the rejected side of a DSAT pair
    and the chosen side of a SAT pair."""
    out, skipped = [], Counter()
    wanted = [(p, "dsat") for p in prefs]
    if sat_pairs:
        wanted += [(s, "sat") for s in signals if s["polarity"] == "sat"]
    for row, kind in sorted(wanted, key=lambda x: (x[0]["conversation"], x[0]["message"], x[1])):
        conv = convs.get(row["conversation"])
        if conv is None or conv["split"] != "train":
            continue
        msgs, j = conv["messages"], row["message"]
        original = msgs[j - 1]["content"]
        if not original.strip():
            skipped[f"{kind}: empty assistant turn"] += 1
            continue
        out.append({"id": f"{row['conversation']}:{j}", "conversation": row["conversation"], "message": j,
                    "kind": kind, "prompt": context(msgs, j - 1, keep, max_chars),
                    "original": spur.clip(original, max_chars * 2), "checklist": row.get("checklist") or [],
                    "categories": row.get("categories", [])})
    return out, skipped


def keep_pair(verdict_ab: str | None, verdict_ba: str | None, rule: str) -> bool:
    """Does the judge prefer the new response (shown as A first, then as B)? both_orders: in both
    orders; one_order: in at least one, and against it in neither; none: always."""
    if rule == "none":
        return True
    first, second = verdict_ab == "A", verdict_ba == "B"
    if rule == "both_orders":
        return first and second
    if rule == "one_order":
        return (first or second) and verdict_ab != "B" and verdict_ba != "A"
    raise ConfigError(f"recipe.pairs.filter must be both_orders, one_order or none, not {rule!r}")


# ----------------------------------------------------------------------------- stage: conversations
def stage_conversations(run) -> dict:
    cfg, d = run.cfg, run.cfg.data
    bad = BadRows("conversations", d.max_bad_fraction, field="recipe.data.max_bad_fraction")
    records, reports = read_records(data_path(cfg, "conversations"), conversation_problem, max_bad_fraction=1.0,
                                    what="conversations")
    for rep in reports:
        bad.add_report(rep)
    bad.check(len(records) + bad.total_bad)
    rows, seen = [], Counter()
    for rec in records:
        cid = str(rec.get("id") or rec["_origin"].rsplit("/", 1)[-1])
        seen[cid] += 1
        if seen[cid] > 1:
            cid = f"{cid}#{seen[cid]}"
        split = "eval" if in_eval(cfg.seed, cid, d.eval_fraction) else "train"
        rows.append({"id": cid, "split": split, "origin": rec["_origin"], "messages": rec["messages"]})
    take = {"train": d.train_conversations, "eval": d.eval_conversations}
    out = []
    longer = sum(len(r["messages"]) > d.max_messages for r in rows) if d.max_messages else 0
    for split in ("train", "eval"):
        part = [r for r in rows if r["split"] == split and (not d.max_messages or len(r["messages"]) <= d.max_messages)]
        out += part[: take[split] or None]  # the file is shuffled already; its order is kept
    run.write_jsonl("conversations.jsonl", out)
    return {"read": len(records), "train": sum(r["split"] == "train" for r in out),
            "eval": sum(r["split"] == "eval" for r in out),
            "feedback_turns": sum(len(feedback_turns(r["messages"])) for r in out), "longer_than_max_messages": longer,
            **bad.summary()}


# ----------------------------------------------------------------------------- stage: signals
def _classify(run, items: list[tuple[str, str, str]]):
    """(rule categories, judge categories or None when unparsable, raw judge replies, failed requests)
    of (previous user request, assistant reply, user turn) triples."""
    s = run.cfg.signals
    rules = [spur.rule_categories(u, s.rule_max_chars, previous_request=r) for r, _, u in items]
    complete = run.completer("judge", temperature=0, max_tokens=run.cfg.judge.max_tokens)
    replies = complete.many([spur.judge_messages(a, u, s.judge_max_chars) for _, a, u in items]) if items else []
    return rules, [spur.parse_judge(r) for r in replies], replies, complete.failures


def stage_signals(run) -> dict:
    cfg, s = run.cfg, run.cfg.signals
    convs = run.read_jsonl("conversations.jsonl")
    turns = [{"conversation": c["id"], "message": j, "split": c["split"]}
             for c in convs for j in feedback_turns(c["messages"])]
    by_id = {c["id"]: c["messages"] for c in convs}
    items = []
    for t in turns:
        m, j = by_id[t["conversation"]], t["message"]
        items.append((m[j - 2]["content"] if j >= 2 else "", m[j - 1]["content"], m[j]["content"]))
    gold_path = Path(s.gold or GOLD)
    if not gold_path.is_file():
        raise ConfigError(f"recipe.signals.gold: {gold_path} is not a file")
    gold = [json.loads(line) for line in open(gold_path) if line.strip()]
    step = max(1, len(gold) // s.gold_turns) if s.gold_turns else 1
    asked = {g["id"] for g in gold[::step][: s.gold_turns or None]}  # spread over the file (the judge's share)
    gold_asked = [g for g in gold if g["id"] in asked]
    rules, judged, replies, failures = _classify(run, items + [(None, g["assistant"], g["user"]) for g in gold_asked])
    answers = {g["id"]: (jd, raw) for g, jd, raw in zip(gold_asked, judged[len(turns):], replies[len(turns):])}
    n = len(turns)
    bad = BadRows("judge verdicts", cfg.judge.max_unparsed, field="recipe.judge.max_unparsed")
    rows = []
    for t, (_, _, user), r, jd, raw in zip(turns, items, rules, judged, replies):
        cats, by = final_categories(r, jd, s.use)
        if jd is None:
            bad.add("unparsed judge reply", f"{t['conversation']}:{t['message']}: {raw[:80]!r}")
        rows.append({**t, "user": spur.clip(user, 300), "rules": r, "judge": jd, "judge_reply": raw[:400],
                     "categories": cats, "polarity": spur.polarity(cats), "by": by})
    run.write_jsonl("signals.jsonl", rows)
    gold_rows = []
    for g in gold:
        jd, raw = answers.get(g["id"], (None, None))
        gold_rows.append({"id": g["id"], "gold": g["categories"], "gold_polarity": g["polarity"],
                          "rules": spur.rule_categories(g["user"], s.rule_max_chars), "judge_asked": raw is not None,
                          "judge": jd, "judge_reply": None if raw is None else raw[:400]})
    run.write_jsonl("gold_eval.jsonl", gold_rows)
    pol = lambda cats: None if cats is None else spur.polarity(cats)  # noqa: E731
    agreement = {
        "judge_vs_rules": spur.agreement([pol(r["judge"]) for r in rows], [pol(r["rules"]) for r in rows]),
        "rules_vs_gold": spur.agreement([pol(g["rules"]) for g in gold_rows], [g["gold_polarity"] for g in gold_rows]),
        "judge_vs_gold": spur.agreement([pol(g["judge"]) for g in gold_rows if g["judge_asked"]],
                                        [g["gold_polarity"] for g in gold_rows if g["judge_asked"]]),
    }
    bad.check(n)
    stats = {k: signal_stats(rows, k) for k in ("rules", "judge", "categories")}
    run.console.print(f"[dim]signals[/dim] {n} turns; DSAT turns: rules {stats['rules']['polarity']['dsat']}, judge "
                      f"{stats['judge']['polarity']['dsat']}; kappa judge/rules {agreement['judge_vs_rules']['kappa']}, "
                      f"rules/gold {agreement['rules_vs_gold']['kappa']}, judge/gold {agreement['judge_vs_gold']['kappa']}")
    return {"turns": n, "gold_turns": len(gold_rows), "use": s.use, "stats": stats, "agreement": agreement,
            "judge_unparsed": sum(j is None for j in judged[:n]), "gold_judge_asked": len(gold_asked),
            "gold_judge_unparsed": sum(j is None for j in judged[n:]),
            "judge_request_failures": len(failures), **bad.summary()}


# ----------------------------------------------------------------------------- stage: preferences
def stage_preferences(run) -> dict:
    cfg, p = run.cfg, run.cfg.preferences
    convs = {c["id"]: c for c in run.read_jsonl("conversations.jsonl")}
    dsat = [s for s in run.read_jsonl("signals.jsonl") if s["polarity"] == "dsat"]
    msgs = []
    for s in dsat:
        m, j = convs[s["conversation"]]["messages"], s["message"]
        request = m[j - 2]["content"] if j >= 2 else ""
        msgs.append(spur.checklist_messages(request, m[j - 1]["content"], m[j]["content"], cfg.signals.judge_max_chars))
    complete = run.completer("judge", temperature=0, max_tokens=p.max_tokens)
    replies = complete.many(msgs) if msgs else []
    rows, sources = [], Counter()
    for s, raw in zip(dsat, replies):
        items = spur.parse_checklist(raw, max_items=p.max_items)
        source = "judge"
        if items is None:  # counted, and the user's own words stand in for the checklist
            items, source = [f"Do what the user asked next: {spur.clip(s['user'], 200)}"], "fallback"
        sources[source] += 1
        rows.append({"conversation": s["conversation"], "message": s["message"], "split": s["split"],
                     "categories": s["categories"], "checklist": items, "checklist_from": source,
                     "judge_reply": raw[:400]})
    run.write_jsonl("preferences.jsonl", rows)
    return {"dsat_turns": len(dsat), "checklists": dict(sources), "judge_request_failures": len(complete.failures),
            "train": sum(r["split"] == "train" for r in rows), "eval": sum(r["split"] == "eval" for r in rows)}


# ----------------------------------------------------------------------------- stage: pairs
def _request_seed(seed, key: str) -> int:
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16) % (2 ** 31)


def stage_pairs(run) -> dict:
    from jaxlm.eval.judges import judge_pairwise

    cfg, pc = run.cfg, run.cfg.pairs
    convs = {c["id"]: c for c in run.read_jsonl("conversations.jsonl")}
    cands, skipped = pair_candidates(convs, run.read_jsonl("preferences.jsonl"), run.read_jsonl("signals.jsonl"),
                                     keep=pc.context_messages, max_chars=pc.max_chars, sat_pairs=pc.sat_pairs)
    requests = []
    for c in cands:
        system = (CHECKLIST_SYSTEM.format(items="\n".join(f"- {x}" for x in c["checklist"])) if c["kind"] == "dsat"
                  else IGNORE_SYSTEM)
        requests.append(([{"role": "system", "content": system}, *c["prompt"]],
                         {"temperature": pc.temperature, "max_tokens": pc.max_tokens,
                          "seed": _request_seed(pc.seed, c["id"] + c["kind"])}))
    results = run.ask("teacher", requests, f"regenerating {len(requests)} replies") if requests else []
    bad = BadRows("regenerated replies", pc.max_bad_fraction, field="recipe.pairs.max_bad_fraction")
    made = []
    for c, res in zip(cands, results):
        if isinstance(res, Exception):
            bad.add("teacher error", f"{c['id']}: {str(res)[:120]}")
        elif not (res.text or "").strip():
            bad.add("empty regeneration", c["id"])
        elif res.text.strip() == c["original"].strip():
            skipped[f"{c['kind']}: regeneration equals the original"] += 1
        else:
            made.append({**c, "new": res.text})
    bad.check(len(cands))
    judge = run.completer("judge", temperature=0, max_tokens=cfg.judge.pairwise_max_tokens)
    items = [{"prompt": render(c["prompt"]), "a": c["new"], "b": c["original"],
              "checklist": c["checklist"] if c["kind"] == "dsat" else None} for c in made]
    verdicts = judge_pairwise(judge, items, verdict=cfg.judge.verdict, tie_margin=cfg.judge.tie_margin)["records"] if items else []
    rows, pairs = [], []
    for c, v in zip(made, verdicts):
        keep = keep_pair(v["verdict_ab"], v["verdict_ba"], pc.filter)
        rows.append({**c, "verdict_ab": v["verdict_ab"], "verdict_ba": v["verdict_ba"], "kept": keep})
        if keep:
            chosen, rejected = (c["new"], c["original"]) if c["kind"] == "dsat" else (c["original"], c["new"])
            pairs.append({"prompt": c["prompt"], "chosen": [{"role": "assistant", "content": chosen}],
                          "rejected": [{"role": "assistant", "content": rejected}], "id": c["id"], "kind": c["kind"],
                          "checklist": c["checklist"]})
    run.write_jsonl("candidates.jsonl", rows)
    run.write_jsonl("pairs.jsonl", pairs)
    yields = {}
    for kind in ("dsat", "sat") if pc.sat_pairs else ("dsat",):
        rk = [r for r in rows if r["kind"] == kind]
        yields[kind] = {"candidates": sum(c["kind"] == kind for c in cands),
                        "regenerated": len(rk),
                        "judged_both_orders": sum(r["verdict_ab"] is not None and r["verdict_ba"] is not None for r in rk),
                        "preferred_as_A": sum(r["verdict_ab"] == "A" for r in rk),
                        "preferred_as_B": sum(r["verdict_ba"] == "B" for r in rk),
                        "preferred_both_orders": sum(r["verdict_ab"] == "A" and r["verdict_ba"] == "B" for r in rk),
                        "kept": sum(r["kept"] for r in rk)}
    run.console.print(f"[dim]pairs[/dim] {len(pairs)} kept of {len(cands)} candidates ({pc.filter}); "
                      + json.dumps(yields))
    return {"pairs": len(pairs), "filter": pc.filter, "yield": yields, "skipped": dict(skipped),
            "judge_request_failures": len(judge.failures), **bad.summary()}


# ----------------------------------------------------------------------------- stage: align
def stage_align(run) -> dict:
    from jaxlm.recipes import training

    cfg = run.cfg
    pairs = run.read_jsonl("pairs.jsonl")
    out = training.finetune(run, "align", cfg.align, init=cfg.student.checkpoint, data=str(run.path("pairs.jsonl")),
                            examples=len(pairs), preference=True)
    run.write_json("aligned_model.json", out)
    last = out["last"]
    return {"steps": out["steps"], "pairs": len(pairs), "loss": last.get("loss"),
            "reward_accuracy": last.get("rewards/accuracies"), "lora_rank": out["lora_rank"]}


RECIPE = Recipe("wildfeedback", [
    Stage("conversations", stage_conversations, config=("data", "seed"), outputs=("conversations.jsonl",),
          help="read the conversations (bad rows with file:line), split train / eval by conversation"),
    Stage("signals", stage_signals, config=("signals", "judge"), outputs=("signals.jsonl", "gold_eval.jsonl"),
          help="SPUR SAT/DSAT categories of each user turn: rules and LLM judge; kappa; gold-set agreement"),
    Stage("preferences", stage_preferences, config=("preferences", "judge"), outputs=("preferences.jsonl",),
          help="the judge's checklist of what the user wanted, for each DSAT turn"),
    Stage("pairs", stage_pairs, config=("pairs", "teacher", "judge"), outputs=("candidates.jsonl", "pairs.jsonl"),
          help="chosen = checklist-guided regeneration, rejected = the DSAT reply; kept if preferred in both orders"),
    Stage("align", stage_align, config=("student", "align"), outputs=("aligned_model.json",),
          help="DPO / LN-DPO with LoRA from the student on the pairs"),
    Stage("eval", stage_eval, config=("eval", "pairs", "judge", "student"),
          outputs=("eval_replies.jsonl", "eval.json", "report.md", "report.png"),
          help="held-out conversations: aligned vs base, judged with and without the checklist; lengths; report"),
], doc=__doc__)
