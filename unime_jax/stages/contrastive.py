"""Stage 2: hard-negative enhanced instruction tuning (UniME §stage 2) on query/target pairs.

Data: a prepared pairs dataset, ``train_data`` (``mmeb_train/all`` built by ``python -m
unime_jax.datasets build mmeb_train``; the demo's ``shapes_world/pairs``). Loss:
:func:`unime_jax.losses.hard_negative_infonce` over the global batch (plain in-batch InfoNCE as
an ablation, or for the first ``infonce_steps`` of a model trained from scratch). Held-out
evaluation: the shapes world's retrieval and compositional sets (``demo_eval_size`` > 0).
"""

from __future__ import annotations

import jax.numpy as jnp

import unime_jax.datasets as uds
from unime_jax import losses
from unime_jax.data import pairs
from unime_jax.errors import UsageError
from unime_jax.stages import datasets
from unime_jax.stages.base import Stage


class Contrastive(Stage):
    number = 2
    sides = pairs.SIDES
    text_only = False
    skip_reasons = pairs.REASONS

    def prepare(self, cfg, workdir: str):
        datasets.prepare(cfg, datasets.ref(cfg, "train_data"))
        if cfg.demo_eval_size > 0:
            for view in ("retrieval", "compositional"):
                datasets.prepare(cfg, uds.Ref("shapes_world", view))
        return cfg

    def validate(self, cfg, *, check_files: bool = True) -> None:
        if cfg.loss not in ("hard_negative", "infonce"):
            raise UsageError(
                f"--config.loss={cfg.loss!r} is not a loss", "use hard_negative or infonce"
            )
        for key in ("temperature",):
            if not cfg[key] > 0:
                raise UsageError(f"--config.{key}={cfg[key]!r} is out of range", "it must be > 0")
        for key in ("image_size", "max_tiles", "tile_budget", "infonce_steps"):
            if cfg[key] < 0:
                raise UsageError(f"--config.{key}={cfg[key]!r} is out of range", "it must be >= 0")
        if cfg.num_hard_negatives < 1:
            raise UsageError(
                f"--config.num_hard_negatives={cfg.num_hard_negatives!r} is out of range",
                "it must be >= 1",
            )
        train_data = datasets.ref(cfg, "train_data")
        if check_files:
            datasets.check_prepared(cfg, train_data, "train", uds.mmeb_train.item)

    def source(self, cfg):
        return datasets.source(cfg, datasets.ref(cfg, "train_data"), "train", uds.mmeb_train.item)

    def lengths(self, cfg) -> dict[str, int]:
        return {"query": cfg.query_length, "target": cfg.target_length}

    def transform(self, cfg, processor):
        return pairs.PairTransform(
            processor,
            lengths=self.lengths(cfg),
            max_units=cfg.max_tiles or processor.max_units(cfg.image_size),
            image_size=cfg.image_size,
        )

    def loss_fn(self, cfg):
        """Plain in-batch InfoNCE for the first ``infonce_steps`` (a model trained from scratch,
        like the offline demo, starts with collapsed embeddings, where mined hard negatives only
        pull it further into collapse; UniME starts from a pretrained MLLM: 0 steps)."""

        def contrastive(embs, extras, step):
            del extras
            q, t = embs["query"], embs["target"]
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
            loss = jnp.where(step < cfg.infonce_steps, plain, hard)
            return loss, metrics | {"hard_negative_loss": hard}

        return contrastive

    def evaluator(self, cfg):
        if cfg.demo_eval_size <= 0:
            return None
        from unime_jax.demo import heldout

        def view(name: str):
            return datasets.builder_config(cfg, uds.Ref("shapes_world", name))

        data_dir = datasets.data_dir(cfg)
        retrieval = uds.retrieval_set("shapes_world", data_dir=data_dir, config=view("retrieval"))
        compositional = uds.sugarcrepe_splits(
            "shapes_world", data_dir=data_dir, config=view("compositional")
        )
        return lambda embedder: heldout.evaluate(embedder, retrieval, compositional)
