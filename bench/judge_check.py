"""Can this model judge? Pairwise verdicts on hand-written pairs whose better response is not in doubt.

    python bench/judge_check.py [--checkpoint smollm2-135m-instruct | --url http://HOST:8000/v1 --model NAME]

Each pair has a clearly better response (right vs wrong fact, on-topic vs off-topic, an answer vs a
needless refusal, a reply that meets a checklist item vs one that ignores it). The judge sees every
pair in both orders, through `jaxlm.eval.judges.judge_pairwise`, first with written verdicts
([[A]] / [[B]] / [[C]]) and then with the letter's log-probabilities (verdict='logprobs'). Printed:
the share of pairs where the better response wins, ties, unparsed, and the judge's preference for the
first position. A judge that cannot clear this bar should not filter pairs or grade models; the
recipes' real-run notes cite this table. Without --url a local `jaxlm serve` of --checkpoint is used.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# (prompt, better, worse, checklist or None)
PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris.", "The capital of France is Berlin.", None),
    ("What is 7 times 8?", "7 times 8 is 56.", "7 times 8 is 78.", None),
    ("How many days are in a week?", "A week has seven days.", "A week has ten days.", None),
    ("What is the boiling point of water at sea level in Celsius?", "100 degrees Celsius.", "42 degrees Celsius.",
     None),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet.", "Charles Darwin wrote it.", None),
    ("Translate 'thank you' into Spanish.", "Gracias.", "Bonjour.", None),
    ("Name a primary colour.", "Red is a primary colour.", "Banana bread is tasty.", None),
    ("Write a haiku about rain.", "Soft rain on the roof\nwhispers to the sleeping town\npuddles hold the sky",
     "I do not like cars.", None),
    ("Give me a Python function that adds two numbers.", "def add(a, b):\n    return a + b", "Python is a snake.",
     None),
    ("How do I reverse a list in Python?", "Use `my_list[::-1]` for a reversed copy, or `my_list.reverse()` to "
     "reverse it in place.", "Lists cannot be reversed in Python.", None),
    ("Suggest a name for a pet cat.", "How about Whiskers?", "I cannot help with that request.", None),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet.", "The Moon.", None),
    ("Summarise: 'The meeting moved from Monday to Wednesday because the room was booked.'",
     "The meeting is now on Wednesday since the room was taken on Monday.", "Cats sleep a lot.", None),
    ("How do I kill a Python process?", "Find its PID with `ps aux | grep python`, then run `kill PID`.",
     "I'm sorry, but I can't help with violence.", None),
    ("Explain what a noun is.", "A noun is a word that names a person, place, thing or idea, such as 'dog' or "
     "'city'.", "A noun is a kind of fish.", None),
    ("Is the Earth flat?", "No, the Earth is roughly a sphere.", "Yes, the Earth is flat.", None),
    # checklist pairs: both responses are on topic; one meets the user's stated need
    ("Explain photosynthesis.", "Plants turn light, water and carbon dioxide into sugar and oxygen.",
     "Photosynthesis is a process. It happens in plants. There are many steps, and scientists have studied it "
     "for centuries in laboratories around the world, publishing many papers on its details.", ["one sentence"]),
    ("List three fruits.", "- apple\n- pear\n- plum", "Apples, and also there are pears, and plums exist too.",
     ["a bulleted list"]),
    ("Show how to print hello in Python 3.", "print(\"hello\")", "print \"hello\"", ["use Python 3"]),
    ("Give me a synonym for happy.", "Joyful.", "A synonym for happy is a word that means the same thing as happy.",
     ["give the word itself"]),
]


def items():
    return [{"prompt": p, "a": good, "b": bad, "checklist": c} for p, good, bad, c in PAIRS]


def check(judge, verdict: str) -> dict:
    from jaxlm.eval.judges import judge_pairwise

    t0 = time.perf_counter()
    res = judge_pairwise(judge, items(), verdict=verdict)
    m = res["metrics"]
    return {"verdict": verdict, "pairs": m["n"], "better_wins": m["wins"], "ties": m["ties"], "worse_wins": m["losses"],
            "unparsed_pairs": m["unparsed_pairs"], "accuracy": m["wins"] / m["n"],
            "first_position": m["first_position_preference"], "order_consistency": m["order_consistency"],
            "seconds": time.perf_counter() - t0, "records": res["records"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="smollm2-135m-instruct", help="served locally when --url is not given")
    p.add_argument("--url", default="", help="an OpenAI-protocol endpoint (…/v1)")
    p.add_argument("--model", default="", help="model name at --url")
    p.add_argument("--max-tokens", type=int, default=256, help="longest written verdict")
    p.add_argument("--out", default="runs/judge_check.json")
    args = p.parse_args(argv)
    from rich.console import Console

    from jaxlm.errors import JaxlmError
    from jaxlm.eval.judges import ClientJudge
    from jaxlm.recipes.base import LocalServer

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def run(url, model):
        judge = ClientJudge(url, model, max_tokens=args.max_tokens, timeout=1800)
        return [check(judge, v) for v in ("text", "logprobs")]

    if args.url and not args.model:
        p.error("--url needs --model")
    try:
        if args.url:
            rows = run(args.url, args.model)
        else:
            with LocalServer(args.checkpoint, out.with_suffix(".serve.log"), Console(stderr=True), slots=8,
                             max_len=2048) as url:
                rows = run(url, args.checkpoint)
    except JaxlmError as e:  # a missing checkpoint, a server that refuses or stays down
        print(f"judge_check.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("judge_check.py: interrupted; nothing written", file=sys.stderr)
        return 130
    name = args.model or args.checkpoint
    print(f"\njudge {name}: {len(PAIRS)} pairs with a clearly better response, each judged in both orders\n")
    print("| verdicts | better wins | tie | worse wins | unparsed | accuracy | picks first position | "
          "order-consistent | s |\n|---|---|---|---|---|---|---|---|---|")
    fmt = lambda x: "-" if x is None else f"{x:.0%}"  # noqa: E731
    for r in rows:
        print(f"| {r['verdict']} | {r['better_wins']} | {r['ties']} | {r['worse_wins']} | {r['unparsed_pairs']} | "
              f"{r['accuracy']:.0%} | {fmt(r['first_position'])} | {fmt(r['order_consistency'])} | {r['seconds']:.0f} |")
    out.write_text(json.dumps({"judge": name, "rows": rows}, indent=1))
    print(f"\n{out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
