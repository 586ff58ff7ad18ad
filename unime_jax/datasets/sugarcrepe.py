"""SugarCrepe (compositional image–text matching): per split, items of an image, its caption and
a minimally edited negative, parsed and checked by :func:`unime_jax.eval.datasets.load_sugarcrepe`,
and the reader that gives back the ``{split: [SugarCrepeItem]}`` the evaluator takes."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, ClassVar

import tensorflow_datasets as tfds

from unime_jax.datasets import base
from unime_jax.eval.datasets import SugarCrepeItem, load_sugarcrepe
from unime_jax.eval.metrics import SUGARCREPE_SPLITS

FEATURES = tfds.features.FeaturesDict(
    {
        "image": base.image_feature(),
        "file_name": tfds.features.Text(doc="the image's path under the image folder"),
        "caption": tfds.features.Text(doc="the true caption"),
        "negative": tfds.features.Text(doc="the hard negative: the caption minimally edited"),
    }
)
DECODERS = {"image": base.RawBytes()}


@dataclasses.dataclass(eq=False, kw_only=True)
class SugarcrepeConfig(tfds.core.BuilderConfig):
    directory: str = "."  # the <split>.json files, relative to the manual dir
    images: str = ""  # the COCO val2017 images they point into


class Sugarcrepe(base.Builder):
    """SugarCrepe: one split per edit type (replace / swap / add × object / attribute /
    relation), items in file order."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release: images as file bytes."}
    FEATURE_DIGESTS: ClassVar[dict[str, str]] = {"1.0.0": "1d23d4be9117f7e9"}
    HOMEPAGE = "https://github.com/RAIVNLab/sugar-crepe"
    BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
        SugarcrepeConfig(
            name="val2017", images="val2017", description="SugarCrepe on COCO val2017"
        ),
        SugarcrepeConfig(
            name="mini",
            directory="sugarcrepe",
            images="images",
            description="coco_mini: the 211 items whose photo is in coco_mini",
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    val2017: put the seven split files of https://github.com/RAIVNLab/sugar-crepe/tree/main/data
    (replace_obj.json, ..., add_att.json) in DIR and unzip COCO's val2017.zip there
    (DIR/val2017/). mini: DIR is the coco_mini folder (DIR/sugarcrepe/*.json, DIR/images/).
    Pass DIR as --manual_dir.
    """

    def _features(self) -> tfds.features.FeaturesDict:
        return FEATURES

    def reader(self):
        return item, DECODERS

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        directory = self.manual_path(dl_manager, cfg.directory, is_dir=True)
        images = self.manual_path(dl_manager, cfg.images, is_dir=True)
        splits = load_sugarcrepe(directory, images)
        return {s: self._generate_examples(items, images) for s, items in splits.items()}

    def _generate_examples(self, items: list[SugarCrepeItem], image_dir: Path):
        for key, (image, caption, negative) in enumerate(items):
            name = os.path.relpath(image, image_dir)
            image = base.checked_image(image, name)
            yield key, {"image": image, "file_name": name, "caption": caption, "negative": negative}


def item(record: dict[str, Any]) -> SugarCrepeItem:
    """A TFDS record → ``SugarCrepeItem(image bytes, caption, negative)``."""
    caption, negative = base.text(record["caption"]), base.text(record["negative"])
    return SugarCrepeItem(record["image"], caption, negative)


def splits(
    name: str = "sugarcrepe",
    *,
    data_dir: str | os.PathLike | None = None,
    config: str | tfds.core.BuilderConfig | None = None,
    splits: tuple[str, ...] | None = None,
    max_items: int | None = None,
) -> dict[str, list[SugarCrepeItem]]:
    """``{split: items}`` of a prepared SugarCrepe (or ``shapes_world`` with the
    ``compositional`` config), the first ``max_items`` of each, for :func:`evaluate_sugarcrepe`."""
    builder = base.prepared(name, data_dir=data_dir, config=config)
    wanted = splits or tuple(s for s in SUGARCREPE_SPLITS if s in builder.info.splits)
    out = {}
    for split in wanted:
        records = base.open_split(builder, split, item, DECODERS)
        n = len(records) if max_items is None else min(max_items, len(records))
        out[split] = records._getitems(range(n))
    return out
