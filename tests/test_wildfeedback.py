"""The WildFeedback recipe: the SPUR rule classifier on hand-written turns (every category, negations),
Cohen's kappa against a hand computation, judge JSON and checklist parsing with malformed output,
pair construction edge cases, bad conversation rows with file:line; every stage on a stub judge and
teacher served over HTTP, resumed with the same artefacts and no request paid twice; align and eval
on a tiny model."""

import json

import pytest
from conftest import tiny_config

from jaxlm.cli.recipe import load_recipe_config
from jaxlm.errors import DataError
from jaxlm.recipes import spur
from jaxlm.recipes.wildfeedback import (
    GOLD,
    RECIPE,
    context,
    feedback_turns,
    final_categories,
    keep_pair,
    pair_candidates,
    signal_stats,
)


# ----------------------------------------------------------------------------- rules
@pytest.mark.parametrize("turn, expected", [
    ("Thank you so much!", ["Gratitude"]),
    ("Oh I see now, I learned something today", ["Learning"]),
    ("I ran it and it works now.", ["Compliance"]),
    ("This is perfect.", ["Praise"]),
    ("haha that one made me laugh", ["Humor"]),
    ("Got it. What about the second step?", ["Acknowledgment"]),
    ("That's all I needed, bye!", ["Positive Closure"]),
    ("Closer, but the date format is still off", ["Getting There"]),
    ("This answer is useless.", ["Negative Feedback"]),
    ("Try again please.", ["Revision"]),
    ("The capital of Australia is Canberra, not Sydney: your answer is wrong.", ["Factual Error"]),
    ("Can you browse the web and tell me today's price?", ["Unrealistic Expectation"]),
    ("I asked for Python, not Java.", ["Ignored"]),
    ("This is worse than before.", ["Lower Quality"]),
    ("Could you elaborate on the second point?", ["Insufficient Detail"]),
    ("Too long. Make it in bullet points.", ["Style"]),
    # negations flip or cancel a cue
    ("not bad, thanks", ["Gratitude", "Praise"]),
    ("not great, to be honest", ["Negative Feedback"]),
    ("it didn't work", ["Factual Error"]),
    ("No error this time, thank you", ["Gratitude"]),
    ("That's not wrong, thanks", ["Gratitude"]),
    # no cue at all, and "continue" after a cut-off reply
    ("What is the capital of France?", []),
    ("continue", []),
])
def test_rule_classifier_on_hand_written_turns(turn, expected):
    assert spur.rule_categories(turn) == expected


def test_rules_cover_every_category_and_no_engagement_needs_the_previous_request():
    assert spur.rule_categories("Write a poem about cats.", previous_request="write a poem about cats") == [
        "No Engagement"]
    assert spur.rule_categories("Write a poem about dogs.", previous_request="write a poem about cats") == []
    assert spur.rule_categories("continue", previous_request="continue") == []  # more of a cut-off reply
    # only the start and end of a long turn are read: an 'error' in the middle of pasted code is not a cue
    pasted = "Here is my code:\n" + "x = 1\n" * 200 + "raise error\n" + "y = 2\n" * 200 + "what does it do?"
    assert spur.rule_categories(pasted) == []
    assert spur.polarity(["Gratitude", "Style"]) == "dsat" and spur.polarity(["Praise"]) == "sat"
    assert spur.polarity([]) == "none" and len(spur.CATEGORIES) == 18


# ----------------------------------------------------------------------------- kappa
def test_cohen_kappa_against_a_hand_computation():
    a = ["sat", "sat", "dsat", "none", "dsat", "none", "sat", "dsat", "none", "none"]
    b = ["sat", "dsat", "dsat", "none", "dsat", "sat", "sat", "none", "none", "none"]
    # p_o = 7/10; marginals a (3 sat, 3 dsat, 4 none), b (3, 3, 4): p_e = (9 + 9 + 16) / 100 = 0.34;
    # kappa = (0.7 - 0.34) / (1 - 0.34) = 6/11
    assert spur.cohen_kappa(a, b) == pytest.approx(6 / 11)
    assert spur.cohen_kappa(a, a) == pytest.approx(1.0)
    assert spur.cohen_kappa(["sat"] * 4, ["sat"] * 4) == 1.0  # one class on both sides: p_e = 1
    # systematic disagreement on two balanced classes: p_o 0, p_e 0.5 -> -1
    assert spur.cohen_kappa(["sat", "dsat"], ["dsat", "sat"]) == pytest.approx(-1.0)
    assert spur.cohen_kappa([], []) is None
    with pytest.raises(ValueError):
        spur.cohen_kappa(["sat"], [])
    ag = spur.agreement(a[:3] + [None], b[:3] + ["none"])  # unparsed (None) left out, and counted
    assert ag["n"] == 3 and ag["left_out"] == 1 and ag["accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    assert ag["confusion"] == {"dsat>dsat": 1, "sat>dsat": 1, "sat>sat": 1}


# ----------------------------------------------------------------------------- judge parsing
@pytest.mark.parametrize("reply, expected", [
    ('{"sat": ["Gratitude"], "dsat": ["Style"]}', ["Gratitude", "Style"]),
    ('Sure! ```json\n{"sat": [], "dsat": ["factual error", "REVISION"]}\n```', ["Revision", "Factual Error"]),
    ('{"sat": "Praise", "dsat": []}', ["Praise"]),
    ('{"sat": [], "dsat": []}', []),
    ('["Humor"]', ["Humor"]),
    ('{"sat": ["Gratitude", "Bogus"]}', ["Gratitude"]),
    ("The user is satisfied because they say thanks.", None),  # no JSON: unparsed, not guessed
    ('{"sat": ["Gratitude"', None),  # cut off
    ('{"answer": "Gratitude"}', None),  # no sat / dsat keys
    ('["Bogus", "Other"]', None),  # names no category at all
    ('{"sat": 3}', None),
    ("", None),
])
def test_judge_json_parsing(reply, expected):
    assert spur.parse_judge(reply) == expected


def test_checklist_parsing():
    assert spur.parse_checklist('Here: ["shorter", "use Python 3"]') == ["shorter", "use Python 3"]
    assert spur.parse_checklist('{"checklist": ["cite sources"]}') == ["cite sources"]
    assert spur.parse_checklist("- shorter\n- friendlier tone\n") == ["shorter", "friendlier tone"]
    assert spur.parse_checklist("1. one\n2) two") == ["one", "two"]
    assert spur.parse_checklist("The user wanted something else.") is None
    assert spur.parse_checklist("[]") is None
    assert len(spur.parse_checklist(json.dumps([f"item {i}" for i in range(10)]), max_items=4)) == 4


def test_the_gold_set_is_well_formed():
    rows = [json.loads(line) for line in open(GOLD)]
    assert len(rows) >= 60 and len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert set(r["categories"]) <= set(spur.CATEGORIES) and r["polarity"] == spur.polarity(r["categories"])
        assert r["user"].strip() and "assistant" in r
    assert {r["polarity"] for r in rows} == {"sat", "dsat", "none"}


# ----------------------------------------------------------------------------- pairs (pure)
def msgs(*texts):
    return [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(texts)]


def test_feedback_turns_and_context():
    m = msgs("q1", "a1", "q2", "a2", "q3")
    assert feedback_turns(m) == [2, 4]  # the first user turn follows no reply: never a signal
    assert context(m, 4, keep=3, max_chars=100) == m[1:4][1:]  # last 3 = a1 q2 a2 -> must start on a user turn
    assert context(m, 5, keep=3, max_chars=100) == m[2:5]
    assert context(m, 3, keep=0, max_chars=100) == m[:3]
    sys = [{"role": "system", "content": "be brief"}] + m
    assert context(sys, 6, keep=1, max_chars=100) == [sys[0], sys[5]]
    assert context(msgs("x" * 50), 1, keep=1, max_chars=20)[0]["content"] == "x" * 10 + " [...] " + "x" * 10


def conv(cid, messages, split="train"):
    return {"id": cid, "split": split, "messages": messages}


def pref(cid, j, checklist=("shorter",)):
    return {"conversation": cid, "message": j, "checklist": list(checklist), "categories": ["Style"]}


def test_pair_candidates_edge_cases():
    convs = {
        # consecutive DSATs: each gives a candidate with its own prompt
        "c1": conv("c1", msgs("q", "long answer", "shorter please", "still long", "even shorter!")),
        # an empty assistant turn: nothing to reject, counted
        "c2": conv("c2", msgs("q", "", "that is wrong")),
        # an eval conversation: never a training pair
        "c3": conv("c3", msgs("q", "a", "wrong"), split="eval"),
    }
    prefs = [pref("c1", 2), pref("c1", 4), pref("c2", 2), pref("c3", 2)]
    sat = [{"conversation": "c1", "message": 4, "polarity": "sat", "categories": ["Praise"]}]
    cands, skipped = pair_candidates(convs, prefs, sat, keep=0, max_chars=100, sat_pairs=False)
    assert [(c["id"], c["kind"]) for c in cands] == [("c1:2", "dsat"), ("c1:4", "dsat")]
    assert cands[0]["prompt"] == msgs("q") and cands[0]["original"] == "long answer"
    assert cands[1]["prompt"] == msgs("q", "long answer", "shorter please") and cands[1]["original"] == "still long"
    assert skipped == {"dsat: empty assistant turn": 1}
    cands, _ = pair_candidates(convs, prefs, sat, keep=0, max_chars=100, sat_pairs=True)
    assert [(c["id"], c["kind"]) for c in cands] == [("c1:2", "dsat"), ("c1:4", "dsat"), ("c1:4", "sat")]
    assert cands[2]["checklist"] == [] and cands[2]["original"] == "still long"


def test_keep_pair_rules():
    assert keep_pair("A", "B", "both_orders") and not keep_pair("A", "A", "both_orders")
    assert not keep_pair("A", None, "both_orders")
    assert keep_pair("A", "tie", "one_order") and keep_pair(None, "B", "one_order")
    assert not keep_pair("A", "A", "one_order") and not keep_pair("tie", "tie", "one_order")
    assert keep_pair(None, None, "none")


def test_final_categories_and_stats():
    assert final_categories(["Gratitude"], None, "judge") == (["Gratitude"], "rules")  # unparsed: the rules
    assert final_categories(["Gratitude"], ["Style"], "judge") == (["Style"], "judge")
    assert final_categories(["Gratitude"], ["Style"], "rules") == (["Gratitude"], "rules")
    assert final_categories(["Revision"], ["Style"], "both") == (["Revision", "Style"], "both")
    assert final_categories(["Gratitude"], ["Style"], "both") == ([], "both (disagree)")
    turns = [{"conversation": "a", "c": ["Gratitude"]}, {"conversation": "a", "c": ["Style"]},
             {"conversation": "b", "c": []}, {"conversation": "c", "c": None}]
    s = signal_stats(turns, "c")
    assert s["turns"] == 3 and s["polarity"] == {"sat": 1, "dsat": 1, "none": 1}
    assert s["share_any"] == pytest.approx(1 / 3, abs=1e-4) and s["share_dsat"] == pytest.approx(1 / 3, abs=1e-4)
    assert s["histogram"]["Gratitude"] == 1 and s["histogram"]["Style"] == 1


# ----------------------------------------------------------------------------- stages on a stub endpoint
CONVERSATIONS = [
    ["What is 6 x 7?", "It is 41.", "That's wrong, it is 42.", "Sorry, 42.", "Thanks!"],
    ["Write a haiku.", "Leaves fall in autumn", "thank you, lovely"],
    ["Name a prime.", "9.", "No, 9 is wrong GARBLE"],  # the judge answers prose here: unparsed, counted
    ["List a colour ORDERBIAS.", "Blue.", "wrong"],  # the pair judge always says A: preferred in one order only
    ["Tell me a joke.", "Why did the chicken...", "tell me another one"],
    ["Capital of Peru?", "Quito.", "wrong, try again"],
    ["Sum 2 and 2", "5", "wrong!"],
    ["Say hi", "Hello!", "ok"],
]


def write_conversations(path, extra_lines=()):
    with open(path, "w") as f:
        for i, c in enumerate(CONVERSATIONS):
            f.write(json.dumps({"id": f"conv{i}", "messages": msgs(*c)}) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def write_gold(path):
    rows = [{"id": "g1", "assistant": "a", "user": "thanks!", "categories": ["Gratitude"], "polarity": "sat"},
            {"id": "g2", "assistant": "a", "user": "wrong", "categories": ["Factual Error"], "polarity": "dsat"},
            {"id": "g3", "assistant": "a", "user": "how about dogs?", "categories": [], "polarity": "none"},
            {"id": "g4", "assistant": "a", "user": "GARBLE", "categories": [], "polarity": "none"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def stub_server():
    """A stand-in OpenAI-protocol endpoint for judge and teacher, answering by the prompt's kind."""
    pytest.importorskip("portpicker")
    import portpicker
    from fastapi import FastAPI, Request

    from jaxlm.infer.web import Background

    app = FastAPI()
    calls = []

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        text = body["messages"][-1]["content"]
        system = body["messages"][0]["content"] if body["messages"][0]["role"] == "system" else ""
        calls.append(text)
        if "You label user satisfaction" in text:
            user = text.split("[User's next message]")[1]
            if "GARBLE" in user:
                answer = "The user seems unhappy."
            elif "wrong" in user:
                answer = '{"sat": [], "dsat": ["Factual Error"]}'
            elif "thank" in user.lower():
                answer = '{"sat": ["Gratitude"], "dsat": []}'
            else:
                answer = '{"sat": [], "dsat": []}'
        elif "Write what the user wanted" in text:
            answer = "- correct answer" if "Capital" in text else '["give the correct answer", "show the steps"]'
        elif "[Response A]" in text:
            a = text.split("[Response A]")[1].split("[Response B]")[0]
            answer = "A is right. [[A]]" if ("CORRECTED" in a or "ORDERBIAS" in text) else "B is right. [[B]]"
            if body.get("logprobs"):  # verdict=logprobs: the letter's top alternatives (a 1.6-nat margin)
                letter = answer[0]
                top = [{"token": letter, "logprob": -0.2}, {"token": "AB".replace(letter, ""), "logprob": -1.8},
                       {"token": "The", "logprob": -3.0}]
                return {"id": "x", "object": "chat.completion", "model": body["model"], "usage": {},
                        "choices": [{"index": 0, "finish_reason": "length",
                                     "message": {"role": "assistant", "content": letter},
                                     "logprobs": {"content": [{"token": letter, "logprob": -0.2, "top_logprobs": top}]}}]}
        elif "checklist" in system:
            answer = "CORRECTED: here is the right answer, step by step."
        else:
            answer = "hello"
        return {"id": "x", "object": "chat.completion", "model": body["model"], "usage": {},
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}]}

    with Background(app, portpicker.pick_unused_port()) as bg:
        yield bg.url + "/v1", calls


def recipe_config(data_dir, url, **overrides):
    ov = {"data.conversations": "c.jsonl", "data.eval_fraction": 0.0, "signals.gold": str(data_dir / "gold.jsonl"),
          "judge.base_url": url, "judge.model": "stub", "judge.retries": 0, "teacher.base_url": url,
          "teacher.model": "stub", "teacher.retries": 0, **overrides}
    cfg = load_recipe_config("wildfeedback", None, None, [f"--config.recipe.data.dir={data_dir}"]
                             + [f"--config.recipe.{k}={v}" for k, v in ov.items()])
    return cfg.recipe


def test_bad_conversation_rows_reported_with_file_and_line(tmp_path, stub_server):
    url, _ = stub_server
    bad = [json.dumps({"messages": msgs("q", "a") + [{"role": "assistant", "content": "again"}]}),
           json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}), "{oops"]
    write_conversations(tmp_path / "c.jsonl", bad)
    write_gold(tmp_path / "gold.jsonl")
    s = RECIPE.run(recipe_config(tmp_path, url, **{"data.max_bad_fraction": 0.5}), tmp_path / "a",
                   until="conversations")["conversations"]
    assert s["bad"] == {"non-alternating roles": 1, "missing content": 1, "malformed JSON": 1}
    n = len(CONVERSATIONS)
    assert s["bad_examples"]["non-alternating roles"][0].startswith(f"{tmp_path / 'c.jsonl'}:{n + 1}")
    assert s["bad_examples"]["malformed JSON"][0].startswith(f"{tmp_path / 'c.jsonl'}:{n + 3}")
    assert s["train"] == n and s["feedback_turns"] == 9
    with pytest.raises(DataError, match=r"conversations: 3 of 11 rows are bad \(27%\), more than "
                                        r"recipe.data.max_bad_fraction=2%"):
        RECIPE.run(recipe_config(tmp_path, url), tmp_path / "b", until="conversations")


DATA_STAGES = ("conversations", "signals", "preferences", "pairs")
ARTEFACTS = ("conversations.jsonl", "signals.jsonl", "gold_eval.jsonl", "preferences.jsonl", "candidates.jsonl",
             "pairs.jsonl")


def test_data_stages_on_a_stub_judge_and_teacher_resume_identically(tmp_path, stub_server):
    url, calls = stub_server
    write_conversations(tmp_path / "c.jsonl")
    write_gold(tmp_path / "gold.jsonl")
    cfg = recipe_config(tmp_path, url)
    s = RECIPE.run(cfg, tmp_path / "a", until="pairs")
    sig = s["signals"]
    assert sig["turns"] == 9 and sig["judge_unparsed"] == 1 and sig["gold_judge_unparsed"] == 1
    assert sig["bad"] == {"unparsed judge reply": 1}
    # judge: 5 'wrong' turns DSAT (one of them GARBLE, unparsed -> rules, which say Factual Error too),
    # 2 thanks SAT, 2 none; rules: the same except 'ok' (Acknowledgment) and 'tell me another one' (none)
    assert sig["stats"]["categories"]["polarity"] == {"sat": 2, "dsat": 5, "none": 2}
    assert sig["stats"]["rules"]["polarity"] == {"sat": 3, "dsat": 5, "none": 1}
    jr = sig["agreement"]["judge_vs_rules"]
    assert jr["n"] == 8 and jr["left_out"] == 1
    # by hand: 8 parsed turns, judge (S,S,D,D,D,D,N,N) vs rules (S,S,D,D,D,D,N,S): p_o = 7/8,
    # p_e = (2*3 + 4*4 + 2*1) / 64 = 24/64, kappa = (7/8 - 3/8) / (5/8) = 0.8
    assert jr["kappa"] == pytest.approx(0.8)
    assert sig["agreement"]["rules_vs_gold"]["kappa"] == pytest.approx(1.0)
    assert sig["agreement"]["judge_vs_gold"]["n"] == 3
    pref = s["preferences"]
    assert pref["dsat_turns"] == 5 and pref["checklists"] == {"judge": 5}
    p = s["pairs"]
    # 5 DSAT turns -> 5 candidates -> all regenerated; ORDERBIAS preferred only as A: dropped
    assert p["yield"]["dsat"] == {"candidates": 5, "regenerated": 5, "judged_both_orders": 5, "preferred_as_A": 5,
                                  "preferred_as_B": 4, "preferred_both_orders": 4, "kept": 4}
    pairs = [json.loads(line) for line in open(tmp_path / "a" / "pairs.jsonl")]
    first = next(x for x in pairs if x["id"] == "conv0:2")
    assert first["prompt"] == msgs("What is 6 x 7?") and first["rejected"][0]["content"] == "It is 41."
    assert first["chosen"][0]["content"].startswith("CORRECTED") and first["checklist"] == [
        "give the correct answer", "show the steps"]
    # redone stages ask nothing twice: the run's cache answers
    n = len(calls)
    RECIPE.run(cfg, tmp_path / "a", from_stage="signals", until="pairs")
    assert len(calls) == n
    # stopped after every stage and resumed: the same artefacts
    for stage in DATA_STAGES:
        assert stage in RECIPE.run(cfg, tmp_path / "b", until=stage)
    for name in ARTEFACTS:
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name
    # a judge that picks A in both orders is biased, not a preference: one_order drops it too, no filter
    # keeps it; only the pairs stage reruns, from the cache
    n = len(calls)
    s = RECIPE.run(recipe_config(tmp_path, url, **{"pairs.filter": "one_order"}), tmp_path / "b", until="pairs")
    assert s["pairs"]["pairs"] == 4
    s = RECIPE.run(recipe_config(tmp_path, url, **{"pairs.filter": "none"}), tmp_path / "b", until="pairs")
    assert s["pairs"]["pairs"] == 5 and len(calls) == n
    # the same judge read through its letter log-probabilities: the same verdicts, the same pairs
    s = RECIPE.run(recipe_config(tmp_path, url, **{"judge.verdict": "logprobs"}), tmp_path / "c", until="pairs")
    assert s["pairs"]["yield"]["dsat"] == {"candidates": 5, "regenerated": 5, "judged_both_orders": 5,
                                           "preferred_as_A": 5, "preferred_as_B": 4, "preferred_both_orders": 4,
                                           "kept": 4}
    ids = [json.loads(x)["id"] for x in (tmp_path / "c" / "pairs.jsonl").read_text().splitlines()]
    assert ids == [json.loads(x)["id"] for x in (tmp_path / "a" / "pairs.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- align + eval, tiny model
@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory):
    from jaxlm.train.loop import train

    tmp = tmp_path_factory.mktemp("student")
    rows = [{"messages": msgs(f"question {k}", f"answer {k}")} for k in range(16)]
    (tmp / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(tmp, steps=2, batch_size=8)
    cfg.data.update(train=str(tmp / "chat.jsonl"), eval="", seq_len=64)
    train(cfg)
    return str(tmp / "run" / "checkpoints")


def test_align_and_eval_end_to_end_on_a_tiny_model(tmp_path, stub_server, tiny_student):
    url, calls = stub_server
    write_conversations(tmp_path / "c.jsonl")
    write_gold(tmp_path / "gold.jsonl")
    # seed 3 puts conv4-6 in eval: two DSAT turns to evaluate, three to train on
    ov = {"data.eval_fraction": 0.5, "seed": 3, "student.checkpoint": tiny_student, "align.steps": 2,
          "align.batch_size": 8, "align.seq_len": 64, "align.max_prompt_length": 32, "align.lora_rank": 4,
          "pairs.filter": "none", "eval.max_new_tokens": 4, "eval.batch_size": 8}
    cfg = recipe_config(tmp_path, url, **ov)
    s = RECIPE.run(cfg, tmp_path / "r")
    d = tmp_path / "r"
    assert s["align"]["steps"] == 2 and s["align"]["lora_rank"] == 4 and s["align"]["pairs"] >= 1
    ev = json.loads((d / "eval.json").read_text())
    assert ev["items"] == s["eval"]["items"] == 2 and s["pairs"]["pairs"] == 3
    for mode in ("checklist", "plain"):
        m = ev["metrics"][mode]
        assert m["wins"] + m["ties"] + m["losses"] + m["unparsed_pairs"] == ev["items"]
    rows = [json.loads(x) for x in (d / "eval_replies.jsonl").read_text().splitlines()]
    same = sum(r["base"].strip() == r["aligned"].strip() for r in rows)
    assert ev["identical_replies"] == same
    report = (d / "report.md").read_text()
    assert f"Aligned and base replies identical: {same} of 2." in report
    assert "with checklist" in report and "judge vs rules" in report and "rules vs gold" in report
    assert (d / "report.png").stat().st_size > 1000
    state = (d / "state.json").read_text()
    n = len(calls)
    RECIPE.run(cfg, d)  # nothing left to do
    assert (d / "state.json").read_text() == state and len(calls) == n
