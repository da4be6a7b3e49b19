"""Preference training end to end: pair data, reference log-probs, DPO learning, KL/length analysis."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from jaxlm import config as run_config
from jaxlm import parallel
from jaxlm.align import analysis, reference
from jaxlm.align.data import PrefConfig, load_pairs, make_rows, truncate
from jaxlm.align.train import AlignTask, make_loss_fn
from jaxlm.cli.align import sampler
from jaxlm.data.sources import DataError
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.model import forward, init_params
from jaxlm.train.loop import train

TOK = "asset:tiny_bpe.json"
GOOD = "sun moon star light gold bright".split()
BAD = "rock stone dust mud ash grey".split()
TOPIC = "king queen sea storm night ship".split()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOK)


def synthetic_pairs(path, n, seed):
    """Prompts of random words; the chosen reply uses 'bright' words, the rejected one 'dull' words."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choice(TOPIC, rng.integers(2, 6))) + " ?"
            c = " " + " ".join(rng.choice(GOOD, rng.integers(2, 8)))
            r = " " + " ".join(rng.choice(BAD, rng.integers(2, 8)))
            f.write(json.dumps({"prompt": prompt, "chosen": c, "rejected": r}) + "\n")
    return path


def test_truncation_keeps_prompt_end_and_response_start():
    p, c, r = list(range(100)), list(range(100, 150)), list(range(200, 230))
    p2, c2, r2, cut = truncate(p, c, r, max_length=64, max_prompt_length=40)
    assert cut and p2 == p[-40:] and c2 == c[:24] and r2 == r[:24]
    assert truncate(p[:10], c[:5], r[:5], 64, 40)[3] is False


def test_pair_records_forms_and_bad_rows(tmp_path, tok):
    rows = [
        {"prompt": "hello there", "chosen": " fine", "rejected": " go away"},
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: leave"},
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
         "rejected": [{"role": "assistant", "content": "no"}]},
        {"prompt": "x", "chosen": " ", "rejected": " no"},        # 4 empty response
        {"prompt": "x", "chosen": " same", "rejected": " same"},  # 5 chosen equals rejected
        {"prompt": "x", "chosen": " yes"},                        # 6 missing field
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    cfg = PrefConfig(str(path), max_length=64, max_prompt_length=32, max_bad_fraction=0.6)
    pairs = load_pairs(cfg, tok)
    assert len(pairs) == 3
    assert dict(pairs.report.bad) == {"empty response": 1, "chosen equals rejected": 1, "missing field": 1,
                                      "malformed JSON": 1}
    assert pairs.report.examples["chosen equals rejected"] == [f"{path}:5"]
    # HH shared prefix: the prompt ends with the last "\n\nAssistant:"
    assert tok.decode(pairs.prompts[1]) == "\n\nHuman: hi\n\nAssistant:"
    assert tok.decode(pairs.chosen[1]) == " hello<|endoftext|>"
    # chat form: the prompt ends with <|assistant|>, the response is the assistant turn and its <|end|>
    assert tok.decode(pairs.prompts[2]).endswith("<|end|><|assistant|>")
    assert tok.decode(pairs.chosen[2]) == "hello<|end|>"
    with pytest.raises(DataError, match="more than data.max_bad_fraction"):
        load_pairs(PrefConfig(str(path), 64, 32, max_bad_fraction=0.1), tok)


def test_rows_interleave_pairs_and_mask_responses(tmp_path, tok):
    pairs = load_pairs(PrefConfig(str(synthetic_pairs(tmp_path / "s.jsonl", 4, 0)), 48, 24), tok)
    rows = make_rows(pairs, np.array([2, 0]), 48)
    assert rows["tokens"].shape == (4, 48) and list(rows["index"]) == [2, 2, 0, 0]
    for row, resp in ((0, pairs.chosen[2]), (1, pairs.rejected[2]), (2, pairs.chosen[0])):
        assert list(rows["targets"][row][rows["loss_mask"][row] == 1]) == list(resp)
        assert rows["lengths"][row] == len(resp)


def test_precomputed_equals_in_step_and_naive_reference(tmp_path, tok):
    cfg = tiny_config()
    model_cfg = run_config.build(cfg).model
    params = init_params(model_cfg, jax.random.key(3))
    pairs = load_pairs(PrefConfig(str(synthetic_pairs(tmp_path / "s.jsonl", 10, 1)), 48, 24), tok)
    mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    pre = reference.pair_logps(model_cfg, params, pairs, 4, 48, mesh, cfg.parallel.rules, 16)
    for e in (0, 7, 9):  # naive: full log-softmax over the unpadded sequence
        for j, resp in enumerate((pairs.chosen[e], pairs.rejected[e])):
            seq = np.concatenate([pairs.prompts[e], resp])
            lp = jax.nn.log_softmax(forward(model_cfg, params, jnp.asarray(seq[None, :-1]))[0], -1)
            naive = float(lp[jnp.arange(len(seq) - 1), seq[1:]][len(pairs.prompts[e]) - 1:].sum())
            assert abs(pre[e, j] - naive) < 1e-4
    # the loss with precomputed log-probs equals the loss with the frozen reference in the step
    cfg.align.update(loss="dpo", beta=0.5)
    policy = init_params(model_cfg, jax.random.key(4))
    rows = make_rows(pairs, np.arange(8), 48)
    batch = {k: jnp.asarray(rows[k]) for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions",
                                                "lengths")}
    batch["ref_logps"] = jnp.asarray(pre[rows["index"], np.arange(16) % 2], jnp.float32)
    cfg.align.reference = "precomputed"
    a = make_loss_fn(model_cfg, run_config.build(cfg).align, 16)(policy, batch, None)
    cfg.align.reference = "checkpoint"
    b = make_loss_fn(model_cfg, run_config.build(cfg).align, 16)(policy, batch, params)
    assert abs(float(a[0]) - float(b[0])) < 1e-4 and float(a[1]) == 8
    for k in a[2]:
        assert abs(float(a[2][k]) - float(b[2][k])) < 1e-3, k


@pytest.mark.parametrize("loss,reference", [("dpo", "precomputed"), ("simpo", "none")])
def test_preference_training_learns_held_out_pairs(tmp_path, loss, reference):
    cfg = tiny_config(tmp_path, steps=25, lr=3e-3, warmup_steps=0, batch_size=8)
    cfg.data.update(train=str(synthetic_pairs(tmp_path / "train.jsonl", 200, 2)),
                    eval=str(synthetic_pairs(tmp_path / "eval.jsonl", 40, 3)), seq_len=48)
    cfg.align.update(loss=loss, beta=0.5, reference=reference, max_prompt_length=24, ref_cache_dir=str(tmp_path))
    cfg.train.update(eval_every=25, eval_batches=0)
    out = train(cfg, task=AlignTask(run_config.build(cfg)))
    ev = out.eval
    assert ev["pairs"] == 40 and ev["rewards/accuracies"] > 0.9, ev
    if reference == "precomputed":
        assert len(list(tmp_path.glob("train.ref-*.npy"))) == 1  # cached in align.ref_cache_dir


def test_kl_and_length_analysis(tmp_path, tok):
    cfg = tiny_config()
    model_cfg = run_config.build(cfg).model
    a_params = init_params(model_cfg, jax.random.key(0))
    b_params = init_params(model_cfg, jax.random.key(1))
    prompts = [tok.encode(p) for p in ("the king", "a storm at sea", "night")]
    sample = sampler(model_cfg, a_params, 12, tok.stop_ids)
    same = analysis.analyze(model_cfg, a_params, a_params, prompts, sample, samples=2, stop_tokens=tok.stop_ids,
                            seed=0)
    assert same.kl == 0.0 and same.samples_per_prompt == 2 and len(same.lengths) == 6
    other = analysis.analyze(model_cfg, a_params, b_params, prompts, sample, samples=2, stop_tokens=tok.stop_ids,
                             seed=0)
    assert other.kl > 0.1  # KL of two different models is positive (and estimated from the same samples)
    assert np.array_equal(other.lengths, same.lengths)
    m, se = analysis.kl_estimate(np.array([[1.0, 3.0], [2.0, 2.0], [6.0, 4.0]]))
    assert m == pytest.approx(3.0) and se == pytest.approx(np.std([2, 2, 5], ddof=1) / np.sqrt(3))
    s = analysis.length_stats([1, 2, 3, 4, 10])
    assert (s["mean"], s["median"], sum(s["hist"])) == (4.0, 3.0, 5) and s["p90"] == pytest.approx(7.6)
    png = analysis.plot({"a": same, "b": other}, tmp_path / "an.png")
    assert png.stat().st_size > 1000
