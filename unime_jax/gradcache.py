"""Gradient caching (GradCache) for contrastive losses over a big global batch.

A contrastive loss couples every query with every target of the global batch, so it cannot be
split into independent micro-batches the way a per-example loss can. GradCache (Gao et al.
2021) keeps the exact full-batch gradient with activation memory bounded by one chunk:

1. embed every chunk of queries and targets with no activations kept (``lax.scan`` whose
   body returns only embeddings);
2. compute the loss and ``d loss / d embeddings`` on the full ``(N, D)`` embeddings — cheap,
   only ``O(N·D)`` and the ``O(N²)`` similarity matrix;
3. re-run every chunk forward+backward with ``jax.vjp``, feeding it its slice of the
   embedding gradient, and sum the parameter gradients in a float32 scan carry.

By the chain rule ``d loss / d params = Σ_chunks (d emb_chunk / d params)ᵀ · d loss / d emb_chunk``
is exactly the full-batch gradient, provided both passes see the same per-chunk randomness
(dropout), see :func:`chunk_key`.

Everything is pure JAX, meant to live inside one ``jax.jit``-ed train step whose batch arrays
are sharded on their leading axis over ``("data", "fsdp")``. A side's inputs are any pytree
(e.g. :class:`~unime_jax.models.inputs.ModelInputs`) whose leaves have a leading axis divisible
by the chunk count: rows, or the image groups that the data pipeline laid out so that every
chunk's groups hold exactly that chunk's rows (see :func:`unime_jax.data.pipeline.row_groups`). Chunks are *interleaved* (chunk
``j`` = rows ``j, j+c, j+2c, …``) rather than contiguous: with rows split contiguously over
devices, a contiguous chunk would live on one or two devices and leave the rest idle (or force
a reshard), whereas an interleaved chunk takes ``N / (c · dp)`` rows from every device, so each
scan step is data-parallel over the whole mesh with no communication for the slicing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

PyTree = Any
# encode(params, inputs_chunk, key) -> (n, D) float32 embeddings.
EncodeFn = Callable[[PyTree, PyTree, jax.Array], jax.Array]
# loss_fn({side: (N, D) embeddings}) -> (loss, aux), or just loss when has_aux=False.
LossFn = Callable[[dict[str, jax.Array]], Any]


def interleave_chunks(tree: PyTree, num_chunks: int) -> PyTree:
    """Leaves ``(N, ...)`` -> ``(num_chunks, N / num_chunks, ...)``; chunk ``j`` = rows ``j::num_chunks``.

    Implemented as reshape ``(N/c, c, ...)`` + swap of the first two axes: the row-block
    sharding of the leading axis carries over to the ``N/c`` axis untouched (no collective),
    provided ``N / num_chunks`` is divisible by the data-parallel size (the caller's job).
    """

    def one(x):
        if x.shape[0] % num_chunks:
            raise ValueError(
                f"leading axis {x.shape[0]} is not divisible by num_chunks={num_chunks}"
            )
        x = x.reshape(x.shape[0] // num_chunks, num_chunks, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(one, tree)


def merge_chunks(tree: PyTree, num_chunks: int) -> PyTree:
    """Exact inverse of :func:`interleave_chunks`: ``(c, n, ...)`` -> ``(c·n, ...)`` in row order."""

    def one(x):
        if x.shape[0] != num_chunks:
            raise ValueError(f"leading axis {x.shape[0]} != num_chunks={num_chunks}")
        x = jnp.swapaxes(x, 0, 1)
        return x.reshape(x.shape[0] * num_chunks, *x.shape[2:])

    return jax.tree.map(one, tree)


def chunk_key(side_key: jax.Array, j: jax.Array | int) -> jax.Array:
    """The key chunk ``j`` is encoded with: ``fold_in(side_key, j)``.

    Both GradCache passes derive their keys through this one function, so the re-run in pass 2
    draws exactly the dropout masks that produced the cached embeddings in pass 1. In
    :func:`gradcache_value_and_grad` ``side_key = fold_in(key, s)`` for the s-th side.
    """
    return jax.random.fold_in(side_key, j)


def embed_in_chunks(
    encode: EncodeFn, params: PyTree, inputs: PyTree, num_chunks: int, key: jax.Array
) -> jax.Array:
    """``(N, D)`` embeddings of ``inputs``, encoded ``num_chunks`` chunks at a time.

    Chunk ``j`` (rows ``j::num_chunks``) uses key ``chunk_key(key, j) = fold_in(key, j)``. The
    scan body returns only the embeddings, so no activations outlive a chunk. The body is also
    ``jax.checkpoint``-ed: should a caller differentiate straight through this function, the
    scan then saves only each chunk's inputs and recomputes the chunk in the backward pass
    (GradCache's memory profile again) instead of stacking every chunk's activations.
    """
    chunks = interleave_chunks(inputs, num_chunks)

    @jax.checkpoint
    def body(_, xs):
        inputs_j, j = xs
        return None, encode(params, inputs_j, chunk_key(key, j))

    _, emb = lax.scan(body, None, (chunks, jnp.arange(num_chunks)))
    return merge_chunks(emb, num_chunks)


def _accumulate_param_grads(
    encode: EncodeFn,
    params: PyTree,
    inputs: PyTree,
    emb_grad: jax.Array,
    num_chunks: int,
    side_key: jax.Array,
    acc: PyTree,
) -> PyTree:
    """Pass 2 for one side: ``acc + Σ_j vjp(encode chunk j)(emb_grad chunk j)`` in float32."""
    chunks = interleave_chunks(inputs, num_chunks)
    grad_chunks = interleave_chunks(emb_grad, num_chunks)

    def body(acc, xs):
        inputs_j, grad_j, j = xs
        emb_j, vjp = jax.vjp(lambda p: encode(p, inputs_j, chunk_key(side_key, j)), params)
        (g,) = vjp(grad_j.astype(emb_j.dtype))
        # Summing in float32 keeps many bf16 chunk gradients from losing low-order bits.
        acc = jax.tree.map(lambda a, gi: a + gi.astype(jnp.float32), acc, g)
        return acc, None

    acc, _ = lax.scan(body, acc, (chunks, grad_chunks, jnp.arange(num_chunks)))
    return acc


def gradcache_value_and_grad(
    encode: EncodeFn,
    loss_fn: LossFn,
    params: PyTree,
    sides: Mapping[str, PyTree],
    *,
    num_chunks: int,
    key: jax.Array,
    has_aux: bool = True,
) -> tuple[Any, PyTree]:
    """Full-batch ``value_and_grad`` of ``loss_fn({side: encode(inputs) for each side})``.

    Stage 2 passes two sides (``query``, ``target``); stage 1 one (``text``, with the teacher
    embeddings closed over by ``loss_fn``). Returns ``((loss, aux), grads)`` (``(loss, grads)``
    when ``has_aux=False``, as with ``jax.value_and_grad``). ``grads`` has the tree structure
    and dtypes of ``params`` (an ``nnx.State`` works like any pytree); chunk gradients are summed
    in float32 and cast to each parameter's dtype once at the end.

    Sides may have different structures (texts vs images), so each is chunked and encoded
    separately, all with ``num_chunks`` chunks. Key scheme: the s-th side (in ``sides`` order)
    chunk ``j`` is encoded with ``fold_in(fold_in(key, s), j)`` in both passes, so dropout in
    the re-run equals the masks that made the cached embeddings, and sides never share masks.
    """
    if not sides:
        raise ValueError("gradcache_value_and_grad needs at least one side of inputs")
    names = list(sides)
    side_keys = {name: jax.random.fold_in(key, s) for s, name in enumerate(names)}

    # Pass 1: embeddings only. Nothing is differentiated here, so the scans keep no residuals.
    embs = {
        name: embed_in_chunks(encode, params, sides[name], num_chunks, side_keys[name])
        for name in names
    }

    # The loss on the full global batch, and the gradient "cache" d loss / d embeddings.
    value, emb_grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(embs)

    # Pass 2: re-run each chunk with its embedding gradient; one float32 accumulator for all.
    acc = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.float32), params)
    for name in names:
        acc = _accumulate_param_grads(
            encode, params, sides[name], emb_grads[name], num_chunks, side_keys[name], acc
        )
    grads = jax.tree.map(lambda a, p: a.astype(p.dtype), acc, params)
    return value, grads
