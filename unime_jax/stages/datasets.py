"""How a stage's config names its data: prepared TFDS datasets (:mod:`unime_jax.datasets`),
``NAME[/CONFIG][:SPLIT]`` in a config key, read from ``cfg.data_dir`` ("" = TFDS's default,
``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).

The demo's shapes world is generated, so it is built on first use; its sizes and seeds come
from the config (``seed``, ``demo_train_rows``, ``demo_eval_size``), like the demo's other
choices. Every other dataset is built once by the user (``python -m unime_jax.datasets build``);
an unprepared one is an error whose fix is that command.
"""

from __future__ import annotations

import unime_jax.datasets as uds
from unime_jax.datasets import base

GENERATED = ("shapes_world",)


def ref(cfg, key: str) -> uds.Ref:
    """The dataset ``cfg[key]`` names (a :class:`~unime_jax.errors.UsageError` if malformed)."""
    return uds.Ref.parse(cfg[key], flag=f"--config.{key}")


def builder_config(cfg, dataset: uds.Ref):
    """The builder config ``dataset`` means under ``cfg``: a shapes-world view takes the demo's
    seed and sizes (training scenes from ``seed``, held-out ones from ``seed + 1`` for the
    sentences and from seed 1 for the retrieval / compositional sets, as the demo always had)."""
    if dataset.name != "shapes_world":
        return dataset.config
    from unime_jax.datasets import shapes_world

    view = dataset.config or "pairs"
    if view not in shapes_world.VIEWS:
        return view  # not a view: prepared() names the configs there are
    params = {
        "pairs": {"seed": cfg.seed, "size": cfg.demo_train_rows},
        "nli": {
            "seed": cfg.seed,
            "size": cfg.demo_train_rows,
            "heldout_seed": cfg.seed + 1,
            "heldout_size": cfg.demo_eval_size,
        },
    }.get(view, {"heldout_size": cfg.demo_eval_size})
    return shapes_world.config(view, **params)


def data_dir(cfg) -> str | None:
    return cfg.get("data_dir") or None


def prepare(cfg, dataset: uds.Ref) -> None:
    """Builds a generated dataset on first use (processes sharing the directory take turns),
    without TFDS's progress bars: seconds of work, logged in one line."""
    if dataset.name not in GENERATED:
        return
    import logging

    import tensorflow_datasets as tfds

    config = builder_config(cfg, dataset)
    tfds.disable_progress_bar()
    try:
        builder = uds.prepare(dataset.name, data_dir=data_dir(cfg), config=config)
    finally:
        tfds.enable_progress_bar()
    logging.getLogger(__name__).info("%s in %s", builder.info.full_name, builder.data_dir_root)


def check_prepared(cfg, dataset: uds.Ref, default_split: str, reads) -> None:
    """A :class:`~unime_jax.errors.DataError` naming the build command when ``dataset`` is not
    prepared, or a :class:`~unime_jax.errors.UsageError` for an unknown config or split, or a
    dataset of another kind than ``reads`` (its item maker, e.g. ``mmeb_train.item``) reads."""
    builder = base.prepared(
        dataset.name, data_dir=data_dir(cfg), config=builder_config(cfg, dataset)
    )
    base.check_reads(builder, reads)
    split = dataset.split or default_split
    if split not in builder.info.splits:
        from unime_jax.errors import UsageError

        raise UsageError(
            f"{builder.info.full_name} has no split {split!r}",
            f"use one of {sorted(builder.info.splits)}",
        )


def source(cfg, dataset: uds.Ref, default_split: str, reads) -> base.Records:
    """Random access over the split's items (picklable, for grain workers), as ``reads``."""
    return uds.source(
        dataset.name,
        dataset.split or default_split,
        data_dir=data_dir(cfg),
        config=builder_config(cfg, dataset),
        reads=reads,
    )
