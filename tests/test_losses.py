"""UniME losses against literal float64 references, with gradients and under batch sharding."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from unime_jax import losses

# Jitted once per shape/config: op-by-op eager dispatch compiles every primitive separately,
# which makes a suite of small cases slow for no extra coverage.
hard_negative_infonce = jax.jit(
    losses.hard_negative_infonce, static_argnames=("temperature", "margin", "k", "return_metrics")
)
infonce = jax.jit(losses.infonce, static_argnames=("temperature", "return_metrics"))
similarity_kd = jax.jit(
    losses.similarity_kd, static_argnames=("temperature", "direction", "keep_diagonal")
)

# ---------------------------------------------------------------------------- helpers / data


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _pair(n: int, d: int, seed: int, noise: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """Random normalised queries and targets correlated with them (so positives stand out)."""
    rng = np.random.default_rng(seed)
    q = _normalise(rng.standard_normal((n, d)))
    t = _normalise(q + noise * rng.standard_normal((n, d)) / math.sqrt(d) * 3)
    return q.astype(np.float32), t.astype(np.float32)


def _with_false_negatives(n: int, d: int, seed: int, rows: int, dups: int):
    """Rows 0..rows-1 get `dups` near-duplicate targets of their query in other columns, so they
    are false negatives (S_ij ≈ 1 > S_ii + margin) and those rows keep fewer valid negatives."""
    rng = np.random.default_rng(seed)
    q, t = _pair(n, d, seed, noise=1.5)
    cols = list(range(rows, n))
    for i in range(rows):
        for j in cols[i * dups : (i + 1) * dups]:
            t[j] = _normalise(q[i] + 0.02 * rng.standard_normal(d)).astype(np.float32)
    return q, t


def _logsumexp(x: list[float]) -> float:
    m = max(x)
    return m + math.log(sum(math.exp(v - m) for v in x))


def ref_hard_negative(q, t, *, temperature, margin, k):
    """Literal per-row reference in float64: build the valid list, sort, top k, logsumexp.

    Returns (loss, metrics, number of negatives used per row)."""
    q = np.asarray(q, np.float64)
    t = np.asarray(t, np.float64)
    s = q @ t.T
    n = s.shape[0]
    losses, fn_rows, pos, hardest, n_valid = [], [], [], [], []
    for i in range(n):
        p = s[i, i]
        others = [j for j in range(n) if j != i]
        filtered = [j for j in others if margin is not None and s[i, j] > p + margin]
        valid = [s[i, j] for j in others if j not in filtered]
        chosen = sorted(valid, reverse=True)[:k]
        losses.append(-p / temperature + _logsumexp([v / temperature for v in [p, *chosen]]))
        fn_rows.append(len(filtered) > 0)
        pos.append(p)
        if valid:
            hardest.append(max(valid))
        n_valid.append(len(chosen))
    metrics = {
        "false_negative_share": float(np.mean(fn_rows)),
        "positive_sim": float(np.mean(pos)),
        "hardest_negative_sim": float(np.mean(hardest)) if hardest else float("nan"),
        "valid_negatives": float(np.mean(n_valid)),
    }
    return float(np.mean(losses)), metrics, n_valid


def ref_infonce(q, t, *, temperature):
    s = np.asarray(q, np.float64) @ np.asarray(t, np.float64).T
    return float(
        np.mean(
            [
                -s[i, i] / temperature + _logsumexp(list(s[i] / temperature))
                for i in range(s.shape[0])
            ]
        )
    )


def ref_similarity_kd(student, teacher, *, temperature, direction, keep_diagonal):
    """Per-row numpy float64 reference of the stage-1 KL loss."""
    es = np.asarray(student, np.float64)
    et = np.asarray(teacher, np.float64)
    n = es.shape[0]

    def row_probs(e, i):
        cols = [j for j in range(n) if keep_diagonal or j != i]
        z = np.array([e[i] @ e[j] / temperature for j in cols])
        z = np.exp(z - z.max())
        return z / z.sum()

    def kl(p, q):
        return float(np.sum(p * (np.log(p) - np.log(q))))

    ts, st = [], []
    for i in range(n):
        ps, pt = row_probs(es, i), row_probs(et, i)
        ts.append(kl(pt, ps))
        st.append(kl(ps, pt))
    return {
        "teacher_student": np.mean(ts),
        "student_teacher": np.mean(st),
        "symmetric": 0.5 * (np.mean(ts) + np.mean(st)),
    }[direction]


# ------------------------------------------------------------------ hard-negative InfoNCE


@pytest.mark.parametrize(
    ("n", "d", "k", "margin", "temperature", "seed"),
    [
        (16, 32, 8, 0.1, 0.02, 0),
        (24, 8, 4, 0.0, 0.05, 1),
        (12, 16, 8, None, 0.02, 2),
        (5, 16, 8, 0.1, 0.02, 3),  # k > N - 1
        (2, 4, 8, 0.1, 0.1, 4),
        (32, 64, 16, -0.1, 0.03, 5),  # negative margin (paper's ablation) filters a lot
    ],
)
def test_hard_negative_matches_reference(n, d, k, margin, temperature, seed):
    q, t = _pair(n, d, seed)
    want, want_m, _ = ref_hard_negative(q, t, temperature=temperature, margin=margin, k=k)
    got, got_m = hard_negative_infonce(
        q, t, temperature=temperature, margin=margin, k=k, return_metrics=True
    )
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-5)
    assert set(got_m) == set(want_m)
    for name, value in want_m.items():
        np.testing.assert_allclose(float(got_m[name]), value, rtol=1e-5, atol=1e-5, err_msg=name)
    # The plain return value is the same loss.
    np.testing.assert_allclose(
        float(hard_negative_infonce(q, t, temperature=temperature, margin=margin, k=k)),
        float(got),
        rtol=1e-7,
    )


@pytest.mark.parametrize(("k", "margin"), [(8, 0.1), (4, 0.1), (8, None)])
def test_hard_negative_rows_with_fewer_than_k_valid(k, margin):
    # 12 rows; rows 0 and 1 each get 5 near-duplicates -> only 11 - 5 = 6 valid negatives.
    q, t = _with_false_negatives(n=12, d=16, seed=7, rows=2, dups=5)
    want, want_m, used = ref_hard_negative(q, t, temperature=0.02, margin=margin, k=k)
    if margin is not None:
        assert want_m["false_negative_share"] >= 2 / 12
        if k == 8:
            assert min(used) < k  # the construction really produced short rows
    got, got_m = hard_negative_infonce(
        q, t, temperature=0.02, margin=margin, k=k, return_metrics=True
    )
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-5)
    for name, value in want_m.items():
        np.testing.assert_allclose(float(got_m[name]), value, rtol=1e-5, atol=1e-5, err_msg=name)


def test_hard_negative_short_rows_counted():
    # Small batch where the filtered rows end up with fewer than k valid negatives.
    q, t = _with_false_negatives(n=10, d=16, seed=3, rows=2, dups=4)
    _, want_m, used = ref_hard_negative(q, t, temperature=0.02, margin=0.1, k=8)
    _, got_m = hard_negative_infonce(q, t, k=8, return_metrics=True)
    assert min(used) < 8  # the construction really produced short rows
    np.testing.assert_allclose(float(got_m["valid_negatives"]), want_m["valid_negatives"])


def test_all_negatives_filtered_row_is_exactly_zero():
    # q0 = e0, q1 = e1, targets swapped-ish: each query's *other* target is far more similar
    # than its own, so both rows lose every negative and loss_i = -p/τ + p/τ = 0 exactly.
    q = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    t = _normalise(np.array([[0.3, 0.95], [0.95, 0.3]])).astype(np.float32)
    loss, m = hard_negative_infonce(q, t, k=8, return_metrics=True)
    assert float(loss) == 0.0
    assert float(m["false_negative_share"]) == 1.0
    assert float(m["valid_negatives"]) == 0.0
    assert np.isnan(float(m["hardest_negative_sim"]))  # no row has a valid negative
    # Without filtering the same batch has a large loss: the zero comes from the masking.
    assert float(hard_negative_infonce(q, t, margin=None)) > 1.0
    # And the gradient of a fully-masked batch is exactly zero, not NaN.
    gq, gt = jax.jit(jax.grad(losses.hard_negative_infonce, argnums=(0, 1)))(q, t)
    assert np.all(np.asarray(gq) == 0) and np.all(np.asarray(gt) == 0)


def test_single_row_batch():
    q, t = _pair(1, 8, 0)
    loss, m = hard_negative_infonce(q, t, return_metrics=True)
    assert float(loss) == 0.0 and float(m["valid_negatives"]) == 0.0


def test_hard_negative_full_k_no_margin_equals_infonce():
    # With no filtering and k = N - 1 every negative is used: the plain InfoNCE.
    q, t = _pair(16, 32, 11)
    np.testing.assert_allclose(
        float(hard_negative_infonce(q, t, margin=None, k=15)), float(infonce(q, t)), rtol=1e-6
    )


def test_bf16_inputs_give_float32_loss():
    q, t = _pair(8, 16, 2)
    loss = hard_negative_infonce(jnp.asarray(q, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16))
    assert loss.dtype == jnp.float32


def test_hard_negative_argument_errors():
    q, t = _pair(4, 8, 0)
    with pytest.raises(ValueError, match="same shape"):
        hard_negative_infonce(q, t[:3])
    with pytest.raises(ValueError, match="2-D"):
        hard_negative_infonce(q[0], t[0])
    with pytest.raises(ValueError, match="k must be"):
        hard_negative_infonce(q, t, k=0)
    with pytest.raises(ValueError, match="temperature"):
        hard_negative_infonce(q, t, temperature=0.0)
    with pytest.raises(TypeError):
        hard_negative_infonce(q, t, k=2.5)


# ------------------------------------------------------------------------------- gradients


def _fixed_selection(q, t, *, margin, k):
    """Indices and slot mask of the hard negatives, decided once in float64 numpy."""
    s = np.asarray(q, np.float64) @ np.asarray(t, np.float64).T
    n = s.shape[0]
    k_eff = min(k, n - 1)
    idx = np.zeros((n, k_eff), np.int32)
    mask = np.zeros((n, k_eff), bool)
    for i in range(n):
        valid = [
            j
            for j in range(n)
            if j != i and not (margin is not None and s[i, j] > s[i, i] + margin)
        ]
        chosen = sorted(valid, key=lambda j: -s[i, j])[:k_eff]
        idx[i, : len(chosen)] = chosen
        mask[i, : len(chosen)] = True
    return idx, mask


def _loss_with_fixed_selection(q, t, idx, mask, temperature):
    """jnp reference whose negatives are constants: gradient = the selection-free gradient."""
    s = jnp.matmul(q, t.T, precision=jax.lax.Precision.HIGHEST)
    pos = jnp.diagonal(s)
    neg = jnp.take_along_axis(s, idx, axis=1)
    logits = jnp.concatenate([pos[:, None], neg], axis=1) / temperature
    keep = jnp.concatenate([jnp.ones((s.shape[0], 1), bool), mask], axis=1)
    lse = jax.nn.logsumexp(jnp.where(keep, logits, -jnp.inf), axis=1)
    return jnp.mean(lse - pos / temperature)


@pytest.mark.parametrize(
    ("n", "k", "margin", "build"),
    [(16, 8, 0.1, "pair"), (30, 8, 0.1, "dups"), (6, 8, None, "pair")],
)
def test_gradient_equals_fixed_selection_reference(n, k, margin, build):
    if build == "pair":
        q, t = _pair(n, 16, 21)
    else:
        q, t = _with_false_negatives(n=n, d=16, seed=5, rows=3, dups=7)
    idx, mask = _fixed_selection(q, t, margin=margin, k=k)
    want = jax.jit(jax.grad(_loss_with_fixed_selection, argnums=(0, 1)), static_argnums=4)(
        jnp.asarray(q), jnp.asarray(t), idx, mask, 0.02
    )
    got = jax.jit(
        jax.grad(
            lambda a, b: losses.hard_negative_infonce(a, b, margin=margin, k=k), argnums=(0, 1)
        )
    )(q, t)
    for g, w in zip(got, want):
        assert np.all(np.isfinite(np.asarray(g)))
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    # Gradients reach targets that are only ever negatives (not just the positives).
    assert np.abs(np.asarray(got[1])).sum() > 0


def test_gradient_finite_differences_float64():
    if not hasattr(jax, "enable_x64"):
        pytest.skip("jax.enable_x64 context manager not available")
    with jax.enable_x64(True):
        # Row 0 gets 3 near-duplicate targets: it keeps 1 valid negative for k = 2 slots, so
        # the finite differences also cover filtered columns and a masked slot.
        q, t = _with_false_negatives(n=5, d=4, seed=9, rows=1, dups=3)
        k, margin, tau = 2, 0.1, 0.05
        _, _, used = ref_hard_negative(q, t, temperature=tau, margin=margin, k=k)
        assert used[0] < k
        q = jnp.asarray(q, jnp.float64)
        t = jnp.asarray(t, jnp.float64)

        @jax.jit
        def loss(a, b):
            return losses.hard_negative_infonce(a, b, temperature=tau, margin=margin, k=k)

        grads = jax.grad(loss, argnums=(0, 1))(q, t)
        assert grads[0].dtype == jnp.float64
        eps = 1e-6
        for arg, g in enumerate(grads):
            base = [np.asarray(q), np.asarray(t)]
            fd = np.zeros_like(base[arg])
            for pos in np.ndindex(fd.shape):
                up = [x.copy() for x in base]
                dn = [x.copy() for x in base]
                up[arg][pos] += eps
                dn[arg][pos] -= eps
                fd[pos] = (float(loss(*up)) - float(loss(*dn))) / (2 * eps)
            np.testing.assert_allclose(np.asarray(g), fd, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------- InfoNCE


@pytest.mark.parametrize(("n", "d", "temperature"), [(16, 32, 0.02), (7, 5, 0.1), (1, 4, 0.02)])
def test_infonce_matches_reference(n, d, temperature):
    q, t = _pair(n, d, n)
    got, m = infonce(q, t, temperature=temperature, return_metrics=True)
    np.testing.assert_allclose(
        float(got), ref_infonce(q, t, temperature=temperature), rtol=1e-5, atol=1e-5
    )
    s = q.astype(np.float64) @ t.astype(np.float64).T
    np.testing.assert_allclose(float(m["positive_sim"]), np.mean(np.diag(s)), rtol=1e-5)
    np.testing.assert_allclose(
        float(m["accuracy"]), np.mean(np.argmax(s, axis=1) == np.arange(n)), rtol=1e-6
    )
    if n > 1:
        off = np.where(np.eye(n, dtype=bool), -np.inf, s)
        np.testing.assert_allclose(
            float(m["hardest_negative_sim"]), np.mean(off.max(axis=1)), rtol=1e-5
        )


# ----------------------------------------------------------------------------- similarity KD


@pytest.mark.parametrize("direction", ["teacher_student", "student_teacher", "symmetric"])
@pytest.mark.parametrize("keep_diagonal", [True, False])
@pytest.mark.parametrize(("n", "ds", "dt", "temperature"), [(12, 16, 24, 0.05), (5, 8, 8, 0.2)])
def test_similarity_kd_matches_reference(direction, keep_diagonal, n, ds, dt, temperature):
    rng = np.random.default_rng(n + ds)
    student = _normalise(rng.standard_normal((n, ds))).astype(np.float32)
    teacher = _normalise(rng.standard_normal((n, dt))).astype(np.float32)
    want = ref_similarity_kd(
        student,
        teacher,
        temperature=temperature,
        direction=direction,
        keep_diagonal=keep_diagonal,
    )
    got = similarity_kd(
        student,
        teacher,
        temperature=temperature,
        direction=direction,
        keep_diagonal=keep_diagonal,
    )
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)
    assert float(got) > 0


@pytest.mark.parametrize("keep_diagonal", [True, False])
def test_similarity_kd_gradients(keep_diagonal):
    rng = np.random.default_rng(0)
    student = _normalise(rng.standard_normal((8, 16))).astype(np.float32)
    teacher = _normalise(rng.standard_normal((8, 24))).astype(np.float32)
    for direction in ["teacher_student", "student_teacher", "symmetric"]:
        gs, gt = jax.jit(
            jax.grad(
                lambda s, t, d=direction: losses.similarity_kd(
                    s, t, direction=d, keep_diagonal=keep_diagonal
                ),
                argnums=(0, 1),
            )
        )(student, teacher)
        assert np.all(np.isfinite(np.asarray(gs))), direction  # no NaN from masked entries
        assert np.abs(np.asarray(gs)).sum() > 0
        assert np.all(np.asarray(gt) == 0), direction  # the teacher is a constant


@pytest.mark.parametrize("direction", ["teacher_student", "student_teacher", "symmetric"])
@pytest.mark.parametrize("keep_diagonal", [True, False])
def test_similarity_kd_zero_when_student_is_teacher(direction, keep_diagonal):
    e = _normalise(np.random.default_rng(1).standard_normal((10, 16))).astype(np.float32)
    loss = similarity_kd(e, e, direction=direction, keep_diagonal=keep_diagonal)
    assert abs(float(loss)) < 1e-7
    # Equal similarity structure at different dims also gives 0: a rotation into 24 dims.
    rot, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((24, 24)))
    teacher = (np.pad(e, ((0, 0), (0, 8))) @ rot).astype(np.float32)
    loss = similarity_kd(e, teacher, direction=direction, keep_diagonal=keep_diagonal)
    assert abs(float(loss)) < 1e-4


def test_similarity_kd_argument_errors():
    e = _normalise(np.random.default_rng(0).standard_normal((4, 8))).astype(np.float32)
    with pytest.raises(ValueError, match="direction"):
        similarity_kd(e, e, direction="forward")
    with pytest.raises(ValueError, match="same N"):
        similarity_kd(e, e[:3])
    with pytest.raises(ValueError, match="2-D"):
        similarity_kd(e[0], e[0])
    with pytest.raises(ValueError, match="temperature"):
        similarity_kd(e, e, temperature=-1.0)
    with pytest.raises(ValueError, match="N >= 2"):
        similarity_kd(e[:1], e[:1], keep_diagonal=False)


# ----------------------------------------------------------------------------------- sharding


def _meshes():
    devices = np.array(jax.devices())
    assert devices.size == 8, "tests/conftest.py should provide 8 CPU devices"
    return [
        (Mesh(devices.reshape(8), ("data",)), P("data", None)),
        (Mesh(devices.reshape(4, 2), ("data", "fsdp")), P(("data", "fsdp"), None)),
    ]


@pytest.mark.parametrize("mesh_index", [0, 1], ids=["data8", "data4xfsdp2"])
def test_sharded_equals_unsharded(mesh_index):
    mesh, spec = _meshes()[mesh_index]
    q, t = _with_false_negatives(n=32, d=16, seed=13, rows=3, dups=7)
    rng = np.random.default_rng(3)
    teacher = _normalise(rng.standard_normal((32, 24))).astype(np.float32)

    fns = {
        "hard_negative": lambda a, b: losses.hard_negative_infonce(a, b, k=8),
        "hard_negative_no_margin": lambda a, b: losses.hard_negative_infonce(
            a, b, margin=None, k=4
        ),
        "infonce": losses.infonce,
        "kd": lambda a, b: (
            losses.similarity_kd(a, teacher, keep_diagonal=False)
            + losses.similarity_kd(b, teacher, direction="symmetric")
        ),
    }
    sharding = NamedSharding(mesh, spec)
    qs, ts = jax.device_put(q, sharding), jax.device_put(t, sharding)
    assert len(qs.sharding.device_set) == 8
    for name, fn in fns.items():
        value_and_grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
        want_loss, want_grads = value_and_grad(jnp.asarray(q), jnp.asarray(t))
        got_loss, got_grads = value_and_grad(qs, ts)
        np.testing.assert_allclose(float(got_loss), float(want_loss), atol=1e-6, err_msg=name)
        for g, w in zip(got_grads, want_grads):
            np.testing.assert_allclose(
                np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6, err_msg=name
            )
    # Metrics under sharding too.
    _, m_sharded = hard_negative_infonce(qs, ts, return_metrics=True)
    _, m_plain = hard_negative_infonce(q, t, return_metrics=True)
    for name in m_plain:
        np.testing.assert_allclose(float(m_sharded[name]), float(m_plain[name]), atol=1e-6)
