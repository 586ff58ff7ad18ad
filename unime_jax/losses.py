"""UniME training losses (spec §1): stage-1 similarity distillation and stage-2 hard-negative InfoNCE.

Every function here is plain global math over the whole batch. Under ``jit`` the inputs may be
batch-sharded (e.g. ``P("data", None)`` or ``P(("data", "fsdp"), None)``); the compiler inserts
whatever all-gathers the ``(N, N)`` similarity matrix needs, and those collectives are
differentiable. So there is no ``shard_map``, no ``psum`` and no "× world size" rescaling:
``N`` is always the *global* batch and the loss is the global mean.

Embeddings are taken as given: the model's pooling already L2-normalises them (spec §1) and
stage-1 teacher embeddings are stored L2-normalised, so nothing here renormalises. That keeps
the losses exact functions of what the model emits and keeps the normalisation's gradient in
one place (the pooling), not two.
"""

from __future__ import annotations

import operator
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["KDDirection", "hard_negative_infonce", "infonce", "similarity_kd"]

KDDirection = Literal["teacher_student", "student_teacher", "symmetric"]
KD_DIRECTIONS = ("teacher_student", "student_teacher", "symmetric")


def _compute_dtype(*arrays: jax.Array) -> jnp.dtype:
    """At least float32 (bf16 activations must not decide a 0.1 margin or feed a 1/0.02 scale);
    float64 stays float64 so finite-difference checks under x64 are meaningful."""
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _gram(a: jax.Array, b: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """``a @ b.T`` in ``dtype`` at full precision.

    HIGHEST precision because TPUs otherwise run float32 matmuls in bf16 passes (~3 significant
    digits): with τ = 0.02 that error is magnified 50× in the logits and can flip the strict
    ``S_ij > S_ii + margin`` test. The cost is negligible (N²·D with N ≈ 1024).
    """
    return jnp.matmul(a.astype(dtype), b.astype(dtype).T, precision=lax.Precision.HIGHEST)


def _eye(n: int) -> jax.Array:
    """Boolean identity built from iotas, so it is generated shard-locally, not as a constant."""
    return lax.broadcasted_iota(jnp.int32, (n, n), 0) == lax.broadcasted_iota(jnp.int32, (n, n), 1)


def _row_diagonal(s: jax.Array, eye: jax.Array) -> jax.Array:
    """``S_ii`` via a masked row sum: adding exact zeros reproduces ``S_ii`` bit for bit (the
    positive logit and the false-negative threshold use the very same number) and is row-local,
    so it needs no communication when S is row-sharded."""
    return jnp.sum(jnp.where(eye, s, jnp.zeros_like(s)), axis=1)


def _check_temperature(temperature: float) -> None:
    # A traced temperature (e.g. learnable) can't be checked here; a Python number can.
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_pair(query: jax.Array, target: jax.Array) -> None:
    if query.ndim != 2 or target.ndim != 2:
        raise ValueError(
            f"query and target must be 2-D (N, D); got {query.shape} and {target.shape}"
        )
    if query.shape != target.shape:
        raise ValueError(
            f"query and target must have the same shape (row i of target is the positive of "
            f"row i of query); got {query.shape} and {target.shape}"
        )


def hard_negative_infonce(
    query: jax.Array,
    target: jax.Array,
    *,
    temperature: float = 0.02,
    margin: float | None = 0.1,
    k: int = 8,
    return_metrics: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """UniME stage-2 loss: InfoNCE against the top-k hard negatives after false-negative removal.

    With ``S = query @ target.T`` (float32 or wider) and ``p_i = S_ii``:

    1. false negatives are the ``j != i`` with ``S_ij > p_i + margin`` (strict) and are removed;
    2. the hard negatives of row i are the top ``k`` of the remaining ``j != i`` by ``S_ij``,
       selected without gradient;
    3. ``loss_i = -p_i/τ + logsumexp([p_i, S_i,idx_1, …, S_i,idx_k] / τ)``, averaged over i.

    Only query→target, as in the paper. Slots for which a row has no valid negative left are
    *masked out* of the logsumexp (never filled with a filtered, positive or repeated index), so
    a row whose negatives were all filtered contributes exactly 0.

    Args:
        query: ``(N, D)`` query embeddings, already L2-normalised (not renormalised here).
        target: ``(N, D)`` target embeddings, already L2-normalised; row i is query i's positive.
        temperature: τ; the paper uses 0.02.
        margin: β for false-negative filtering (paper: 0.1; may be negative, as in its
            ablation). ``None`` disables filtering.
        k: number of hard negatives per row (paper: 8). Clamped statically to ``N - 1``.
        return_metrics: also return a dict of scalar diagnostics (all without gradient):
            ``false_negative_share`` (fraction of rows with at least one filtered false
            negative), ``positive_sim`` (mean ``p_i``), ``hardest_negative_sim`` (mean over
            rows of the largest valid negative ``S_ij``, rows without one excluded; NaN if no
            row has one) and ``valid_negatives`` (mean number of unmasked slots per row).

    Returns:
        The scalar loss, or ``(loss, metrics)`` if ``return_metrics``.

    Two deliberate departures from the published PyTorch loss (spec §1): (a) its cross-device
    all-gather of embeddings drops the gradient, so embeddings gathered from other devices are
    constants there; here the global batch is one logical array and the all-gather the compiler
    inserts is differentiable, so every ``S_ij`` used gets its full gradient (the result equals
    the single-device gradient); (b) it lets masked (filtered / missing) slots into the softmax;
    here they are excluded from the logsumexp.
    """
    _check_pair(query, target)
    _check_temperature(temperature)
    k = operator.index(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")

    n = query.shape[0]
    dtype = _compute_dtype(query, target)
    s = _gram(query, target, dtype)
    eye = _eye(n)
    positive = _row_diagonal(s, eye)

    # Mining decisions (filtering and top-k) are made on a gradient-free copy: the selection is
    # a piecewise-constant function of S, and stop_gradient states that outright instead of
    # relying on top_k/comparison happening to have no useful derivative.
    s_sel = lax.stop_gradient(s)
    positive_sel = lax.stop_gradient(positive)
    false_negative = jnp.zeros_like(eye)
    if margin is not None:
        false_negative = ~eye & (s_sel > positive_sel[:, None] + margin)
    valid = ~eye & ~false_negative

    # k_eff must be static (top_k's output shape); only N - 1 other targets exist.
    k_eff = min(k, n - 1)
    if k_eff > 0:
        # -inf ranks invalid columns last; whether one is then picked is read from `valid` by
        # index (below), so a masked column can never pass for a real negative.
        _, idx = lax.top_k(jnp.where(valid, s_sel, -jnp.inf), k_eff)
        slot_valid = jnp.take_along_axis(valid, idx, axis=1)
        # Gather the *live* S values at the chosen indices: the gradient flows through exactly
        # the selected S_ij (and through both embeddings that produced them).
        negatives = jnp.take_along_axis(s, idx, axis=1)
    else:  # N == 1: no negatives at all; every row's loss is -p/τ + p/τ = 0.
        slot_valid = jnp.zeros((n, 0), dtype=bool)
        negatives = jnp.zeros((n, 0), dtype=dtype)

    # -p/τ + logsumexp([p, n_1..n_k]/τ) == logsumexp([0, (n_1 - p)/τ, ..]): shifting by the
    # positive first avoids cancelling two ~1/τ = 50-sized numbers (float32 ulp ~4e-6 there)
    # and makes a row with every slot masked exactly logsumexp([0]) = 0, not just ≈ 0.
    logits = jnp.concatenate(
        [jnp.zeros((n, 1), dtype), (negatives - positive[:, None]) / temperature], axis=1
    )
    keep = jnp.concatenate([jnp.ones((n, 1), dtype=bool), slot_valid], axis=1)
    # The positive is always kept, so each row's max is finite and masked entries contribute
    # exp(-inf) = 0 to the sum and nothing to the gradient.
    loss = jnp.mean(jax.nn.logsumexp(jnp.where(keep, logits, -jnp.inf), axis=1))

    if not return_metrics:
        return loss

    # Hardest valid negative per row = max over all valid j (the first top-k slot, when valid).
    has_valid = jnp.any(valid, axis=1)
    hardest = jnp.max(jnp.where(valid, s_sel, -jnp.inf), axis=1)
    n_rows_with_neg = jnp.sum(has_valid)
    hardest_mean = jnp.where(
        n_rows_with_neg > 0,
        jnp.sum(jnp.where(has_valid, hardest, 0.0)) / jnp.maximum(n_rows_with_neg, 1),
        jnp.nan,
    )
    metrics = {
        "false_negative_share": jnp.mean(jnp.any(false_negative, axis=1).astype(dtype)),
        "positive_sim": jnp.mean(positive_sel),
        "hardest_negative_sim": hardest_mean.astype(dtype),
        "valid_negatives": jnp.mean(jnp.sum(slot_valid, axis=1).astype(dtype)),
    }
    return loss, metrics


def infonce(
    query: jax.Array,
    target: jax.Array,
    *,
    temperature: float = 0.02,
    return_metrics: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """Plain in-batch InfoNCE, query→target (the ablation baseline without mining).

    ``loss = mean_i CE(softmax(S_i / τ), label i)`` with ``S = query @ target.T`` over the full
    row (all N targets). Inputs are ``(N, D)`` and already L2-normalised (not renormalised).

    With ``return_metrics`` also returns (without gradient) ``positive_sim`` (mean ``S_ii``),
    ``hardest_negative_sim`` (mean over rows of ``max_{j≠i} S_ij``; NaN if N == 1) and
    ``accuracy`` (fraction of rows whose argmax is their own target).
    """
    _check_pair(query, target)
    _check_temperature(temperature)
    n = query.shape[0]
    dtype = _compute_dtype(query, target)
    s = _gram(query, target, dtype)
    eye = _eye(n)
    # Shift each row by its positive before the logsumexp (same value, better float32 accuracy
    # at τ = 0.02; see hard_negative_infonce).
    loss = jnp.mean(jax.nn.logsumexp((s - _row_diagonal(s, eye)[:, None]) / temperature, axis=1))
    if not return_metrics:
        return loss

    s_sel = lax.stop_gradient(s)
    positive = _row_diagonal(s_sel, eye)
    hardest = (
        jnp.mean(jnp.max(jnp.where(eye, -jnp.inf, s_sel), axis=1))
        if n > 1
        else jnp.asarray(jnp.nan, dtype)
    )
    metrics = {
        "positive_sim": jnp.mean(positive),
        "hardest_negative_sim": hardest,
        "accuracy": jnp.mean((jnp.argmax(s_sel, axis=1) == jnp.arange(n)).astype(dtype)),
    }
    return loss, metrics


def _kl_rows(log_p: jax.Array, log_q: jax.Array, keep: jax.Array | None) -> jax.Array:
    """Row-wise ``KL(p ‖ q) = Σ_j p_j (log p_j − log q_j)`` from log-probabilities.

    Masked entries have ``log p = log q = -inf``; ``0 · (-inf − -inf)`` is NaN, and even under
    a ``where`` its backward pass would multiply a zero cotangent by NaN. So the log-probs are
    made finite *before* the product ("double where"), and the term is zeroed after.
    """
    if keep is not None:
        log_p = jnp.where(keep, log_p, 0.0)
        log_q = jnp.where(keep, log_q, 0.0)
    terms = jnp.exp(log_p) * (log_p - log_q)
    if keep is not None:
        terms = jnp.where(keep, terms, 0.0)
    return jnp.sum(terms, axis=-1)


def similarity_kd(
    student: jax.Array,
    teacher: jax.Array,
    *,
    temperature: float = 0.05,
    direction: KDDirection = "teacher_student",
    keep_diagonal: bool = True,
) -> jax.Array:
    """UniME stage-1 loss: distil the teacher's in-batch similarity structure into the student.

    ``S_s = E_s E_sᵀ / τ`` and ``S_t = E_t E_tᵀ / τ`` (both ``(N, N)``, so the embedding dims
    may differ); ``P = softmax`` per row. ``direction`` picks
    ``"teacher_student"``: ``mean_i KL(P_t[i] ‖ P_s[i])`` (the paper's form, default),
    ``"student_teacher"``: ``mean_i KL(P_s[i] ‖ P_t[i])``, or ``"symmetric"``: their average.

    Args:
        student: ``(N, Ds)`` student embeddings, L2-normalised by the pooling (not renormalised).
        teacher: ``(N, Dt)`` teacher embeddings, stored L2-normalised (not renormalised). They
            are constants of the loss (``stop_gradient``): the teacher is never trained.
        temperature: τ (open in the paper; default 0.05).
        direction: KL direction, see above.
        keep_diagonal: if False, the self-similarity ``j = i`` is removed from both softmaxes
            (it is 1/τ for every normalised row and carries no information about the batch).

    Returns:
        The scalar loss (0 when the two similarity matrices agree).
    """
    if student.ndim != 2 or teacher.ndim != 2:
        raise ValueError(
            f"student and teacher must be 2-D (N, D); got {student.shape} and {teacher.shape}"
        )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student and teacher must embed the same N rows; got {student.shape[0]} and "
            f"{teacher.shape[0]}"
        )
    if direction not in KD_DIRECTIONS:
        raise ValueError(f"direction must be one of {KD_DIRECTIONS}, got {direction!r}")
    _check_temperature(temperature)
    n = student.shape[0]
    if not keep_diagonal and n < 2:
        raise ValueError("keep_diagonal=False needs N >= 2 (each row needs another row)")

    teacher = lax.stop_gradient(teacher)
    dtype = _compute_dtype(student, teacher)
    logits_s = _gram(student, student, dtype) / temperature
    logits_t = _gram(teacher, teacher, dtype) / temperature
    keep = None
    if not keep_diagonal:
        keep = ~_eye(n)
        logits_s = jnp.where(keep, logits_s, -jnp.inf)
        logits_t = jnp.where(keep, logits_t, -jnp.inf)
    # log_softmax rather than log(softmax): exact log-probabilities even where p underflows
    # (at τ = 0.05 logits span 40 nats).
    log_ps = jax.nn.log_softmax(logits_s, axis=-1)
    log_pt = jax.nn.log_softmax(logits_t, axis=-1)

    if direction == "teacher_student":
        return jnp.mean(_kl_rows(log_pt, log_ps, keep))
    if direction == "student_teacher":
        return jnp.mean(_kl_rows(log_ps, log_pt, keep))
    return 0.5 * (
        jnp.mean(_kl_rows(log_pt, log_ps, keep)) + jnp.mean(_kl_rows(log_ps, log_pt, keep))
    )
