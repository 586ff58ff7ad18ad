"""The multimodal model: vision tower -> projector -> AnyRes placement -> decoder LLM.

Device-side inputs are static-shaped arrays:

- ``input_ids``, ``attention_mask``: (B, T);
- ``pixel_values``: (B, max_tiles, C, H, W), unused tiles zero;
- ``image_index`` / ``image_weight``: (B, T, taps). For an image-token position, the packed
  image feature is ``sum_j weight[j] * features[index[j]]`` over the example's own projected tile
  features (``max_tiles * P`` rows, then the ``image_newline`` row). The host computes these from
  the image sizes (:mod:`unime_jax.models.anyres`): reordering the tile grid, cropping the
  padding and inserting newlines are gathers; OneVision's bilinear downsampling takes 4 taps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from unime_jax.models.config import LlavaConfig
from unime_jax.models.layers import Linear, activation, param, subkey
from unime_jax.models.llm import DecoderLM
from unime_jax.models.vision import VisionTower


class Projector(nnx.Module):
    """LLaVA's multimodal projector: linear -> activation -> linear."""

    def __init__(
        self, d_vision: int, d_text: int, act: str, bias: bool, *, rngs, dtype=jnp.float32
    ):
        self.linear_1 = Linear(
            d_vision, d_text, ("vision_embed", "embed"), bias=bias, rngs=rngs, dtype=dtype
        )
        self.linear_2 = Linear(d_text, d_text, ("mlp", "embed"), bias=bias, rngs=rngs, dtype=dtype)
        self.act = activation(act)

    def __call__(self, x, key=None):
        return self.linear_2(self.act(self.linear_1(x, subkey(key, 0))), subkey(key, 1))


class LlavaModel(nnx.Module):
    def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, remat: bool = False):
        self.cfg = cfg
        self.llm = DecoderLM(cfg.text, rngs=rngs, dtype=dtype, remat=remat)
        if cfg.vision is None:  # text-only (stage 1): no vision tower or projector in memory
            self.vision = self.projector = self.image_newline = None
            return
        self.vision = VisionTower(
            cfg.vision, cfg.vision_layers_used, rngs=rngs, dtype=dtype, remat=remat
        )
        d = cfg.text.hidden_size
        self.projector = Projector(
            cfg.vision.hidden_size, d, cfg.projector_act, cfg.projector_bias, rngs=rngs, dtype=dtype
        )
        self.image_newline = param(rngs, (d,), ("embed",), dtype=dtype)

    def tile_features(self, pixel_values: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """(B, M, C, H, W) -> projected tile features + newline row, (B, M*P + 1, D)."""
        b, m = pixel_values.shape[:2]
        feats = self.vision(pixel_values.reshape(b * m, *pixel_values.shape[2:]), subkey(key, 0))
        if self.cfg.select_strategy == "default":  # drop the class token
            feats = feats[:, 1:]
        feats = self.projector(feats, subkey(key, 1)).reshape(b, -1, self.cfg.text.hidden_size)
        newline = jnp.broadcast_to(
            self.image_newline[...].astype(feats.dtype), (b, 1, feats.shape[-1])
        )
        return jnp.concatenate([feats, newline], axis=1)

    def input_embeddings(
        self, input_ids, pixel_values=None, image_index=None, image_weight=None, key=None
    ):
        text = self.llm.embed(input_ids)
        if pixel_values is None:
            return text
        if self.vision is None:
            raise ValueError("this model was built text-only; it cannot take pixel_values")
        feats = self.tile_features(pixel_values, key).astype(text.dtype)
        gather = jax.vmap(lambda f, i: f[i])  # per example: (R, D)[(T,)] -> (T, D)
        packed = sum(
            image_weight[..., j, None].astype(text.dtype) * gather(feats, image_index[..., j])
            for j in range(image_index.shape[-1])
        )
        is_image = (input_ids == self.cfg.image_token_id)[..., None]
        return jnp.where(is_image, packed, text)

    def __call__(
        self,
        input_ids,
        attention_mask,
        pixel_values=None,
        image_index=None,
        image_weight=None,
        dropout_key=None,
    ):
        """Final-layer hidden states after the final norm, (B, T, D).

        ``dropout_key`` enables LoRA dropout (training); without it the forward is deterministic.
        """
        embeds = self.input_embeddings(
            input_ids, pixel_values, image_index, image_weight, subkey(dropout_key, 0)
        )
        return self.llm(embeds, attention_mask, subkey(dropout_key, 1))


def last_token_pool(
    hidden: jax.Array, attention_mask: jax.Array, normalize: bool = True
) -> jax.Array:
    """Hidden state at the last non-pad token, L2-normalised; correct for left and right padding."""
    t = attention_mask.shape[1]
    last = t - 1 - jnp.argmax(attention_mask[:, ::-1].astype(jnp.int32), axis=1)
    pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    if not normalize:
        return pooled
    return pooled * jax.lax.rsqrt(jnp.maximum(jnp.sum(pooled * pooled, -1, keepdims=True), 1e-12))
