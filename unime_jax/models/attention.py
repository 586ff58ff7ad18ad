"""Softmax attention with grouped KV heads: an exact XLA reference and Pallas splash attention.

Which keys a query sees is described, not materialised: ``segment_ids`` (B, T) int32 (0 =
padding; a token sees keys of its own non-zero segment), ``causal`` and an optional sliding
``window``. Two implementations, chosen by ``impl``:

- ``"xla"``: the reference. Builds the (B, T, S) mask, fp32 logits and softmax; padding queries
  (segment 0) give zeros. Exact, runs everywhere, memory O(T²) per head.
- ``"splash"``: Pallas splash attention (TPU): blockwise, never materialises T×T logits, masks
  from segment ids and a causal/local mask object. Pallas kernels cannot be partitioned by
  GSPMD, so the kernel runs under ``shard_map`` over the batch (and head) axes of the current
  mesh. On CPU it runs in Pallas' interpreter (tests compare it with the reference). Padding
  queries give unspecified (finite) values: nothing reads them.
- ``"auto"``: splash on TPU, the reference elsewhere.

cuDNN flash attention on GPU is not wired in: it expresses padding as sequence lengths (right
padding only), and no GPU was available to validate it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from unime_jax.sharding import logical_to_spec

IMPLEMENTATIONS = ("auto", "xla", "splash")


def platform() -> str:
    """The platform the code is traced for: the current mesh's (an ahead-of-time compile for a
    TPU topology runs on a CPU host), else the default backend's."""
    mesh = jax.sharding.get_abstract_mesh()
    return jax.default_backend() if mesh.empty else mesh.abstract_device.platform


def resolve(impl: str) -> str:
    """``auto`` → the implementation for the target platform."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; use one of {IMPLEMENTATIONS}")
    if impl != "auto":
        return impl
    return "splash" if platform() == "tpu" else "xla"


def visibility(
    segment_ids: jax.Array | None, t: int, causal: bool, window: int | None
) -> jax.Array | None:
    """(B, T, T) boolean mask of the reference path (None: every key visible)."""
    mask = None
    if segment_ids is not None:
        seg = segment_ids
        mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
    if causal or window is not None:
        q_idx, k_idx = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
        pos = k_idx <= q_idx if causal else jnp.ones((t, t), bool)
        if window is not None:
            pos &= k_idx > q_idx - window
        mask = pos[None] if mask is None else mask & pos[None]
    return mask


def reference_attention(q, k, v, mask: jax.Array | None) -> jax.Array:
    """q: (B,T,H,hd), k/v: (B,S,K,hd), mask: (B|1,T,S) bool. fp32 logits and softmax; rows with
    no visible key give zeros instead of NaN."""
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


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, t: int, causal: bool, window: int | None, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if window is not None:
        one = sa.LocalMask((t, t), window_size=(window - 1, 0 if causal else None), offset=0)
    elif causal:
        one = sa.CausalMask((t, t))
    else:
        one = sa.FullMask((t, t))
    block = min(512, t)
    # The non-fused backward keeps temporaries flat in T (the fused one grows with T / block).
    sizes = sa.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
        use_fused_bwd_kernel=False,
    )
    mask = sa.MultiHeadMask([one] * heads)
    return sa.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def splash_attention(q, k, v, segment_ids, *, causal: bool, window: int | None) -> jax.Array:
    """The splash kernel per example, under ``shard_map`` over batch and heads of the mesh."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, t, _, hd = q.shape
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    interpret = platform() != "tpu"  # Pallas' interpreter elsewhere (tests on CPU)

    def local(q, k, v, seg):
        kernel = _splash_kernel(q.shape[2], t, causal, window, interpret)
        # (T, H, hd) -> (H, T, hd) per example; the kernel does not scale queries.
        one = lambda q, k, v, s: kernel(  # noqa: E731
            (q * (hd**-0.5)).swapaxes(0, 1),
            k.swapaxes(0, 1),
            v.swapaxes(0, 1),
            segment_ids=sa.SegmentIds(q=s, kv=s),
        ).swapaxes(0, 1)
        return jax.vmap(one)(q, k, v, seg)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v, segment_ids)
    heads = logical_to_spec(("batch", None, "heads", None), q.shape, mesh)
    kv_heads = logical_to_spec(("batch", None, "kv_heads", None), k.shape, mesh)
    if heads[2] != kv_heads[2]:  # GQA whose KV heads do not split like the query heads
        heads = kv_heads = PartitionSpec(heads[0], None, None, None)
    seg = PartitionSpec(heads[0], None)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(heads, kv_heads, kv_heads, seg),
        out_specs=heads,
        check_vma=False,
    )(q, k, v, segment_ids)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    causal: bool = False,
    window: int | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Self-attention of q (B,T,H,hd) over k/v (B,T,K,hd), H a multiple of K (module doc)."""
    # The TPU kernel tiles T in blocks of 128; other lengths take the reference path.
    tileable = q.shape[1] % 128 == 0 or platform() != "tpu"
    if resolve(impl) == "splash" and tileable:
        return splash_attention(q, k, v, segment_ids, causal=causal, window=window)
    return reference_attention(q, k, v, visibility(segment_ids, q.shape[1], causal, window))
