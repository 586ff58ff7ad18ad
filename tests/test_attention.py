"""The memory-efficient attention path (Pallas splash attention, run by Pallas' interpreter on
CPU) equals the exact reference path, values and gradients, sharded over 8 fake devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from unime_jax import sharding
from unime_jax.models.attention import attention, resolve, visibility

B, T, H, K, D = 8, 128, 4, 2, 32


def inputs(padding_side: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, H, D)).astype(np.float32)
    k = rng.normal(size=(B, T, K, D)).astype(np.float32)
    v = rng.normal(size=(B, T, K, D)).astype(np.float32)
    lengths = rng.integers(T // 4, T + 1, size=B)
    lengths[0] = T
    mask = np.zeros((B, T), np.int32)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1 if padding_side == "right" else 0
        if padding_side == "left":
            mask[i, T - n :] = 1
    return q, k, v, mask


@pytest.mark.parametrize(
    "mesh_shape, padding_side, window",
    [
        ({"fsdp": 8}, "right", None),
        ({"fsdp": 4, "tensor": 2}, "left", None),
        ({"data": 2, "fsdp": 4}, "right", 48),
    ],
    ids=["fsdp8-right", "fsdp4-tensor2-left", "window48"],
)
def test_splash_equals_reference(mesh_shape, padding_side, window):
    q, k, v, mask = inputs(padding_side)
    real = mask.astype(bool)
    mesh = sharding.make_mesh(mesh_shape)
    put = lambda x, *axes: jax.device_put(  # noqa: E731
        x, NamedSharding(mesh, sharding.logical_to_spec(axes, x.shape, mesh))
    )
    args = (
        put(q, "batch", None, "heads", None),
        put(k, "batch", None, "kv_heads", None),
        put(v, "batch", None, "kv_heads", None),
        put(mask, "batch", None),
    )

    def loss(q, k, v, mask, impl):
        out = attention(q, k, v, segment_ids=mask, causal=True, window=window, impl=impl)
        weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
        # Only real (non-padding) query rows count: padding rows are unspecified in splash.
        return jnp.sum(jnp.where(mask[:, :, None, None] > 0, out * weights, 0.0)), out

    results = {}
    for impl in ("xla", "splash"):
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=4)
        with jax.set_mesh(mesh):
            (value, out), grads = fn(*args, impl)
        results[impl] = (np.asarray(value), np.asarray(out)[real], [np.asarray(g) for g in grads])
    (v_ref, o_ref, g_ref), (v_spl, o_spl, g_spl) = results["xla"], results["splash"]
    np.testing.assert_allclose(o_spl, o_ref, atol=2e-5)
    np.testing.assert_allclose(v_spl, v_ref, rtol=1e-5)
    for name, a, b in zip("qkv", g_spl, g_ref):
        np.testing.assert_allclose(a, b, atol=5e-5, err_msg=f"d{name}")


def test_reference_masks_padding_and_causality():
    mask = np.array([[1, 1, 1, 0], [0, 1, 1, 1]], np.int32)
    vis = np.asarray(visibility(jnp.asarray(mask), 4, causal=True, window=None))
    np.testing.assert_array_equal(vis[0, 2], [True, True, True, False])
    np.testing.assert_array_equal(vis[0, 3], [False, False, False, False])  # a padding query
    np.testing.assert_array_equal(vis[1, 1], [False, True, False, False])  # left padding
    assert resolve("auto") == "xla"  # on this CPU
    with pytest.raises(ValueError, match="unknown attention"):
        resolve("flash")
