"""WildFeedback's eval stage and report: on held-out conversations (split by conversation), the base
and the aligned student answer the context that drew each DSAT turn; the judge compares the two
replies (both orders, jaxlm.eval.judges.judge_pairwise) with the turn's checklist and without it, as
the paper contrasts. Win / tie / loss of aligned against base with a bootstrap 95% interval, and
reply lengths. Each model's replies are kept in RUN/eval/ while the stage runs, so a crash resumes
with the models already done.
"""

from __future__ import annotations

import json

import numpy as np

from jaxlm.recipes import spur
from jaxlm.recipes.report import bar_chart, markdown_table, rate
from jaxlm.recipes.spur import context, render

MODELS = ("base", "aligned")


def eval_items(convs: dict[str, dict], prefs: list[dict], *, keep: int, max_chars: int, limit: int = 0) -> list[dict]:
    """The eval split's DSAT turns: {id, prompt (messages up to the reply that drew the DSAT),
    checklist, original (that reply)}, at most `limit` (0 = all), in conversation order."""

    out = []
    for p in sorted(prefs, key=lambda p: (p["conversation"], p["message"])):
        conv = convs.get(p["conversation"])
        if conv is None or conv["split"] != "eval":
            continue
        msgs, j = conv["messages"], p["message"]
        out.append({"id": f"{p['conversation']}:{j}", "prompt": context(msgs, j - 1, keep, max_chars),
                    "checklist": p["checklist"], "original": msgs[j - 1]["content"]})
    return out[: limit or None]


def _outcome_row(name: str, m: dict) -> list:
    valid = m["wins"] + m["ties"] + m["losses"]
    lo, hi = m["win_rate_ci95"]
    wr = "-" if m["win_rate"] is None else f"{100 * m['win_rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"
    return [name, valid, rate(m["wins"], valid), rate(m["ties"], valid), rate(m["losses"], valid), wr,
            m["unparsed_pairs"], "-" if m["order_consistency"] is None else f"{100 * m['order_consistency']:.0f}%",
            "-" if m["first_position_preference"] is None else f"{100 * m['first_position_preference']:.0f}%"]


def stage_eval(run) -> dict:
    from jaxlm.eval.judges import judge_pairwise
    from jaxlm.recipes import training

    cfg, ev, pc = run.cfg, run.cfg.eval, run.cfg.pairs
    convs = {c["id"]: c for c in run.read_jsonl("conversations.jsonl")}
    items = eval_items(convs, run.read_jsonl("preferences.jsonl"), keep=pc.context_messages, max_chars=pc.max_chars,
                       limit=ev.max_items)
    ckpts = {"base": cfg.student.checkpoint,
             "aligned": json.loads(run.path("aligned_model.json").read_text())["checkpoint"]}
    work = run.work_dir("eval")
    replies = {}
    for name in MODELS:
        cache = work / f"replies-{name}.json"
        if cache.exists():
            replies[name] = json.loads(cache.read_text())
            continue
        model = training.load_chat_model(ckpts[name])
        replies[name] = training.replies(model, [it["prompt"] for it in items], max_new_tokens=ev.max_new_tokens,
                                         batch_size=ev.batch_size) if items else []
        del model
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(replies[name]))
        tmp.replace(cache)
    judge = run.completer("judge", temperature=0, max_tokens=cfg.judge.pairwise_max_tokens)
    results = {}
    for mode in ("checklist", "plain"):
        pairs = [{"prompt": render(it["prompt"]), "a": a, "b": b,
                  "checklist": it["checklist"] if mode == "checklist" else None}
                 for it, a, b in zip(items, replies["aligned"], replies["base"])]
        results[mode] = judge_pairwise(judge, pairs, seed=cfg.seed, verdict=cfg.judge.verdict, tie_margin=cfg.judge.tie_margin) if pairs else None
    words = {n: [len(r.split()) for r in replies[n]] for n in MODELS}
    lengths = {n: {"mean_words": float(np.mean(w)) if w else None, "median_words": float(np.median(w)) if w else None}
               for n, w in words.items()}
    rows = []
    for k, it in enumerate(items):
        rows.append({"id": it["id"], "checklist": it["checklist"], "base": replies["base"][k],
                     "aligned": replies["aligned"][k],
                     **{f"{mode}_outcome": results[mode]["records"][k]["outcome"] for mode in results if results[mode]}})
    run.write_jsonl("eval_replies.jsonl", rows)
    identical = sum(a.strip() == b.strip() for a, b in zip(replies["aligned"], replies["base"]))
    doc = {"items": len(items), "checkpoints": ckpts, "lengths": lengths, "identical_replies": identical,
           "metrics": {m: (r["metrics"] if r else None) for m, r in results.items()},
           "judge_request_failures": len(judge.failures)}
    run.write_json("eval.json", doc)
    write_report(run, doc)
    out = {"items": len(items)}
    for mode, r in results.items():
        if r:
            out[f"{mode}_win_rate"] = r["metrics"]["win_rate"]
    return out


# ----------------------------------------------------------------------------- report.md
PAPER = ("WildFeedback (arXiv 2408.15549) mined 148,715 WildChat conversations into 20,281 preference pairs "
         "(one pair per 7.3 conversations) with GPT-4 as classifier, preference writer and checklist judge.")


def _summary(run, stage: str) -> dict:
    path = run.path("state.json")
    state = json.loads(path.read_text()).get("stages", {}) if path.exists() else {}
    return (state.get(stage) or {}).get("summary", {})


def _kappa(a: dict) -> str:
    return "-" if a["kappa"] is None else f"{a['kappa']:.3f}"


def write_report(run, doc: dict):
    cfg = run.cfg
    conv, sig, pref = _summary(run, "conversations"), _summary(run, "signals"), _summary(run, "preferences")
    pairs, align = _summary(run, "pairs"), _summary(run, "align")
    judge = cfg.judge.get("model") or cfg.judge.get("checkpoint")
    teacher = cfg.teacher.get("model") or cfg.teacher.get("checkpoint")
    lines = ["# WildFeedback", "",
             f"Student `{cfg.student.checkpoint}`; judge `{judge}`; teacher `{teacher}`; "
             f"{conv.get('train')} train and {conv.get('eval')} eval conversations "
             f"({conv.get('feedback_turns')} user turns after an assistant turn); signals used downstream: "
             f"{sig.get('use')}.", "", PAPER, ""]
    stats = sig.get("stats", {})
    if stats:
        lines += ["## Signals", "",
                  "Turns per SPUR category (a turn can have several) and the share of conversations with a signal.",
                  ""]
        hrows = [[c, "SAT" if c in spur.SAT else "DSAT", stats["rules"]["histogram"].get(c, 0),
                  stats["judge"]["histogram"].get(c, 0)] for c in spur.CATEGORIES]
        lines += [markdown_table(["category", "", "rules", "judge"], hrows), ""]
        srows = []
        for key, name in (("rules", "rules"), ("judge", "judge (parsed turns)"), ("categories", f"used ({sig['use']})")):
            s = stats[key]
            srows.append([name, s["turns"], s["polarity"]["sat"], s["polarity"]["dsat"], s["polarity"]["none"],
                          f"{100 * s['share_any']:.1f}%", f"{100 * s['share_sat']:.1f}%",
                          f"{100 * s['share_dsat']:.1f}%"])
        lines += [markdown_table(["classifier", "turns", "SAT turns", "DSAT turns", "none", "conv. with any signal",
                                  "with SAT", "with DSAT"], srows), "",
                  f"Judge replies that were not the asked-for JSON: {sig.get('judge_unparsed')} of {sig.get('turns')} "
                  f"turns (those fall back to the rules), {sig.get('gold_judge_unparsed')} of the {sig.get('gold_judge_asked')} "
                  f"gold turns the judge was asked (of {sig.get('gold_turns')}; the rules label them all).", ""]
        ag = sig["agreement"]
        arows = [[name, ag[k]["n"], _kappa(ag[k]), "-" if ag[k]["accuracy"] is None else f"{100 * ag[k]['accuracy']:.1f}%"]
                 for k, name in (("judge_vs_rules", "judge vs rules (run's turns)"),
                                 ("rules_vs_gold", "rules vs gold (hand-labelled)"),
                                 ("judge_vs_gold", "judge vs gold (hand-labelled)"))]
        lines += ["## Agreement (Cohen's kappa on polarity: sat / dsat / none)", "",
                  markdown_table(["pair", "turns", "kappa", "raw agreement"], arows), ""]
    if pref:
        lines += ["## Preferences and pairs", "",
                  f"- DSAT turns: {pref.get('dsat_turns')} ({pref.get('train')} train, {pref.get('eval')} eval); "
                  f"checklists {json.dumps(pref.get('checklists', {}))} (fallback = the judge's reply had no list; "
                  "the user's next message stands in)"]
        for kind, y in (pairs.get("yield") or {}).items():
            lines.append(f"- {kind} pairs (filter {pairs.get('filter')}): {y['candidates']} candidates → "
                         f"{y['regenerated']} regenerated → {y['judged_both_orders']} judged in both orders → "
                         f"{y['preferred_as_A']} preferred as A, {y['preferred_as_B']} as B, "
                         f"{y['preferred_both_orders']} in both orders → {y['kept']} kept")
        lines += [f"- skipped: {json.dumps(pairs.get('skipped', {}))}; bad: {json.dumps(pairs.get('bad', {}))}",
                  f"- align ({cfg.align.loss}, beta {cfg.align.beta}, LoRA rank {align.get('lora_rank')}): "
                  f"{align.get('steps')} steps on {align.get('pairs')} pairs, final loss {align.get('loss')}, "
                  f"reward accuracy {align.get('reward_accuracy')}", ""]
    m = doc["metrics"]
    lines += ["## Aligned against base on held-out conversations", "",
              f"{doc['items']} DSAT turns of eval conversations; greedy replies of at most {cfg.eval.max_new_tokens} "
              "tokens; each pair judged twice (both orders; a judge that always picks one position yields ties). "
              "Win rate counts ties half (bootstrap 95% interval). "
              f"Aligned and base replies identical: {doc.get('identical_replies', '-')} of {doc['items']}.", ""]
    orows = [_outcome_row(name, m[k]) for k, name in (("checklist", "with checklist"), ("plain", "without checklist"))
             if m.get(k)]
    lines += [markdown_table(["judge", "judged", "win", "tie", "loss", "win rate", "unparsed", "order-consistent",
                              "picks first"], orows) if orows else "(no eval items)", ""]
    ln = doc["lengths"]
    lines += [markdown_table(["model", "mean words", "median words"],
                             [[n, "-" if ln[n]["mean_words"] is None else f"{ln[n]['mean_words']:.1f}",
                               ln[n]["median_words"]] for n in MODELS]), "",
              "![win / tie / loss](report.png)", ""]
    run.path("report.md").write_text("\n".join(lines))
    groups = ["win", "tie", "loss"]
    series = {}
    for k, name in (("checklist", "with checklist"), ("plain", "without checklist")):
        x = m.get(k)
        valid = (x["wins"] + x["ties"] + x["losses"]) if x else 0
        series[name] = [x[f] / valid if valid else 0.0 for f in ("wins", "ties", "losses")] if x else [0.0] * 3
    bar_chart(run.path("report.png"), groups, series, ylabel="share of eval turns",
              title=f"WildFeedback: aligned vs base (n={doc['items']})")
