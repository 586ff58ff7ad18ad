"""The paper's headline numbers (spec §5) and the evaluation report (JSON + markdown)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unime_jax.eval.metrics import SUGARCREPE_SPLITS
from unime_jax.eval.mmeb_eval import mmeb_meta_task, mmeb_split
from unime_jax.files import atomic_write

PAPER_MODELS = {
    "unime_ov7b": "UniME LLaVA-OneVision-7B",
    "unime_llava16": "UniME LLaVA-1.6-7B",
    "unime_phi35": "UniME Phi-3.5-V",
    "vlm2vec": "VLM2Vec LLaVA-1.6",
    "e5v": "E5-V LLaVA-1.6",
    "clip_bigg": "CLIP ViT-bigG/14",
}
# Spec §5, column order: MMEB overall, Flickr t2i/i2t R@1, COCO t2i/i2t R@1, Urban1K t2i R@1,
# SugarCrepe replace/swap/add. The paper reports MMEB as the mean of the 4 meta-tasks for
# every row but UniME LLaVA-OneVision-7B (there: the mean over the 36 datasets).
_ROWS = {
    "unime_ov7b": (70.7, 83.3, 94.4, 54.8, 74.0, 94.3, 80.5, 65.5, 82.2),
    "unime_llava16": (66.6, 81.9, 93.4, 53.7, 70.1, 95.2, 89.0, 71.5, 94.4),
    "unime_phi35": (64.2, 77.0, 88.2, 49.8, 66.8, 92.7, 90.1, 70.9, 93.3),
    "vlm2vec": (63.3, 76.0, 90.6, 46.8, 66.6, 84.7, 85.8, 66.3, 86.5),
    "e5v": (37.5, 77.3, 85.7, 49.1, 57.6, 88.9, 86.3, 68.7, 66.9),
    "clip_bigg": (44.3, 79.5, 92.9, 51.3, 67.3, 77.8, 86.5, 68.9, 88.4),
}
_MMEB_36 = {"unime_llava16": 63.6, "unime_phi35": 61.3}  # footnote: mean over the 36 datasets


def _paper_table() -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for model, v in _ROWS.items():
        mmeb_key = "overall_datasets" if model == "unime_ov7b" else "overall_meta"
        out[model] = {
            "mmeb": {mmeb_key: v[0]},
            "flickr": {"t2i_R@1": v[1], "i2t_R@1": v[2]},
            "coco": {"t2i_R@1": v[3], "i2t_R@1": v[4]},
            "urban1k": {"t2i_R@1": v[5]},
            "sugarcrepe": {"replace": v[6], "swap": v[7], "add": v[8]},
        }
        if model in _MMEB_36:
            out[model]["mmeb"]["overall_datasets"] = _MMEB_36[model]
    return out


PAPER = _paper_table()


def paper_numbers(benchmark: str, models: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{model id: {metric: value}}`` for a benchmark (``coco``, ``flickr``, ``urban1k``,
    ``sugarcrepe``, ``mmeb``); models without figures for it are left out."""
    unknown = [m for m in models if m not in PAPER]
    if unknown:
        raise ValueError(f"unknown reference model(s) {unknown}; use {sorted(PAPER)}")
    return {m: PAPER[m][benchmark] for m in models if benchmark and benchmark in PAPER[m]}


# ---------------------------------------------------------------------------------------------
# markdown


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A markdown table; columns of numbers are right-aligned."""
    numeric = [
        all(isinstance(r[c], int | float) or r[c] is None for r in rows) for c in range(len(header))
    ]
    align = " | ".join("---:" if n and c else "---" for c, n in enumerate(numeric))
    lines = ["| " + " | ".join(header) + " |", f"| {align} |"]
    return lines + ["| " + " | ".join(_fmt(x) for x in row) + " |" for row in rows]


def _with_paper(
    metrics: Mapping[str, Any], names: Sequence[tuple[str, str]], paper: Mapping[str, Mapping]
) -> list[str]:
    header = ["metric", "ours", *(PAPER_MODELS[m] for m in paper)]
    rows = [
        [label, metrics.get(key), *(paper[m].get(key) for m in paper)]
        for key, label in names
        if key in metrics
    ]
    return _table(header, rows)


def _retrieval_md(task: Mapping) -> list[str]:
    m = task["metrics"]
    keys = [k for k in m if "_R@" in k]
    names = [
        (k, k.replace("_R@", " R@").replace("t2i", "text→image").replace("i2t", "image→text"))
        for k in keys
    ]
    lines = _with_paper(m, names, task["paper"])
    sim = task.get("similarity")
    if sim:
        lines += [
            "",
            f"Text→image similarities: positive mean {sim['positive_mean']:.3f}, hardest "
            f"negative mean {sim['hardest_negative_mean']:.3f}; the positive beats every "
            f"negative for {sim['separated']:.1f}% of the captions.",
        ]
    return lines


def _sugarcrepe_md(task: Mapping) -> list[str]:
    m = task["metrics"]
    names = [(g, g.capitalize()) for g in ("replace", "swap", "add")]
    names += [(s, f"{s} ({m['num_items'][s]} items)") for s in SUGARCREPE_SPLITS if s in m]
    return _with_paper(m, names, task["paper"])


def _mmeb_md(task: Mapping) -> list[str]:
    m = task["metrics"]
    summary = {
        "overall_datasets": m["overall_datasets"],
        "overall_meta": m["overall_meta"],
        **{f"meta/{k}": v for k, v in m["meta_task"].items()},
        "IND": m["IND"],
        "OOD": m["OOD"],
    }
    names = [
        ("overall_datasets", "overall (mean of datasets)"),
        ("overall_meta", "overall (mean of meta-tasks)"),
        *((f"meta/{k}", k) for k in m["meta_task"]),
        ("IND", "IND"),
        ("OOD", "OOD"),
    ]
    lines = _with_paper(summary, names, task["paper"])
    rows = [
        [d, mmeb_meta_task(d), mmeb_split(d), m["num_rows"][d], v]
        for d, v in m["per_dataset"].items()
    ]
    lines += ["", *_table(["dataset", "meta-task", "split", "rows", "P@1"], rows)]
    if m["missing_datasets"]:
        lines += [
            "",
            f"Not evaluated ({len(m['missing_datasets'])}): "
            + ", ".join(m["missing_datasets"])
            + "; the aggregates are partial.",
        ]
    if m["unknown_datasets"]:
        lines += [
            "",
            "Outside the 36 MMEB datasets (left out of aggregates): "
            + ", ".join(m["unknown_datasets"]),
        ]
    return lines


_SECTIONS = {
    "retrieval": _retrieval_md,
    "long_caption": _retrieval_md,
    "sugarcrepe": _sugarcrepe_md,
    "mmeb": _mmeb_md,
}


def _size(task: Mapping) -> str:
    m = task["metrics"]
    if "num_captions" in m:
        return f"{m['num_images']} images, {m['num_captions']} captions"
    if "num_items" in m:
        return f"{sum(m['num_items'].values())} items"
    return f"{sum(m['num_rows'].values())} rows"


def markdown(report: Mapping) -> str:
    """The report as markdown: one section per task with our numbers beside the paper's."""
    model = report["model"]
    cache = report["cache"]
    lines = [
        "# Evaluation report",
        "",
        f"Model: `{model['model']}` ({model['kind']}, dtype {model['dtype']}), fingerprint "
        f"`{model['fingerprint'][:16]}`. Embedding cache: "
        f"{cache['directory'] or 'in memory'} ({cache['hits']} hits, {cache['misses']} misses). "
        f"{report['created']}.",
    ]
    for name, task in report["tasks"].items():
        lines += ["", f"## {name} — {task['kind']} ({_size(task)})", ""]
        if task.get("note"):
            lines += [task["note"], ""]
        lines.append(
            f"Source: `{task['source']}`; {task['seconds']:.1f} s; cache {task['cache']['hits']} "
            f"hits, {task['cache']['misses']} misses."
        )
        if task.get("excluded"):
            lines.append(f"Left out: {len(task['excluded'])} entries, e.g. {task['excluded'][0]}.")
        lines += ["", *_SECTIONS[task["kind"]](task)]
        if task.get("plots"):
            lines += ["", *(f"![{Path(p).stem}]({Path(p).name})" for p in task["plots"])]
    return "\n".join(lines) + "\n"


def write(report: Mapping, directory: str | os.PathLike) -> tuple[str, str]:
    """Writes ``report.json`` and ``report.md`` into ``directory`` (atomically); their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=1, default=str) + "\n"
    atomic_write(directory / "report.json", text)
    md = markdown(report)
    atomic_write(directory / "report.md", md)
    return str(directory / "report.json"), str(directory / "report.md")
