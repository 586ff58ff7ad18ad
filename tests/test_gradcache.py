"""GradCache: chunking layout, exactness against full-batch autodiff, sharding, and memory.

The reference everywhere is plain ``jax.value_and_grad`` through the whole batch; GradCache
must reproduce it (same loss, same gradient for every parameter leaf) for any chunk count, on
any mesh, while its compiled temporary memory grows with the chunk size, not the batch size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from unime_jax.gradcache import (
    embed_in_chunks,
    gradcache_value_and_grad,
    interleave_chunks,
    merge_chunks,
)

KEEP = 0.9
ROW_KEY = jax.random.key(1234)  # "row" dropout: masks depend on the row id only.


class TinyEncoder(nnx.Module):
    """Texts (token ids) or "images" (patch vectors) -> one pooled embedding per row."""

    def __init__(self, *, vocab=97, patch_dim=12, hidden=32, mlp=64, out=16, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, hidden, rngs=rngs)
        self.patch = nnx.Linear(patch_dim, hidden, rngs=rngs)
        self.fc1 = nnx.Linear(hidden, mlp, rngs=rngs)
        self.fc2 = nnx.Linear(mlp, out, rngs=rngs)

    def __call__(self, inputs, key, dropout: str | None):
        x = self.embed(inputs["tokens"]) if "tokens" in inputs else self.patch(inputs["patches"])
        h = jax.nn.gelu(self.fc1(x))
        if dropout == "key":  # mask from the key GradCache passes: tests key consistency.
            mask = jax.random.bernoulli(key, KEEP, h.shape)
        elif dropout == "row":  # mask from the row id: identical however the batch is chunked.
            mask = jax.vmap(
                lambda r: jax.random.bernoulli(jax.random.fold_in(ROW_KEY, r), KEEP, h.shape[1:])
            )(inputs["row_id"])
        else:
            mask = None
        if mask is not None:
            h = h * mask / KEEP
        y = self.fc2(h)
        w = inputs["mask"][..., None]
        return ((y * w).sum(1) / w.sum(1)).astype(jnp.float32)


def make_encode(graphdef, dropout: str | None):
    def encode(params, inputs, key):
        return nnx.merge(graphdef, params)(inputs, key, dropout)

    return encode


def info_nce(q, t, temperature=0.05):
    """-log softmax(q tᵀ / τ) on the diagonal, mean over queries (normalised embeddings)."""
    q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    t = t / jnp.linalg.norm(t, axis=-1, keepdims=True)
    logits = q @ t.T / temperature
    loss = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=-1)))
    acc = jnp.mean(jnp.argmax(logits, axis=-1) == jnp.arange(q.shape[0]))
    return loss, {"acc": acc}


def info_nce_sides(embs):
    return info_nce(embs["query"], embs["target"])


def pair(query, target):
    return {"query": query, "target": target}


def make_batch(n, *, seq=8, patches=6, patch_dim=12, vocab=97, seed=0):
    """Queries are texts, targets are "images": different structures and shapes."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, seq + 1, size=n)
    query = {
        "tokens": rng.integers(0, vocab, size=(n, seq)).astype(np.int32),
        "mask": (np.arange(seq)[None] < lengths[:, None]).astype(np.float32),
        "row_id": np.arange(n, dtype=np.int32),
    }
    target = {
        "patches": rng.normal(size=(n, patches, patch_dim)).astype(np.float32),
        "mask": np.ones((n, patches), np.float32),
        "row_id": np.arange(n, dtype=np.int32) + n,
    }
    return query, target


def make_model(**kw):
    model = TinyEncoder(rngs=nnx.Rngs(0), **kw)
    return nnx.split(model)


@functools.cache
def small_setup(dropout: str | None):
    """(params, encode) of the small model, built once so jitted functions are reused."""
    graphdef, params = make_model()
    return params, make_encode(graphdef, dropout)


def full_batch_value_and_grad(encode, params, query, target, key):
    """The reference: plain autodiff through the whole batch in one go."""

    def loss(p):
        return info_nce(encode(p, query, key), encode(p, target, key))

    return jax.value_and_grad(loss, has_aux=True)(params)


# Everything runs jitted: op-by-op eager NNX is far slower to run and to compile on CPU.
full_batch_jit = jax.jit(full_batch_value_and_grad, static_argnums=0)
gradcache_jit = jax.jit(
    gradcache_value_and_grad, static_argnums=(0, 1), static_argnames=("num_chunks", "has_aux")
)


def assert_same(got, want, rtol=1e-5):
    (loss, aux), grads = got
    (loss_ref, aux_ref), grads_ref = want
    np.testing.assert_allclose(loss, loss_ref, rtol=rtol)
    np.testing.assert_allclose(aux["acc"], aux_ref["acc"])
    assert jax.tree.structure(grads) == jax.tree.structure(grads_ref)
    for path, g, r in zip(
        jax.tree.leaves_with_path(grads), jax.tree.leaves(grads), jax.tree.leaves(grads_ref)
    ):
        assert g.dtype == r.dtype and g.shape == r.shape, path[0]
        r = np.asarray(r)
        # atol relative to the leaf's scale: entries near zero are sums of cancelling terms.
        np.testing.assert_allclose(
            g, r, rtol=rtol, atol=rtol * np.abs(r).max(), err_msg=jax.tree_util.keystr(path[0])
        )


# --- 1. layout -----------------------------------------------------------------------------


@pytest.mark.parametrize("num_chunks", [1, 2, 4, 8])
def test_interleave_merge_round_trip(num_chunks):
    tree = {"a": np.arange(64 * 3).reshape(64, 3), "b": {"c": np.arange(64.0)}}
    chunks = interleave_chunks(tree, num_chunks)
    assert chunks["a"].shape == (num_chunks, 64 // num_chunks, 3)
    for j in range(num_chunks):
        np.testing.assert_array_equal(chunks["a"][j], tree["a"][j::num_chunks])
        np.testing.assert_array_equal(chunks["b"]["c"][j], tree["b"]["c"][j::num_chunks])
    back = merge_chunks(chunks, num_chunks)
    jax.tree.map(np.testing.assert_array_equal, back, tree)


def test_interleave_rejects_bad_sizes():
    with pytest.raises(ValueError, match="divisible"):
        interleave_chunks({"a": np.zeros((10, 2))}, 4)
    # Leaves may differ in leading size (rows and image groups), each divisible by the chunks.
    chunks = interleave_chunks({"a": np.zeros((8, 2)), "b": np.zeros((4,))}, 2)
    assert chunks["a"].shape == (2, 4, 2) and chunks["b"].shape == (2, 2)
    with pytest.raises(ValueError, match="divisible"):
        interleave_chunks({"a": np.zeros((8, 2)), "b": np.zeros((3,))}, 2)


# --- 2. exactness --------------------------------------------------------------------------


@pytest.mark.parametrize("num_chunks", [1, 2, 4, 8])
def test_matches_full_batch_gradient(num_chunks):
    """Row-keyed dropout makes full-batch and chunked encodes see identical masks."""
    params, encode = small_setup("row")
    query, target = make_batch(64)
    key = jax.random.key(0)
    want = full_batch_jit(encode, params, query, target, key)
    got = gradcache_jit(
        encode, info_nce_sides, params, pair(query, target), num_chunks=num_chunks, key=key
    )
    assert isinstance(got[1], nnx.State)
    assert_same(got, want)


def chunked_autodiff_reference(encode, params, query, target, num_chunks, key):
    """Plain autodiff through per-chunk encodes with the documented GradCache key scheme.

    If pass 2 of GradCache drew different dropout masks than pass 1, its gradient would not
    match this one.
    """

    def embed(p, inputs, side):
        side_key = jax.random.fold_in(key, side)
        n = next(iter(inputs.values())).shape[0]
        out = None
        for j in range(num_chunks):
            chunk = {k: v[j::num_chunks] for k, v in inputs.items()}
            emb = encode(p, chunk, jax.random.fold_in(side_key, j))
            out = jnp.zeros((n, emb.shape[-1]), emb.dtype) if out is None else out
            out = out.at[j::num_chunks].set(emb)
        return out

    def loss(p):
        return info_nce(embed(p, query, 0), embed(p, target, 1))  # side order: query, target

    return jax.value_and_grad(loss, has_aux=True)(params)


def test_dropout_keys_consistent_between_passes(num_chunks=4):
    params, encode = small_setup("key")
    query, target = make_batch(64)
    key = jax.random.key(7)
    reference = jax.jit(chunked_autodiff_reference, static_argnums=(0, 4))
    want = reference(encode, params, query, target, num_chunks, key)
    got = gradcache_jit(
        encode, info_nce_sides, params, pair(query, target), num_chunks=num_chunks, key=key
    )
    assert_same(got, want)

    # embed_in_chunks: chunk j (rows j::c) uses fold_in(key, j).
    @jax.jit
    def embeddings(params, query, key):
        emb = embed_in_chunks(encode, params, query, num_chunks, key)
        ref = [
            encode(
                params, {k: v[j::num_chunks] for k, v in query.items()}, jax.random.fold_in(key, j)
            )
            for j in range(num_chunks)
        ]
        return emb, jnp.concatenate(ref)

    emb, ref = embeddings(params, query, key)
    order = np.concatenate([np.arange(64)[j::num_chunks] for j in range(num_chunks)])
    np.testing.assert_allclose(emb[order], ref, rtol=1e-6, atol=1e-6)

    # The dropout is live: another key gives another loss.
    (other, _), _ = gradcache_jit(
        encode,
        info_nce_sides,
        params,
        pair(query, target),
        num_chunks=num_chunks,
        key=jax.random.key(8),
    )
    assert abs(float(other) - float(got[0][0])) > 1e-4


def test_no_aux_and_bf16_params():
    params, encode = small_setup("row")
    query, target = make_batch(64)
    key = jax.random.key(0)
    (loss_ref, _), grads_ref = full_batch_jit(encode, params, query, target, key)

    def loss_only(embs):
        return info_nce_sides(embs)[0]

    loss, grads = gradcache_jit(
        encode, loss_only, params, pair(query, target), num_chunks=4, key=key, has_aux=False
    )
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    assert_same(((loss, {"acc": 0.0}), grads), ((loss_ref, {"acc": 0.0}), grads_ref))

    # bf16 parameters: gradients come back bf16 (summed in float32 first), same structure, and
    # equal to the float32 full-batch gradient at those same (bf16-valued) parameters up to the
    # final rounding to bf16 (2^-8 relative).
    params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    _, grads16 = gradcache_jit(
        encode, info_nce_sides, params16, pair(query, target), num_chunks=4, key=key
    )
    assert jax.tree.structure(grads16) == jax.tree.structure(params16)
    assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads16))
    params16_as_32 = jax.tree.map(lambda p: p.astype(jnp.float32), params16)
    _, grads_at16 = full_batch_jit(encode, params16_as_32, query, target, key)
    for g, r in zip(jax.tree.leaves(grads16), jax.tree.leaves(grads_at16)):
        r = np.asarray(r)
        np.testing.assert_allclose(
            np.asarray(g, np.float32), r, rtol=1e-2, atol=1e-2 * np.abs(r).max()
        )


# --- 3. sharded ----------------------------------------------------------------------------


def make_test_mesh(shape):
    devices = np.array(jax.devices()).reshape(shape)
    return Mesh(devices, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


# Each chunk count runs on one of the two meshes (every compile costs seconds on CPU); with
# 8 chunks of 64 rows each chunk holds exactly one row per device.
@pytest.mark.parametrize(
    "mesh_shape, chunk_counts", [((2, 4, 1), (2, 8)), ((8, 1, 1), (1, 4))], ids=["2x4x1", "8x1x1"]
)
def test_sharded_jit_matches_unsharded(mesh_shape, chunk_counts):
    mesh = make_test_mesh(mesh_shape)
    params, encode = small_setup("row")
    query, target = make_batch(64)
    key = jax.random.key(0)
    want = full_batch_jit(encode, params, query, target, key)  # same call as the exactness test

    batch = NamedSharding(mesh, P(("data", "fsdp")))
    put = functools.partial(jax.device_put, device=batch)
    query_s, target_s = jax.tree.map(put, query), jax.tree.map(put, target)
    params_s = jax.device_put(params, NamedSharding(mesh, P()))
    for num_chunks in chunk_counts:
        got = gradcache_jit(
            encode,
            info_nce_sides,
            params_s,
            pair(query_s, target_s),
            num_chunks=num_chunks,
            key=key,
        )
        assert_same(got, want)


# --- 4. memory -----------------------------------------------------------------------------


def test_temp_memory_grows_with_chunk_not_batch():
    """Compiled temp memory (single device) with activations dominating: hidden 256, seq 32."""
    graphdef, params = make_model(vocab=512, patch_dim=64, hidden=256, mlp=1024, out=256)
    encode = make_encode(graphdef, "key")
    key = jax.random.key(0)

    def temp_bytes(fn, n):
        query, target = make_batch(n, seq=32, patches=32, patch_dim=64, vocab=512)
        compiled = jax.jit(fn).lower(params, query, target, key).compile()
        analysis = compiled.memory_analysis()
        if analysis is None:
            pytest.skip("memory_analysis() unavailable on this backend")
        return analysis.temp_size_in_bytes

    def gradcache(num_chunks):
        return lambda p, q, t, key: gradcache_value_and_grad(
            encode, info_nce_sides, p, pair(q, t), num_chunks=num_chunks, key=key
        )

    def full(p, q, t, k):
        return full_batch_value_and_grad(encode, p, q, t, k)

    rows = {}
    for n, chunk in [(64, 8), (128, 8), (256, 8), (64, 16), (64, 32)]:
        rows[n, chunk] = temp_bytes(
            lambda p, q, t, k, c=n // chunk: gradcache(c)(p, q, t, key=k), n
        )
    full_256 = temp_bytes(full, 256)

    print("\nGradCache compiled temp memory (MiB), hidden 256, mlp 1024, seq 32:")
    print(f"{'batch':>6} {'chunk rows':>10} {'num_chunks':>10} {'temp MiB':>9}")
    for (n, chunk), b in rows.items():
        print(f"{n:>6} {chunk:>10} {n // chunk:>10} {b / 2**20:>9.2f}")
    print(f"{256:>6} {'full':>10} {'-':>10} {full_256 / 2**20:>9.2f}  (plain value_and_grad)")

    assert rows[256, 8] < 1.5 * rows[64, 8]
    assert rows[64, 32] > rows[64, 8]  # grows with the chunk size
    assert full_256 > 3 * rows[256, 8]


def test_one_side_matches_full_batch_autodiff():
    """Stage 1 embeds one side only; its loss reads fixed teacher vectors."""
    params, encode = small_setup("row")
    query, _ = make_batch(16)
    teacher = jax.random.normal(jax.random.key(3), (16, 24))

    def distill(embs):
        student = embs["text"]
        s = student / jnp.linalg.norm(student, axis=-1, keepdims=True)
        t = teacher / jnp.linalg.norm(teacher, axis=-1, keepdims=True)
        p_t = jax.nn.softmax(t @ t.T / 0.05, axis=-1)
        log_p_s = jax.nn.log_softmax(s @ s.T / 0.05, axis=-1)
        return jnp.mean(jnp.sum(p_t * (jnp.log(p_t) - log_p_s), -1)), {"acc": jnp.zeros(())}

    key = jax.random.key(0)
    want = jax.value_and_grad(lambda p: distill({"text": encode(p, query, key)}), has_aux=True)(
        params
    )
    for chunks in (1, 4):
        got = gradcache_jit(encode, distill, params, {"text": query}, num_chunks=chunks, key=key)
        assert_same(got, want, rtol=1e-3)  # the KL is small: float32 cancellation in the value
    with pytest.raises(ValueError, match="at least one side"):
        gradcache_value_and_grad(encode, distill, params, {}, num_chunks=1, key=key)
