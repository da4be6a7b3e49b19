"""Multilingual scaling-law data (He et al., 2024): model sizes x token budgets x family sampling ratios
over three language families of a folder of per-language JSON Lines (xx.jsonl, and families.json: in
this project's checkout ../shared/data/multilingual), each run evaluated per family.

    jaxlm sweep run configs/sweeps/multilingual.py:DATA_DIR
    jaxlm fit multilingual runs/sweeps/multilingual/results.jsonl

The Germanic share takes three values with the rest split evenly; two more mixtures hold Germanic at
0.4 and move the Romance/Slavic split, for the independence check, and two seed replicates of the 0.4
mixture (smallest size, first budget) measure the run-to-run noise that check compares against. A byte-level BPE is trained once
on the training text of all 12 languages.
"""

import ml_collections

from jaxlm.errors import ConfigError
from jaxlm.sweep import named, product

FAMILIES = {"Germanic": ("en", "de", "nl", "sv"), "Romance": ("fr", "es", "pt_BR", "ca"),
            "Slavic": ("ru", "pl", "cs", "uk")}
HELD_OUT = 80  # last records of each language file
SIZES = {"xs": dict(hidden_size=64, intermediate_size=192, num_layers=2, num_heads=2, num_kv_heads=1),
         "s": dict(hidden_size=128, intermediate_size=384, num_layers=3, num_heads=4, num_kv_heads=2)}
STEPS = (150, 300)  # two token budgets: the law's D term needs at least two


def mixture(ml: str, shares: dict) -> str:
    parts = []
    for fam, langs in FAMILIES.items():
        for lang in langs:
            parts.append(f"{ml}/{lang}.jsonl[:-{HELD_OUT}]@{shares[fam] / len(langs):.6f}")
    return ", ".join(parts)


MIXTURES = {
    "g0.2": {"Germanic": 0.2, "Romance": 0.4, "Slavic": 0.4},
    "g0.4": {"Germanic": 0.4, "Romance": 0.3, "Slavic": 0.3},
    "g0.6": {"Germanic": 0.6, "Romance": 0.2, "Slavic": 0.2},
    "g0.4r": {"Germanic": 0.4, "Romance": 0.45, "Slavic": 0.15},  # independence: Germanic fixed
    "g0.4s": {"Germanic": 0.4, "Romance": 0.15, "Slavic": 0.45},
}


def get_config(ml: str = ""):
    if not ml:
        raise ConfigError("the multilingual sweep needs its data folder: configs/sweeps/multilingual.py:DATA_DIR "
                          "(e.g. ../shared/data/multilingual)")
    langs = [lang for ls in FAMILIES.values() for lang in ls]
    s = ml_collections.ConfigDict()
    s.name = "multilingual"
    s.base = "configs/tiny.py"
    s.command = "train"
    s.init = ""
    s.dir = "runs/sweeps/multilingual"
    s.record = "multilingual"
    s.families = f"{ml}/families.json"
    tokenizer = f"{s.dir}/tokenizer.json"
    s.prepare = ((tokenizer, "tokenizer", {"data": ", ".join(f"{ml}/{x}.jsonl[:-{HELD_OUT}]" for x in langs),
                                           "vocab_size": 4096, "max_records": 600}),)
    s.fixed = (("data.tokenizer", tokenizer), ("model.vocab_size", 4096), ("data.seq_len", 128),
               ("data.eval", ", ".join(f"{ml}/{x}.jsonl[-{HELD_OUT}:]" for x in langs)), ("data.group_field", "family"),
               ("train.batch_size", 16), ("train.lr", 3e-3), ("train.warmup_steps", 15), ("train.eval_batches", 0),
               ("log.sample_prompt", ""), ("checkpoint.keep", 1))
    def size(name):
        return {f"model.{k}": v for k, v in SIZES[name].items()}

    def budget(steps):
        return {"train.steps": steps, "train.eval_every": steps, "checkpoint.every": steps}

    sizes = named({name: size(name) for name in SIZES})
    mixes = named({name: {"data.train": mixture(ml, shares)} for name, shares in MIXTURES.items()})
    budgets = named({f"t{steps}": budget(steps) for steps in STEPS})
    # seed replicates of one mixture: the independence check's noise comes from them (an F test)
    reps = named({f"g0.4-seed{k}": {"data.train": mixture(ml, MIXTURES["g0.4"]), "train.seed": k} for k in (1, 2)})
    smallest = named({"xs": size("xs")})
    first = named({f"t{STEPS[0]}": budget(STEPS[0])})
    s.points = product(sizes, budgets, mixes) + product(smallest, first, reps)
    return s
