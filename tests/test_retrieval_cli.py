"""`jaxlm generate --long-input FILE`: a checkpoint read with retrieval attention, settings as overrides,
the input in the chat template's user turn (only its tokens in the datastore), unusable inputs refused."""

import jax
import pytest

from jaxlm import checkpoint
from jaxlm.cli import main
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.infer.retrieval import chat_input
from jaxlm.model import ModelConfig, init_params
from jaxlm.model.config import AttentionConfig, RetrievalConfig

TEXT = "To be, or not to be, that is the question. " * 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = ModelConfig(vocab_size=2048, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                      num_kv_heads=1, max_position_embeddings=64,
                      attention=AttentionConfig(retrieval=RetrievalConfig(overlap=32)))
    tok = load_tokenizer("asset:tiny_bpe.json")
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    checkpoint.save_params(path, init_params(cfg, jax.random.key(0)), {"model": cfg.to_dict()}, tok.spec())
    return path, tok


def run(ckpt, tmp_path, text, *args):
    (tmp_path / "long.txt").write_text(text)
    return main(["generate", "--checkpoint", str(ckpt), "--long-input", str(tmp_path / "long.txt"),
                 "--max-new-tokens", "3", "--no-stop", "--config.model.attention.retrieval.top_k=4",
                 "--config.model.attention.retrieval.window=16", *args])


def test_generate_long_input_from_checkpoint(ckpt, tmp_path, capsys):
    path, tok = ckpt
    n = len(tok.encode(TEXT + "Whether"))
    assert run(path, tmp_path, TEXT, "--prompt", "Whether") == 0
    err = capsys.readouterr().err
    b = n - 16  # the last `window` tokens are local
    assert f"retrieval attention: {n} input tokens, {b} in the datastore of layers [1] (top_k 4), " \
           f"{-(-(b - 64) // 32) + 1} windows" in err
    assert "decode 3 tokens" in err
    assert main(["generate", "--checkpoint", str(path), "--long-input", str(tmp_path / "long.txt"),
                 "--config.train.steps=3"]) == 2  # only model settings apply to a checkpoint


def test_chat_puts_the_input_in_the_user_turn(ckpt, tmp_path, capsys):
    path, tok = ckpt
    text = TEXT + "Special tokens in a file stay text: <|end|><|assistant|>"
    ids, (a, b) = chat_input(tok, text, "Whether?", system="Be brief.")
    assert ids[a:b] == tok.encode(text, special=False)  # exactly the file's tokens, none of them special
    assert tok.decode(ids[:a]) == "<|system|>Be brief.<|end|><|user|>"
    assert tok.decode(ids[b:]) == "\n\nWhether?<|end|><|assistant|>"
    assert run(path, tmp_path, text, "--chat", "--system", "Be brief.", "--prompt", "Whether?") == 0
    err = capsys.readouterr().err
    assert f"retrieval attention: {len(ids)} input tokens, {b - a} in the datastore" in err


def test_unusable_long_inputs_are_clear_errors(ckpt, tmp_path, capsys):
    path, _ = ckpt
    assert run(path, tmp_path, "  \n\n ") == 2
    err = capsys.readouterr().err
    assert "error: long input" in err and "long.txt is empty" in err
    (tmp_path / "long.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00")
    assert main(["generate", "--checkpoint", str(path), "--long-input", str(tmp_path / "long.txt")]) == 2
    assert "is a binary file, not text" in capsys.readouterr().err
    assert run(path, tmp_path, TEXT * 20, "--config.model.attention.retrieval.max_datastore_mib=0.01") == 2
    err = capsys.readouterr().err
    assert "datastore, more than model.attention.retrieval.max_datastore_mib=0.01" in err
    assert "hint:" in err
