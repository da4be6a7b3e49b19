"""The *PO robustness table: configs/sweeps/po_robustness.py's rows per method, beta and learning rate.

    python bench/po_robustness.py [runs/sweeps/po_robustness/results.jsonl] [--sft runs/sft/checkpoints]

Per cell: held-out reward accuracy and margin (HH-RLHF harmless test pairs the policy never trained on),
KL(policy || SFT) with its standard error, and the mean length of sampled responses. With --sft the SFT
model's own responses are sampled with the sweep's settings (same prompts, seed and limits), so the
length change of every cell is measured against the model it started from. The summary then says, per
method, how far accuracy moves across the grid (robustness to beta and LR), the largest KL, and whether
the method lengthens responses - the length exploitation LN-DPO and SimPO normalise away.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sft_length(sft: str, sweep_file: str) -> float:
    """Mean response length of the SFT model sampled as record_align samples the policies."""
    from jaxlm import checkpoint, sweep
    from jaxlm.align import analysis
    from jaxlm.checkpoint import model_from_checkpoint
    from jaxlm.cli.align import sampler
    from jaxlm.data.tokenizer import load_tokenizer

    s = sweep.load(sweep_file)
    a = s.analysis
    cfg, params, spec = model_from_checkpoint(sft)
    tok = load_tokenizer(spec)
    seed = sweep.point_config(s, s.points[0]).train.seed
    prompts = analysis.read_prompts(a.prompts, tok, "prompt", a.n)
    ref = checkpoint.load_params(sft)
    an = analysis.analyze(cfg, params, ref, prompts, sampler(cfg, params, a.max_new_tokens, tok.stop_ids),
                          samples=a.samples, stop_tokens=tok.stop_ids, seed=seed, max_prompt=a.get("max_prompt", 192))
    return an.summary()["len_mean"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="?", default="runs/sweeps/po_robustness/results.jsonl")
    p.add_argument("--sft", help="the SFT checkpoint the sweep started from: measure its response length")
    p.add_argument("--sweep", default=f"{ROOT / 'configs/sweeps/po_robustness.py'}:"
                                      f"{ROOT.parent / 'shared/data/preference/hh_rlhf_harmless_test.jsonl'}")
    args = p.parse_args(argv)
    path = Path(args.results)
    if not path.is_file():
        p.error(f"no results at {path}: run `jaxlm sweep run configs/sweeps/po_robustness.py:PAIRS` first")
    rows = [json.loads(line) for line in open(path) if line.strip()]
    base = sft_length(args.sft, args.sweep) if args.sft else None

    print("| method | beta | lr | reward acc | margin | KL(pi||SFT) | mean len" + (" | vs SFT" if base else "") + " |")
    print("|---" * (7 + bool(base)) + "|")
    for r in sorted(rows, key=lambda r: (r["loss_type"], r["beta"], r["lr"])):
        cells = [r["loss_type"], f"{r['beta']:g}", f"{r['lr']:g}", f"{r['accuracy']:.3f}", f"{r['margin']:.3f}",
                 f"{r['kl']:.2f} ± {r['kl_se']:.2f}", f"{r['len_mean']:.1f}"]
        if base:
            cells.append(f"{r['len_mean'] - base:+.1f}")
        print("| " + " | ".join(cells) + " |")
    if base:
        print(f"\nSFT model: mean response length {base:.1f} tokens")

    print("\n| method | cells | accuracy min-max | KL max | mean len (avg over cells) |\n|---|---|---|---|---|")
    by = {}
    for r in rows:
        by.setdefault(r["loss_type"], []).append(r)
    summary = {}
    for m, rs in sorted(by.items()):
        acc = [r["accuracy"] for r in rs]
        length = statistics.fmean(r["len_mean"] for r in rs)
        summary[m] = length
        print(f"| {m} | {len(rs)} | {min(acc):.3f}-{max(acc):.3f} | {max(r['kl'] for r in rs):.2f} | {length:.1f} |")
    if "dpo" in summary:
        for m in ("ln_dpo", "simpo"):
            if m in summary:
                d = summary[m] - summary["dpo"]
                print(f"{m} responses are {abs(d):.1f} tokens {'shorter' if d < 0 else 'longer'} than DPO's "
                      f"on average over the grid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
