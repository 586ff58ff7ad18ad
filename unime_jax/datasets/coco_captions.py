"""COCO captions (``captions_*.json``): image–text retrieval, one example per image with its
captions, parsed and checked by :func:`unime_jax.eval.datasets.load_coco_captions`."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import tensorflow_datasets as tfds

from unime_jax.datasets import retrieval
from unime_jax.eval.datasets import load_coco_captions


@dataclasses.dataclass(eq=False, kw_only=True)
class CocoCaptionsConfig(tfds.core.BuilderConfig):
    annotations: str = ""  # the captions_*.json, relative to the manual dir
    images: str = ""  # the image folder, relative to the manual dir


class CocoCaptions(retrieval.RetrievalBuilder):
    """COCO caption annotations as an image–text retrieval set (split ``test``)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "First release: images as file bytes, captions in file order."
    }
    FEATURE_DIGESTS: ClassVar[dict[str, str]] = {"1.0.0": "dc48270a9d7161fa"}
    HOMEPAGE = "https://cocodataset.org"
    BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
        CocoCaptionsConfig(
            name="val2017",
            annotations="annotations/captions_val2017.json",
            images="val2017",
            description="COCO val2017 (5000 images), as unzipped from cocodataset.org",
        ),
        CocoCaptionsConfig(
            name="mini",
            annotations="captions_val2017.json",
            images="images",
            description="coco_mini: 79 val2017 photos with their captions (../shared/data)",
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    val2017: download val2017.zip and annotations_trainval2017.zip from
    https://cocodataset.org/#download and unzip both in DIR (DIR/val2017/*.jpg,
    DIR/annotations/captions_val2017.json). mini: DIR is the coco_mini folder
    (DIR/captions_val2017.json, DIR/images/). Pass DIR as --manual_dir.
    """

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        annotations = self.manual_path(dl_manager, cfg.annotations)
        images = self.manual_path(dl_manager, cfg.images, is_dir=True)
        dataset = load_coco_captions(annotations, images)
        return {"test": self._generate_examples("test", dataset, images)}
