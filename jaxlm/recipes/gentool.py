"""GenTool (He et al., arXiv 2502.18990): synthetic tool-use data for tools a model has never seen
(zero-to-one, weak-to-strong), two-stage training (rank the candidates, then call one), measured
with BFCL's AST rules on held-out tools.

    jaxlm recipe gentool --preset mini --config.recipe.data.dir=PATH/TO/shared/data

Stages (see `jaxlm recipe gentool --list`):
  tools        BFCL v4 question rows + possible answers (simple, multiple, live) and irrelevance rows;
               split by tool with a seeded hash of the tool name, so eval tools never appear in training
  variants     a weaker variant of every gold tool by rules (drop optional parameters, narrow enums,
               simplify the description; optionally a teacher's rewrite of the description), teacher
               paraphrases of the train queries (optional), and each query labelled "weak" (its gold
               call fits the weak schema) or "strong_only"
  scenarios    candidates = the gold tool + BM25 neighbours from the same split: zero-to-one (absent /
               present), weak-only, weak-to-strong, irrelevance; plain BFCL simple / multiple for eval
  format       chat records in `jaxlm serve`'s tool format: stage 1 answers the ranked candidate names,
               stage 2 the call as JSON
  stage1       LoRA SFT of the student on the ranking records
  stage2       SFT from stage 1 on the call records (two-stage)
  stage2_only  SFT from the student on the call records (the ablation; recipe.ablation=False skips it)
  eval         base, stage-2-only and two-stage on the held-out tools: tool selection, ranking top-1 and
               NDCG, BFCL AST accuracy, irrelevance; a `jaxlm serve` check through the openai package;
               report.md + PNG
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from pathlib import Path

from jaxlm.data.sources import read_records
from jaxlm.errors import ConfigError, DataError
from jaxlm.recipes import gentool_data as gd
from jaxlm.recipes.base import BadRows, Recipe, Stage
from jaxlm.recipes.bfcl_ast import norm_name
from jaxlm.recipes.gentool_eval import stage_eval


# ----------------------------------------------------------------------------- stage: tools
def data_path(cfg, name: str) -> str:
    if not name or Path(name).is_absolute():
        return name
    root = cfg.data.get("dir", "") or os.environ.get("JAXLM_DATA_DIR", "")
    if not root:
        raise ConfigError(f"recipe.data.dir is empty, so {name!r} has no folder",
                          hint="pass --config.recipe.data.dir=PATH (the folder with tools/) or set JAXLM_DATA_DIR")
    return str(Path(root) / name)


def _files(field: str) -> list[str]:
    return [f.strip() for f in str(field).split(",") if f.strip()]


def category_of(row_id: str) -> str:
    return row_id.split("-", 1)[0].rsplit("_", 1)[0]


def _read(path: str, problem, bad: BadRows, what: str) -> list[dict]:
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file", hint="check recipe.data.dir and the file names in recipe.data")
    records, reports = read_records(path, problem, max_bad_fraction=1.0, what=what)
    for rep in reports:
        bad.add_report(rep)
    return records


def read_rows(cfg, bad: BadRows) -> list[dict]:
    """Usable call rows (with their answer and gold tool) and irrelevance rows, in file order."""
    d = cfg.data
    rows = []
    for name in _files(d.calls):
        qpath = data_path(cfg, str(Path(d.tools_dir) / name))
        questions = _read(qpath, gd.row_problem, bad, "BFCL rows")
        answers = {a["id"]: a for a in _read(data_path(cfg, str(Path(d.tools_dir) / d.answers_dir / name)),
                                               gd.answer_problem, bad, "BFCL answers")}
        for q in questions:
            a = answers.get(q["id"])
            if a is None:
                bad.add("no answer", q["_origin"])
                continue
            gold = next(iter(a["ground_truth"][0]))
            target = next((f for f in q["function"] if norm_name(f["name"]) == norm_name(gold)), None)
            if target is None:
                bad.add("answer names no offered function", q["_origin"])
                continue
            rows.append({"id": q["id"], "category": category_of(q["id"]), "kind": "call", "question": q["question"][0],
                         "functions": q["function"], "answer": a["ground_truth"], "target": target["name"],
                         "origin": q["_origin"]})
    for name in _files(d.irrelevance):
        for q in _read(data_path(cfg, str(Path(d.tools_dir) / name)), gd.row_problem, bad, "BFCL irrelevance rows"):
            if not q["function"]:
                bad.add("no function", q["_origin"])
                continue
            rows.append({"id": q["id"], "category": category_of(q["id"]), "kind": "irrelevance",
                         "question": q["question"][0], "functions": q["function"], "answer": None,
                         "target": q["function"][0]["name"], "origin": q["_origin"]})
    return rows


def _take(rows: list[dict], n: int, seed, salt: str) -> list[dict]:
    """n rows (0 = all): a seeded sample taken round-robin over the categories (so a small sample keeps
    every category), in file order."""
    if not n or n >= len(rows):
        return rows
    queues = defaultdict(list)
    for i, r in enumerate(rows):
        queues[r["category"]].append(i)
    for cat in sorted(queues):
        gd.rng(seed, "take", salt, cat).shuffle(queues[cat])
    keep: set[int] = set()
    while len(keep) < n:
        for cat in sorted(queues):
            if queues[cat] and len(keep) < n:
                keep.add(queues[cat].pop(0))
    return [r for i, r in enumerate(rows) if i in keep]


def stage_tools(run) -> dict:
    cfg, d = run.cfg, run.cfg.data
    bad = BadRows("BFCL rows", d.max_bad_fraction, field="recipe.data.max_bad_fraction")
    rows = read_rows(cfg, bad)
    bad.check(len(rows) + bad.total_bad)
    too_big = Counter()
    kept = []
    for r in rows:
        if d.max_tool_chars and max(gd.spec_chars(f) for f in r["functions"]) > d.max_tool_chars:
            too_big[r["kind"]] += 1
            continue
        r["split"] = gd.tool_split(r["target"], cfg.seed, d.eval_fraction)
        kept.append(r)
    picked = []
    for split in ("train", "eval"):
        for kind in ("call", "irrelevance"):
            group = [r for r in kept if r["split"] == split and r["kind"] == kind]
            picked += _take(group, int(d.get(f"{split}_{'rows' if kind == 'call' else 'irrelevance'}", 0)), cfg.seed,
                            f"{split}/{kind}")
    catalogue: dict[str, dict] = {}
    for r in kept:
        for f in r["functions"]:
            key = norm_name(f["name"])
            if key not in catalogue:
                catalogue[key] = {"name": f["name"], "split": gd.tool_split(f["name"], cfg.seed, d.eval_fraction),
                                  "spec": f}
    run.write_jsonl("rows.jsonl", picked)
    run.write_jsonl("tools.jsonl", [catalogue[k] for k in sorted(catalogue)])
    gold = {s: len({norm_name(r["target"]) for r in picked if r["split"] == s and r["kind"] == "call"})
            for s in ("train", "eval")}
    overlap = {norm_name(r["target"]) for r in picked if r["split"] == "train"} & \
              {norm_name(r["target"]) for r in picked if r["split"] == "eval"}
    assert not overlap, overlap  # the split is by tool: no gold tool on both sides
    sizes = Counter(f"{r['split']}/{r['kind']}/{r['category']}" for r in picked)
    run.console.print("[dim]tools[/dim] " + ", ".join(f"{k} {v}" for k, v in sorted(sizes.items())))
    return {"rows": len(picked), "available": len(kept), "too_big": dict(too_big), "sizes": dict(sorted(sizes.items())),
            "gold_tools": gold, "catalogue": dict(Counter(t["split"] for t in catalogue.values())), **bad.summary()}


# ----------------------------------------------------------------------------- stage: variants
REWRITE_PROMPT = ("Rewrite this tool description so that it is shorter and more general. Reply with the new "
                  "description only.\n\nTool: {name}\nDescription: {description}")
PARAPHRASE_PROMPT = ("Paraphrase the following request. Keep every name, number and value exactly as it is. Reply "
                     "with the paraphrase only.\n\nRequest: {query}")


def _ask_texts(run, requests, what, bad: BadRows, origins) -> list[str | None]:
    out = []
    for res, origin in zip(run.ask("teacher", requests, what), origins):
        if isinstance(res, Exception):
            bad.add("teacher error", f"{origin}: {str(res)[:120]}")
            out.append(None)
        elif not (res.text or "").strip():
            bad.add("empty reply", origin)
            out.append(None)
        else:
            out.append(res.text.strip())
    return out


def stage_variants(run) -> dict:
    cfg, v = run.cfg, run.cfg.variants
    rows = run.read_jsonl("rows.jsonl")
    bad = BadRows("teacher replies", v.max_bad_fraction, field="recipe.variants.max_bad_fraction")
    weak = {}
    for r in rows:
        if r["kind"] != "call":
            continue
        spec = next(f for f in r["functions"] if f["name"] == r["target"])
        w, changes = gd.weaken(spec)
        weak.setdefault(norm_name(spec["name"]), {"name": spec["name"], "weak": w, "changes": changes, "by": "rules"})
    asked = 0
    if v.teacher_rewrite:
        keys = sorted(weak)
        reqs = [([{"role": "user", "content": REWRITE_PROMPT.format(name=weak[k]["name"],
                                                                     description=weak[k]["weak"]["description"])}],
                 {"temperature": 0.0, "max_tokens": v.max_tokens}) for k in keys]
        texts = _ask_texts(run, reqs, f"rewriting {len(keys)} weak descriptions", bad, keys)
        asked += len(keys)
        for k, t in zip(keys, texts):
            if t:
                weak[k]["weak"]["description"] = " ".join(t.split())[:300]
                weak[k]["by"] = "rules+teacher"
                weak[k]["changes"].append("teacher rewrote the description")
    out_rows = []
    para = [r for r in rows if r["split"] == "train" and r["kind"] == "call"] if v.paraphrases else []
    paraphrased: dict[str, list[str]] = defaultdict(list)
    if para:
        reqs = [([{"role": "user", "content": PARAPHRASE_PROMPT.format(query=r["question"][-1]["content"])}],
                 {"temperature": v.temperature, "max_tokens": v.max_tokens, "n": int(v.paraphrases),
                  "seed": int(gd._u(cfg.seed, "para", r["id"]) * 2 ** 31)}) for r in para]
        results = run.ask("teacher", reqs, f"{v.paraphrases} paraphrases x {len(para)} train queries")
        asked += len(para) * int(v.paraphrases)
        for r, res in zip(para, results):
            if isinstance(res, Exception):
                bad.add("teacher error", f"{r['id']}: {str(res)[:120]}", n=int(v.paraphrases))
                continue
            seen = {r["question"][-1]["content"].strip()}
            for ch in (res.response.get("choices") or [])[: int(v.paraphrases)]:
                t = " ".join(((ch.get("message") or {}).get("content") or "").split())
                if not t:
                    bad.add("empty reply", r["id"])
                elif t not in seen:
                    seen.add(t)
                    paraphrased[r["id"]].append(t)
    bad.check(asked)
    labels = Counter()
    for r in rows:
        variants = [(r, "bfcl")] + [({**r, "id": f"{r['id']}~p{i}",
                                      "question": r["question"][:-1] + [{"role": "user", "content": t}]}, "teacher")
                                    for i, t in enumerate(paraphrased.get(r["id"], []))]
        for row, source in variants:
            row = {**row, "query_source": source}
            if r["kind"] == "call":
                w = weak[norm_name(r["target"])]["weak"]
                row["solvable"], row["why"], _ = gd.solvability(r["answer"][0], w)
                labels[f"{r['split']}/{row['solvable']}"] += 1
            out_rows.append(row)
    run.write_jsonl("variants.jsonl", [weak[k] for k in sorted(weak)])
    run.write_jsonl("queries.jsonl", out_rows)
    rules = Counter(c.split(" of ")[0].replace("narrowed enum", "narrowed enums") for w in weak.values() for c in w["changes"])
    return {"weak_variants": len(weak), "rules": dict(rules), "unchanged": sum(not w["changes"] for w in weak.values()),
            "queries": len(out_rows), "paraphrases": sum(map(len, paraphrased.values())), "labels": dict(labels),
            **bad.summary()}


# ----------------------------------------------------------------------------- stage: scenarios
def stage_scenarios(run) -> dict:
    cfg, s = run.cfg, run.cfg.scenarios
    catalogue = run.read_jsonl("tools.jsonl")
    weak = {norm_name(w["name"]): w for w in run.read_jsonl("variants.jsonl")}
    pools = {split: gd.Neighbours([t["spec"] for t in catalogue if t["split"] == split]) for split in ("train", "eval")}
    out, unchanged = [], 0
    for r in run.read_jsonl("queries.jsonl"):
        if r["kind"] == "irrelevance":
            out += gd.scenarios_of(r, None, None, [], s.neighbours, cfg.seed, False)
            continue
        target = next(f for f in r["functions"] if f["name"] == r["target"])
        entry = weak[norm_name(r["target"])]
        w = entry["weak"]
        near = pools[r["split"]].of(target, s.neighbours, exclude=[w["name"]])
        if not entry["changes"]:
            unchanged += 1
            w = None
        out += gd.scenarios_of(r, target, w, near, s.neighbours, cfg.seed, with_plain=r["split"] == "eval")
    run.write_jsonl("scenarios.jsonl", out)
    sizes = Counter(f"{e['split']}/{e['scenario']}" for e in out)
    return {"examples": len(out), "sizes": dict(sorted(sizes.items())), "no_weak_variant": unchanged}


# ----------------------------------------------------------------------------- stage: format
def stage_format(run) -> dict:
    examples = [e for e in run.read_jsonl("scenarios.jsonl") if e["split"] == "train"]
    allowed = set(gd.SCENARIOS) if run.cfg.format.scenarios == "all" else set(_files(run.cfg.format.scenarios))
    unknown = allowed - set(gd.SCENARIOS)
    if unknown:
        raise ConfigError(f"recipe.format.scenarios names {sorted(unknown)}; choose from {', '.join(gd.SCENARIOS)}")
    stage1, stage2 = [], []
    for e in examples:
        if e["scenario"] in allowed:
            a, b = gd.records(e)
            stage1.append(a)
            stage2.append(b)
    run.write_jsonl("stage1.jsonl", stage1)
    run.write_jsonl("stage2.jsonl", stage2)
    return {"stage1": len(stage1), "stage2": len(stage2),
            "by_scenario": dict(sorted(Counter(r["scenario"] for r in stage2).items()))}


# ----------------------------------------------------------------------------- stages: training
def _finetune(run, name: str, section, init: str, data: str) -> dict:
    from jaxlm import checkpoint
    from jaxlm.data.tokenizer import load_tokenizer
    from jaxlm.recipes import training

    records = run.read_jsonl(data)
    tok = load_tokenizer(checkpoint.load_tokenizer_spec(run.cfg.student.checkpoint))
    rows = training.sft_rows(tok, records, section.seq_len) if records else 0
    out = training.finetune(run, name, section, init=init, data=str(run.path(data)), examples=len(records), rows=rows)
    run.write_json(f"{name}_model.json", out)
    return {"steps": out["steps"], "examples": len(records), "rows": rows, "loss": out["last"].get("loss")}


def stage_stage1(run) -> dict:
    return _finetune(run, "stage1", run.cfg.stage1, run.cfg.student.checkpoint, "stage1.jsonl")


def stage_stage2(run) -> dict:
    init = json.loads(run.path("stage1_model.json").read_text())["checkpoint"]
    return _finetune(run, "stage2", run.cfg.stage2, init, "stage2.jsonl")


def stage_stage2_only(run) -> dict:
    if not run.cfg.ablation:  # no ablation model: eval leaves it out
        run.write_json("stage2_only_model.json", {"checkpoint": None, "skipped": "recipe.ablation is False"})
        return {"skipped": True}
    return _finetune(run, "stage2_only", run.cfg.stage2, run.cfg.student.checkpoint, "stage2.jsonl")


def _variant_sections(cfg) -> list[str]:
    v = cfg.variants
    return ["variants", "seed"] + (["teacher"] if v.teacher_rewrite or v.paraphrases else [])


RECIPE = Recipe("gentool", [
    Stage("tools", stage_tools, config=("data", "seed"), outputs=("rows.jsonl", "tools.jsonl"),
          help="BFCL rows and answers, split by tool (seeded hash of the name): eval tools never train"),
    Stage("variants", stage_variants, config=_variant_sections, outputs=("variants.jsonl", "queries.jsonl"),
          help="weaker tool variants by rules (+ teacher rewrite), paraphrases, weak / strong-only labels"),
    Stage("scenarios", stage_scenarios, config=("scenarios", "seed"), outputs=("scenarios.jsonl",),
          help="BM25 candidates; zero-to-one, weak-only, weak-to-strong, irrelevance, plain BFCL (eval)"),
    Stage("format", stage_format, config=("format",), outputs=("stage1.jsonl", "stage2.jsonl"),
          help="chat records in serve's tool format: stage 1 = ranked names, stage 2 = the call as JSON"),
    Stage("stage1", stage_stage1, config=("student", "stage1"), outputs=("stage1_model.json",),
          help="LoRA SFT of the student on the ranking records"),
    Stage("stage2", stage_stage2, config=("stage2",), outputs=("stage2_model.json",),
          help="SFT from stage 1 on the call records (two-stage)"),
    Stage("stage2_only", stage_stage2_only, config=("student", "stage2", "ablation"), outputs=("stage2_only_model.json",),
          help="SFT from the student on the call records only (the ablation)"),
    Stage("eval", stage_eval, config=("eval", "student"), outputs=("eval_replies.jsonl", "eval.json", "report.md",
                                                                   "report.png"),
          help="base, stage-2-only and two-stage on held-out tools: selection, ranking, AST, irrelevance"),
], doc=__doc__)
