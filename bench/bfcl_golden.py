"""Golden verdicts of BFCL's own AST checker, for tests/test_gentool.py to hold jaxlm.recipes.bfcl_ast to.

    pip download --no-deps bfcl-eval==2026.3.23 -d /tmp/bfcl && unzip -q /tmp/bfcl/*.whl -d /tmp/bfcl/src
    python bench/bfcl_golden.py --bfcl /tmp/bfcl/src [--data ../shared/data/tools] [--rows 30]

The `bfcl-eval` package pins heavy dependencies (every model handler), so it is not installed: its
`eval_checker/ast_eval/ast_checker.py` is imported from the unpacked wheel with the one heavy module
it reads (`constants.model_config`, for "does this model rename a.b to a_b") replaced by a stub that
says yes, as for OpenAI-style models, which is what `jaxlm serve`'s tool format is. For BFCL v4
simple_python and multiple rows (their possible answers), each expected call is perturbed: the first
acceptable values (correct), a required parameter dropped, an unexpected parameter, a wrong type, a
string changed in case and punctuation only, an integer where a float is expected, a list reversed,
a wrong function name, an omitted optional parameter. BFCL's checker judges every case; the cases
and its verdicts go to tests/golden/bfcl_ast.jsonl (BFCL data: Apache-2.0, Gorilla / UC Berkeley).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "jaxlm"


def load_checker(src: Path):
    sys.path.insert(0, str(src))
    stub = types.ModuleType("bfcl_eval.constants.model_config")
    stub.MODEL_CONFIG_MAPPING = {MODEL: types.SimpleNamespace(underscore_to_dot=True)}
    sys.modules["bfcl_eval.constants.model_config"] = stub
    from bfcl_eval.constants.enums import Language
    from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker

    return lambda specs, calls, answers, category: ast_checker(specs, calls, answers, Language.PYTHON, category, MODEL)


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def first_values(answer: dict, spec: dict) -> dict:
    """The expected call with each parameter's first acceptable value ('' = left out)."""
    (name, want), = answer.items()  # named as an OpenAI-style model must: a.b -> a_b
    return {name.replace(".", "_"): {p: vals[0] for p, vals in want.items() if vals and vals[0] != ""}}


def variants(spec: dict, answer: dict) -> list[tuple[str, dict]]:
    """(kind, call in BFCL's model-output form {name: {param: value}}) for one expected call."""
    base = first_values(answer, spec)
    (name, args), = base.items()
    props = (spec.get("parameters") or {}).get("properties") or {}
    required = (spec.get("parameters") or {}).get("required") or []
    out = [("correct", base)]
    for p in required:
        if p in args:
            out.append(("missing_required", {name: {k: v for k, v in args.items() if k != p}}))
            break
    out.append(("unexpected_parameter", {name: {**args, "jaxlm_extra": 1}}))
    for p, v in args.items():
        typ = props.get(p, {}).get("type")
        if typ in ("integer", "float") and not isinstance(v, bool):
            out.append(("number_as_string", {name: {**args, p: str(v)}}))
            if typ == "float" and float(v).is_integer():
                out.append(("int_for_float", {name: {**args, p: int(v)}}))
            break
    for p, v in args.items():
        if isinstance(v, str) and v:
            out.append(("string_case_punctuation", {name: {**args, p: v.upper().replace(" ", " ,")}}))
            out.append(("string_different", {name: {**args, p: v + "zz"}}))
            break
    for p, v in args.items():
        if isinstance(v, list) and len(v) > 1 and v != v[::-1]:
            out.append(("list_reversed", {name: {**args, p: list(reversed(v))}}))
            break
    out.append(("wrong_name", {name + "_x": dict(args)}))
    (_, want), = answer.items()
    for p, vals in want.items():
        if "" in vals and len(vals) > 1 and p in args:
            out.append(("optional_omitted", {name: {k: v for k, v in args.items() if k != p}}))
            break
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bfcl", required=True, help="the unpacked bfcl-eval wheel (the folder holding bfcl_eval/)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tools"))
    p.add_argument("--rows", type=int, default=30, help="rows per category")
    p.add_argument("--max-spec-chars", type=int, default=1200)
    p.add_argument("--out", default=str(ROOT / "tests" / "golden" / "bfcl_ast.jsonl"))
    args = p.parse_args(argv)
    if not (Path(args.bfcl) / "bfcl_eval" / "eval_checker" / "ast_eval" / "ast_checker.py").is_file():
        p.error(f"--bfcl {args.bfcl}: no bfcl_eval/eval_checker/ast_eval/ast_checker.py there (unpack the wheel)")
    data = Path(args.data)
    for name in ("BFCL_v4_simple_python.json", "BFCL_v4_multiple.json"):
        if not (data / name).is_file() or not (data / "possible_answer" / name).is_file():
            p.error(f"--data {data}: {name} and possible_answer/{name} are needed")
    check = load_checker(Path(args.bfcl))
    cases = []
    for category, fname in (("simple", "BFCL_v4_simple_python.json"), ("multiple", "BFCL_v4_multiple.json")):
        answers = {r["id"]: r["ground_truth"] for r in read_jsonl(data / "possible_answer" / fname)}
        kept = 0
        for row in read_jsonl(data / fname):
            specs = row["function"]
            if row["id"] not in answers or len(json.dumps(specs)) > args.max_spec_chars:
                continue
            answer = answers[row["id"]]
            if len(answer) != 1:
                continue
            (want_name, _), = answer[0].items()
            spec = next(s for s in specs if s["name"] == want_name)
            for kind, call in variants(spec, answer[0]):
                res = check(copy.deepcopy(specs), [copy.deepcopy(call)], copy.deepcopy(answer), category)
                cases.append({"id": row["id"], "category": category, "kind": kind, "functions": specs,
                              "call": call, "answer": answer, "valid": bool(res["valid"]),
                              "bfcl_error": res.get("error_type", "")})
            kept += 1
            if kept >= args.rows:
                break
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(c, sort_keys=True) + "\n" for c in cases))
    kinds: dict[str, list[int]] = {}
    for c in cases:
        kinds.setdefault(c["kind"], [0, 0])[c["valid"]] += 1
    print(f"{len(cases)} cases -> {out}")
    for k, (bad, good) in sorted(kinds.items()):
        print(f"  {k:24s} valid {good:3d}  invalid {bad:3d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
