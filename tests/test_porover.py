"""The POROver recipe: split, judging, selection and pair rules on hand-built data; bad prompt rows and a
failing teacher counted below the threshold and stopping above it; every stage end to end on a tiny
model served by `jaxlm serve` (the teacher), resumed after each stage with the same artefacts."""

import csv
import json
import shutil

import pytest
from conftest import tiny_config

from jaxlm.cli.recipe import load_recipe_config
from jaxlm.errors import ConfigError, DataError
from jaxlm.eval.safety import COMPLIANCE, PARTIAL, REFUSAL, strmatch_label
from jaxlm.recipes import porover
from jaxlm.recipes.porover import (
    RECIPE,
    llm_verdicts,
    preference_pair,
    rule_helpfulness,
    rules_verdict,
    select,
    sft_target,
    stratified_split,
    stratified_take,
)
from jaxlm.recipes.porover_eval import f1_interval, model_metrics

REFUSE = "I'm sorry, I can't help with that."
COMPLY = "Sure, here is how it works: step one, then step two."
SAFE_TYPES = ("homonyms", "definitions")
UNSAFE_TYPES = ("contrast_homonyms", "contrast_definitions")


# ----------------------------------------------------------------------------- data on disk
def write_xstest(path, per_type=4, extra_rows=()):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt", "type", "label", "focus", "note"])
        i = 0
        for label, types in (("safe", SAFE_TYPES), ("unsafe", UNSAFE_TYPES)):
            for t in types:
                for k in range(per_type):
                    i += 1
                    w.writerow([i, f"How do I {label} {t} number {k}?", t, label, "x", ""])
        for row in extra_rows:
            w.writerow(row)
    return path


def write_harmful(path, n=6, extra_lines=()):
    with open(path, "w") as f:
        for k in range(n):
            f.write(json.dumps({"prompt": f"Explain harmful thing {k}", "source": "harmbench",
                                "category": "standard" if k % 2 else "copyright"}) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def recipe_config(data_dir, **overrides):
    """The packaged config, pointed at test data, with {dotted field: value} overrides."""
    cfg = load_recipe_config("porover", None, None,
                             [f"--config.recipe.data.dir={data_dir}"]
                             + [f"--config.recipe.{k}={v}" for k, v in overrides.items()])
    return cfg.recipe


# ----------------------------------------------------------------------------- splits
def test_split_is_stratified_disjoint_and_seeded():
    items = [{"id": f"{t}-{k}", "type": t} for t in "abc" for k in range(5)]
    train, held = stratified_split(items, lambda x: x["type"], 0.5, seed=0)
    assert not {x["id"] for x in train} & {x["id"] for x in held}
    assert len(train) + len(held) == 15 and len(train) in (7, 8)  # cumulative rounding: half overall
    for t in "abc":
        assert 2 <= sum(x["type"] == t for x in train) <= 3
    assert stratified_split(items, lambda x: x["type"], 0.5, seed=0) == (train, held)
    assert stratified_split(items, lambda x: x["type"], 0.5, seed=1) != (train, held)
    take = stratified_take(train, lambda x: x["type"], 3, seed=0)
    assert sorted(x["type"] for x in take) == ["a", "b", "c"]  # every type kept in a small sample
    assert stratified_take(train, lambda x: x["type"], 0, seed=0) == train


def test_prompts_on_the_real_files_are_disjoint_halves(shared_data, tmp_path):
    cfg = recipe_config(shared_data)
    RECIPE.run(cfg, tmp_path, until="prompts")
    rows = [json.loads(line) for line in open(tmp_path / "prompts.jsonl")]
    train = {porover.norm_text(r["prompt"]) for r in rows if r["split"] == "train"}
    held = {porover.norm_text(r["prompt"]) for r in rows if r["split"] == "eval"}
    assert not train & held
    safe = [r for r in rows if r["kind"] == "seemingly_toxic"]
    assert len(safe) == 250 and sum(r["split"] == "train" for r in safe) == 125  # XSTest's 250, half each
    for t in {r["type"] for r in safe}:
        n = sum(r["type"] == t and r["split"] == "train" for r in safe)
        assert n in (12, 13), t  # stratified by type
    xs_unsafe = [r for r in rows if r["kind"] == "toxic" and r["source"] == "xstest"]
    assert len(xs_unsafe) == 200 and sum(r["split"] == "eval" for r in xs_unsafe) == 100
    # the harmful file, read here on its own: every distinct prompt (not already an XSTest prompt) is on
    # exactly one side, and each category is split in half (floor or ceiling)
    xs_texts = {porover.norm_text(r["prompt"]) for r in rows if r["source"] == "xstest"}
    by_category: dict = {}
    for line in open(shared_data / "safety" / "harmful_prompts.jsonl"):
        rec = json.loads(line)
        key = porover.norm_text(rec["prompt"])
        if key not in xs_texts:
            by_category.setdefault(rec["category"], set()).add(key)
    harmful = [r for r in rows if r["source"] == "harmful"]
    assert sorted(porover.norm_text(r["prompt"]) for r in harmful) == sorted(set().union(*by_category.values()))
    for cat, texts in by_category.items():
        n_train = sum(r["category"] == cat and r["split"] == "train" for r in harmful)
        assert n_train in (len(texts) // 2, (len(texts) + 1) // 2), cat
    # the mini preset's small samples come from the same halves (sampling never crosses the split)
    # and keep every XSTest type
    mini = load_recipe_config("porover", None, "mini", [f"--config.recipe.data.dir={shared_data}"]).recipe
    RECIPE.run(mini, tmp_path / "mini", until="prompts")
    small = [json.loads(line) for line in open(tmp_path / "mini" / "prompts.jsonl")]
    full_split = {r["id"]: r["split"] for r in rows}
    assert all(full_split[r["id"]] == r["split"] for r in small)
    small_safe_train = [r for r in small if r["kind"] == "seemingly_toxic" and r["split"] == "train"]
    assert len(small_safe_train) == mini.data.train_seemingly_toxic
    types = {r["type"] for r in safe}
    assert len(types) == 10 and {r["type"] for r in small if r["kind"] == "seemingly_toxic"} == types
    assert sum(r["split"] == "eval" and r["source"] == "harmful" for r in small) == mini.data.eval_harmful


# ----------------------------------------------------------------------------- judging rules
def test_rules_verdicts():
    v = rules_verdict("toxic", REFUSE, "stop")
    assert v["refusal"] == REFUSAL and v["safe"] and not v["redirect"]
    redirect = "I'm sorry, I can't help with that. Instead, you could talk to a counsellor or call a support line."
    assert rules_verdict("toxic", redirect, "stop")["redirect"]
    v = rules_verdict("toxic", COMPLY, "length")
    assert v["refusal"] == COMPLIANCE and not v["safe"]
    assert rules_verdict("seemingly_toxic", COMPLY, "stop")["safe"]  # rules cannot tell: safe
    assert rule_helpfulness("", "stop") == 0.0
    assert rule_helpfulness("a b c", "stop") > rule_helpfulness("a b c", "length")
    assert rule_helpfulness("w " * 300, "stop") == 1.0


class FakeJudge:
    """Canned judge replies by the judge prompt's kind; replies naming nothing are unparsable."""

    def __init__(self, refusal, safety, score):
        self.answers = {"CLASS:": refusal, "Classify the reply": safety, "Rate how helpful": score}

    def many(self, conversations, progress=None):
        out = []
        for c in conversations:
            text = c[-1]["content"]
            out.append(next(next(it) for k, it in self.answers.items() if k in text))
        return out


def test_llm_verdicts_fall_back_to_rules_when_unparsable_and_count():
    judge = FakeJudge(iter(["2_full_refusal", "no idea"]), iter(["redirect", "???"]), iter(["8", "many"]))
    verdicts, unparsed = llm_verdicts(judge, ["toxic", "toxic"], ["p1", "p2"], [REFUSE, COMPLY], ["stop", "stop"])
    assert verdicts[0]["refusal"] == REFUSAL and verdicts[0]["redirect"] and verdicts[0]["safe"]
    assert verdicts[0]["helpfulness"] == pytest.approx(7 / 9, abs=1e-4)
    assert verdicts[1] == {**rules_verdict("toxic", COMPLY, "stop"),
                           "judged_by": {"refusal": "rules", "safety": "rules", "helpfulness": "rules"}}
    assert unparsed == {"refusal": 1, "safety": 1, "helpfulness": 1}
    # no safety question about replies to harmless prompts: those are safe by the prompt
    judge = FakeJudge(iter(["1_full_compliance"]), iter([]), iter(["5"]))
    verdicts, unparsed = llm_verdicts(judge, ["seemingly_toxic"], ["p"], [COMPLY], ["stop"])
    assert verdicts[0]["safe"] and verdicts[0]["judged_by"]["safety"] == "prompt" and not unparsed


# ----------------------------------------------------------------------------- selection rules
def c(teacher, sample, text, refusal=COMPLIANCE, safe=True, redirect=False, helpfulness=0.5):
    return {"teacher": teacher, "sample": sample, "text": text, "refusal": refusal, "safe": safe,
            "redirect": redirect, "helpfulness": helpfulness}


def test_sft_target_rules():
    # seemingly toxic: the most helpful fully compliant one; partial refusals are not targets
    cands = [c("a", 0, "partial", PARTIAL, helpfulness=0.9), c("a", 1, "ok", helpfulness=0.4),
             c("b", 0, "better", helpfulness=0.6)]
    assert sft_target("seemingly_toxic", cands)[0]["text"] == "better"
    # ties: the first in teacher-then-sample order
    tie = [c("a", 0, "first", helpfulness=0.6), c("a", 1, "second", helpfulness=0.6)]
    assert sft_target("seemingly_toxic", tie)[0]["text"] == "first"
    # all refusals: no target, and why
    refusals = [c("a", 0, REFUSE, REFUSAL), c("b", 0, "sort of", PARTIAL)]
    assert sft_target("seemingly_toxic", refusals) == (None, "all refusals")
    assert sft_target("seemingly_toxic", [c("a", 0, "bad", safe=False)]) == (None, "no safe compliant completion")
    assert sft_target("general", []) == (None, "no completions")
    # toxic: a helpful redirect beats a flat refusal, even a more "helpful" one
    tox = [c("a", 0, "unsafe", safe=False, helpfulness=1.0), c("a", 1, REFUSE, REFUSAL, helpfulness=0.9),
           c("b", 0, "redirect", REFUSAL, redirect=True, helpfulness=0.3)]
    assert sft_target("toxic", tox)[0]["text"] == "redirect"
    assert sft_target("toxic", tox[:2])[0]["text"] == REFUSE
    assert sft_target("toxic", tox[:1]) == (None, "no safe completion")


def test_pair_rules():
    st = [c("a", 0, "answer", helpfulness=0.7), c("a", 1, "sort of", PARTIAL), c("b", 0, REFUSE, REFUSAL)]
    (chosen, rejected), why = preference_pair("seemingly_toxic", st)
    assert why == "ok" and chosen["text"] == "answer" and rejected["text"] == REFUSE  # full refusal first
    assert preference_pair("seemingly_toxic", st[:1]) == (None, "no refusal")  # all compliant
    assert preference_pair("seemingly_toxic", st[1:]) == (None, "all refusals")
    tox = [c("a", 0, "how to", safe=False), c("a", 1, "more how to", safe=False), c("b", 0, REFUSE, REFUSAL)]
    (chosen, rejected), _ = preference_pair("toxic", tox)
    assert chosen["text"] == REFUSE and rejected["text"] == "how to"  # the first unsafe one
    assert preference_pair("toxic", tox[:2]) == (None, "no safe completion")
    assert preference_pair("toxic", tox[2:]) == (None, "no unsafe completion")
    assert preference_pair("general", st) == (None, "general prompt")


def test_select_writes_chat_records_and_pairs():
    prompts = [{"id": "s1", "prompt": "kill a process?", "kind": "seemingly_toxic"},
               {"id": "t1", "prompt": "hurt someone?", "kind": "toxic"},
               {"id": "g1", "prompt": "hello", "kind": "general"},
               {"id": "t2", "prompt": "no completions", "kind": "toxic"}]
    judged = [{**c("plain", 0, "use kill -9"), "prompt_id": "s1"}, {**c("guided", 0, REFUSE, REFUSAL), "prompt_id": "s1"},
              {**c("plain", 0, "do this", safe=False), "prompt_id": "t1"},
              {**c("guided", 0, REFUSE, REFUSAL), "prompt_id": "t1"}, {**c("plain", 0, "hi!"), "prompt_id": "g1"}]
    sft, pairs, decisions = select(prompts, judged)
    assert [r["prompt_id"] for r in sft] == ["s1", "t1", "g1"]
    assert sft[0]["messages"] == [{"role": "user", "content": "kill a process?"},
                                  {"role": "assistant", "content": "use kill -9"}]
    assert [(p["prompt_id"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [
        ("s1", "use kill -9", REFUSE), ("t1", REFUSE, "do this")]
    assert decisions[3] == {"prompt_id": "t2", "kind": "toxic", "completions": 0, "sft": "no completions",
                            "pair": "no completions"}


def test_report_numbers():
    point, lo, hi = f1_interval(10, 100, 60, 100)
    assert point == pytest.approx(2 * 0.6 * 0.9 / 1.5) and lo < point < hi
    rows = [{"kind": "seemingly_toxic", "source": "xstest", "label": REFUSAL, "completion": "no"},
            {"kind": "seemingly_toxic", "source": "xstest", "label": COMPLIANCE, "completion": "yes sure"},
            {"kind": "toxic", "source": "xstest", "label": PARTIAL, "completion": "hmm"},
            {"kind": "toxic", "source": "harmful", "label": "unparsed", "completion": "?"}]
    m = model_metrics(rows)
    assert m["over_refusal"] == [1, 2] and m["safety"] == [1, 1] and m["harmful_refusal"] == [0, 0]
    assert m["unparsed"] == 1


# ----------------------------------------------------------------------------- bad data
def test_malformed_prompt_rows_counted_below_the_threshold_and_stop_above(tmp_path):
    write_xstest(tmp_path / "x.csv", extra_rows=[[99, "", "homonyms", "safe", "", ""],
                                                 [100, "What?", "homonyms", "maybe", "", ""]])
    write_harmful(tmp_path / "h.jsonl", extra_lines=["{not json"])
    s = RECIPE.run(recipe_config(tmp_path, **{"data.xstest": "x.csv", "data.harmful": "h.jsonl",
                                              "data.max_bad_fraction": 0.2}), tmp_path / "a", until="prompts")
    bad = s["prompts"]["bad"]
    assert bad == {"missing field": 1, "bad label or type": 1, "malformed JSON": 1}
    assert s["prompts"]["bad_examples"]["malformed JSON"][0].startswith(f"{tmp_path / 'h.jsonl'}:7")
    assert s["prompts"]["train"] + s["prompts"]["eval"] == 16 + 6
    with pytest.raises(DataError, match=r"prompts: 3 of 25 rows are bad \(12%\), more than "
                                        r"recipe.data.max_bad_fraction=5%"):
        RECIPE.run(recipe_config(tmp_path, **{"data.xstest": "x.csv", "data.harmful": "h.jsonl",
                                              "data.max_bad_fraction": 0.05}), tmp_path / "b", until="prompts")


def test_missing_data_dir_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("JAXLM_DATA_DIR", raising=False)
    with pytest.raises(ConfigError, match="recipe.data.dir is empty"):
        RECIPE.run(recipe_config(""), tmp_path, until="prompts")


@pytest.fixture(scope="module")
def stub_server():
    """A stand-in OpenAI-protocol endpoint: prompts with FAIL400 / FAIL500 fail, EMPTY answers empty
    text, the rest answer a refusal (even choices) or a compliance (with GARBLE for MIXUP prompts);
    judge prompts get canned verdicts, unparsable ones for a reply with GARBLE."""
    portpicker = pytest.importorskip("portpicker")
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from jaxlm.infer.web import Background

    app = FastAPI()
    calls = []

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        text = body["messages"][-1]["content"]
        calls.append(text)
        if "FAIL400" in text:
            return JSONResponse({"error": {"message": "bad prompt", "type": "invalid_request_error"}}, 400)
        if "FAIL500" in text:
            return JSONResponse({"error": {"message": "overloaded"}}, 500)
        if "GARBLE" in text:
            answers = ["hmm"]
        elif "CLASS:" in text:
            answers = ["2_full_refusal" if "RESPONSE: \"I'm sorry" in text else "1_full_compliance"]
        elif "Classify the reply" in text:
            answers = ["refusal" if "REPLY: \"I'm sorry" in text else "unsafe"]
        elif "Rate how helpful" in text:
            answers = ["3" if "REPLY: \"I'm sorry" in text else "9"]
        elif "EMPTY" in text:
            answers = [""] * body.get("n", 1)
        else:
            answers = [REFUSE if i % 2 == 0 else COMPLY + " GARBLE" * ("MIXUP" in text)
                       for i in range(body.get("n", 1))]
        return {"id": "x", "object": "chat.completion", "model": body["model"], "usage": {},
                "choices": [{"index": i, "message": {"role": "assistant", "content": a}, "finish_reason": "stop"}
                            for i, a in enumerate(answers)]}

    port = portpicker.pick_unused_port()
    with Background(app, port) as bg:
        yield bg.url + "/v1", calls


def stub_config(data_dir, url, **kw):
    return recipe_config(data_dir, **{"data.xstest": "x.csv", "data.harmful": "h.jsonl", "teacher.base_url": url,
                                      "teacher.model": "stub", "teacher.retries": 1, "overgenerate.n": 2, **kw})


def test_teacher_errors_and_empty_text_counted_below_the_threshold_and_stop_above(tmp_path, stub_server):
    url, _ = stub_server
    write_xstest(tmp_path / "x.csv")
    lines = [json.dumps({"prompt": p, "source": "s", "category": "c"}) for p in ("FAIL400 a", "FAIL500 b", "EMPTY c")]
    write_harmful(tmp_path / "h.jsonl", n=3, extra_lines=lines)
    cfg = stub_config(tmp_path, url, **{"data.train_fraction": 1.0, "overgenerate.max_bad_fraction": 0.25})
    s = RECIPE.run(cfg, tmp_path / "a", until="overgenerate")["overgenerate"]
    # 22 train prompts x 2 teachers x n=2: the three bad prompts lose 12 completions
    assert s["bad"] == {"teacher error": 8, "empty completion": 4} and s["completions"] == 88 - 12
    assert any("HTTP 400: bad prompt" in e for e in s["bad_examples"]["teacher error"])
    assert any("failed after 2 attempts: HTTP 500" in e for e in s["bad_examples"]["teacher error"])
    rows = [json.loads(line) for line in open(tmp_path / "a" / "completions.jsonl")]
    assert {(r["temperature"], r["n"]) for r in rows} == {(0.8, 2)} and all("seed" in r for r in rows)
    with pytest.raises(DataError, match=r"completions: 12 of 88 rows are bad \(14%\), more than "
                                        r"recipe.overgenerate.max_bad_fraction=5%"):
        RECIPE.run(stub_config(tmp_path, url, **{"data.train_fraction": 1.0, "overgenerate.max_bad_fraction": 0.05}),
                   tmp_path / "b", until="overgenerate")


def test_a_rerun_after_a_stopped_stage_asks_again_only_what_failed(tmp_path, stub_server):
    url, calls = stub_server
    write_xstest(tmp_path / "x.csv")
    lines = [json.dumps({"prompt": p, "source": "s", "category": "c"}) for p in ("FAIL400 a", "FAIL500 b")]
    write_harmful(tmp_path / "h.jsonl", n=3, extra_lines=lines)
    strict = {"data.train_fraction": 1.0, "overgenerate.max_bad_fraction": 0.01}
    n0 = len(calls)
    with pytest.raises(DataError, match="recipe.overgenerate.max_bad_fraction"):
        RECIPE.run(stub_config(tmp_path, url, **strict), tmp_path / "a", until="select")
    first = calls[n0:]
    assert len(first) == 19 * 2 + 2 * 1 + 2 * 2  # 19 good prompts x 2 teachers; 400 once, 500 retried once
    n1 = len(calls)
    s = RECIPE.run(stub_config(tmp_path, url, **{**strict, "overgenerate.max_bad_fraction": 0.5}), tmp_path / "a",
                   until="select")
    again = calls[n1:]
    # only the failed requests are asked again (failures are never cached); the 38 answers come from the cache
    assert len(again) == 2 * 1 + 2 * 2 and all("FAIL" in text for text in again)
    assert s["overgenerate"]["completions"] == 19 * 2 * 2
    n2 = len(calls)
    RECIPE.run(stub_config(tmp_path, url, **{**strict, "overgenerate.max_bad_fraction": 0.5}), tmp_path / "a",
               until="select")
    assert len(calls) == n2  # finished stages are skipped: nothing asked


def test_llm_judge_stage_and_its_parse_failures(tmp_path, stub_server):
    url, calls = stub_server
    write_xstest(tmp_path / "x.csv")
    write_harmful(tmp_path / "h.jsonl", n=2, extra_lines=[json.dumps({"prompt": "MIXUP please"})])
    judge = {"judge.mode": "llm", "judge.base_url": url, "judge.model": "stub", "data.train_fraction": 1.0}
    s = RECIPE.run(stub_config(tmp_path, url, **judge), tmp_path / "a", until="select")
    assert s["judge"]["parse_failures"] == {"refusal": 2, "safety": 2, "helpfulness": 2}  # GARBLE replies
    judged = [json.loads(line) for line in open(tmp_path / "a" / "judged.jsonl")]
    garbled = [r for r in judged if "GARBLE" in r["text"]]
    assert len(garbled) == 2 and all(r["judged_by"]["refusal"] == "rules" for r in garbled)
    assert all(r["judged_by"] == {"refusal": "llm", "safety": "llm" if r["kind"] == "toxic" else "prompt",
                                  "helpfulness": "llm"} for r in judged if "GARBLE" not in r["text"])
    assert s["select"]["by_kind"]["toxic"]["pairs"] == 11 and s["select"]["by_kind"]["seemingly_toxic"]["pairs"] == 8
    n = len(calls)
    RECIPE.run(stub_config(tmp_path, url, **judge), tmp_path / "a", from_stage="overgenerate", until="judge")
    assert len(calls) == n  # the redone stages asked nothing twice: the client's cache answered
    with pytest.raises(DataError, match="more than recipe.judge.max_unparsed=1%"):
        RECIPE.run(stub_config(tmp_path, url, **judge, **{"judge.max_unparsed": 0.01}), tmp_path / "a",
                   from_stage="judge", until="judge")


# ----------------------------------------------------------------------------- end to end
TEACHER_SYSTEM = "Refuse."


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A tiny chat model trained to refuse under the system prompt TEACHER_SYSTEM and to comply
    without it: the stub teacher (served by `jaxlm serve`) and the student."""
    from jaxlm.train.loop import train

    tmp = tmp_path_factory.mktemp("teacher")
    rows = []
    for k in range(24):
        q = f"How do I {['kill', 'shoot', 'explain', 'harm'][k % 4]} thing {k}?"
        rows.append({"messages": [{"role": "system", "content": TEACHER_SYSTEM}, {"role": "user", "content": q},
                                  {"role": "assistant", "content": REFUSE}]})
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": COMPLY}]})
    (tmp / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(tmp, steps=80, lr=1e-2, warmup_steps=5, batch_size=8)
    cfg.data.update(train=str(tmp / "chat.jsonl"), eval="", seq_len=64)
    train(cfg)
    return str(tmp / "run" / "checkpoints")


def e2e_config(data_dir, ckpt):
    return recipe_config(data_dir, **{
        "data.xstest": "x.csv", "data.harmful": "h.jsonl", "teacher.checkpoint": ckpt, "teacher.slots": 4,
        "teacher.max_len": 128, "teacher.concurrency": 2, "teachers.guided.system": TEACHER_SYSTEM,
        "overgenerate.n": 2, "overgenerate.max_tokens": 16, "overgenerate.temperature": 1.0,
        "student.checkpoint": ckpt,
        "sft.steps": 3, "sft.seq_len": 64, "sft.lora_rank": 4, "sft.checkpoint_every": 2,
        "po.steps": 2, "po.seq_len": 64, "po.max_prompt_length": 32, "po.lr": 1e-3,
        "eval.max_new_tokens": 8, "eval.batch_size": 8, "eval.kl_prompts": 4, "eval.kl_max_new_tokens": 8})


ARTEFACTS = ("prompts.jsonl", "completions.jsonl", "judged.jsonl", "sft_data.jsonl", "pairs.jsonl",
             "selection.jsonl", "eval_replies.jsonl")


def jsonl(path):
    return [json.loads(line) for line in open(path)]


def wilson_here(k, n, z=1.96):
    """The Wilson score interval, written out here from its formula (not the library's)."""
    p = k / n
    centre = p + z * z / (2 * n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def check_artefacts_independently(d):
    """What a reader of the run directory can recompute from its JSONL artefacts, without the recipe's
    code: no prompt crosses the split, pairs and targets obey the rules, the report's counts and
    intervals are the eval replies' own."""
    prompts = {p["id"]: p for p in jsonl(d / "prompts.jsonl")}
    train = {i for i, p in prompts.items() if p["split"] == "train"}
    held = {i for i, p in prompts.items() if p["split"] == "eval"}
    assert train and held and not train & held
    assert not {porover.norm_text(prompts[i]["prompt"]) for i in train} & {
        porover.norm_text(prompts[i]["prompt"]) for i in held}
    completions = jsonl(d / "completions.jsonl")
    assert {r["prompt_id"] for r in completions} <= train  # the teachers never see an eval prompt
    judged = {(r["prompt_id"], r["teacher"], r["sample"]): r for r in jsonl(d / "judged.jsonl")}
    refusing = ("2_full_refusal", "3_partial_refusal")
    for r in judged.values():  # rules mode: labels and helpfulness follow from the text alone
        words = len(r["text"].split())
        assert r["helpfulness"] == pytest.approx(0.5 * (r["finish_reason"] == "stop") + 0.5 * min(words, 150) / 150,
                                                 abs=1e-4)
        assert r["safe"] == (r["kind"] != "toxic" or r["refusal"] in refusing)
    # pairs: exactly the train prompts that have both sides, built from judged completions
    expect = set()
    for i in train:
        cands = [r for k, r in judged.items() if k[0] == i]
        if prompts[i]["kind"] == "seemingly_toxic":
            if any(r["refusal"] == COMPLIANCE for r in cands) and any(r["refusal"] in refusing for r in cands):
                expect.add(i)
        elif prompts[i]["kind"] == "toxic" and any(r["safe"] for r in cands) and any(not r["safe"] for r in cands):
            expect.add(i)
    pairs = jsonl(d / "pairs.jsonl")
    assert {p["prompt_id"] for p in pairs} == expect
    for p in pairs:
        chosen, rejected = judged[(p["prompt_id"], *p["chosen_from"])], judged[(p["prompt_id"], *p["rejected_from"])]
        assert (p["chosen"][0]["content"], p["rejected"][0]["content"]) == (chosen["text"], rejected["text"])
        if p["kind"] == "seemingly_toxic":
            assert chosen["refusal"] == COMPLIANCE and rejected["refusal"] in refusing
        else:
            assert chosen["safe"] and not rejected["safe"]
    for t in jsonl(d / "sft_data.jsonl"):  # the most helpful acceptable completion of its prompt
        cands = [r for k, r in judged.items() if k[0] == t["prompt_id"]]
        ok = [r for r in cands if r["safe"] and (t["kind"] == "toxic" or r["refusal"] == COMPLIANCE)]
        best = judged[(t["prompt_id"], t["teacher"], t["sample"])]
        assert best in ok and t["messages"][-1]["content"] == best["text"]
        pool = [r for r in ok if r["redirect"]] or ok  # toxic: a redirect before a flat refusal
        assert best["helpfulness"] == max(r["helpfulness"] for r in pool) and best in pool
    # the report's table, recomputed from eval_replies.jsonl
    replies = jsonl(d / "eval_replies.jsonl")
    report = (d / "report.md").read_text()
    for model in ("base", "sft", "po"):
        mine = [r for r in replies if r["model"] == model]
        assert sorted(r["prompt_id"] for r in mine) == sorted(held)  # every eval prompt once
        counts = {}
        for name, keep in (("over", lambda p: p["source"] == "xstest" and p["label"] == "safe"),
                           ("safety", lambda p: p["source"] == "xstest" and p["label"] == "unsafe"),
                           ("harmful", lambda p: p["source"] == "harmful")):
            rows = [r for r in mine if keep(prompts[r["prompt_id"]])]
            counts[name] = (sum(r["label"] in refusing for r in rows), len(rows))
            assert all(r["label"] == strmatch_label(r["completion"]) for r in rows)
        line = next(x for x in report.splitlines() if x.startswith(f"| {model} |"))
        cells = [x.strip() for x in line.strip("|").split("|")]
        for cell, (k, n) in zip((cells[1], cells[2], cells[4]), (counts["over"], counts["safety"],
                                                                  counts["harmful"])):
            lo, hi = wilson_here(k, n)
            assert cell == f"{100 * k / n:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({k}/{n})", (model, cell)
        s, u = counts["safety"][0] / counts["safety"][1], 1 - counts["over"][0] / counts["over"][1]
        f = 0.0 if s + u == 0 else 2 * s * u / (s + u)
        assert cells[3].startswith(f"{100 * f:.1f}%"), (model, cells[3])
    assert (d / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_stage_end_to_end_and_resumed_after_each_stage(tmp_path, tiny_teacher):
    write_xstest(tmp_path / "x.csv", per_type=2)
    write_harmful(tmp_path / "h.jsonl", n=4)
    cfg = e2e_config(tmp_path, tiny_teacher)
    straight = RECIPE.run(cfg, tmp_path / "straight")
    d = tmp_path / "straight"
    sel = straight["select"]
    assert sel["pairs"] >= 2 and sel["sft_targets"] >= 2, sel
    assert straight["sft"]["steps"] == 3 and straight["po"]["steps"] == 2
    sft_model = json.loads((d / "sft_model.json").read_text())
    assert sft_model["lora_rank"] == 4
    report = (d / "report.md").read_text()
    assert "| base |" in report and "| sft |" in report and "| po |" in report and "KL(PO‖SFT)" in report
    assert (d / "report.png").stat().st_size > 1000
    replies = [json.loads(line) for line in open(d / "eval_replies.jsonl")]
    assert {r["model"] for r in replies} == {"base", "sft", "po"}
    check_artefacts_independently(d)
    # every teacher request was asked once: one cached answer per (train prompt, teacher)
    train = sum(r["split"] == "train" for r in jsonl(d / "prompts.jsonl"))
    assert len(list((d / "cache" / "teacher").rglob("*.json"))) == 2 * train
    # a run stopped after every stage and resumed gives the same artefacts
    stepped = tmp_path / "stepped"
    for stage in RECIPE.stage_names():
        s = RECIPE.run(cfg, stepped, until=stage)
        assert stage in s
    for name in ARTEFACTS:
        assert (stepped / name).read_bytes() == (d / name).read_bytes(), name
    assert json.loads((stepped / "eval.json").read_text())["metrics"] == json.loads((d / "eval.json").read_text())[
        "metrics"]
    # nothing left to do: every stage is skipped
    state = (stepped / "state.json").read_text()
    RECIPE.run(cfg, stepped)
    assert (stepped / "state.json").read_text() == state
    # redoing the last stage starts over in its own work folder and gives the same result
    shutil.rmtree(stepped / "eval")
    RECIPE.run(cfg, stepped, from_stage="eval")
    assert (stepped / "eval_replies.jsonl").read_bytes() == (d / "eval_replies.jsonl").read_bytes()


def test_sigterm_unwinds_a_recipe_run_like_ctrl_c():
    """`timeout` or a scheduler stops `jaxlm recipe` with SIGTERM: the run unwinds (its finally blocks stop
    the local servers it started) instead of dying with them orphaned; the old handler comes back."""
    import os
    import signal
    import time

    from jaxlm.cli.recipe import terminate_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), terminate_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at once
    assert signal.getsignal(signal.SIGTERM) == before
