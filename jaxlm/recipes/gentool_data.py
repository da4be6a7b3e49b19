"""GenTool's data, as pure functions: BFCL rows, the seeded split by tool, weaker variants by rules,
the weak / strong-only label, BM25 neighbours, the scenarios and their rendering in `jaxlm serve`'s
tool format (the stages in jaxlm.recipes.gentool call these).

Scenarios of one query whose gold call uses tool T (N = T's BM25 neighbours in the same split, W =
T's weaker variant, G = the default tool `generate_response`, always offered last):

    zero_to_one_absent   N[:k]        + G  ->  G          (no suitable tool)
    zero_to_one_present  T + N[:k]    + G  ->  T(args)
    weak_only            W + N[:k]    + G  ->  W(args) when the query is solvable by W, else G
    weak_to_strong       T + W + N[:k-1] + G -> T(args)   (the stronger variant wins)
    irrelevance          BFCL irrelevance row's tools + G -> G
    bfcl_simple / bfcl_multiple (eval only)  the row's own tools + G -> the gold call

Relevance grades for ranking (NDCG): the expected tool 3; W beside T 1 when W could also solve the
query, else 0; every other candidate 0. The stage-1 target lists the candidates by grade, then in
BM25 order (G last among equals).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Sequence

from jaxlm.recipes.bfcl_ast import norm_name, norm_string

DEFAULT_TOOL = {"name": "generate_response",
                "description": "Answer the user directly in words, without calling a tool. Use it when none of "
                               "the other tools can do what the user asks.",
                "parameters": {"type": "dict", "properties": {"response": {
                    "type": "string", "description": "The answer to the user."}}, "required": []}}
DEFAULT = DEFAULT_TOOL["name"]
RANK_INSTRUCTION = ("Do not call a tool yet. Rank all the tools above from the most to the least suitable for the "
                    "user's request, and reply with only a JSON list of their names.")
WEAK_SUFFIXES = ("lite", "basic", "simple", "mini")
MAX_NAME = 64  # the longest function name the protocol accepts
SCENARIOS = ("zero_to_one_absent", "zero_to_one_present", "weak_only", "weak_to_strong", "irrelevance")
EVAL_ONLY = ("bfcl_simple", "bfcl_multiple")
SIMPLE_CATEGORIES = ("simple_python", "live_simple", "simple")


def _u(seed, *salt) -> float:
    h = hashlib.sha256(json.dumps([seed, *salt]).encode()).hexdigest()[:15]
    return int(h, 16) / 16 ** 15


def rng(seed, *salt) -> random.Random:
    return random.Random(int(_u(seed, *salt) * 2 ** 52))


# ----------------------------------------------------------------------------- BFCL rows
def row_problem(rec: dict) -> str | None:
    """What makes a BFCL question row unusable, or None."""
    q, fns = rec.get("question"), rec.get("function")
    if not isinstance(rec.get("id"), str) or not isinstance(q, list) or not q or not isinstance(fns, list):
        return "missing field"
    turn = q[0]
    if not isinstance(turn, list) or not turn or not all(
            isinstance(m, dict) and m.get("role") in ("system", "user") and isinstance(m.get("content"), str)
            for m in turn) or turn[-1]["role"] != "user":
        return "bad question"
    for f in fns:
        if not (isinstance(f, dict) and isinstance(f.get("name"), str) and f["name"]
                and isinstance(f.get("parameters", {}), dict)):
            return "bad function"
    return None


def answer_problem(rec: dict) -> str | None:
    gt = rec.get("ground_truth")
    if not isinstance(rec.get("id"), str) or not isinstance(gt, list):
        return "missing field"
    if len(gt) != 1 or not isinstance(gt[0], dict) or len(gt[0]) != 1:
        return "not one call"
    (args,) = gt[0].values()
    if not isinstance(args, dict) or not all(isinstance(v, list) for v in args.values()):
        return "bad answer"
    return None


def tool_split(name: str, seed, eval_fraction: float) -> str:
    """'eval' or 'train' for a tool, by a seeded hash of its (normalised) name: every row, file and
    run puts the same tool on the same side, so eval tools are never seen in training."""
    return "eval" if _u(seed, "tool", norm_name(name)) < eval_fraction else "train"


def spec_chars(spec: dict) -> int:
    return len(json.dumps(spec))


# ----------------------------------------------------------------------------- weaker variants
def first_sentence(text: str, max_words: int = 12) -> str:
    s = re.split(r"(?<=[.!?])\s+", str(text).strip(), maxsplit=1)[0]
    words = s.split()
    return " ".join(words[:max_words]).rstrip(",;:") + ("..." if len(words) > max_words else "")


def weak_name(name: str) -> str:
    suffix = WEAK_SUFFIXES[int(_u("weak", norm_name(name)) * len(WEAK_SUFFIXES))]
    return name[: MAX_NAME - len(suffix) - 1] + "_" + suffix


def weaken(spec: dict) -> tuple[dict, list[str]]:
    """(the weaker variant of a tool, the rules that changed it): drop every optional parameter, keep
    the first half (rounded up) of each enum, cut the descriptions to their first sentence, and
    rename it `NAME_<lite|basic|simple|mini>` (chosen by a hash of the name)."""
    params = spec.get("parameters") or {}
    props = params.get("properties") or {}
    required = [p for p in params.get("required") or [] if p in props]
    changes = []
    if len(required) < len(props):
        changes.append("dropped optional parameters")
    weak_props = {}
    for p in required:
        s = dict(props[p])
        if isinstance(s.get("enum"), list) and len(s["enum"]) >= 2:
            s["enum"] = s["enum"][: math.ceil(len(s["enum"]) / 2)]
            changes.append(f"narrowed enum of {p}")
        if "description" in s:
            s["description"] = first_sentence(s["description"])
        weak_props[p] = s
    desc = first_sentence(spec.get("description", ""))
    if desc != str(spec.get("description", "")).strip():
        changes.append("simplified description")
    weak = {"name": weak_name(spec["name"]), "description": desc,
            "parameters": {**{k: v for k, v in params.items() if k not in ("properties", "required")},
                           "type": params.get("type", "dict"), "properties": weak_props, "required": required}}
    return weak, changes


def solvability(answer: dict, weak: dict) -> tuple[str, str, dict | None]:
    """('weak' | 'strong_only', why, the answer rewritten for the weak variant or None): a query is
    solvable by the weak variant when every parameter its gold call needs (no "" among the
    acceptable values) is in the weak schema, with an acceptable value inside any narrowed enum."""
    (_, args), = answer.items()
    props = weak["parameters"]["properties"]
    out = {}
    for p, vals in args.items():
        if p not in props:
            if "" in vals:
                continue
            return "strong_only", f"needs the dropped parameter {p}", None
        enum = props[p].get("enum")
        if isinstance(enum, list):
            allowed = {norm_string(e) if isinstance(e, str) else e for e in enum}
            kept = [v for v in vals if v == "" or (norm_string(v) if isinstance(v, str) else v) in allowed]
            if not [v for v in kept if v != ""]:
                if "" in vals:
                    continue
                return "strong_only", f"needs a value of {p} outside the narrowed enum", None
            vals = kept
        out[p] = vals
    return "weak", "", {weak["name"]: out}


def call_from_answer(answer: dict) -> dict:
    """The call a training target shows: each parameter with its first acceptable value ("" alone
    means leave it out); nested objects likewise."""
    def pick(vals):
        real = [v for v in vals if v != ""]
        if not real:
            return None
        v = real[0]
        if isinstance(v, dict):
            return {k: x for k, x in ((k, pick(vv)) for k, vv in v.items()) if x is not None}
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            return [{k: x for k, x in ((k, pick(vv)) for k, vv in d.items()) if x is not None} for d in v]
        return v

    (name, args), = answer.items()
    out = {p: x for p, x in ((p, pick(v)) for p, v in args.items()) if x is not None}
    return {"name": name, "arguments": out}


# ----------------------------------------------------------------------------- BM25 neighbours
def tokens(spec: dict) -> list[str]:
    text = f"{spec['name']} {spec.get('description', '')}"
    return re.findall(r"[a-z0-9]+", re.sub(r"([a-z])([A-Z])", r"\1 \2", text).lower())


class Neighbours:
    """BM25 (rank_bm25's Okapi) over the tools' names and descriptions; `of(name, k)` are the k tools
    most similar to that tool's own description, ties broken by name (deterministic)."""

    def __init__(self, specs: Sequence[dict]):
        from rank_bm25 import BM25Okapi

        self.specs = sorted(specs, key=lambda s: norm_name(s["name"]))
        self.index = {norm_name(s["name"]): i for i, s in enumerate(self.specs)}
        self.bm25 = BM25Okapi([tokens(s) or ["_"] for s in self.specs]) if self.specs else None

    def of(self, spec: dict, k: int, exclude: Sequence[str] = ()) -> list[dict]:
        if self.bm25 is None:
            return []
        scores = self.bm25.get_scores(tokens(spec))
        skip = {norm_name(spec["name"]), *map(norm_name, exclude)}
        order = sorted(range(len(self.specs)), key=lambda i: (-round(float(scores[i]), 9),
                                                              norm_name(self.specs[i]["name"])))
        return [self.specs[i] for i in order if norm_name(self.specs[i]["name"]) not in skip][:k]


# ----------------------------------------------------------------------------- scenarios
def _example(row: dict, scenario: str, tools: list[dict], expected: str, answer: list[dict] | None,
             grades: dict, seed, shuffle: bool = True, **extra) -> dict:
    tools = list(tools)
    if shuffle:
        rng(seed, "order", row["id"], scenario).shuffle(tools)
    tools.append(DEFAULT_TOOL)
    bm25_order = {t["name"]: i for i, t in enumerate(extra.pop("bm25", tools))}
    ranking = sorted((t["name"] for t in tools),
                     key=lambda n: (-grades.get(n, 0), n == DEFAULT, bm25_order.get(n, len(bm25_order))))
    call = call_from_answer(answer[0]) if answer else {"name": DEFAULT, "arguments": {}}
    return {"id": f"{row['id']}/{scenario}", "row": row["id"], "split": row["split"], "scenario": scenario,
            "category": row["category"], "question": row["question"], "tools": tools, "expected": expected,
            "answer": answer, "grades": {n: g for n, g in grades.items() if g}, "ranking": ranking, "call": call,
            **extra}


def scenarios_of(row: dict, target: dict | None, weak: dict | None, neighbours: list[dict], k: int,
                 seed, with_plain: bool) -> list[dict]:
    """Every scenario example of one BFCL row (see the module docstring). `target` is the gold tool
    (None for an irrelevance row), `weak` its variant (None: no weak scenarios), `neighbours` its BM25 neighbours (best first)."""
    if row["kind"] == "irrelevance":
        return [_example(row, "irrelevance", row["functions"], DEFAULT, None, {DEFAULT: 3}, seed)]
    answer = row["answer"]
    name = target["name"]
    near = neighbours[:k]
    out = [_example(row, "zero_to_one_absent", near, DEFAULT, None, {DEFAULT: 3}, seed, bm25=near),
           _example(row, "zero_to_one_present", [target, *near], name, answer, {name: 3}, seed,
                    bm25=[target, *near])]
    if weak is None:  # no rule weakened the tool: there is no weaker variant to offer
        out += _plain(row, answer, name, seed, with_plain)
        return out
    label, why, weak_answer = solvability(answer[0], weak)
    if label == "weak":
        out.append(_example(row, "weak_only", [weak, *near], weak["name"], [weak_answer], {weak["name"]: 3}, seed,
                            bm25=[weak, *near], solvable=label))
    else:
        out.append(_example(row, "weak_only", [weak, *near], DEFAULT, None, {DEFAULT: 3}, seed,
                            bm25=[weak, *near], solvable=label, why=why))
    out.append(_example(row, "weak_to_strong", [target, weak, *near[:max(k - 1, 0)]], name, answer,
                        {name: 3, weak["name"]: 1 if label == "weak" else 0}, seed,
                        bm25=[target, weak, *near], solvable=label))
    return out + _plain(row, answer, name, seed, with_plain)


def _plain(row, answer, name, seed, with_plain) -> list[dict]:
    if not with_plain:
        return []
    plain = "bfcl_simple" if row["category"] in SIMPLE_CATEGORIES else "bfcl_multiple"
    return [_example(row, plain, row["functions"], name, answer, {name: 3}, seed, shuffle=False)]


# ----------------------------------------------------------------------------- rendering
def tool_objects(tools: list[dict]):
    from jaxlm.infer.protocol import FunctionSpec, Tool

    return [Tool(type="function", function=FunctionSpec(name=t["name"], description=t.get("description"),
                                                        parameters=t.get("parameters"))) for t in tools]


def openai_tools(tools: list[dict]) -> list[dict]:
    """The tools as an OpenAI request's `tools` (what `jaxlm serve` takes)."""
    return [t.model_dump(exclude_none=True) for t in tool_objects(tools)]


def prompt_messages(question: list[dict], tools: list[dict], rank: bool = False) -> list[dict]:
    """The chat a model sees: exactly what `jaxlm serve` renders for these messages and tools (its
    tool prompt in the system message, before any system text of the row), plus the ranking
    instruction for stage-1 prompts."""
    from jaxlm.infer.protocol import tool_prompt

    text = tool_prompt(tool_objects(tools), None)
    if rank:
        text += "\n\n" + RANK_INSTRUCTION
    msgs = [dict(m) for m in question]
    if msgs and msgs[0]["role"] == "system":
        msgs[0] = {"role": "system", "content": text + "\n\n" + msgs[0]["content"]}
    else:
        msgs.insert(0, {"role": "system", "content": text})
    return msgs


def rank_target(example: dict) -> str:
    return json.dumps(example["ranking"])


def call_target(example: dict) -> str:
    c = example["call"]
    return json.dumps({"name": c["name"], "arguments": c["arguments"]})


def records(example: dict) -> tuple[dict, dict]:
    """(stage-1 record, stage-2 record): chat records whose assistant turn is the ranking (a JSON list
    of names) or the call ({"name", "arguments"} as JSON, the form `jaxlm serve` parses)."""
    q, tools = example["question"], example["tools"]
    meta = {"id": example["id"], "scenario": example["scenario"]}
    return ({"messages": prompt_messages(q, tools, rank=True) + [{"role": "assistant", "content": rank_target(example)}],
             "stage": 1, **meta},
            {"messages": prompt_messages(q, tools) + [{"role": "assistant", "content": call_target(example)}],
             "stage": 2, **meta})


# ----------------------------------------------------------------------------- reading replies
def parse_calls(text: str, tools: list[dict]) -> list[dict] | None:
    """The calls of a reply as `jaxlm serve` parses them ({"name", "arguments"} each), or None when the
    reply is not a call of one of the tools."""
    from jaxlm.infer.protocol import parse_tool_calls

    calls = parse_tool_calls(text, tool_objects(tools))
    if calls is None:
        return None
    out = []
    for c in calls:
        try:
            args = json.loads(c["function"]["arguments"])
        except ValueError:
            args = c["function"]["arguments"]
        out.append({"name": c["function"]["name"], "arguments": args})
    return out


def parse_ranking(text: str, names: Sequence[str]) -> list[str]:
    """The candidate names of a ranking reply, in its order (unknown names and repeats dropped); a
    reply that is not a JSON list is read as the names in the order they appear in it."""
    known = list(names)
    m = re.search(r"\[.*?\]", text, re.S)
    found: list[str] = []
    if m:
        try:
            items = json.loads(m.group(0))
            found = [str(x) for x in items] if isinstance(items, list) else []
        except ValueError:
            found = []
    if not found:
        hits = sorted((text.find(n), -len(n), n) for n in known if n in text)
        found = [n for _, _, n in hits]
    out = []
    for n in found:
        if n in known and n not in out:
            out.append(n)
    return out


def ndcg(ranking: Sequence[str], grades: dict, k: int | None = None) -> float:
    """NDCG of a ranking against graded relevance (gain 2^g - 1, log2 discount); 1.0 when nothing is
    relevant."""
    ideal = sorted(grades.values(), reverse=True)[:k]
    idcg = sum((2 ** g - 1) / math.log2(i + 2) for i, g in enumerate(ideal))
    if idcg == 0:
        return 1.0
    dcg = sum((2 ** grades.get(n, 0) - 1) / math.log2(i + 2) for i, n in enumerate(list(ranking)[:k]))
    return dcg / idcg
