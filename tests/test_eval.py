"""`jaxlm eval`: perplexity overall and per group, against an independent per-document computation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
from conftest import tiny_config

from jaxlm import checkpoint
from jaxlm import config as run_config
from jaxlm.cli import main
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.model import forward, init_params


def test_eval_per_group_perplexity(tmp_path, capsys):
    cfg = tiny_config()
    model_cfg = run_config.build(cfg).model
    params = init_params(model_cfg, jax.random.key(1))
    tok = load_tokenizer(cfg.data.tokenizer)
    ckpt = tmp_path / "ckpt"
    checkpoint.save_params(ckpt, params, run_config.to_dict(cfg), tok.spec())

    rng = np.random.default_rng(0)
    words = "to be or not that is the question whether tis nobler in mind".split()
    rows = [{"text": " ".join(rng.choice(words, rng.integers(3, 30))), "family": fam}
            for fam in ("Germanic", "Romance", "Slavic") for _ in range(5)]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "results.jsonl"
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--group-field", "family",
                 "--out", str(out)]) == 0
    assert "family=Romance" in capsys.readouterr().out
    res = json.loads(out.read_text())

    nll, count = {}, {}
    for r in rows:  # each document alone, unpacked
        ids = tok.encode(r["text"]) + [tok.eos_id]
        logits = forward(model_cfg, params, jnp.asarray([ids[:-1]]))[0]
        lp = jax.nn.log_softmax(logits, -1)[jnp.arange(len(ids) - 1), jnp.asarray(ids[1:])]
        nll[r["family"]] = nll.get(r["family"], 0.0) - float(lp.sum())
        count[r["family"]] = count.get(r["family"], 0) + len(ids) - 1
    for fam in nll:
        g = res["groups"][fam]
        assert g["tokens"] == count[fam]
        assert abs(g["loss"] - nll[fam] / count[fam]) < 1e-4
    assert abs(res["loss"] - sum(nll.values()) / sum(count.values())) < 1e-4
    assert abs(res["ppl"] - np.exp(res["loss"])) < 1e-6 * res["ppl"]


def test_quickstart_runs_end_to_end(tmp_path, capsys):
    run = tmp_path / "qs"
    assert main(["train", "--config", "configs/quickstart.py", "--config.train.steps=4",
                 "--config.train.eval_batches=1", "--config.log.every=2", "--config.log.sample_tokens=8",
                 f"--config.log.dir={run}", "--config.model.num_layers=1"]) == 0
    out = capsys.readouterr()
    assert "held-out perplexity" in out.err and "ROMEO." in out.out
    assert (run / "checkpoints" / "4" / "params").is_dir()
    assert any((run / "tensorboard").glob("events.out.tfevents.*"))
    assert [json.loads(x)["step"] for x in open(run / "metrics.jsonl") if '"lr"' in x] == [1, 2, 3, 4]
