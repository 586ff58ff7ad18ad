"""Evaluation (spec §4): ``python -m unime_jax.eval --config=configs/eval.py[:preset] --workdir=OUT``.

    python -m unime_jax.eval --config=configs/eval.py --workdir=runs/eval \
        --config.model=/ckpt/UniME-LLaVA-OneVision-7B --config.tasks=coco,sugarcrepe \
        --config.coco.annotations=/data/coco/annotations/captions_val2017.json \
        --config.coco.images=/data/coco/val2017 \
        --config.sugarcrepe.directory=/data/sugarcrepe --config.sugarcrepe.images=/data/coco/val2017
    python -m unime_jax.eval --config=configs/eval.py:coco_mini --workdir=runs/eval_coco_mini

Presets (``:name``): ``paper`` (default: every benchmark of the paper; fill in the data paths of
the tasks you run), ``coco_mini`` (the offline demo model on the real photos of
``../shared/data/coco_mini`` beside the repository: a smoke test of the whole pipeline).

Each entry of ``tasks`` names a section of this config; its ``kind`` picks the protocol:
``retrieval`` (COCO-caption or Flickr30K-Karpathy files), ``long_caption`` (one caption per
image, ShareGPT4V-1K / Urban1K), ``sugarcrepe`` (the split files) or ``mmeb`` (MMEB-eval files).
``paper`` names the benchmark whose published numbers are shown beside ours ("" = none).
"""

from pathlib import Path

import ml_collections

COCO_MINI = Path(__file__).resolve().parents[1].parent / "shared/data/coco_mini"


def _section(kind: str, paper: str, **fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"kind": kind, "paper": paper, "note": ""} | fields)


def retrieval(fmt: str, paper: str) -> ml_collections.ConfigDict:
    return _section(
        "retrieval",
        paper,
        format=fmt,  # "coco": captions_*.json; "flickr": Karpathy dataset_flickr30k.json
        annotations="",
        images="",
        split="test",  # Karpathy split (flickr format only)
        max_images=0,  # 0 = all
        ks=(1, 5, 10),
    )


def long_caption(paper: str) -> ml_collections.ConfigDict:
    # JSON list or JSONL of {"image": <path under images>, "caption": <text>}
    return _section("long_caption", paper, annotations="", images="", max_images=0, ks=(1, 5, 10))


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Model: an HF checkpoint directory (or hub id, with network), "demo" (the offline demo
    # model, randomly initialised from `seed`), or a training run directory, evaluated from its
    # merged/ HF checkpoint (unime_jax/eval/__main__.py, load_stage2_workdir, is the hook).
    c.model = ""
    c.seed = 0
    c.dtype = "float32"
    c.batch_size = 8  # rounded up to a multiple of the data-parallel mesh size
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    # Embedding cache: reruns embed nothing. "" keeps embeddings in memory only.
    c.cache_dir = "~/.cache/unime_jax/embeddings"
    # What to run and how to report it.
    c.tasks = "coco,flickr,sharegpt4v,urban1k,sugarcrepe,mmeb"
    c.reference = "unime_ov7b,unime_llava16,unime_phi35"  # paper rows shown beside ours
    c.plots = True
    c.plot_max_k = 50  # recall@k curves for k = 1..plot_max_k
    c.progress = True
    c.data_hint = ""  # added to data errors (presets that point at fixed locations say where)
    # Tasks.
    c.coco = retrieval("coco", "coco")
    c.flickr = retrieval("flickr", "flickr")
    c.sharegpt4v = long_caption("")  # the spec quotes no ShareGPT4V figure
    c.urban1k = long_caption("urban1k")
    c.sugarcrepe = _section(
        "sugarcrepe",
        "sugarcrepe",
        directory="",  # holds <split>.json for each split
        images="",  # the COCO val2017 images the items' filenames point into
        splits="",  # comma-separated subset; "" = all 7
        max_items=0,  # first N items per split; 0 = all
    )
    c.mmeb = _section(
        "mmeb",
        "mmeb",
        directory="",  # MMEB-eval parquet/JSONL files (searched recursively), or one file
        images="",  # root the rows' image paths are relative to
        max_rows=0,  # first N rows per dataset; 0 = all (1000 each)
    )
    return c


def get_config(preset: str = "paper") -> ml_collections.ConfigDict:
    c = base()
    if preset == "paper":
        return c
    if preset == "coco_mini":
        c.model = "demo"
        c.tasks = "coco,sugarcrepe"
        c.batch_size = 16
        c.plot_max_k = 20
        c.coco.annotations = str(COCO_MINI / "captions_val2017.json")
        c.coco.images = str(COCO_MINI / "images")
        c.coco.paper = ""  # 79 photos, not the 5K test split: the paper's figures don't compare
        c.coco.note = (
            "coco_mini: 79 COCO val2017 photos with 5 captions each (a miniature of the 5K "
            "protocol; no paper figure compares)"
        )
        c.sugarcrepe.directory = str(COCO_MINI / "sugarcrepe")
        c.sugarcrepe.images = str(COCO_MINI / "images")
        c.sugarcrepe.note = "coco_mini: the 211 SugarCrepe items whose photo is in coco_mini"
        c.data_hint = (
            f"the coco_mini preset reads {COCO_MINI} (real COCO photos, captions and SugarCrepe "
            "items kept beside the repository, at ../shared/data/coco_mini); it is not there. "
            "Place it there, or use the default preset with your own data paths "
            "(--config.coco.annotations=..., --config.coco.images=..., ...)."
        )
        return c
    raise ValueError(f"unknown eval preset {preset!r}; use paper or coco_mini")
