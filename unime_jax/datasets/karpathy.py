"""Flickr30K and COCO in Karpathy's split files (``dataset_flickr30k.json``,
``dataset_coco.json``): the ``test`` split (1K / 5K images) as image–text retrieval, parsed and
checked by :func:`unime_jax.eval.datasets.load_flickr30k`."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import tensorflow_datasets as tfds

from unime_jax.datasets import retrieval
from unime_jax.eval.datasets import load_flickr30k


@dataclasses.dataclass(eq=False, kw_only=True)
class KarpathyConfig(tfds.core.BuilderConfig):
    annotations: str = ""  # Karpathy's JSON, relative to the manual dir
    images: str = ""  # the folder its file names (COCO: filepath/filename) are under
    splits: tuple[str, ...] = ("test",)


class Karpathy(retrieval.RetrievalBuilder):
    """Flickr30K / COCO (Karpathy splits) as image–text retrieval sets, one split per
    Karpathy split built (``test``: the paper's 1K / 5K protocol)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "First release: images as file bytes, sentences' raw text."
    }
    FEATURE_DIGESTS: ClassVar[dict[str, str]] = {"1.0.0": "dc48270a9d7161fa"}
    HOMEPAGE = "https://cs.stanford.edu/people/karpathy/deepimagesent/"
    BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
        KarpathyConfig(
            name="flickr30k",
            annotations="dataset_flickr30k.json",
            images="flickr30k-images",
            description="Flickr30K, Karpathy test split (1000 images, 5 captions each)",
        ),
        KarpathyConfig(
            name="coco",
            annotations="dataset_coco.json",
            images=".",
            description="COCO 2014, Karpathy test split (5000 images, 5 captions each)",
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Karpathy's split files come in caption_datasets.zip
    (https://cs.stanford.edu/people/karpathy/deepimagesent/). flickr30k: put
    dataset_flickr30k.json and the Flickr30K images (flickr30k-images/, from
    https://shannon.cs.illinois.edu/DenotationGraph/) in DIR. coco: put dataset_coco.json in DIR
    and unzip COCO's val2014.zip (and train2014.zip for other splits) there, so that
    DIR/<filepath>/<filename> exists. Pass DIR as --manual_dir.
    """

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        annotations = self.manual_path(dl_manager, cfg.annotations)
        images = self.manual_path(dl_manager, cfg.images, is_dir=True)
        return {
            split: self._generate_examples(
                split, load_flickr30k(annotations, images, split=split), images
            )
            for split in cfg.splits
        }
