"""Stage 2: hard-negative enhanced instruction tuning (UniME §stage 2) on query/target pairs.

Data: MMEB-train converted by ``python -m unime_jax.data.mmeb_convert`` (or ``train_data="demo"``,
the shapes world's pairs). Loss: :func:`unime_jax.losses.hard_negative_infonce` over the global
batch (plain in-batch InfoNCE as an ablation, or for the first ``infonce_steps`` of a model
trained from scratch). Held-out evaluation: the shapes world (``demo_eval_size`` > 0).
"""

from __future__ import annotations

import os

import jax.numpy as jnp

from unime_jax import losses
from unime_jax.data import pairs
from unime_jax.errors import UsageError
from unime_jax.stages.base import Stage


class Contrastive(Stage):
    number = 2
    sides = pairs.SIDES
    text_only = False
    skip_reasons = pairs.REASONS

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
        if not check_files:
            return
        if cfg.train_data != "demo" and (not cfg.train_data or not os.path.isdir(cfg.train_data)):
            raise UsageError(
                f"--config.train_data={cfg.train_data!r} is not a directory",
                "convert MMEB-train with `python -m unime_jax.data.mmeb_convert --input ... "
                "--image-root ... --out DIR` and pass DIR",
            )

    def source(self, cfg):
        if cfg.train_data == "demo":
            from unime_jax.demo.model import IMAGE_SIZE
            from unime_jax.demo.world import sets

            return sets.training_rows(cfg.seed, cfg.demo_train_rows, image_size=IMAGE_SIZE)
        from unime_jax.data.mmeb_train import open_dataset

        return open_dataset(cfg.train_data, image_root=cfg.image_root or None)

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

        return lambda embedder: heldout.evaluate(embedder, n=cfg.demo_eval_size)
