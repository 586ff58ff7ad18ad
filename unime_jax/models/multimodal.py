"""What every multimodal family shares: placing image features into the token embeddings, and
the one forward + pooling function that turns a model and a batch into embeddings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from unime_jax.models.inputs import ModelInputs


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
