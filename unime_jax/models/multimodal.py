"""What every multimodal family shares: the forward pass (token embeddings, image features placed
at the image tokens, the decoder), and the one forward + pooling function that turns a model and
a batch into embeddings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from unime_jax.models.inputs import ModelInputs
from unime_jax.models.layers import subkey


def place_image_features(
    text: jax.Array,
    features: jax.Array,
    index: jax.Array,
    weight: jax.Array,
    is_image: jax.Array,
) -> jax.Array:
    """Input embeddings with image features written at image-token positions.

    ``text`` (B, T, D); ``features`` (G, R, D): each group's feature rows; ``index`` / ``weight``
    (B, T, taps); ``is_image`` (B, T). Rows are split evenly over groups (row r in group
    r // (B/G)), so the gather is local to a group and never crosses devices.
    """
    b, t = index.shape[:2]
    g = features.shape[0]
    per_group = lambda x: x.reshape(g, b // g, *x.shape[1:])  # noqa: E731
    gather = jax.vmap(lambda f, i: f[i])  # per group: (R, D)[(b/g, T)] -> (b/g, T, D)
    index, weight = per_group(index), per_group(weight)
    packed = sum(
        weight[..., j, None].astype(text.dtype) * gather(features, index[..., j])
        for j in range(index.shape[-1])
    )
    return jnp.where(is_image[..., None], packed.reshape(b, t, -1), text)


class MultimodalModel(nnx.Module):
    """A family's model: ``self.llm`` (a :class:`~unime_jax.models.llm.DecoderLM`), ``self.vision``
    (None when built text-only) and :meth:`image_features`; ``self.cfg.image_token_id`` marks the
    image tokens unless :meth:`image_tokens` says otherwise."""

    def image_features(self, images: dict, key: jax.Array | None = None) -> jax.Array:
        """The groups' image units -> their feature rows (G, R, D) in the LLM's width."""
        raise NotImplementedError

    def token_ids(self, input_ids: jax.Array) -> jax.Array:
        """The ids whose embeddings are looked up (image tokens' are replaced anyway)."""
        return input_ids

    def image_tokens(self, input_ids: jax.Array) -> jax.Array:
        return input_ids == self.cfg.image_token_id

    def __call__(self, inputs: ModelInputs, dropout_key: jax.Array | None = None) -> jax.Array:
        """Final-layer hidden states after the final norm, (B, T, D). ``dropout_key`` enables
        LoRA dropout (training); without it the forward is deterministic."""
        embeds = self.llm.embed(self.token_ids(inputs.input_ids))
        if inputs.images is not None:
            if self.vision is None:
                raise ValueError("this model was built text-only; it cannot take images")
            feats = self.image_features(inputs.images, subkey(dropout_key, 0))
            embeds = place_image_features(
                embeds,
                feats.astype(embeds.dtype),
                inputs.image_index,
                inputs.image_weight,
                self.image_tokens(inputs.input_ids),
            )
        return self.llm(embeds, inputs.attention_mask, inputs.positions, subkey(dropout_key, 1))


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


def encode(
    model: nnx.Module, inputs: ModelInputs, dropout_key: jax.Array | None = None, pool: bool = True
) -> jax.Array:
    """The embedding of every row (B, D), L2-normalised (``pool=False``: hidden states (B, T, D)).

    The one forward used by training (GradCache), the Embedder and evaluation.
    """
    hidden = model(inputs, dropout_key=dropout_key)
    return last_token_pool(hidden, inputs.attention_mask) if pool else hidden
