"""The offline demo's shapes world (:mod:`unime_jax.demo.world.sets`) as TFDS datasets, so the
demo reads its data the way real runs do. One config per view, each with the feature spec of
the real dataset it stands in for: ``pairs`` (stage-2 pairs, as ``mmeb_train``), ``nli``
(stage-1 sentences, as ``nli_simcse``: split ``train`` and the held-out ``heldout``),
``retrieval`` (held-out retrieval, as ``coco_captions``) and ``compositional`` (held-out
SugarCrepe-style splits, as ``sugarcrepe``). Rendered images are stored as PNG (lossless: the
pixels read back are the pixels drawn). The registered configs hold the demo's sizes and seeds;
:func:`config` makes others."""

from __future__ import annotations

import dataclasses
import io
import tempfile
from pathlib import Path
from typing import ClassVar

import tensorflow_datasets as tfds
from PIL import Image

from unime_jax.datasets import base, mmeb_train, nli_simcse, retrieval, sugarcrepe
from unime_jax.demo.world import sets
from unime_jax.teacher.corpus import read_corpus, write_nli_csv

VIEWS = {
    "pairs": mmeb_train.FEATURES,
    "nli": nli_simcse.FEATURES,
    "retrieval": retrieval.FEATURES,
    "compositional": sugarcrepe.FEATURES,
}

READERS = {
    "pairs": (mmeb_train.item, mmeb_train.DECODERS),
    "nli": (nli_simcse.item, None),
    "retrieval": (retrieval.item, retrieval.DECODERS),
    "compositional": (sugarcrepe.item, sugarcrepe.DECODERS),
}


@dataclasses.dataclass(eq=False, kw_only=True)
class ShapesWorldConfig(tfds.core.BuilderConfig):
    view: str = "pairs"  # one of VIEWS
    seed: int = 0  # training scenes (pairs, nli/train)
    size: int = 0  # training rows
    heldout_seed: int = 1  # held-out scenes (nli/heldout, retrieval, compositional)
    heldout_size: int = 0
    image_size: int = 64  # the demo model's tile size


PARAMS = ("seed", "size", "heldout_seed", "heldout_size", "image_size")


def config(view: str, **params: int) -> ShapesWorldConfig:
    """The registered config of ``view``, or a new, named one with ``params`` changed, e.g.
    ``config("pairs", seed=3, size=500)`` for a demo run with other sizes."""
    registered = next(c for c in ShapesWorld.BUILDER_CONFIGS if c.view == view)
    unknown = set(params) - set(PARAMS)
    if unknown:
        raise TypeError(f"unknown shapes_world parameters {sorted(unknown)}; use {PARAMS}")
    values = {f: params.get(f, getattr(registered, f)) for f in PARAMS}
    if all(v == getattr(registered, f) for f, v in values.items()):
        return registered
    name = f"{view}_" + "_".join(f"{k}{v}" for k, v in values.items())
    return ShapesWorldConfig(name=name, view=view, **values)


class ShapesWorld(base.Builder):
    """The offline demo's synthetic compositional world: training pairs, NLI sentences and the
    held-out retrieval / compositional sets, each in the layout of the real dataset."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "First release: the views of unime_jax.demo.world.sets."
    }
    FEATURE_DIGESTS: ClassVar[dict[str, str]] = {
        "1.0.0/pairs": "1f3411275f9cd550",
        "1.0.0/nli": "d4c994cebae0ee29",
        "1.0.0/retrieval": "dc48270a9d7161fa",
        "1.0.0/compositional": "1d23d4be9117f7e9",
    }
    BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
        ShapesWorldConfig(name="pairs", view="pairs", size=12000, description="stage-2 demo"),
        ShapesWorldConfig(
            name="nli", view="nli", size=4000, heldout_size=200, description="stage-1 demo"
        ),
        ShapesWorldConfig(name="retrieval", view="retrieval", heldout_size=200),
        ShapesWorldConfig(name="compositional", view="compositional", heldout_size=200),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Nothing to download: the world is generated."

    def _spec_key(self) -> str:
        return f"{self.VERSION}/{self.builder_config.view}"

    def _features(self) -> tfds.features.FeaturesDict:
        return VIEWS[self.builder_config.view]

    def reader(self):
        return READERS[self.builder_config.view]

    def _split_generators(self, dl_manager):
        c = self.builder_config
        if c.view == "pairs":
            return {"train": self._generate_examples(pairs(c))}
        if c.view == "nli":
            splits = {"train": self._nli("train", sets.nli_rows(c.seed, c.size))}
            if c.heldout_size:  # TFDS refuses an empty split (a demo without evaluation)
                held_out = sets.nli_rows(c.heldout_seed, c.heldout_size, held_out=True)
                splits["heldout"] = self._nli("heldout", held_out)
            return splits
        if c.view == "retrieval":
            images, captions, index = sets.retrieval_set(
                c.heldout_seed, c.heldout_size, image_size=c.image_size
            )
            captions_of: list[list[str]] = [[] for _ in images]
            for caption, i in zip(captions, index):
                captions_of[i].append(caption)
            self.info.metadata["test"] = {"source": self.info.full_name, "excluded": []}
            items = enumerate(zip(images, captions_of))
            return {
                "test": self._generate_examples(
                    retrieval.example((png(im), f"heldout-{k:05d}.png", caps))
                    for k, (im, caps) in items
                )
            }
        split_items = sets.compositional_set(
            c.heldout_seed, c.heldout_size, image_size=c.image_size
        )
        return {
            split: self._generate_examples(
                {
                    "image": png(im),
                    "file_name": f"{split}-{k:05d}.png",
                    "caption": cap,
                    "negative": neg,
                }
                for k, (im, cap, neg) in enumerate(items)
            )
            for split, items in split_items.items()
        }

    def _generate_examples(self, examples):
        return enumerate(examples)

    def _nli(self, split: str, rows: list[dict[str, str]]):
        """Through the CSV the demo writes and ``read_corpus``, so ids and exclusions match."""
        with tempfile.TemporaryDirectory() as tmp:
            corpus = read_corpus(write_nli_csv(Path(tmp, f"{split}.csv"), rows), verbose=False)
            self.info.metadata[split] = nli_simcse.corpus_metadata(corpus, "")
        return self._generate_examples({"id": rid, "sentence": s} for rid, s in corpus)


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def pairs(c: ShapesWorldConfig):
    """Stage-2 rows → mmeb_train examples (dataset ``shapes_world``, row = position)."""
    for i, row in enumerate(sets.training_rows(c.seed, c.size, image_size=c.image_size)):
        record = {
            "qry": row["qry"],
            "pos_text": row["pos_text"],
            "dataset": "shapes_world",
            "row": i,
        }
        for side in ("qry", "pos"):
            image = row[f"{side}_image"]
            record[f"{side}_image"] = [png(image)] if image is not None else []
            record[f"{side}_image_path"] = f"train-{i:06d}.png" if image is not None else ""
        yield record
