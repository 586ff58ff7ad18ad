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

from unime_jax import losses, sharding
from unime_jax.gradcache import gradcache_value_and_grad
from unime_jax.models.mllm import last_token_pool


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


def init_state(
    trainable: nnx.State, tx: optax.GradientTransformation, seed: int, mesh: Mesh
) -> TrainState:
    """A fresh train state, created directly in its shardings."""

    def create(trainable):
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            trainable=trainable,
            opt_state=tx.init(trainable),
            rng=jax.random.key_data(jax.random.key(seed)),
            skipped=jnp.zeros((), jnp.int32),
        )

    return jax.jit(create, out_shardings=train_state_shardings(trainable, tx, mesh))(trainable)


STAGE_SIDES = {1: ("text",), 2: ("query", "target")}


def make_loss_fn(cfg) -> Callable:
    """``(embeddings, extras, step) -> (loss, metrics)`` for the configured stage.

    Stage 1: ``embeddings = (student,)`` and ``extras["teacher"]`` holds the precomputed teacher
    vectors of the same rows; the loss is :func:`losses.similarity_kd`.

    Stage 2: ``embeddings = (query, target)``. ``infonce_steps`` > 0 uses plain in-batch
    InfoNCE for the first steps: a model trained from scratch (the offline demo) starts with
    collapsed embeddings, where mined hard negatives only pull it further into collapse. UniME
    itself starts from a pretrained MLLM (0 steps).
    """
    if cfg.stage == 1:

        def distill(embs, extras, step):
            del step
            loss = losses.similarity_kd(
                embs[0],
                extras["teacher"],
                temperature=cfg.kd_temperature,
                direction=cfg.kd_direction,
                keep_diagonal=cfg.kd_keep_diagonal,
            )
            return loss, {"kd_loss": loss}

        return distill

    if cfg.loss not in ("hard_negative", "infonce"):
        raise ValueError(f"unknown loss {cfg.loss!r}; use hard_negative or infonce")

    def contrastive(embs, extras, step):
        del extras
        q, t = embs
        plain, plain_metrics = losses.infonce(
            q, t, temperature=cfg.temperature, return_metrics=True
        )
        if cfg.loss == "infonce":
            return plain, plain_metrics
        hard, metrics = losses.hard_negative_infonce(
            q,
            t,
            temperature=cfg.temperature,
            margin=cfg.margin if cfg.filter_false_negatives else None,
            k=cfg.num_hard_negatives,
            return_metrics=True,
        )
        if cfg.infonce_steps <= 0:
            return hard, metrics
        return jnp.where(step < cfg.infonce_steps, plain, hard), metrics | {
            "hard_negative_loss": hard
        }

    return contrastive


def split_batch(batch: dict[str, jax.Array], sides: tuple[str, ...]) -> tuple[tuple, dict]:
    """``{"query_input_ids": ..., "teacher": ...}`` -> (per-side model inputs, other arrays)."""
    side_inputs = tuple(
        {k[len(side) + 1 :]: v for k, v in batch.items() if k.startswith(side + "_")}
        for side in sides
    )
    extras = {k: v for k, v in batch.items() if not k.startswith(tuple(s + "_" for s in sides))}
    return side_inputs, extras


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    cfg,
    mesh: Mesh,
    trainable: nnx.State,
    frozen: nnx.State,
) -> Callable:
    """Returns ``step(state, frozen, batch) -> (state, metrics)``, jitted with the shardings of
    ``trainable`` / ``frozen`` (concrete or abstract) and the train state donated. The batch
    holds the model inputs of each side of ``STAGE_SIDES[cfg.stage]`` (``query_*`` and
    ``target_*``, or ``text_*``) plus any extra arrays the loss reads (see :func:`split_batch`).
    """
    loss_fn = make_loss_fn(cfg)

    def encode(trainable, frozen, inputs, key):
        model = nnx.merge(graphdef, trainable, frozen)
        hidden = model(**inputs, dropout_key=key if cfg.lora_dropout > 0 else None)
        return last_token_pool(hidden, inputs["attention_mask"])

    def step(state: TrainState, frozen: nnx.State, batch: dict[str, jax.Array]):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        side_inputs, extras = split_batch(batch, STAGE_SIDES[cfg.stage])
        (loss, aux), grads = gradcache_value_and_grad(
            lambda p, x, k: encode(p, frozen, x, k),
            lambda *embs: loss_fn(embs, extras, state.step),
            state.trainable,
            *side_inputs,
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
    return jax.jit(
        step,
        in_shardings=(state_sh, sharding.state_shardings(frozen, mesh), None),
        out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )
