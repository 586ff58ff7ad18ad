"""Building blocks shared by the vision towers and the decoder LLM.

Parameters are created through :func:`param`, which records logical axis names as metadata
(``out_sharding``) without placing anything: :mod:`unime_jax.sharding` turns the names into
shardings when a model is built on a mesh, and the loader fills them straight from disk.
Weight layouts follow the ``x @ kernel`` convention: kernels are ``(in, out)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


def param(
    rngs: nnx.Rngs,
    shape: Sequence[int],
    axes: Axes,
    *,
    dtype=jnp.float32,
    init: str = "normal",
    scale: float = 0.02,
) -> nnx.Param:
    """A parameter with logical axis names; ``init`` is "normal", "zeros" or "ones"."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {tuple(shape)}")
    if init == "normal":
        value = scale * jax.random.normal(rngs.params(), tuple(shape), dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias)``, plus a low-rank adapter once :func:`unime_jax.models.lora.apply_lora`
    has attached ``lora_a`` / ``lora_b`` (dropout on the adapter input when a ``key`` is given)."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        axes: tuple[str | None, str | None],
        *,
        bias: bool = False,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
    ):
        # Fan-in scaled init (only matters for models trained from scratch, e.g. the demo).
        self.kernel = param(rngs, (d_in, d_out), axes, dtype=dtype, scale=d_in**-0.5)
        self.bias = param(rngs, (d_out,), (axes[1],), dtype=dtype, init="zeros") if bias else None
        # Adapter slots are declared as data now so apply_lora can fill them later.
        self.lora_a, self.lora_b = nnx.data(None), nnx.data(None)
        self.lora_scale = self.lora_dropout = 0.0

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        y = x @ self.kernel[...].astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        if self.lora_a is not None:
            h = x
            if key is not None and self.lora_dropout > 0:
                keep = jax.random.bernoulli(key, 1.0 - self.lora_dropout, h.shape)
                h = jnp.where(keep, h / (1.0 - self.lora_dropout), 0).astype(x.dtype)
            low = h @ self.lora_a[...].astype(x.dtype)
            y = y + (low @ self.lora_b[...].astype(x.dtype)) * self.lora_scale
        return y


def subkey(key: jax.Array | None, i: int) -> jax.Array | None:
    """A distinct, deterministic key per submodule (None stays None: no dropout)."""
    return None if key is None else jax.random.fold_in(key, i)


class RMSNorm(nnx.Module):
    """Llama/Mistral/Qwen2 RMSNorm: statistics in fp32, scale applied after casting back."""

    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.scale = param(rngs, (dim,), ("norm",), dtype=dtype, init="ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with bias, statistics in fp32 (CLIP / SigLIP)."""

    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.scale = param(rngs, (dim,), ("norm",), dtype=dtype, init="ones")
        self.bias = param(rngs, (dim,), ("norm",), dtype=dtype, init="zeros")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin of rotary embeddings, (B, T, head_dim), in the HF "rotate_half" layout."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: (B, T, H, hd); cos/sin: (B, T, hd)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Softmax attention with grouped KV heads. q: (B,T,H,hd), k/v: (B,S,K,hd), mask: (B,T,S).

    Logits and softmax run in fp32; rows with no visible key (padding queries) give zeros
    instead of NaN.
    """
    b, t, h, hd = q.shape
    groups = h // k.shape[2]
    q = q.reshape(b, t, k.shape[2], groups, hd)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    logits = logits / math.sqrt(hd)
    if mask is not None:
        logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        probs = jnp.where(mask[:, None, None], probs, 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)
    return out.reshape(b, t, h, hd)


def stacked(num_layers: int, make: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module:
    """Creates ``num_layers`` copies of a layer with parameters stacked on a leading "layers" axis.

    Stacking lets :func:`scan_layers` compile one layer body instead of unrolling the depth.
    """

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs: nnx.Rngs) -> nnx.Module:
        return make(rngs)

    return create(rngs)


def scan_layers(
    layers: nnx.Module, h: jax.Array, *args, key: jax.Array | None = None, remat: bool = False
) -> jax.Array:
    """Applies stacked layers in sequence with ``lax.scan`` (pure: split, then merge per step).

    Each layer is called as ``layer(h, *args, key=layer_key)``; with a ``key`` every layer gets
    its own dropout key, without one no key is passed (deterministic forward).
    """
    graphdef, state = nnx.split(layers)
    num_layers = jax.tree.leaves(state)[0].shape[0]
    keys = None if key is None else jax.random.split(key, num_layers)

    def body(carry, xs):
        layer_state, layer_key = xs
        return nnx.merge(graphdef, layer_state)(carry, *args, key=layer_key), None

    if remat:
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    return jax.lax.scan(body, h, (state, keys))[0]
