"""BFCL's AST rules for one function call (or a parallel set), written out independently of the
`bfcl-eval` package (which pins its own heavy dependencies) from its documented behaviour, and held
to its checker's verdicts on tests/golden/bfcl_ast.jsonl (bench/bfcl_golden.py):

    name        the call's function name equals the expected one (dots and underscores are the same
                character: BFCL renames `a.b` to `a_b` for OpenAI-style models)
    required    every required parameter of the function's schema is present
    unexpected  no parameter outside the schema, and none the answer does not list
    types       string, integer (not a boolean), float (an integer is accepted), boolean, array /
                tuple (each element checked when `items` gives a type), dict; `any` is not checked
    strings     compared after lower-casing and removing spaces and , . / - _ * ^
    lists       compared element by element, in order (strings inside normalised as above)
    dicts       each key checked like a parameter; a missing key needs "" among its values
    optional    a parameter the call leaves out must have "" among its acceptable values
    parallel    calls matched to answers without regard to order (each call used once)

`check_call(spec, call, answer) -> (ok, reason)`; `check_calls(specs, calls, answers, parallel)`.
A call is {"name", "arguments": {param: value}}; an answer is {name: {param: [acceptable values]}}
as in BFCL's possible_answer files; a spec is BFCL's {"name", "description", "parameters"}.
"""

from __future__ import annotations

import re

_STRIP = re.compile(r"[ ,./\-_*^]")


def norm_name(name: str) -> str:
    return str(name).replace(".", "_")


def norm_string(s: str) -> str:
    """BFCL's string standardisation: lower case, without spaces and , . / - _ * ^."""
    return _STRIP.sub("", str(s)).lower()


def _type_ok(value, typ: str) -> bool:
    if typ in ("", "any", None):
        return True
    if typ == "string":
        return isinstance(value, str)
    if typ == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if typ in ("float", "number"):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if typ == "boolean":
        return isinstance(value, bool)
    if typ in ("array", "tuple"):
        return isinstance(value, list | tuple)
    if typ in ("dict", "object"):
        return isinstance(value, dict)
    return True  # an unknown schema type is not held against the call


def _norm_value(v):
    if isinstance(v, str):
        return norm_string(v)
    if isinstance(v, list | tuple):
        return [_norm_value(x) for x in v]
    if isinstance(v, bool):
        return v
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, dict):
        return {k: _norm_value(x) for k, x in v.items()}
    return v


def _value_ok(value, acceptable: list, schema: dict) -> tuple[bool, str]:
    typ = schema.get("type", "")
    if not _type_ok(value, typ):
        return False, f"wrong type: expected {typ}, got {type(value).__name__}"
    items = schema.get("items") or {}
    if typ in ("array", "tuple") and items.get("type") not in (None, "", "any", "dict", "object"):
        if not all(_type_ok(x, items["type"]) for x in value):
            return False, f"wrong type: expected a list of {items['type']}"
    if isinstance(value, dict):  # a nested object: its answer is a dict of lists
        reasons = []
        for want in acceptable:
            if isinstance(want, dict):
                ok, why = _dict_ok(value, want, schema.get("properties") or {})
                if ok:
                    return True, ""
                reasons.append(why)
        return False, reasons[0] if reasons else "wrong value"
    if isinstance(value, list) and any(isinstance(x, dict) for x in value):
        for want in acceptable:
            if isinstance(want, list) and len(want) == len(value) and all(
                    isinstance(w, dict) and _dict_ok(x, w, (items.get("properties") or {}))[0]
                    for x, w in zip(value, want)):
                return True, ""
        return False, "wrong value"
    got = _norm_value(value)
    if any(_norm_value(a) == got for a in acceptable if a != ""):
        return True, ""
    return False, f"wrong value {value!r}"


def _dict_ok(value: dict, want: dict, props: dict) -> tuple[bool, str]:
    for k, v in value.items():
        if k not in want:
            return False, f"unexpected key {k!r}"
        ok, why = _value_ok(v, want[k], props.get(k) or {})
        if not ok:
            return False, f"{k}: {why}"
    for k, vals in want.items():
        if k not in value and "" not in vals:
            return False, f"missing key {k!r}"
    return True, ""


def check_call(spec: dict, call: dict, answer: dict) -> tuple[bool, str]:
    """(passes, why not) of one call against one expected answer {name: {param: [values]}}."""
    (want_name, want), = answer.items()
    if norm_name(call.get("name", "")) != norm_name(want_name):
        return False, f"wrong function name {call.get('name')!r} (expected {want_name!r})"
    args = call.get("arguments")
    if not isinstance(args, dict):
        return False, "arguments are not an object"
    params = spec.get("parameters") or {}
    props = params.get("properties") or {}
    for p in params.get("required") or []:
        if p not in args:
            return False, f"missing required parameter {p!r}"
    for p, v in args.items():
        if p not in props or p not in want:
            return False, f"unexpected parameter {p!r}"
        ok, why = _value_ok(v, want[p], props[p])
        if not ok:
            return False, f"{p}: {why}"
    for p, vals in want.items():
        if p not in args and "" not in vals:
            return False, f"missing parameter {p!r} (not optional in the answer)"
    return True, ""


def check_calls(specs: list[dict], calls: list[dict], answers: list[dict], parallel: bool = False
                ) -> tuple[bool, str]:
    """The calls of one reply against the expected ones: one to one in order, or (parallel) matched
    without regard to order."""
    if len(calls) != len(answers):
        return False, f"wrong number of calls: {len(calls)} (expected {len(answers)})"
    by_name = {norm_name(s["name"]): s for s in specs}
    used: set[int] = set()
    for answer in answers:
        name = norm_name(next(iter(answer)))
        spec = by_name.get(name)
        if spec is None:
            return False, f"no function {name!r} among the offered ones"
        candidates = [i for i in range(len(calls)) if i not in used] if parallel else [len(used)]
        reasons = []
        for i in candidates:
            ok, why = check_call(spec, calls[i], answer)
            if ok:
                used.add(i)
                break
            reasons.append(why)
        else:
            return False, reasons[0] if reasons else "no call left"
    return True, ""
