"""The evaluation tasks of the CLI: loading and checking each task's data, running its
evaluator, and its figures (summary statistics and plots).

A task is a config section (see configs/eval.py) whose ``kind`` is ``retrieval``,
``long_caption``, ``sugarcrepe`` or ``mmeb``, and whose ``dataset`` names the prepared TFDS
dataset it reads (:mod:`unime_jax.datasets`, through ``tfds.data_source``); with ``manual_dir``
set, a dataset not prepared yet is built from that folder first.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from unime_jax.errors import DataError, UsageError, UserError
from unime_jax.eval import evaluators, plots
from unime_jax.eval.datasets import DatasetError
from unime_jax.eval.metrics import SUGARCREPE_SPLITS

KINDS = ("retrieval", "long_caption", "sugarcrepe", "mmeb")
# The builders each kind reads (shapes_world: the demo's stand-ins, with the view's config).
READS = {
    "retrieval": ("coco_captions", "karpathy", "long_caption", "shapes_world"),
    "long_caption": ("long_caption", "coco_captions", "karpathy", "shapes_world"),
    "sugarcrepe": ("sugarcrepe", "shapes_world"),
    "mmeb": ("mmeb_eval",),
}
EXAMPLES = {
    "retrieval": "coco_captions/val2017, karpathy/coco, karpathy/flickr30k",
    "long_caption": "long_caption/sharegpt4v_1k, long_caption/urban1k",
    "sugarcrepe": "sugarcrepe/val2017",
    "mmeb": "mmeb_eval",
}


@dataclasses.dataclass
class Task:
    name: str
    section: Any  # the task's ConfigDict
    data: Any  # RetrievalSet | {split: items} | {dataset: rows}
    source: str
    excluded: list[str] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# data


def data_dir(cfg) -> str | None:
    """``cfg.data_dir`` (``~`` expanded), or None for TFDS's default."""
    value = str(cfg.get("data_dir", "") or "")
    return os.path.expanduser(value) if value else None


def dataset_ref(name: str, sec):
    """The task's ``dataset`` as a :class:`unime_jax.datasets.Ref`, checked against its kind."""
    from unime_jax.datasets import Ref

    kind, flag = sec.get("kind"), f"--config.{name}.dataset"
    if kind not in KINDS:
        raise UsageError(f"--config.{name}.kind={kind!r} is not a task kind", f"use one of {KINDS}")
    text = str(sec.get("dataset", "") or "").strip()
    if not text:
        raise UsageError(f"{flag} is empty", f"name a dataset, e.g. {flag}={EXAMPLES[kind]}")
    try:
        ref = Ref.parse(text, flag=flag)
    except UsageError as e:
        raise UsageError(
            e.what,
            f"write NAME[/CONFIG][:SPLIT], NAME one of {list(READS[kind])}, e.g. {EXAMPLES[kind]}",
        ) from None
    if ref.name not in READS[kind]:
        raise UsageError(
            f"{flag}={text!r}: a {kind} task cannot read {ref.name}",
            f"name one of {list(READS[kind])}, e.g. {EXAMPLES[kind].split(',')[0]}",
        )
    if kind == "mmeb" and (ref.config or ref.split):
        raise UsageError(
            f"{flag}={text!r}: MMEB-eval is read whole (its rows and images configs, every "
            "dataset's split)",
            f"write {flag}=mmeb_eval; --config.{name}.max_rows limits the rows per dataset",
        )
    return ref


def _configs(ref) -> tuple[str | None, ...]:
    return ("rows", "images") if ref.name == "mmeb_eval" else (ref.config,)


def ensure_prepared(name: str, sec, ref, root: str | None) -> None:
    """Checks the dataset is prepared in ``root``; with ``manual_dir`` set, builds what is not
    (else the :class:`DataError` of :func:`unime_jax.datasets.base.prepared`, whose Fix is the
    build command)."""
    from unime_jax import datasets
    from unime_jax.datasets import base

    manual = str(sec.get("manual_dir", "") or "")
    for config in _configs(ref):
        try:
            base.prepared(ref.name, data_dir=root, config=config)
            continue
        except DataError as e:
            if not manual:
                raise DataError(
                    e.what,
                    f"{e.fix}; or set --config.{name}.manual_dir=DIR to have the evaluation "
                    "build it",
                ) from None
        builder_cls = next(b for b in datasets.BUILDERS if b.name == ref.name)
        directory = Path(manual).expanduser()
        if not directory.is_dir():
            raise DataError(
                f"--config.{name}.manual_dir={manual!r}: no such directory (building "
                f"{ref.name}{f'/{config}' if config else ''})",
                " ".join(builder_cls.MANUAL_DOWNLOAD_INSTRUCTIONS.split()),
            )
        try:
            datasets.prepare(ref.name, data_dir=root, config=config, manual_dir=directory)
        except DatasetError as e:  # the parser's report of the manual dir's files
            raise DataError(
                f"building {ref.name}{f'/{config}' if config else ''} from {directory}: {e.what}",
                e.fix or "correct the files named above, then run again",
            ) from None


def sugarcrepe_wanted(name: str, sec, ref) -> tuple[str, ...]:
    """The SugarCrepe splits a task asks for (``splits``, or the dataset's ``:SPLIT``; empty:
    all the dataset has)."""
    splits = tuple(s.strip() for s in sec.splits.split(",") if s.strip())
    if ref.split and splits and splits != (ref.split,):
        raise UsageError(
            f"--config.{name}.dataset names split {ref.split!r} and "
            f"--config.{name}.splits={sec.splits!r} others",
            "name the splits in one place",
        )
    splits = splits or ((ref.split,) if ref.split else ())
    if unknown := [s for s in splits if s not in SUGARCREPE_SPLITS]:
        raise UsageError(
            f"--config.{name}.splits: unknown {unknown}", f"use some of {SUGARCREPE_SPLITS}"
        )
    return splits


def load_task(name: str, sec, root: str | None = None) -> Task:
    """Loads and checks one task's data from its prepared TFDS dataset in ``root`` (the TFDS
    data dir; None: the default), building it first when the section has a ``manual_dir``.
    Raises :class:`UsageError` (the section) or :class:`DataError` (the data)."""
    from unime_jax import datasets
    from unime_jax.datasets import base

    ref = dataset_ref(name, sec)
    kind = sec.kind
    splits = sugarcrepe_wanted(name, sec, ref) if kind == "sugarcrepe" else ()
    ensure_prepared(name, sec, ref, root)
    builder = base.prepared(ref.name, data_dir=root, config=_configs(ref)[0])
    where = f"{builder.info.full_name} in {builder.data_dir_root}"
    if kind in ("retrieval", "long_caption"):
        split = ref.split or "test"
        data = datasets.retrieval_set(
            ref.name,
            data_dir=root,
            config=ref.config,
            split=split,
            max_images=sec.max_images or None,
        )
        built_from = f" (built from {data.source})" if data.source else ""
        source = f"{builder.info.full_name} [{split}] in {builder.data_dir_root}{built_from}"
        return Task(name, sec, data, source, list(data.excluded))
    if kind == "sugarcrepe":
        data = datasets.sugarcrepe_splits(
            ref.name,
            data_dir=root,
            config=ref.config,
            splits=splits or None,
            max_items=sec.max_items or None,
        )
        return Task(name, sec, data, where)
    data = datasets.mmeb_eval_rows(data_dir=root, max_rows=sec.max_rows or None)
    return Task(name, sec, data, f"mmeb_eval (rows, images) in {builder.data_dir_root}")


def load_tasks(cfg) -> list[Task]:
    """Every task named in ``cfg.tasks``, loaded and checked; all problems raised together
    (a :class:`UsageError` if any is one, else a :class:`DataError`)."""
    names = [n.strip() for n in cfg.tasks.split(",") if n.strip()]
    if not names:
        raise UsageError(
            "--config.tasks is empty", "name sections of the config, e.g. --config.tasks=coco"
        )
    root = data_dir(cfg)
    if not cfg.get("progress", True):
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()  # of the builds a manual_dir starts
    errors: list[UserError] = []
    tasks = []
    for name in names:
        sec = cfg.get(name)
        if not hasattr(sec, "get") or "kind" not in sec:
            sections = [k for k, v in cfg.items() if hasattr(v, "get") and "kind" in v]
            errors.append(
                UsageError(f"task {name!r}: no such section in the config", f"use {sections}")
            )
            continue
        try:
            tasks.append(load_task(name, sec, root))
        except UserError as e:
            errors.append(type(e)(f"task {name!r} ({sec.get('kind')}): {e.what}", e.fix))
    if not errors:
        return tasks
    hint = str(cfg.get("data_hint", "") or "")
    usage = any(isinstance(e, UsageError) for e in errors)
    if len(errors) == 1:
        what, fix = errors[0].what, errors[0].fix
    else:
        what = f"{len(errors)} tasks cannot be read:\n\n" + "\n\n".join(map(str, errors))
        fix = "fix each task as its Fix line says"
    if hint and not usage:
        fix = f"{fix.rstrip('.')}; {hint}" if fix else hint
    raise (UsageError if usage else DataError)(what, fix)


# ---------------------------------------------------------------------------------------------
# evaluation and figures


def evaluate(encoder: Any, task: Task) -> dict:
    """The task's metrics (the evaluator's result) with ``encoder``."""
    kind = task.section.kind
    if kind in ("retrieval", "long_caption"):
        return evaluators.evaluate_retrieval(encoder, task.data, ks=tuple(task.section.ks))
    if kind == "sugarcrepe":
        return evaluators.evaluate_sugarcrepe(encoder, task.data)
    return evaluators.evaluate_mmeb(encoder, task.data)


def figures(
    encoder: Any,
    task: Task,
    metrics: Mapping,
    out: Path,
    *,
    reference: Mapping[str, float],
    reference_label: str,
    max_k: int = 50,
    draw: bool = True,
) -> dict:
    """Summary statistics and (``draw``) PNG plots in ``out`` for a task already evaluated.
    ``encoder`` should answer from the cache the evaluation filled, so nothing is embedded
    again. ``reference`` holds the paper's numbers shown in bar plots. Returns the entries to
    add to the task's report (``plots``: the written paths)."""
    kind, name = task.section.kind, task.name
    if kind in ("retrieval", "long_caption"):
        return _retrieval_figures(encoder, task, out, max_k, draw)
    if not draw:
        return {}
    if kind == "sugarcrepe":
        shown = {k: v for k, v in metrics.items() if k != "num_items"}
        path = plots.score_bars(
            shown,
            out / f"{name}_accuracy.png",
            reference=reference,
            reference_label=reference_label,
            title=f"{name}: accuracy",
            chance=50.0,
        )
        return {"plots": [path]}
    names = {"overall_datasets": "overall (36)", "overall_meta": "overall (4 tasks)"}
    ref = {names[k]: v for k, v in reference.items() if k in names}
    path = plots.mmeb_bars(
        metrics, out / f"{name}_meta_tasks.png", reference=ref, reference_label=reference_label
    )
    return {"plots": [path]}


def _retrieval_figures(encoder: Any, task: Task, out: Path, max_k: int, draw: bool) -> dict:
    ds = task.data
    scores = encoder.embed_texts(ds.captions) @ encoder.embed_images(ds.image_paths).T
    t2i = [[i] for i in ds.image_for_caption]
    i2t: list[list[int]] = [[] for _ in ds.image_paths]
    for j, i in enumerate(ds.image_for_caption):
        i2t[i].append(j)
    pos, neg = plots.positive_and_hardest_negative(scores, t2i)
    curves = {
        "text→image": plots.recall_curve(scores, t2i, max_k),
        "image→text": plots.recall_curve(scores.T, i2t, max_k),
    }
    entry: dict[str, Any] = {
        "similarity": {
            "positive_mean": float(pos.mean()),
            "hardest_negative_mean": float(np.nanmean(neg)),
            "separated": float(np.mean(pos > np.nan_to_num(neg, nan=-np.inf)) * 100),
        },
        "recall_curve": {k: np.round(v, 4).tolist() for k, v in curves.items()},
    }
    if draw:
        entry["plots"] = [
            plots.similarity_histogram(
                scores, t2i, out / f"{task.name}_similarity.png", title=f"{task.name}: text→image"
            ),
            plots.recall_curves(curves, out / f"{task.name}_recall.png", title=task.name),
        ]
    return entry
