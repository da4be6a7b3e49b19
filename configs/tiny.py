"""A tiny Phi-4-mini-shaped model (GQA 2:1, partial RoPE 0.75) for tests and the quickstart."""

from jaxlm.config import defaults


def get_config():
    cfg = defaults()
    cfg.model.update(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=384,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        partial_rotary_factor=0.75,
        max_position_embeddings=1024,
        original_max_position_embeddings=1024,
        tie_embeddings=True,
    )
    cfg.data.tokenizer = "asset:tiny_bpe.json"
    return cfg
