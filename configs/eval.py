"""Evaluation (spec §4): ``python -m unime_jax.eval --config=configs/eval.py[:preset] --workdir=OUT``.

    python -m unime_jax.eval --config=configs/eval.py --workdir=runs/eval \
        --config.model=/ckpt/UniME-LLaVA-OneVision-7B --config.tasks=coco,sugarcrepe \
        --config.data_dir=/data/tfds
    python -m unime_jax.eval --config=configs/eval.py:coco_mini --workdir=runs/eval_coco_mini

Every benchmark is read from a prepared TFDS dataset (``unime_jax.datasets``), built once with
``python -m unime_jax.datasets build NAME --config C --manual_dir DIR --data_dir DATA`` or by the
evaluation itself when the task's ``manual_dir`` is set (DIR: the unpacked files the builder's
instructions name). ``data_dir`` is the TFDS data directory ("" = TFDS's default:
``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``).

Presets (``:name``): ``paper`` (default: every benchmark of the paper, from prepared datasets),
``coco_mini`` (the offline demo model on the real photos of ``../shared/data/coco_mini`` beside
the repository, built into TFDS datasets on the first run: a smoke test of the whole pipeline).

Each entry of ``tasks`` names a section of this config; its ``kind`` picks the protocol:
``retrieval`` (COCO captions, Flickr30K / COCO Karpathy), ``long_caption`` (one caption per
image, ShareGPT4V-1K / Urban1K), ``sugarcrepe`` (its splits) or ``mmeb`` (MMEB-eval's 36
datasets). ``dataset`` names what the task reads, ``NAME[/CONFIG][:SPLIT]`` (retrieval sets:
split ``test`` unless named; SugarCrepe: the split, or ``splits``). ``paper`` names the benchmark
whose published numbers are shown beside ours ("" = none).
"""

from pathlib import Path

import ml_collections

COCO_MINI = Path(__file__).resolve().parents[1].parent / "shared/data/coco_mini"


def _section(kind: str, paper: str, dataset: str, **fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "kind": kind,
            "dataset": dataset,  # NAME[/CONFIG][:SPLIT], a unime_jax.datasets builder
            "manual_dir": "",  # set: build the dataset from this folder first if not prepared
            "paper": paper,
            "note": "",
        }
        | fields
    )


def retrieval(dataset: str, paper: str, kind: str = "retrieval") -> ml_collections.ConfigDict:
    """A retrieval task over ``dataset`` (``coco_captions``, ``karpathy``, ``long_caption`` or
    ``shapes_world/retrieval``)."""
    return _section(kind, paper, dataset, max_images=0, ks=(1, 5, 10))  # max_images 0 = all


def long_caption(dataset: str, paper: str) -> ml_collections.ConfigDict:
    return retrieval(dataset, paper, kind="long_caption")


def sugarcrepe(dataset: str, paper: str) -> ml_collections.ConfigDict:
    return _section(
        "sugarcrepe",
        paper,
        dataset,
        splits="",  # comma-separated subset; "" = all the dataset has (7)
        max_items=0,  # first N items per split; 0 = all
    )


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
    # Data: the TFDS data directory of the prepared datasets ("" = $TFDS_DATA_DIR, else
    # ~/tensorflow_datasets).
    c.data_dir = ""
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
    # COCO 5K test is Karpathy's split of COCO 2014 (coco_captions/val2017: the 2017 val images)
    c.coco = retrieval("karpathy/coco", "coco")
    c.flickr = retrieval("karpathy/flickr30k", "flickr")
    c.sharegpt4v = long_caption("long_caption/sharegpt4v_1k", "")  # no ShareGPT4V figure quoted
    c.urban1k = long_caption("long_caption/urban1k", "urban1k")
    c.sugarcrepe = sugarcrepe("sugarcrepe/val2017", "sugarcrepe")
    c.mmeb = _section("mmeb", "mmeb", "mmeb_eval", max_rows=0)  # first N rows per dataset; 0 = all
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
        c.coco.dataset = "coco_captions/mini"
        c.coco.manual_dir = str(COCO_MINI)  # the first run builds the dataset from it
        c.coco.paper = ""  # 79 photos, not the 5K test split: the paper's figures don't compare
        c.coco.note = (
            "coco_mini: 79 COCO val2017 photos with 5 captions each (a miniature of the 5K "
            "protocol; no paper figure compares)"
        )
        c.sugarcrepe.dataset = "sugarcrepe/mini"
        c.sugarcrepe.manual_dir = str(COCO_MINI)
        c.sugarcrepe.note = "coco_mini: the 211 SugarCrepe items whose photo is in coco_mini"
        c.data_hint = (
            f"the coco_mini preset builds its datasets from {COCO_MINI} (real COCO photos, "
            "captions and SugarCrepe items kept beside the repository, at "
            "../shared/data/coco_mini); place it there, or use the default preset with datasets "
            "you have built (--config.coco.dataset=..., --config.data_dir=...)"
        )
        return c
    raise ValueError(f"unknown eval preset {preset!r}; use paper or coco_mini")
