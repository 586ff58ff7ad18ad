"""The pure train step: GradCache over the global batch, AdamW, clipping, non-finite skipping.

The model is split once into ``graphdef``, ``trainable`` (LoRA adapters, or every parameter when
training fully) and ``frozen``; the step is a pure function of plain pytrees, jitted with
explicit shardings and with the train state donated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unime_jax import sharding
from unime_jax.gradcache import gradcache_value_and_grad
from unime_jax.models import multimodal


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps applied or skipped
    trainable: nnx.State
    opt_state: Any
    rng: jax.Array  # raw uint32 key data (checkpointable); per-step keys are folded from it
    skipped: jax.Array  # int32 scalar: steps skipped for a non-finite loss or gradient


def make_schedule(lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``lr``, then linear decay to zero at ``total_steps``."""
    warmup = optax.linear_schedule(0.0, lr, max(warmup_steps, 1))
    decay = optax.linear_schedule(lr, 0.0, max(total_steps - warmup_steps, 1))
    return optax.join_schedules([warmup, decay], [warmup_steps])


def make_optimizer(cfg) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; ``cfg`` holds lr, warmup_steps, num_steps, weight_decay,
    adam_b1/b2/eps and grad_clip (0 disables clipping)."""
    schedule = make_schedule(cfg.lr, cfg.warmup_steps, cfg.num_steps)
    adamw = optax.adamw(
        schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps, weight_decay=cfg.weight_decay
    )
    return (
        optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip > 0 else adamw
    )


def train_state_shardings(
    trainable: nnx.State, tx: optax.GradientTransformation, mesh: Mesh
) -> TrainState:
    """Shardings of a :class:`TrainState`: adapters/params by their logical axes, optimizer
    moments like their parameters (``optax.tree_map_params``), scalars replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    param_shardings = sharding.state_shardings(trainable, mesh)
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, s: s,
        jax.eval_shape(tx.init, trainable),
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return TrainState(replicated, param_shardings, opt_shardings, replicated, replicated)


def fresh_state(trainable: nnx.State, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=trainable,
        opt_state=tx.init(trainable),
        rng=jax.random.key_data(jax.random.key(seed)),
        skipped=jnp.zeros((), jnp.int32),
    )


def init_state(
    trainable: nnx.State, tx: optax.GradientTransformation, seed: int, mesh: Mesh
) -> TrainState:
    """A fresh train state, created directly in its shardings."""
    create = jax.jit(
        lambda t: fresh_state(t, tx, seed), out_shardings=train_state_shardings(trainable, tx, mesh)
    )
    return create(trainable)


LossFn = Callable[[dict[str, jax.Array], dict[str, jax.Array], jax.Array], tuple[jax.Array, dict]]


class TrainStep:
    """``step(state, frozen, batch) -> (state, metrics)``: jitted with the shardings of the train
    state and the frozen parameters, the train state donated, traced under the mesh (so the
    model's activation sharding constraints apply). ``lower(...)`` lowers the very same function
    for ahead-of-time compilation (e.g. for a TPU topology, see :mod:`unime_jax.aot`)."""

    def __init__(self, fn: Callable, mesh: Mesh, in_shardings, out_shardings):
        self.mesh = mesh
        self.jitted = jax.jit(
            fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=0
        )

    def __call__(self, state, frozen, batch):
        with jax.set_mesh(self.mesh):
            return self.jitted(state, frozen, batch)

    def lower(self, state, frozen, batch):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(state, frozen, batch)

    def _cache_size(self) -> int:
        return self.jitted._cache_size()


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    cfg,
    mesh: Mesh,
    loss_fn: LossFn,
    sides: tuple[str, ...],
    trainable: nnx.State,
    frozen: nnx.State,
) -> TrainStep:
    """The train step of a stage: GradCache over the ``sides`` of the nested batch
    (``{side: ModelInputs, ...extras}``), ``loss_fn(embeddings, extras, step)``, AdamW with
    clipping, non-finite steps skipped. ``trainable`` / ``frozen`` may be concrete or abstract
    (only their shardings are read)."""

    def encode(trainable, frozen, inputs, key):
        model = nnx.merge(graphdef, trainable, frozen)
        return multimodal.encode(model, inputs, key if cfg.lora_dropout > 0 else None)

    def step(state: TrainState, frozen: nnx.State, batch: dict):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        side_inputs = {side: batch[side] for side in sides}
        extras = {k: v for k, v in batch.items() if k not in sides}
        (loss, aux), grads = gradcache_value_and_grad(
            lambda p, x, k: encode(p, frozen, x, k),
            lambda embs: loss_fn(embs, extras, state.step),
            state.trainable,
            side_inputs,
            num_chunks=cfg.num_chunks,
            key=key,
        )
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        # A non-finite step is skipped entirely: parameters and optimizer moments stay as they were.
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = state.replace(
            step=state.step + 1,
            trainable=keep(trainable, state.trainable),
            opt_state=keep(opt_state, state.opt_state),
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, "skipped_steps": new_state.skipped, **aux}
        return new_state, metrics

    state_sh = train_state_shardings(trainable, tx, mesh)
    in_shardings = (state_sh, sharding.state_shardings(frozen, mesh), None)
    return TrainStep(step, mesh, in_shardings, (state_sh, NamedSharding(mesh, PartitionSpec())))
