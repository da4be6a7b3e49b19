"""The GPA recipe: log-odds against a hand computation of Monroe et al.'s formula, JS divergence against
scipy, the rule labeller and extractor on crafted conversations, the judge parsers, clustering, rubric
provenance, bad rows with file:line, unparsable judge replies counted, resume with identical artefacts,
and pairs -> align -> eval plumbing on a fake judge/teacher and fake models; the GPA-CT system prompt of
`jaxlm chat` / `jaxlm serve`."""

import asyncio
import json
import math
import re
import types
from collections import Counter

import numpy as np
import pytest

from jaxlm.cli.recipe import load_recipe_config
from jaxlm.errors import DataError, UsageError
from jaxlm.infer.client import ChatResult
from jaxlm.recipes import base, gpa_eval, gpa_stats, training
from jaxlm.recipes import gpa_labels as L
from jaxlm.recipes.gpa import RECIPE, keep_pair, parse_numbered
from jaxlm.recipes.gpa_eval import cross_group
from jaxlm.recipes.gpa_rubric import load_rubrics, rubric_system, system_from_args


# ----------------------------------------------------------------------------- statistics
def test_log_odds_against_a_hand_computation():
    yi, yj, prior = {"a": 10, "b": 2}, {"a": 2, "b": 8, "c": 5}, {"a": 12, "b": 10, "c": 5}
    out = gpa_stats.log_odds_z(yi, yj, prior)  # prior counts used as pseudo-counts (a0 = 27)
    # Monroe et al. (2008) eq. 16, by hand: n_i = 12, n_j = 15, a0 = 27
    d_a = math.log(22 / 17) - math.log(14 / 28)  # (10+12)/(12+27-10-12), (2+12)/(15+27-2-12)
    d_c = math.log(5 / 34) - math.log(10 / 32)  # (0+5)/(12+27-0-5), (5+5)/(15+27-5-5)
    assert out["a"]["delta"] == pytest.approx(d_a)
    assert out["a"]["z"] == pytest.approx(d_a / math.sqrt(1 / 22 + 1 / 14))
    assert out["c"]["z"] == pytest.approx(d_c / math.sqrt(1 / 5 + 1 / 10))
    assert out["a"]["z"] == pytest.approx(2.7816, abs=1e-4) and out["c"]["z"] < 0
    # rescaling the prior to the same total is the identity; swapping the sides flips the sign
    same = gpa_stats.log_odds_z(yi, yj, {k: 2 * v for k, v in prior.items()}, prior_strength=27)
    assert all(same[w]["z"] == pytest.approx(out[w]["z"]) for w in prior)
    flipped = gpa_stats.log_odds_z(yj, yi, prior)
    assert all(flipped[w]["z"] == pytest.approx(-out[w]["z"]) for w in prior)
    # a stronger prior shrinks the same evidence towards zero
    strong = gpa_stats.log_odds_z(yi, yj, prior, prior_strength=270)
    assert abs(strong["a"]["delta"]) < abs(out["a"]["delta"])
    two = gpa_stats.contrast({"x": Counter(yi), "y": Counter(yj)}, prior, None)
    assert two["x"]["a"]["z"] == pytest.approx(out["a"]["z"]) and two["y"]["a"]["z"] == pytest.approx(-out["a"]["z"])


def test_js_divergence_against_scipy_and_its_properties():
    from scipy.spatial.distance import jensenshannon

    rng = np.random.default_rng(0)
    for _ in range(5):
        p, q = rng.random(7), rng.random(7)
        q[2] = 0.0
        ours = gpa_stats.js_divergence(p, q)
        assert ours == pytest.approx(jensenshannon(p, q, base=2) ** 2, abs=1e-12)
        assert ours == pytest.approx(gpa_stats.js_divergence(q, p)) and 0 <= ours <= 1
    assert gpa_stats.js_divergence([1, 2, 3], [2, 4, 6]) == pytest.approx(0.0)
    assert gpa_stats.js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    s = gpa_stats.js_summary({"g": Counter(a=2), "h": Counter(b=1), "e": Counter()})
    assert s == {"e|g": None, "e|h": None, "g|h": pytest.approx(1.0)}


# ----------------------------------------------------------------------------- labels, statements
def conv(*turns):
    return [{"role": ("user", "assistant")[k % 2], "content": t} for k, t in enumerate(turns)]


@pytest.mark.parametrize("turns,group,intent", [
    (("Why does this fail?\n```python\nprint(x)\n```", "a"), "developer", "coding"),
    (("Fix it:\ndef f(x):\n    return x;\n", "ok"), "developer", "coding"),
    (("Traceback (most recent call last):\n  File 'a.py'", "hm"), "developer", "coding"),
    (("How do I reverse a list in python?", "use reversed"), "general", "coding"),  # no code shown
    (("Write a short poem about the sea", "Waves..."), "general", "writing"),
    (("Should I learn piano or guitar first?", "..."), "general", "advice"),
    (("What is the capital of Peru?", "Lima", "and of Chile?"), "general", "explanation"),
    (("Tell me about stars.", "Sure", "now the essay:\n```\nx = 1\ny = 2\n```"), "developer", "explanation"),
])
def test_rule_labeller_on_crafted_conversations(turns, group, intent):
    assert L.rule_group(conv(*turns)) == group
    assert L.rule_intent(conv(*turns)) == intent


def test_rule_preferences():
    got = L.rule_preferences(conv("Explain step by step, with examples, in a table", "...",
                                  "shorter please, and in simple terms\n```\nx\n```", "```\ny\n```"))
    assert got[0] == L.SHARES_CODE
    for s in ("wants step-by-step instructions", "wants examples", "wants a table", "prefers concise replies",
              "wants simple language"):
        assert s in got
    assert "wants debugging help" not in got
    assert L.rule_preferences(conv("hello there", "```\ncode in the reply only\n```")) == []


@pytest.mark.parametrize("reply,expected", [
    ('{"group": "developer", "intent": "coding"}', ("developer", "coding")),
    ('Sure! ```json\n{"group": "General", "intent": "advice"}\n```', ("general", "advice")),
    ("The user is a developer asking about writing.", ("developer", "writing")),
    ("developer or general? explanation or advice?", (None, None)),  # names two of each: unparsed
    ('{"group": "student", "intent": "poetry"}', (None, None)),
])
def test_parse_label(reply, expected):
    assert L.parse_label(reply, ["developer", "general"], ["coding", "writing", "explanation", "advice"]) == expected


def test_parse_statements_numbered_and_canonical():
    assert L.parse_statements('["prefers runnable code", "wants bullet points"]', 6) == [
        "prefers runnable code", "wants bullet points"]
    assert L.parse_statements('{"preferences": ["a", "b", "c"]}', 2) == ["a", "b"]
    assert L.parse_statements("- wants tables\n2. prefers brevity", 6) == ["wants tables", "prefers brevity"]
    assert L.parse_statements("I cannot tell.", 6) is None
    assert parse_numbered("Here:\n1. Give runnable code.\n3) Be very brief.\n1. again", 3) == [
        "Give runnable code.", None, "Be very brief."]
    assert parse_numbered("1. 1.\n2. Do it", 2) == [None, None]  # not instructions
    assert L.canonical('  "The user Wants bullet   points."') == "wants bullet points"
    assert L.parse_canonical("Prefers short replies.\nmore") == "Prefers short replies"
    assert L.parse_canonical("") is None


def test_cluster_merges_near_duplicates_only():
    freq = Counter({"wants bullet points": 5, "wants bullet-points": 2, "wants bulleted points": 1,
                    "prefers runnable code": 4, "prefers runnable python code": 1, "wants a formal tone": 3})
    rep = L.cluster(freq, 0.6)
    assert rep["wants bullet-points"] == rep["wants bulleted points"] == "wants bullet points"
    assert rep["prefers runnable python code"] == "prefers runnable code"
    assert rep["wants a formal tone"] == "wants a formal tone"
    assert len(set(rep.values())) == 3
    assert len(set(L.cluster(freq, 1.01).values())) == len(freq)  # above any cosine: nothing merges


def test_keep_pair_and_cross_group():
    assert keep_pair("A", "B", "both_orders") and not keep_pair("A", "A", "both_orders")
    assert keep_pair("A", None, "one_order") and not keep_pair("B", "A", "one_order")
    assert keep_pair(None, None, "none")
    assert cross_group(["a", "b", "c"], ["a", "c"], "a") == "c"
    assert cross_group(["a", "b", "c"], ["a", "c"], "c") == "a"
    assert cross_group(["a", "b"], ["a"], "a") is None


# ----------------------------------------------------------------------------- stages on a fake endpoint
DEV = [f"DEV{k}: my code fails\n```python\nx = f({k})\n```" + (" ORDERBIAS" if k == 0 else "") for k in range(12)]
GEN = [f"GEN{k}: what is the history of town {k}?" + (" GARBLE" if k == 1 else "") for k in range(12)]


def write_conversations(path, extra_lines=()):
    with open(path, "w") as f:
        for k, first in enumerate(DEV + GEN):
            f.write(json.dumps({"id": f"c{k}", "messages": conv(first, "an answer", "thanks, more please")}) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def fake_answer(messages: list[dict]) -> str:
    text = messages[-1]["content"]
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    if "Classify the user" in text:
        if "GARBLE" in text:
            return "no idea"
        return json.dumps({"group": "developer" if "DEV" in text else "general",
                           "intent": "coding" if "DEV" in text else "explanation"})
    if "implicit preferences" in text:
        if "GARBLE" in text:
            return "I am not sure."
        return json.dumps(["Prefers runnable code.", "wants code comments", "wants bullet points"] if "DEV" in text
                          else ["wants bullet points", "prefers a friendly tone", "wants historical context"])
    if "short, general phrase" in text:
        return text.split("Preference: ")[1].capitalize() + "."
    if "Rewrite each one" in text:
        return "\n".join(f"{m.group(1)}. Do this: {m.group(2)}" for m in re.finditer(r"(?m)^(\d+)\. (.+)$", text))
    if "[Response A]" in text:
        a = text.split("[Response A]")[1].split("[Response B]")[0]
        if "ORDERBIAS" in text and "BAD reply" in text:
            return "[[A]]"
        return "A follows it. [[A]]" if "GOOD" in a else "B does. [[B]]"
    if "Users like them prefer" in system:
        return "GOOD reply"
    if "deliberately do NOT" in system:
        return "BAD reply"
    return "hello"


class FakeClient:
    def __init__(self, calls):
        self.calls = calls

    async def achat(self, messages, **params):
        self.calls.append(messages[-1]["content"])
        text = fake_answer(messages)
        return ChatResult(text, "stop", None, {}, {"choices": [{"message": {"content": text}}]})

    def close(self):
        pass


@pytest.fixture
def fake(monkeypatch):
    calls = []
    monkeypatch.setattr(base.RecipeRun, "client", lambda self, role: FakeClient(calls))
    return calls


def gpa_config(data_dir, **overrides):
    ov = {"data.conversations": "c.jsonl", "data.eval_fraction": 0.25, "rubrics.min_conversations": 2,
          "rubrics.z_min": 0.5, "pairs.per_rubric": 4, **overrides}
    cfg = load_recipe_config("gpa", None, None, [f"--config.recipe.data.dir={data_dir}"]
                             + [f"--config.recipe.{k}={v}" for k, v in ov.items()])
    return cfg.recipe


DATA_STAGES = ("conversations", "extract", "normalise", "contrast", "rubrics", "pairs")
ARTEFACTS = ("conversations.jsonl", "statements.jsonl", "items.jsonl", "mentions.jsonl", "contrast.jsonl",
             "contrast.json", "rubrics.json", "candidates.jsonl", "pairs.jsonl")


def test_bad_rows_reported_with_file_and_line(tmp_path, fake):
    bad = [json.dumps({"messages": conv("q", "a") + [{"role": "assistant", "content": "again"}]}),
           json.dumps({"messages": [{"role": "user"}]}), "{oops"]
    path = write_conversations(tmp_path / "c.jsonl", bad)
    s = RECIPE.run(gpa_config(tmp_path, **{"data.max_bad_fraction": 0.2}), tmp_path / "a",
                   until="conversations")["conversations"]
    assert s["bad"] == {"non-alternating roles": 1, "missing content": 1, "malformed JSON": 1}
    assert s["bad_examples"]["non-alternating roles"][0].startswith(f"{path}:25")
    assert s["bad_examples"]["malformed JSON"][0].startswith(f"{path}:27")
    with pytest.raises(DataError, match=r"conversations: 3 of 27 rows are bad \(11%\), more than "
                                        r"recipe.data.max_bad_fraction=2%"):
        RECIPE.run(gpa_config(tmp_path), tmp_path / "b", until="conversations")


def test_data_stages_count_parse_failures_keep_provenance_and_resume_identically(tmp_path, fake):
    write_conversations(tmp_path / "c.jsonl")
    cfg = gpa_config(tmp_path)
    s = RECIPE.run(cfg, tmp_path / "a", until="pairs")
    c = s["conversations"]
    # GEN1 (GARBLE): the judge's label is unparsed -> the rules (general / explanation), counted
    assert c["conversations"] == 24 and c["label_unparsed"] == {"group": 1, "intent": 1}
    rows = [json.loads(x) for x in open(tmp_path / "a" / "conversations.jsonl")]
    assert Counter(r["group"] for r in rows) == {"developer": 12, "general": 12}
    garble = next(r for r in rows if "GARBLE" in r["messages"][0]["content"])
    assert garble["labelled_by"] == {"group": "rules", "intent": "rules"}
    train = [r for r in rows if r["split"] == "train"]
    ex = s["extract"]
    garbled_train = sum("GARBLE" in r["messages"][0]["content"] for r in train)
    assert ex["judge_unparsed"] == garbled_train and ex["conversations"] == len(train)
    # judge canonicalisation ("Prefers runnable code." -> "prefers runnable code") and clustering
    items = {it["label"]: it for it in (json.loads(x) for x in open(tmp_path / "a" / "items.jsonl"))}
    assert "prefers runnable code" in items and "wants bullet points" in items
    # provenance: every rubric item's counts are the counts of conversations mentioning it in mentions.jsonl
    mentions = [json.loads(x) for x in open(tmp_path / "a" / "mentions.jsonl")]
    doc = load_rubrics(tmp_path / "a" / "rubrics.json")
    dev = doc["rubrics"]["developer"]["coding"]
    assert dev["criteria"][0].startswith("Do this: ") and dev["written_by"][0] == "judge"
    assert "wants bullet points" not in [it["label"] for it in dev["items"]]  # both groups want it: z ~ 0
    for g, by_intent in doc["rubrics"].items():
        for i, rub in by_intent.items():
            assert len(rub["criteria"]) == len(rub["items"]) > 0
            for it in rub["items"]:
                convs_g = {m["conversation"] for m in mentions if m["item"] == it["item"] and m["group"] == g
                           and m["intent"] == i}
                convs_rest = {m["conversation"] for m in mentions if m["item"] == it["item"] and m["group"] != g
                              and m["intent"] == i}
                assert (it["count_group"], it["count_rest"]) == (len(convs_g), len(convs_rest))
                assert it["z"] >= 0.5 and it["label"] in [x["text"] for x in it["members"]] + [it["label"]]
    p = s["pairs"]
    assert p["candidates"] == p["planned"] > 0
    # the ORDERBIAS prompt's judge always answers A: chosen wins only when shown first -> dropped
    orderbias = any("ORDERBIAS" in json.loads(x)["prompt"] for x in open(tmp_path / "a" / "candidates.jsonl"))
    assert p["pairs"] == p["candidates"] - orderbias and p["judge_unparsed"] == 0
    # stopped after every stage and resumed in another directory: the same artefacts; a rerun asks nothing
    for stage in DATA_STAGES:
        RECIPE.run(cfg, tmp_path / "b", until=stage)
    for name in ARTEFACTS:
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name
    n = len(fake)
    RECIPE.run(cfg, tmp_path / "a", until="pairs")
    assert len(fake) == n


def test_rules_only_needs_no_endpoint_and_judge_failures_stop_above_the_threshold(tmp_path, fake):
    write_conversations(tmp_path / "c.jsonl")
    s = RECIPE.run(gpa_config(tmp_path, **{"labels.mode": "rules", "extract.mode": "rules",
                                           "normalise.canonicalise": False, "rubrics.write_with_judge": False}),
                   tmp_path / "a", until="rubrics")
    assert not fake and s["conversations"]["group_x_intent"]["developer"]["coding"] == 12
    doc = load_rubrics(tmp_path / "a" / "rubrics.json")
    assert all(w == "label" for r in doc["rubrics"]["developer"].values() for w in r["written_by"])
    # a limit takes a seeded sample with as many conversations of each rule group as there are
    rules = {"labels.mode": "rules", "data.limit": 6}
    s = RECIPE.run(gpa_config(tmp_path, **rules), tmp_path / "c", until="conversations")["conversations"]
    assert {g: sum(v.values()) for g, v in s["group_x_intent"].items()} == {"developer": 3, "general": 3}
    s2 = RECIPE.run(gpa_config(tmp_path, **rules, **{"seed": 1}), tmp_path / "d", until="conversations")
    ids = [[json.loads(x)["id"] for x in open(tmp_path / d / "conversations.jsonl")] for d in ("c", "d")]
    assert ids[0] != ids[1] and s2["conversations"]["conversations"] == 6
    with pytest.raises(DataError, match="preference extraction: 1 of"):
        RECIPE.run(gpa_config(tmp_path, **{"extract.max_unparsed": 0.0}), tmp_path / "b", until="extract")


@pytest.mark.parametrize("routing", [True, False])
def test_pairs_align_eval_plumbing_on_fake_models(tmp_path, fake, monkeypatch, routing):
    write_conversations(tmp_path / "c.jsonl")
    trained = []

    def finetune(run, name, section, *, init, data, examples, rows=None, preference=False):
        assert preference and section.loss == "ln_dpo"
        trained.append((name, examples))
        return {"checkpoint": f"/fake/{name}", "steps": 1, "examples": examples, "lora_rank": 8, "last": {"loss": 0.5}}

    def replies(model, conversations, **kw):
        out = []
        for c in conversations:
            rubric = c[0]["role"] == "system"
            own = ("ft-developer" in model and "DEV" in c[-1]["content"]) or (
                "ft-general" in model and "GEN" in c[-1]["content"])
            out.append(f"{model} says " + ("GOOD" if rubric or own else "plain"))
        return out

    def routed(model, conversations, adapters, **kw):
        assert model == "mixture of /fake/ft-developer,/fake/ft-general"
        return [replies(f"/fake/ft-{a}", [c])[0] for a, c in zip(adapters, conversations)]

    monkeypatch.setattr(training, "finetune", finetune)
    monkeypatch.setattr(training, "load_chat_model", lambda path: path)
    monkeypatch.setattr(training, "replies", replies)
    monkeypatch.setattr(gpa_eval, "load_mixture", lambda paths: "mixture of " + ",".join(paths.values()))
    monkeypatch.setattr(gpa_eval, "routed_replies", routed)
    s = RECIPE.run(gpa_config(tmp_path, **{"eval.routing": routing}), tmp_path / "a")
    assert sorted(n for n, _ in trained) == ["ft-developer", "ft-general"]
    ev = json.loads((tmp_path / "a" / "eval.json").read_text())["results"]
    for g in ("developer", "general"):
        assert ev[g]["ct"]["win_rate"] == 1.0 and ev[g]["ft"]["win_rate"] == 1.0
        assert ev[g]["cross"]["ties"] == ev[g]["n"]  # the other group's adapter: plain vs plain, both orders
        assert ev[g]["ft"]["adapter"] == g and ev[g]["cross"]["adapter"] != g
    assert s["eval"]["developer_ft_win_rate"] == 1.0
    report = (tmp_path / "a" / "report.md").read_text()
    assert "| developer | ft (developer adapter) |" in report and (tmp_path / "a" / "report.png").stat().st_size > 0


def test_per_group_adapters_routed_in_one_batch_equal_separate_models():
    import jax
    import jax.numpy as jnp

    from jaxlm.infer.generate import generate
    from jaxlm.model import LoraConfig, ModelConfig, forward, init_params, lora

    cfg = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                      partial_rotary_factor=0.5, tie_embeddings=False, max_position_embeddings=64,
                      lora=LoraConfig(rank=2, alpha=4.0))
    base_p = init_params(cfg, jax.random.key(0))

    def tuned(seed):  # the same base, a random adapter (as two groups' LN-DPO runs would give)
        keys = iter(jax.random.split(jax.random.key(seed), 1000))
        return jax.tree_util.tree_map_with_path(
            lambda path, x: jax.random.normal(next(keys), x.shape) * 0.3 if lora.is_adapter(path) else x, base_p)

    models = {"developer": (cfg, tuned(1)), "general": (cfg, tuned(2))}
    mix_cfg, mix_p = gpa_eval.combine_adapters(models)
    assert mix_cfg.lora.adapters == ("developer", "general")
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 96, (4, 8)))
    ids = lora.adapter_ids(mix_cfg, ["general", "developer", "developer", "general"])
    mixed = np.asarray(forward(mix_cfg, mix_p, tokens, adapter_ids=jnp.asarray(ids)))
    for row, g in enumerate(["general", "developer", "developer", "general"]):
        alone = np.asarray(forward(cfg, models[g][1], tokens[row:row + 1]))
        np.testing.assert_allclose(mixed[row], alone[0], atol=1e-5, rtol=0)
    prompts = [list(map(int, tokens[0])), list(map(int, tokens[1][:5]))]
    both = generate(mix_cfg, mix_p, prompts, max_new_tokens=5, adapter_ids=lora.adapter_ids(mix_cfg, ["general",
                                                                                                    "developer"]))
    for p, g, got in zip(prompts, ["general", "developer"], both.tokens):
        assert generate(cfg, models[g][1], [p], max_new_tokens=5).tokens[0] == got
    other = dict(models, general=(cfg, jax.tree.map(lambda x: x + 1, base_p)))
    with pytest.raises(DataError, match="other base weights"):
        gpa_eval.combine_adapters(other)


# ----------------------------------------------------------------------------- GPA-CT in chat and serve
def write_rubrics(path):
    doc = {"format": "gpa-rubrics/1", "groups": ["developer", "general"], "intents": ["coding"],
           "rubrics": {"developer": {"coding": {"criteria": ["Give runnable code."], "items": []},
                                     "explanation": {"criteria": ["Be precise.", "Give runnable code."],
                                                     "items": []}}, "general": {}}}
    path.write_text(json.dumps(doc))
    return path


def test_rubric_system_prompt_and_errors(tmp_path):
    path = write_rubrics(tmp_path / "r.json")
    text = system_from_args(str(path), "developer", None, "Be kind.")
    assert text.startswith("Be kind.\n\n") and text.count("Give runnable code.") == 1 and "Be precise." in text
    assert "- Be precise." not in rubric_system(load_rubrics(path), "developer", "coding")
    assert system_from_args(None, None, None, "plain") == "plain"
    with pytest.raises(UsageError, match="go together"):
        system_from_args(str(path), None)
    with pytest.raises(UsageError, match="groups developer, general"):
        system_from_args(str(path), "nurse")
    with pytest.raises(UsageError, match="no such file"):
        system_from_args(str(tmp_path / "missing.json"), "developer")
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(DataError, match="not a GPA rubric file"):
        load_rubrics(tmp_path / "bad.json")


def test_server_adds_the_rubric_to_the_system_message():
    from jaxlm.infer.protocol import Message
    from jaxlm.infer.server import Server

    srv = types.SimpleNamespace(system_prompt="RUBRIC")
    msgs = [Message(role="user", content="hi")]
    out = Server._with_system(srv, msgs)
    assert [(m.role, m.content) for m in out] == [("system", "RUBRIC"), ("user", "hi")]
    out = Server._with_system(srv, [Message(role="system", content="own")] + msgs)
    assert [(m.role, m.content) for m in out] == [("system", "own\n\nRUBRIC"), ("user", "hi")]
    assert Server._with_system(types.SimpleNamespace(system_prompt=None), msgs) is msgs


def test_chat_and_serve_take_rubric_and_group():
    import argparse

    from jaxlm.cli import chat, serve

    for mod in (chat, serve):
        parser = argparse.ArgumentParser()
        mod.register(parser.add_subparsers(), "x", "x")
        args = parser.parse_args(["x", "--rubric", "r.json", "--group", "developer", "--intent", "coding"])
        assert (args.rubric, args.group, args.intent) == ("r.json", "developer", "coding")


def test_fake_client_is_async():
    res = asyncio.run(FakeClient([]).achat([{"role": "user", "content": "x"}]))
    assert res.text == "hello"
