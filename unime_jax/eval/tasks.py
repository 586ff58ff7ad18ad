"""The evaluation tasks of the CLI: loading and checking each task's data, running its
evaluator, and its figures (summary statistics and plots).

A task is a config section (see configs/eval.py) whose ``kind`` is ``retrieval``,
``long_caption``, ``sugarcrepe`` or ``mmeb``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from unime_jax.eval import datasets, evaluators, mmeb_eval, plots
from unime_jax.eval.metrics import SUGARCREPE_SPLITS

KINDS = ("retrieval", "long_caption", "sugarcrepe", "mmeb")
REQUIRED = {
    "retrieval": ("annotations", "images"),
    "long_caption": ("annotations", "images"),
    "sugarcrepe": ("directory", "images"),
    "mmeb": ("directory", "images"),
}
REQUIRED_HELP = {
    "retrieval": "the caption file (COCO captions_*.json, or Karpathy JSON with format=flickr) "
    "and its image folder",
    "long_caption": 'the JSON(L) of {"image", "caption"} rows and its image folder',
    "sugarcrepe": "the folder of SugarCrepe <split>.json files and the COCO val2017 folder",
    "mmeb": "the MMEB-eval files (or their folder) and the root of their image paths",
}


class EvalError(Exception):
    """A problem with the evaluation's configuration or data; the message says what to fix."""


@dataclasses.dataclass
class Task:
    name: str
    section: Any  # the task's ConfigDict
    data: Any  # RetrievalSet | {split: items} | {dataset: rows}
    source: str
    excluded: list[str] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# data


def _path(name: str, sec, field: str, what: str, *, is_dir: bool) -> str:
    value = str(sec.get(field, "") or "")
    if not value:
        raise EvalError(f"--config.{name}.{field} is empty; give {what}")
    path = Path(value).expanduser()
    if not (path.is_dir() if is_dir else path.exists()):
        raise EvalError(
            f"--config.{name}.{field}={value!r}: no such {'directory' if is_dir else 'file'} ({what})"
        )
    return str(path)


def load_task(name: str, sec) -> Task:
    """Loads and checks one task's data (raising :class:`EvalError` or
    :class:`~unime_jax.eval.datasets.DatasetError` with file and rows)."""
    kind = sec.get("kind")
    empty = [f"--config.{name}.{f}" for f in REQUIRED.get(kind, ()) if not sec.get(f)]
    if empty:
        raise EvalError(f"{' and '.join(empty)} not set; give {REQUIRED_HELP[kind]}")
    if kind in ("retrieval", "long_caption"):
        images = _path(name, sec, "images", "the image folder", is_dir=True)
        max_images = sec.max_images or None
        if kind == "long_caption":
            ann = _path(name, sec, "annotations", 'a JSON(L) of {"image", "caption"}', is_dir=False)
            data = datasets.load_caption_pairs(ann, images, max_images=max_images)
        elif sec.format == "coco":
            ann = _path(name, sec, "annotations", "a COCO captions_*.json", is_dir=False)
            data = datasets.load_coco_captions(ann, images, max_images=max_images)
        elif sec.format == "flickr":
            ann = _path(name, sec, "annotations", "a Karpathy dataset_flickr30k.json", is_dir=False)
            data = datasets.load_flickr30k(
                ann, images, split=sec.split or None, max_images=max_images
            )
        else:
            raise EvalError(f"--config.{name}.format={sec.format!r}; use coco or flickr")
        return Task(name, sec, data, data.source, list(data.excluded))
    if kind == "sugarcrepe":
        directory = _path(
            name, sec, "directory", "the folder of SugarCrepe <split>.json files", is_dir=True
        )
        images = _path(name, sec, "images", "the COCO val2017 image folder", is_dir=True)
        splits = tuple(s.strip() for s in sec.splits.split(",") if s.strip()) or SUGARCREPE_SPLITS
        unknown = [s for s in splits if s not in SUGARCREPE_SPLITS]
        if unknown:
            raise EvalError(f"--config.{name}.splits: unknown {unknown}; use {SUGARCREPE_SPLITS}")
        data = datasets.load_sugarcrepe(directory, images, splits=splits)
        if sec.max_items:
            data = {s: items[: sec.max_items] for s, items in data.items()}
        return Task(name, sec, data, directory)
    if kind == "mmeb":
        source = _path(name, sec, "directory", "MMEB-eval files or their folder", is_dir=False)
        images = _path(name, sec, "images", "the root of the rows' image paths", is_dir=True)
        data = mmeb_eval.load_mmeb(source, images, max_rows=sec.max_rows or None)
        return Task(name, sec, data, source)
    raise EvalError(f"--config.{name}.kind={kind!r}; use one of {KINDS}")


def load_tasks(cfg) -> list[Task]:
    """Every task named in ``cfg.tasks``, loaded and checked; all problems raised together."""
    names = [n.strip() for n in cfg.tasks.split(",") if n.strip()]
    if not names:
        raise EvalError(
            "--config.tasks is empty; name sections of the config, e.g. coco,sugarcrepe"
        )
    errors, tasks = [], []
    for name in names:
        sec = cfg.get(name)
        if not hasattr(sec, "get") or "kind" not in sec:
            errors.append(f"task {name!r}: no such section in the config")
            continue
        try:
            tasks.append(load_task(name, sec))
        except (EvalError, datasets.DatasetError) as e:
            errors.append(f"task {name!r} ({sec.get('kind')}): {e}")
    if errors:
        hint = f"\n\n{cfg.data_hint}" if cfg.get("data_hint") else ""
        raise EvalError("\n\n".join(errors) + hint)
    return tasks


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
