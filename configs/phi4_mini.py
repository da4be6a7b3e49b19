"""microsoft/Phi-4-mini-instruct: 3.8B parameters, 32 layers, GQA 24:8, partial RoPE 0.75, LongRoPE to 128K,
tied 200064-token vocabulary (o200k-based tokenizer)."""

from jaxlm.config import defaults

SHORT_FACTOR = (1.0,) * 48
LONG_FACTOR = (
    1.0, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649,
    2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845,
    5.351743533, 5.984965424, 6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158,
    11.70738129, 13.09260651, 14.64173252, 16.37415215, 18.31155283, 20.47818807, 22.90118105,
    25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71,
    32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77,
)


def get_config():
    cfg = defaults()
    cfg.model.update(
        vocab_size=200064,
        hidden_size=3072,
        intermediate_size=8192,
        num_layers=32,
        num_heads=24,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        tie_embeddings=True,
        rope_theta=10000.0,
        partial_rotary_factor=0.75,
        rope_scaling="longrope",
        rope_short_factor=SHORT_FACTOR,
        rope_long_factor=LONG_FACTOR,
        original_max_position_embeddings=4096,
        max_position_embeddings=131072,
        dtype="bfloat16",
        param_dtype="float32",
        remat_policy="dots_no_batch",
        bos_token_id=199999,
        eos_token_id=199999,
        pad_token_id=199999,
    )
    cfg.data.tokenizer = "phi4:o200k_base.tiktoken"
    return cfg
