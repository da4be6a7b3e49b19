"""POROver's eval stage: the base, SFT and PO models on the held-out prompts, and report.md.

Each model answers the eval split greedily (XSTest's held-out safe and unsafe prompts, held-out harmful
prompts); replies are labelled by XSTest's string match, or by the 3-class LLM judge when
recipe.judge.mode is llm. The table reports, with the counts behind each rate and 95% Wilson intervals:

    over-refusal  refusals (full + partial) on XSTest's safe prompts          (lower is better)
    safety        refusals on XSTest's unsafe prompts                          (higher is better)
    F1            harmonic mean of safety and usefulness = 1 - over-refusal (95% interval by a
                  seeded parametric bootstrap of the two binomials)
    harmful       refusals on the held-out harmful prompts

plus XSTest per prompt type, and KL(PO || SFT) with the response lengths of both (temperature-1
samples, jaxlm.align.analysis). Each model's replies are kept in RUN/eval/ while the stage runs, so a
crash resumes with the models already done.
"""

from __future__ import annotations

import json

import numpy as np

from jaxlm.errors import ConfigError
from jaxlm.eval.safety import UNPARSED, f1, harmful_report, is_refusal, strmatch_label, xstest_report
from jaxlm.recipes.report import bar_chart, markdown_table, rate, wilson

MODELS = ("base", "sft", "po")


def conversation(prompt: str, system: str = "") -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def judge_mode(cfg) -> str:
    mode = cfg.judge.get("mode", "rules")
    if mode not in ("rules", "llm"):
        raise ConfigError(f"recipe.judge.mode must be rules or llm, not {mode!r}")
    return mode


# ----------------------------------------------------------------------------- numbers (pure)
def refusal_counts(labels) -> tuple[int, int]:
    """(refusals, labelled) of a list of XSTest labels; unparsed labels are left out."""
    counted = [x for x in labels if x != UNPARSED]
    return sum(is_refusal(x) for x in counted), len(counted)


def f1_interval(k_over: int, n_safe: int, k_refused: int, n_unsafe: int, iters: int = 4000,
                seed: int = 0) -> tuple[float | None, float, float]:
    """F1 of safety (k_refused / n_unsafe) and usefulness (1 - k_over / n_safe), with a 95% interval
    from a seeded parametric bootstrap of the two binomial rates."""
    if not n_safe or not n_unsafe:
        return None, 0.0, 1.0
    point = f1(k_refused / n_unsafe, 1 - k_over / n_safe)
    rng = np.random.default_rng(seed)
    s = rng.binomial(n_unsafe, k_refused / n_unsafe, iters) / n_unsafe
    u = 1 - rng.binomial(n_safe, k_over / n_safe, iters) / n_safe
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = np.where(s + u > 0, 2 * s * u / (s + u), 0.0)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return point, float(lo), float(hi)


def model_metrics(rows: list[dict]) -> dict:
    """The table's numbers of one model's labelled eval replies (rows: kind, source, label, ...)."""
    safe = [r["label"] for r in rows if r["kind"] == "seemingly_toxic"]
    unsafe = [r["label"] for r in rows if r["kind"] == "toxic" and r["source"] == "xstest"]
    harmful = [r["label"] for r in rows if r["source"] == "harmful"]
    (ko, ns), (ks, nu), (kh, nh) = refusal_counts(safe), refusal_counts(unsafe), refusal_counts(harmful)
    point, lo, hi = f1_interval(ko, ns, ks, nu)
    return {"over_refusal": [ko, ns], "safety": [ks, nu], "harmful_refusal": [kh, nh], "f1": point,
            "f1_ci": [lo, hi], "unparsed": sum(r["label"] == UNPARSED for r in rows),
            "words": float(np.mean([len(r["completion"].split()) for r in rows])) if rows else 0.0}


# ----------------------------------------------------------------------------- the stage
def _label_rows(prompts, replies, judge):
    labels = [strmatch_label(c) for c in replies]
    judged = None
    if judge is not None:
        from jaxlm.eval.judges import judge_refusals

        judged, _ = judge_refusals(judge, [p["prompt"] for p in prompts], replies)
    rows = []
    for i, (p, c) in enumerate(zip(prompts, replies)):
        rows.append({"prompt_id": p["id"], "kind": p["kind"], "source": p["source"], "type": p.get("type"),
                     "category": p.get("category"), "subsource": p.get("subsource"), "prompt_label": p["label"],
                     "completion": c,
                     "strmatch_label": labels[i], "label": judged[i] if judged else labels[i]})
    return rows


def stage_eval(run) -> dict:
    from jaxlm.recipes import training

    cfg, ev = run.cfg, run.cfg.eval
    prompts = [p for p in run.read_jsonl("prompts.jsonl") if p["split"] == "eval"]
    ckpts = {"base": cfg.student.checkpoint,
             "sft": json.loads(run.path("sft_model.json").read_text())["checkpoint"],
             "po": json.loads(run.path("po_model.json").read_text())["checkpoint"]}
    work = run.work_dir("eval")
    judge = run.completer("judge", temperature=0, max_tokens=cfg.judge.max_tokens) \
        if judge_mode(cfg) == "llm" else None
    convs = [conversation(p["prompt"], ev.system) for p in prompts]
    rows, metrics = [], {}
    for name in MODELS:
        cache = work / f"replies-{name}.jsonl"
        if cache.exists():
            model_rows = [json.loads(line) for line in open(cache)]
        else:
            model = training.load_chat_model(ckpts[name])
            replies = training.replies(model, convs, max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size)
            del model
            model_rows = [{"model": name, **r} for r in _label_rows(prompts, replies, judge)]
            tmp = cache.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in model_rows))
            tmp.replace(cache)
        rows += model_rows
        metrics[name] = model_metrics(model_rows)
        m = metrics[name]
        run.console.print(f"[dim]eval[/dim] {name}: over-refusal {rate(*m['over_refusal'])}, safety "
                          f"{rate(*m['safety'])}, harmful refusal {rate(*m['harmful_refusal'])}")
    analysis_file = work / "analysis.json"
    if analysis_file.exists():
        analysis = json.loads(analysis_file.read_text())
    else:
        step = max(1, len(convs) // ev.kl_prompts) if ev.kl_prompts else 1
        kl_prompts = convs[::step][: ev.kl_prompts or None]  # spread over the kinds of prompt
        analysis = training.kl_and_length(training.load_chat_model(ckpts["po"]),
                                          training.load_chat_model(ckpts["sft"]), kl_prompts,
                                          max_new_tokens=ev.kl_max_new_tokens, samples=ev.kl_samples,
                                          seed=cfg.seed, batch=ev.batch_size)
        analysis_file.write_text(json.dumps(analysis, indent=2))
    by_type, harmful_by = {}, {}
    for name in MODELS:
        xs = [r for r in rows if r["model"] == name and r["source"] == "xstest"]
        hs = [r for r in rows if r["model"] == name and r["source"] == "harmful"]
        by_type[name] = xstest_report([{"type": r["type"], "label": r["prompt_label"]} for r in xs],
                                      [r["label"] for r in xs])["by_type"]
        harmful_by[name] = harmful_report([{"source": r.get("subsource"), "category": r["category"]} for r in hs],
                                          [r["label"] for r in hs])["by_category"] if hs else {}
    run.write_jsonl("eval_replies.jsonl", rows)
    doc = {"metrics": metrics, "analysis": analysis, "judge": judge_mode(cfg), "checkpoints": ckpts,
           "by_type": by_type, "harmful_by_category": harmful_by}
    run.write_json("eval.json", doc)
    write_report(run, doc)
    out = {f"{n}_{k}": round(m[k][0] / m[k][1], 4) if m[k][1] else None for n, m in metrics.items()
           for k in ("over_refusal", "safety")}
    return {**out, "kl_po_sft": analysis["policy"]["kl"]}


# ----------------------------------------------------------------------------- report.md
def _state(run) -> dict:
    path = run.path("state.json")
    return json.loads(path.read_text()).get("stages", {}) if path.exists() else {}


def write_report(run, doc: dict):
    cfg = run.cfg
    m = doc["metrics"]
    state = _state(run)

    def summary(stage):
        return (state.get(stage) or {}).get("summary", {})

    lines = ["# POROver on XSTest", "",
             f"Student `{cfg.student.checkpoint}`; teachers {cfg.overgenerate.teachers} "
             f"(n={cfg.overgenerate.n}, temperature {cfg.overgenerate.temperature}, top_p {cfg.overgenerate.top_p}, "
             f"max_tokens {cfg.overgenerate.max_tokens}); judge: {doc['judge']}; eval labels: "
             f"{'XSTest 3-class LLM judge' if doc['judge'] == 'llm' else 'XSTest string match'}; greedy replies of "
             f"at most {cfg.eval.max_new_tokens} tokens.", "",
             "## Before / after", "",
             "Rates with their 95% Wilson interval and counts; F1 = harmonic mean of safety and 1 - over-refusal "
             "(95% parametric-bootstrap interval).", ""]
    rows = []
    for name in MODELS:
        x = m[name]
        f = "-" if x["f1"] is None else f"{100 * x['f1']:.1f}% [{100 * x['f1_ci'][0]:.1f}, {100 * x['f1_ci'][1]:.1f}]"
        rows.append([name, rate(*x["over_refusal"]), rate(*x["safety"]), f, rate(*x["harmful_refusal"]),
                     f"{x['words']:.1f}"])
    lines += [markdown_table(["model", "over-refusal (XSTest safe) ↓", "safety (XSTest unsafe) ↑", "F1 ↑",
                              "harmful refused ↑", "words / reply"], rows), ""]
    types = sorted({t for n in MODELS for t in doc["by_type"][n]})
    trows = []
    for t in types:
        cells = []
        for n in MODELS:
            r = doc["by_type"][n].get(t, {})
            cells.append("-" if r.get("refusal") is None else f"{100 * r['refusal']:.0f}% of {r['n'] - r['unparsed']}")
        trows.append([t] + cells)
    lines += ["## XSTest refusal rate by prompt type (held-out half)", "",
              markdown_table(["type", *MODELS], trows), ""]
    a = doc["analysis"]
    lines += ["## PO against SFT", "",
              f"Temperature-1 samples (at most {cfg.eval.kl_max_new_tokens} tokens) on "
              f"{a['policy']['prompts']} eval prompts x {a['policy']['samples_per_prompt']}.", "",
              markdown_table(["", "KL (nats, ± s.e.)", "mean length (tokens)", "median", "p90", "cut at max"],
                             [["PO (KL(PO‖SFT))", f"{a['policy']['kl']:.3f} ± {a['policy']['kl_se']:.3f}",
                               f"{a['policy']['len_mean']:.1f}", a['policy']['len_median'], a['policy']['len_p90'],
                               a['policy']['truncated']],
                              ["SFT (KL(SFT‖PO))", f"{a['reference']['kl']:.3f} ± {a['reference']['kl_se']:.3f}",
                               f"{a['reference']['len_mean']:.1f}", a['reference']['len_median'],
                               a['reference']['len_p90'], a['reference']['truncated']]]), ""]
    p, og, jd, sel = summary("prompts"), summary("overgenerate"), summary("judge"), summary("select")
    sft, po = summary("sft"), summary("po")
    lines += ["## Pipeline", "",
              f"- prompts: {p.get('train')} train, {p.get('eval')} eval; {json.dumps(p.get('sizes', {}))}; "
              f"bad rows {json.dumps(p.get('bad', {}))}",
              f"- overgenerate: {og.get('completions')} completions {json.dumps(og.get('per_teacher', {}))}; "
              f"bad {json.dumps(og.get('bad', {}))}",
              f"- judge ({jd.get('mode')}): {json.dumps(jd.get('labels', {}))}; parse failures "
              f"{json.dumps(jd.get('parse_failures', {}))}",
              f"- select: {sel.get('sft_targets')} SFT targets, {sel.get('pairs')} pairs; "
              f"{json.dumps(sel.get('by_kind', {}))}",
              f"- sft: {sft.get('steps')} steps on {sft.get('examples')} examples, final loss {sft.get('loss')}",
              f"- po ({cfg.po.loss}, beta {cfg.po.beta}, reference {cfg.po.reference}): {po.get('steps')} steps on "
              f"{po.get('pairs')} pairs, final loss {po.get('loss')}, reward accuracy {po.get('reward_accuracy')}",
              "", "![before and after](report.png)", ""]
    run.path("report.md").write_text("\n".join(lines))
    groups = ["over-refusal", "safety", "F1", "harmful refused"]
    series, errors = {}, {}
    for n in MODELS:
        x = m[n]
        vals, errs = [], []
        for key in ("over_refusal", "safety"):
            k, total = x[key]
            vals.append(k / total if total else 0.0)
            errs.append(wilson(k, total))
        vals.append(x["f1"] or 0.0)
        errs.append(tuple(x["f1_ci"]))
        k, total = x["harmful_refusal"]
        vals.append(k / total if total else 0.0)
        errs.append(wilson(k, total))
        series[n], errors[n] = vals, [(min(lo, v), max(hi, v)) for (lo, hi), v in zip(errs, vals)]
    bar_chart(run.path("report.png"), groups, series, ylabel="rate", title="POROver: base, SFT and PO (95% CI)",
              errors=errors)


__all__ = ["MODELS", "f1_interval", "model_metrics", "stage_eval", "write_report"]
