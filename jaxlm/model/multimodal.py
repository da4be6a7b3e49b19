"""Phi-4-multimodal's entry into the one decoder: modality features, projected to the model width,
are spliced in at the positions of special tokens, and the input mode picks both the projector and
the LoRA adapter (the language model itself never changes; jaxlm.model.lora routes per example).

    input mode      adapter   audio projector
    LANGUAGE = 0    none      -
    VISION = 1      vision    -
    SPEECH = 2      speech    speech
    VISION_SPEECH=3 vision    vision_speech

Projectors are Linear(encoder width -> d) -> GELU -> Linear(d -> d); the audio projector has two heads
of that shape. The k-th image (audio) token of a row takes the row's k-th image (audio) feature.
Encoders are any Flax modules mapping their input to [B, N, width]: `ViTEncoder` (patches -> a small
pre-LN transformer, SigLIP's shape) and `ConformerEncoder` (frames -> 2x subsampling -> Conformer
blocks) serve the tests and demos; Phi-4-multimodal's SigLIP-400M and 24-block Conformer would load
into modules of the same structure from their checkpoints (not done here).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from jaxlm import schema
from jaxlm.errors import ConfigError
from jaxlm.model import lora
from jaxlm.model.config import ModelConfig
from jaxlm.model.decoder import Decoder
from jaxlm.schema import field

LANGUAGE, VISION, SPEECH, VISION_SPEECH = 0, 1, 2, 3
__all__ = ["LANGUAGE", "SPEECH", "VISION", "VISION_SPEECH", "ConformerEncoder", "MultimodalConfig", "MultimodalLM",
           "Projector", "ViTEncoder", "splice"]


@dataclasses.dataclass(frozen=True)
class MultimodalConfig:
    """How modality features enter the decoder (Phi-4-multimodal's values by default)."""

    SECTION: ClassVar[str] = "multimodal"
    image_token_id: int = field(200010, "token whose positions take the projected image features", ge=0)
    audio_token_id: int = field(200011, "token whose positions take the projected audio features", ge=0)
    vision_width: int = field(1152, "width of the image encoder's features (SigLIP-400M: 1152)", ge=1)
    audio_width: int = field(1024, "width of the audio encoder's features (Phi-4-multimodal's Conformer: 1024)",
                             ge=1)
    vision_adapter: str = field("vision", "LoRA adapter of the VISION and VISION_SPEECH modes")
    speech_adapter: str = field("speech", "LoRA adapter of the SPEECH mode")

    def __post_init__(self):
        schema.check(self)


def splice(embeds_BxTxD, tokens_BxT, token_id: int, features_BxNxD):
    """embeds with the k-th `token_id` position of each row replaced by that row's k-th feature;
    every other position is left exactly as it was."""
    mask_BxT = tokens_BxT == token_id
    k_BxT = jnp.cumsum(mask_BxT, axis=1) - 1
    k_BxT = jnp.clip(k_BxT, 0, features_BxNxD.shape[1] - 1)
    picked = jnp.take_along_axis(features_BxNxD, k_BxT[..., None], axis=1).astype(embeds_BxTxD.dtype)
    return jnp.where(mask_BxT[..., None], picked, embeds_BxTxD)


def check_counts(tokens, token_id: int, n_features: int, what: str):
    """Refuse (on concrete inputs) rows with more `token_id` tokens than features."""
    import numpy as np

    most = int(np.max(np.sum(np.asarray(tokens) == token_id, axis=1), initial=0))
    if most > n_features:
        raise ConfigError(f"a row has {most} {what} tokens (id {token_id}) but only {n_features} {what} features")


class Projector(nn.Module):
    """Linear(width -> d) -> GELU -> Linear(d -> d)."""

    d: int

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.d, name="fc1")(x)
        return nn.Dense(self.d, name="fc2")(nn.gelu(x, approximate=False))


class _Attention(nn.Module):
    heads: int

    @nn.compact
    def __call__(self, x):
        return nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(x, x)


class ViTEncoder(nn.Module):
    """images [B, H, W, C] -> patch features [B, (H/p)(W/p), width]: a patch embedding, learned
    positions and pre-LN transformer blocks (SigLIP's structure, no class token)."""

    width: int = 64
    depth: int = 2
    heads: int = 4
    patch: int = 8

    @nn.compact
    def __call__(self, images):
        b, h, w, c = images.shape
        p = self.patch
        if h % p or w % p:
            raise ConfigError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * c)
        x = nn.Dense(self.width, name="patch_embed")(x)
        x = x + self.param("pos_embed", nn.initializers.normal(0.02), (1, x.shape[1], self.width))
        for i in range(self.depth):
            x = x + _Attention(self.heads, name=f"attn_{i}")(nn.LayerNorm(name=f"ln1_{i}")(x))
            y = nn.Dense(4 * self.width, name=f"fc1_{i}")(nn.LayerNorm(name=f"ln2_{i}")(x))
            x = x + nn.Dense(self.width, name=f"fc2_{i}")(nn.gelu(y))
        return nn.LayerNorm(name="post_ln")(x)


class ConformerEncoder(nn.Module):
    """audio frames [B, T, n_mels] -> features [B, T/2, width]: 2x subsampling, then Conformer blocks
    (half feed-forward, self-attention, convolution module, half feed-forward, LayerNorm)."""

    width: int = 64
    depth: int = 2
    heads: int = 4
    kernel: int = 7

    @nn.compact
    def __call__(self, frames):
        b, t, m = frames.shape
        x = frames[:, : t - t % 2].reshape(b, t // 2, 2 * m)  # stack frame pairs: 2x subsampling
        x = nn.Dense(self.width, name="subsample")(x)
        w = self.width
        for i in range(self.depth):
            def ff(x, name):
                y = nn.Dense(4 * w, name=f"{name}_in")(nn.LayerNorm(name=f"{name}_ln")(x))
                return nn.Dense(w, name=f"{name}_out")(nn.swish(y))

            x = x + 0.5 * ff(x, f"ff1_{i}")
            x = x + _Attention(self.heads, name=f"attn_{i}")(nn.LayerNorm(name=f"ln_attn_{i}")(x))
            y = nn.Dense(2 * w, name=f"conv_pw1_{i}")(nn.LayerNorm(name=f"ln_conv_{i}")(x))
            y = nn.glu(y, axis=-1)
            y = nn.Conv(w, (self.kernel,), feature_group_count=w, padding="SAME", name=f"conv_dw_{i}")(y)
            y = nn.Dense(w, name=f"conv_pw2_{i}")(nn.swish(nn.LayerNorm(name=f"ln_dw_{i}")(y)))
            x = x + y
            x = x + 0.5 * ff(x, f"ff2_{i}")
            x = nn.LayerNorm(name=f"ln_out_{i}")(x)
        return x


class MultimodalLM(nn.Module):
    """The decoder with Phi-4-multimodal's entry: `__call__(tokens, input_mode, images=None,
    audio=None, positions=None, segment_ids=None, cache=None)` -> logits (and the cache).
    input_mode [B] picks each row's adapter and audio projector; images / audio go through their
    encoder and projector and are spliced in at the image / audio token positions."""

    config: ModelConfig
    mm: MultimodalConfig = MultimodalConfig()
    vision_encoder: nn.Module | None = None
    audio_encoder: nn.Module | None = None

    def setup(self):
        c = self.config
        for name in (self.mm.vision_adapter, self.mm.speech_adapter):
            lora.index(c, name)  # the model must hold both adapters
        self.decoder = Decoder(c)
        d = c.hidden_size
        self.vision_projector = Projector(d)
        self.audio_projector = {"speech": Projector(d), "vision_speech": Projector(d)}

    def adapter_ids(self, input_mode):
        """[B] adapter ids of the input modes: none, vision, speech, vision."""
        v, s = lora.index(self.config, self.mm.vision_adapter), lora.index(self.config, self.mm.speech_adapter)
        return jnp.asarray([lora.NONE, v, s, v], jnp.int32)[jnp.asarray(input_mode, jnp.int32)]

    def embed_inputs(self, tokens, input_mode, images=None, audio=None):
        """The decoder's input embeddings [B, T, d]: token embeddings with the projected features
        spliced in at the image and audio token positions."""
        x = self.decoder.embed(tokens)
        if images is not None:
            if self.vision_encoder is None:
                raise ConfigError("images given but the model has no vision_encoder")
            feats = self.vision_projector(self.vision_encoder(images))
            x = splice(x, tokens, self.mm.image_token_id, feats)
        if audio is not None:
            if self.audio_encoder is None:
                raise ConfigError("audio given but the model has no audio_encoder")
            a = self.audio_encoder(audio)
            speech, both = self.audio_projector["speech"](a), self.audio_projector["vision_speech"](a)
            mode = jnp.asarray(input_mode, jnp.int32).reshape(-1, 1, 1)
            x = splice(x, tokens, self.mm.audio_token_id, jnp.where(mode == VISION_SPEECH, both, speech))
        return x

    def __call__(self, tokens, input_mode, images=None, audio=None, positions=None, segment_ids=None, cache=None):
        x = self.embed_inputs(tokens, input_mode, images, audio)
        ids = jnp.broadcast_to(self.adapter_ids(input_mode), (tokens.shape[0],))
        return self.decoder(tokens, positions, segment_ids, cache=cache, adapter_ids=ids, inputs_embeds=x)


def init(model: MultimodalLM, rng, tokens, input_mode, images=None, audio=None) -> dict:
    """Plain (unboxed) params of a MultimodalLM; the decoder's are under 'decoder'."""
    variables = model.init(rng, tokens, input_mode, images, audio)
    return nn.meta.unbox(variables["params"])


def features_check(tokens, mm: MultimodalConfig, n_image: int | None, n_audio: int | None):
    """Refuse inputs with more image / audio tokens in a row than features (host side)."""
    if n_image is not None:
        check_counts(tokens, mm.image_token_id, n_image, "image")
    if n_audio is not None:
        check_counts(tokens, mm.audio_token_id, n_audio, "audio")

