"""`jaxlm generate --long-input FILE`: a checkpoint read with retrieval attention, settings as overrides."""

import jax

from jaxlm import checkpoint
from jaxlm.cli import main
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.model import ModelConfig, init_params
from jaxlm.model.config import AttentionConfig, RetrievalConfig


def test_generate_long_input_from_checkpoint(tmp_path, capsys):
    cfg = ModelConfig(vocab_size=2048, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                      num_kv_heads=1, max_position_embeddings=64,
                      attention=AttentionConfig(retrieval=RetrievalConfig(overlap=32)))
    tok = load_tokenizer("asset:tiny_bpe.json")
    checkpoint.save_params(tmp_path / "ckpt", init_params(cfg, jax.random.key(0)), {"model": cfg.to_dict()},
                           tok.spec())
    text = "To be, or not to be, that is the question. " * 12
    (tmp_path / "long.txt").write_text(text)
    n = len(tok.encode(text + "Whether"))
    assert main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--long-input", str(tmp_path / "long.txt"),
                 "--prompt", "Whether", "--max-new-tokens", "3", "--no-stop",
                 "--config.model.attention.retrieval.top_k=4", "--config.model.attention.retrieval.window=16"]) == 0
    err = capsys.readouterr().err
    assert f"retrieval attention: {n} input tokens in {-(-(n - 64) // 32) + 1} windows" in err
    assert "decode 3 tokens" in err
    assert main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--long-input", str(tmp_path / "long.txt"),
                 "--config.train.steps=3"]) == 2  # only model settings apply to a checkpoint
