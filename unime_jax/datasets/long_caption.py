"""Long-caption retrieval (ShareGPT4V-1K, Urban1K): one caption per image, read from a JSON list
or JSONL of ``{"image", "caption"}`` by :func:`unime_jax.eval.datasets.load_caption_pairs`."""

from __future__ import annotations

from typing import ClassVar

import tensorflow_datasets as tfds

from unime_jax.datasets import retrieval
from unime_jax.errors import DataError
from unime_jax.eval.datasets import load_caption_pairs

ANNOTATIONS = ("captions.jsonl", "captions.json")
IMAGES = "images"


class LongCaption(retrieval.RetrievalBuilder):
    """Long-caption image–text retrieval (split ``test``): ShareGPT4V-1K and Urban1K."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release: images as file bytes."}
    FEATURE_DIGESTS: ClassVar[dict[str, str]] = {"1.0.0": "dc48270a9d7161fa"}
    BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
        tfds.core.BuilderConfig(
            name="sharegpt4v_1k",
            description="ShareGPT4V-1K: 1000 images with ShareGPT4V's long captions",
        ),
        tfds.core.BuilderConfig(
            name="urban1k", description="Urban1K (Long-CLIP): 1000 urban images, long captions"
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    DIR holds captions.jsonl (or captions.json, a JSON list): one {"image": <path under
    DIR/images>, "caption": <text>} per image, and the images under DIR/images/. Urban1K
    (https://huggingface.co/datasets/BeichenZhang/Urban1k) ships image/ and caption/<name>.txt:
    write one row per image. ShareGPT4V-1K: the 1000 ShareGPT4V
    (https://huggingface.co/datasets/Lin-Chen/ShareGPT4V) images and captions of the Long-CLIP
    protocol. Pass DIR as --manual_dir.
    """

    def _split_generators(self, dl_manager):
        found = [p for p in ANNOTATIONS if (dl_manager.manual_dir / p).is_file()]
        if not found:
            raise DataError(
                f"{self.info.full_name}: none of {ANNOTATIONS} in {dl_manager.manual_dir}",
                self.MANUAL_DOWNLOAD_INSTRUCTIONS.strip(),
            )
        annotations = self.manual_path(dl_manager, found[0])
        images = self.manual_path(dl_manager, IMAGES, is_dir=True)
        dataset = load_caption_pairs(annotations, images)
        return {"test": self._generate_examples("test", dataset, images)}
