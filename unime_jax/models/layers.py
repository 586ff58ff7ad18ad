"""Building blocks shared by the vision towers and the decoder LLM.

Parameters are created through :func:`param`, which records logical axis names as metadata
(``out_sharding``) without placing anything: :mod:`unime_jax.sharding` turns the names into
shardings when a model is built on a mesh, and the loader fills them straight from disk.
Weight layouts follow the ``x @ kernel`` convention: kernels are ``(in, out)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from unime_jax.sharding import constrain

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
        if self.lora_a is None:
            return y
        # The adapter runs on (rows, d): a skinny (d, r) matmul on a 3-D activation makes XLA
        # transpose the (B, T, d) cotangent in the backward pass; flattened, it does not.
        h = x.reshape(-1, x.shape[-1])
        if key is not None and self.lora_dropout > 0:
            keep = jax.random.bernoulli(key, 1.0 - self.lora_dropout, x.shape).reshape(h.shape)
            h = jnp.where(keep, h / (1.0 - self.lora_dropout), 0).astype(x.dtype)
        low = h @ self.lora_a[...].astype(x.dtype)
        delta = (low @ self.lora_b[...].astype(x.dtype)) * self.lora_scale
        return y + delta.reshape(y.shape)


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


def stacked(num_layers: int, make: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module:
    """Creates ``num_layers`` copies of a layer with parameters stacked on a leading "layers" axis.

    Stacking lets :func:`scan_layers` compile one layer body instead of unrolling the depth.
    """

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs: nnx.Rngs) -> nnx.Module:
        return make(rngs)

    return create(rngs)


REMAT_POLICIES = {
    "none": None,
    # Keep only each layer's input: the backward pass recomputes the layer (least memory).
    "full": jax.checkpoint_policies.nothing_saveable,
    # Also keep the weight matmuls' outputs: less recompute, more memory.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Keep them in host memory instead of HBM (TPU/GPU with pinned host memory).
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


def remat_policy(name: str | bool) -> str:
    """Normalises a config value: booleans mean "full" / "none"."""
    if isinstance(name, bool):
        return "full" if name else "none"
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; use one of {sorted(REMAT_POLICIES)}")
    return name


def scan_layers(
    layers: nnx.Module,
    h: jax.Array,
    *args,
    per_layer: jax.Array | None = None,
    key: jax.Array | None = None,
    remat: str = "none",
    carry_axes: tuple[str | None, ...] = ("batch", None, None),
) -> jax.Array:
    """Applies stacked layers in sequence with ``lax.scan`` (pure: split, then merge per step).

    Each layer is called as ``layer(h, *args, key=layer_key)`` — ``layer(h, per_layer[i], *args,
    key=...)`` when a ``per_layer`` array (leading axis: layers) is given, e.g. which layers
    attend globally; with a ``key`` every layer gets its own dropout key, without one no key is
    passed (deterministic forward). The carry is
    constrained to ``carry_axes`` (batch-sharded, model dimension whole): without it GSPMD may
    shard activations like the FSDP weights, on the model dimension, and all-reduce them instead
    of gathering each layer's weights. ``remat`` names a policy of :data:`REMAT_POLICIES`.
    """
    graphdef, state = nnx.split(layers)
    num_layers = jax.tree.leaves(state)[0].shape[0]
    keys = None if key is None else jax.random.split(key, num_layers)

    def body(carry, xs):
        layer_state, layer_key, extra = xs
        carry = constrain(carry, *carry_axes)
        lead = () if per_layer is None else (extra,)
        return nnx.merge(graphdef, layer_state)(carry, *lead, *args, key=layer_key), None

    policy = REMAT_POLICIES[remat_policy(remat)]
    if policy is not None:
        body = jax.checkpoint(body, policy=policy)
    return constrain(jax.lax.scan(body, h, (state, keys, per_layer))[0], *carry_axes)
