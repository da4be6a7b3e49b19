"""Tokenizer backends and the Phi chat template."""

import json
import re

import pytest

from jaxlm.data.tokenizer import (
    TokenizerError,
    apply_chat_template,
    load_tokenizer,
    train_bpe,
)


@pytest.fixture(scope="module")
def tiny():
    return load_tokenizer("asset:tiny_bpe.json")


def test_o200k_hello_world(shared_data):
    tok = load_tokenizer(f"o200k_base:{shared_data}/tokenizers/o200k_base.tiktoken")
    assert tok.encode("Hello world") == [13225, 2375]
    assert tok.encode("<|endoftext|>") == [199999]


def test_gpt2_hello_world(shared_data):
    tok = load_tokenizer(shared_data / "tokenizers" / "gpt2.tiktoken")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eos_id == 50256


def test_phi4_specials_and_chat_template(shared_data):
    tok = load_tokenizer(f"phi4:{shared_data}/tokenizers/o200k_base.tiktoken")
    for name, i in {"<|endoftext|>": 199999, "<|assistant|>": 200019, "<|end|>": 200020, "<|user|>": 200021,
                    "<|system|>": 200022}.items():
        assert tok.token_id(name) == i
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"},
            {"role": "assistant", "content": "Hello world"}]
    ids, mask = apply_chat_template(tok, msgs)
    text = tok.decode(ids)
    assert text == "<|system|>Be brief.<|end|><|user|>Hello world<|end|><|assistant|>Hello world<|end|>"
    assert ids[-4:] == [200019, 13225, 2375, 200020]
    # the loss mask covers exactly the assistant's reply and its <|end|>
    assert [i for i, m in zip(ids, mask) if m] == [13225, 2375, 200020]
    gen_ids, gen_mask = apply_chat_template(tok, msgs[:2], add_generation_prompt=True)
    assert gen_ids[-1] == 200019 and sum(gen_mask) == 0


def test_round_trip_multilingual(shared_data, tiny):
    tok = load_tokenizer(f"o200k_base:{shared_data}/tokenizers/o200k_base.tiktoken")
    for lang in ("ja", "hi", "ru", "ar"):
        with open(shared_data / "multilingual" / f"{lang}.jsonl") as f:
            text = json.loads(f.readline())["text"]
        assert tok.decode(tok.encode(text)) == text
        assert tiny.decode(tiny.encode(text)) == text  # byte-level: any UTF-8 survives


def test_tiny_bpe_asset(tiny):
    assert tiny.vocab_size == 2048
    assert tiny.special_tokens["<|pad|>"] == 0 and tiny.pad_id == 0
    text = "To be, or not to be, that is the question."
    ids = tiny.encode(text)
    assert tiny.decode(ids) == text and len(ids) < len(text) / 2  # it learned merges
    # special strings in text become special ids only when asked
    assert tiny.encode("a<|end|>")[-1] == tiny.token_id("<|end|>")
    plain = tiny.encode("a<|end|>", special=False)
    assert tiny.token_id("<|end|>") not in plain and tiny.decode(plain) == "a<|end|>"


def test_train_bpe_is_deterministic():
    texts = ["the cat sat on the mat"] * 50 + ["a dog and a cat"] * 20
    a, b = train_bpe(texts, 300), train_bpe(texts, 300)
    assert a.encode("the cat and the dog") == b.encode("the cat and the dog")
    assert len(a.encode("the cat")) <= 3


def test_spec_round_trip(tiny):
    again = load_tokenizer(tiny.spec())
    assert again.encode("Hello there") == tiny.encode("Hello there")


def test_errors(tmp_path, tiny):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "missing.tiktoken")
    with pytest.raises(TokenizerError, match="cannot tell"):
        load_tokenizer(tmp_path / "vocab.txt")
    with pytest.raises(TokenizerError, match=re.escape("no special token '<|nope|>'")):
        tiny.token_id("<|nope|>")
    with pytest.raises(TokenizerError, match="message 0"):
        apply_chat_template(tiny, [{"role": "robot", "content": "hi"}])
