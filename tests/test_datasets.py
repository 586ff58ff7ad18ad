"""TFDS builders (unime_jax.datasets): each built from a tiny manual dir, read back through
tfds.data_source and grain, equals what the raw-file parser gives for the same input; bad rows
are reported and never written; images are the files' bytes; a feature change needs a new
VERSION. coco_mini goes through the COCO and SugarCrepe builders when it is present."""

import dataclasses
import json
import pickle
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import tensorflow_datasets as tfds

import unime_jax.datasets as uds
from configs.eval import COCO_MINI
from tests.eval_fixtures import make_image_root
from tests.test_pipeline import (  # noqa: F401  (tiny, transform: a tiny LLaVA-OV's transform)
    assert_same_batch,
    iterator,
    make_images,
    make_rows,
    tiny,
    transform,
)
from unime_jax.datasets import base, karpathy, nli_simcse, shapes_world
from unime_jax.demo.world import sets
from unime_jax.errors import UsageError
from unime_jax.eval import cache, mmeb_eval
from unime_jax.eval import datasets as eds
from unime_jax.preprocess.images import load_image
from unime_jax.teacher import corpus_checksum, read_corpus, write_nli_csv

ROOT = Path(__file__).resolve().parents[1]


def build(name, data_dir, manual_dir=None, config=None):
    return uds.prepare(name, data_dir=data_dir, config=config, manual_dir=manual_dir)


def pixels(image):
    return np.asarray(load_image(image))


# ---------------------------------------------------------------------------------------------
# MMEB-train


def test_training_batches_from_the_builder_equal_the_files(tmp_path, transform):  # noqa: F811
    """The stage-2 pipeline (shuffle, PairTransform, packing) gives the same batches, resumable
    the same way, from the TFDS source (through pickling, as grain workers get it) as from the
    row files' records read directly."""
    manual = tmp_path / "manual"
    names = make_images(manual)
    (manual / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in make_rows(12, names)))
    build("mmeb_train", tmp_path / "tfds", manual, "all")
    direct = [
        r
        | {
            k: str(manual / r[k]) if r.get(k) else None
            for k in ("qry_image_path", "pos_image_path")
        }
        for r in make_rows(12, names)
    ]
    tfds_source = uds.source("mmeb_train", "train", data_dir=tmp_path / "tfds", config="all")
    sources = [direct, pickle.loads(pickle.dumps(tfds_source))]
    kw = dict(global_batch_size=4, seed=3, num_epochs=2, process_count=1, process_index=0)
    want, got = (iterator(s, transform, **kw) for s in sources)
    for _ in range(2):
        assert_same_batch(next(want), next(got))
    state = got.get_state()
    resumed = iterator(sources[1], transform, **kw)
    resumed.set_state(json.loads(json.dumps(state)))
    for a, b in zip(want, resumed, strict=True):
        assert_same_batch(a, b)


# ---------------------------------------------------------------------------------------------
# evaluation sets


def test_retrieval_builders_equal_the_loaders(tmp_path):
    root = make_image_root(tmp_path / "flickr")
    flickr = {
        "images": [
            {"filename": "a.png", "split": "test", "sentences": [{"raw": "an a"}, {"raw": "A"}]},
            {"filename": "b.png", "split": "train", "sentences": [{"raw": "a b"}]},
            {"filename": "sub/c.png", "split": "test", "sentences": [{"raw": "a c"}]},
            {"filename": "b.png", "split": "test", "sentences": []},  # no caption: excluded
        ]
    }
    (root / "dataset_flickr30k.json").write_text(json.dumps(flickr))
    (root / "flickr30k-images").symlink_to(root / "imgs")
    pairs_file = root / "captions.jsonl"
    rows = [{"image": "a.png", "caption": "long a"}, {"image": "sub/c.png", "caption": "long c"}]
    pairs_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "images").symlink_to(root / "imgs")
    data_dir = tmp_path / "tfds"
    with pytest.warns(UserWarning, match="without captions"):
        build("karpathy", data_dir, root, "flickr30k")
        want = eds.load_flickr30k(root / "dataset_flickr30k.json", root / "flickr30k-images")
    build("long_caption", data_dir, root, "urban1k")
    cases = [
        (uds.retrieval_set("karpathy", data_dir=data_dir, config="flickr30k"), want),
        (
            uds.retrieval_set("long_caption", data_dir=data_dir, config="urban1k"),
            eds.load_caption_pairs(pairs_file, root / "images"),
        ),
    ]
    for got, want in cases:
        assert (got.captions, got.image_for_caption) == (want.captions, want.image_for_caption)
        assert got.image_paths == [Path(p).read_bytes() for p in want.image_paths]
        assert (got.source, got.excluded) == (want.source, want.excluded)
    assert cases[0][0].excluded == [
        "image 3 (" + str(root / "flickr30k-images/b.png") + "): no caption"
    ]
    first = uds.retrieval_set("karpathy", data_dir=data_dir, config="flickr30k", max_images=1)
    assert first.captions == ["an a", "A"]

    # A bad row stops the build with the loader's report (file, row, what to fix).
    (root / "captions.jsonl").write_text(json.dumps({"image": "nope.png", "caption": "x"}) + "\n")
    with pytest.raises(eds.DatasetError, match=r"line 1: image file .* does not exist"):
        build("long_caption", data_dir, root, "sharegpt4v_1k")


def test_karpathy_coco_uses_filepath(tmp_path):
    root = make_image_root(tmp_path)
    entry = {"filepath": "imgs", "filename": "a.png", "split": "test", "sentences": [{"raw": "x"}]}
    (root / "dataset_coco.json").write_text(json.dumps({"images": [entry]}))
    build("karpathy", tmp_path / "tfds", root, "coco")
    got = uds.retrieval_set("karpathy", data_dir=tmp_path / "tfds", config="coco")
    assert got.image_paths == [(root / "imgs" / "a.png").read_bytes()] and got.captions == ["x"]


def test_mmeb_eval_rows_equal_the_loader(tmp_path):
    root = make_image_root(tmp_path)
    (root / "VisDial").mkdir()
    t2i = [
        {"qry_text": "find a", "qry_img_path": "", "tgt_text": ["<|image_1|> x"] * 2,
         "tgt_img_path": ["imgs/a.png", "imgs/b.png"]},
        {"qry_text": "find b", "qry_img_path": None, "tgt_text": ["<|image_1|> x"] * 2,
         "tgt_img_path": ["imgs/b.png", "imgs/a.png"]},
    ]  # fmt: skip
    cls = [{"qry_text": "<|image_1|> what?", "qry_img_path": "imgs/sub/c.png",
            "tgt_text": ["cat", "dog"], "tgt_img_path": []}]  # fmt: skip
    for path, rows in (
        (root / "VisDial/test-00000-of-00001.jsonl", t2i),
        (root / "n24news.jsonl", cls),
    ):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    build("mmeb_eval", tmp_path / "tfds", root, "rows")
    build("mmeb_eval", tmp_path / "tfds", root, "images")
    got = uds.mmeb_eval_rows(data_dir=tmp_path / "tfds")
    want = mmeb_eval.load_mmeb(root, root)

    def as_bytes(row):
        image = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        return dataclasses.replace(
            row, qry_image=image(row.qry_image), tgt_images=tuple(map(image, row.tgt_images))
        )

    assert sorted(got) == sorted(want) == ["N24News", "VisDial"]
    assert {d: [as_bytes(r) for r in rows] for d, rows in want.items()} == got
    assert got["VisDial"][0].tgt_images[1] is got["VisDial"][1].tgt_images[0]  # read once
    assert list(uds.mmeb_eval_rows(data_dir=tmp_path / "tfds", datasets=["visdial"])) == ["VisDial"]
    assert len(uds.mmeb_eval_rows(data_dir=tmp_path / "tfds", max_rows=1)["VisDial"]) == 1


def test_nli_simcse_equals_read_corpus(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    text = 'sent0,sent1,hard_neg\nA cat.,A feline.,A dog.\n ,"Two, quoted",x\nok,caf\xe9,\n'
    path = manual / "nli_for_simcse.csv"
    path.write_bytes(text.encode("utf-8").replace("caf\xe9".encode(), b"caf\xe9"))
    build("nli_simcse", tmp_path / "tfds", manual)
    got = uds.nli_corpus(data_dir=tmp_path / "tfds")
    want = read_corpus(path, verbose=False)
    assert list(got) == list(want) and corpus_checksum(got) == corpus_checksum(want)
    assert got.report == want.report and got.report.non_utf8 == ["2:sent1"]
    assert got.report.empty == ["1:sent0", "2:hard_neg"]
    assert list(uds.source("nli_simcse", "train", data_dir=tmp_path / "tfds")) == list(want)


def test_eval_cache_keys_bytes_like_their_file(tmp_path):
    root = make_image_root(tmp_path)
    path = root / "imgs" / "a.png"
    assert cache.input_key("image", None, path.read_bytes()) == cache.input_key("image", None, path)


@pytest.mark.skipif(not COCO_MINI.is_dir(), reason=f"coco_mini not at {COCO_MINI}")
def test_coco_mini_through_the_coco_and_sugarcrepe_builders(tmp_path):
    build("coco_captions", tmp_path, COCO_MINI, "mini")
    build("sugarcrepe", tmp_path, COCO_MINI, "mini")
    got = uds.retrieval_set("coco_captions", data_dir=tmp_path, config="mini")
    want = eds.load_coco_captions(COCO_MINI / "captions_val2017.json", COCO_MINI / "images")
    assert (got.captions, got.image_for_caption) == (want.captions, want.image_for_caption)
    assert got.image_paths == [Path(p).read_bytes() for p in want.image_paths]  # JPEG bytes kept
    assert len(got.image_paths) == 79 and len(got.captions) == 395
    items = uds.sugarcrepe_splits(data_dir=tmp_path, config="mini")
    for split, want_items in eds.load_sugarcrepe(
        COCO_MINI / "sugarcrepe", COCO_MINI / "images"
    ).items():
        assert [(Path(p).read_bytes(), c, n) for p, c, n in want_items] == [
            tuple(x) for x in items[split]
        ]
    assert sum(map(len, items.values())) == 211


# ---------------------------------------------------------------------------------------------
# the demo world


def test_shapes_world_equals_the_demo_sets(tmp_path):
    small = dict(seed=3, size=10, heldout_seed=4, heldout_size=12)
    configs = {v: shapes_world.config(v, **small) for v in shapes_world.VIEWS}
    for config in configs.values():
        build("shapes_world", tmp_path, config=config)

    rows = sets.training_rows(3, 10, image_size=64)
    got = uds.source("shapes_world", "train", data_dir=tmp_path, config=configs["pairs"])
    for want, item in zip(rows, got, strict=True):
        assert (item["qry"], item["pos_text"]) == (want["qry"], want["pos_text"])
        for key in ("qry_image", "pos_image"):
            if want[key] is None:
                assert item[key] is None
            else:
                np.testing.assert_array_equal(pixels(item[key]), pixels(want[key]))

    for split, (seed, n, held_out) in {"train": (3, 10, False), "heldout": (4, 12, True)}.items():
        csv = write_nli_csv(tmp_path / f"{split}.csv", sets.nli_rows(seed, n, held_out=held_out))
        got = uds.nli_corpus("shapes_world", data_dir=tmp_path, config=configs["nli"], split=split)
        assert list(got) == list(read_corpus(csv, verbose=False))

    images, captions, index = sets.retrieval_set(4, 12, image_size=64)
    got = uds.retrieval_set("shapes_world", data_dir=tmp_path, config=configs["retrieval"])
    assert (got.captions, got.image_for_caption) == (captions, index)
    for stored, image in zip(got.image_paths, images, strict=True):
        np.testing.assert_array_equal(pixels(base.decode_image(stored)), pixels(image))

    want = sets.compositional_set(4, 12, image_size=64)
    got = uds.sugarcrepe_splits("shapes_world", data_dir=tmp_path, config=configs["compositional"])
    assert list(got) == list(want)
    for split in want:
        assert [x[1:] for x in got[split]] == [x[1:] for x in want[split]]
        for (stored, *_), (image, *_) in zip(got[split], want[split], strict=True):
            np.testing.assert_array_equal(pixels(base.decode_image(stored)), pixels(image))
    assert shapes_world.config("pairs") is shapes_world.ShapesWorld.BUILDER_CONFIGS[0]


# ---------------------------------------------------------------------------------------------
# versions, formats, environments


def test_a_feature_change_needs_a_new_version(tmp_path):
    for cls in uds.BUILDERS:  # every registered config's spec is the one its VERSION records
        for config in cls.BUILDER_CONFIGS or [None]:
            cls(config=config, data_dir=tmp_path / "specs")
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "s.txt").write_text("one\ntwo\n")
    build("nli_simcse", tmp_path / "tfds", manual)
    changed = tfds.features.FeaturesDict(
        {**nli_simcse.FEATURES, "language": tfds.features.Text(doc="added")}
    )

    class Changed(nli_simcse.NliSimcse, skip_registration=True):
        name = "nli_simcse"

        def _features(self):
            return changed

    with pytest.raises(base.FeatureSpecChanged, match="needs a new VERSION"):
        Changed(data_dir=tmp_path / "tfds")

    class Bumped(Changed, skip_registration=True):
        VERSION = tfds.core.Version("1.1.0")
        FEATURE_DIGESTS: ClassVar[dict[str, str]] = {"1.1.0": base.feature_digest(changed)}

    bumped = Bumped(data_dir=tmp_path / "tfds")
    assert not bumped.is_prepared()  # 1.0.0 data is not read as 1.1.0
    assert (tmp_path / "tfds" / "nli_simcse" / "1.0.0").is_dir()


def test_array_record_only(tmp_path):
    with pytest.raises(UsageError, match="ArrayRecord only"):
        nli_simcse.NliSimcse(data_dir=tmp_path, file_format="tfrecord")
    assert karpathy.Karpathy(data_dir=tmp_path, config="coco").info.file_format == base.ARRAY_RECORD


def test_beam_requirements_mirror_the_runtime_pins():
    runtime = (ROOT / "requirements.txt").read_text().splitlines()
    beam = (ROOT / "requirements-beam.txt").read_text().splitlines()
    pins = lambda lines: {l.split("#")[0].strip() for l in lines} - {""}  # noqa: E731, E741
    assert pins(runtime) - pins(beam) == {"protobuf==7.36.2"}
    assert {p for p in pins(beam) - pins(runtime)} == {"protobuf<7", "apache-beam==2.77.0"}


def test_build_command_runs_without_tensorflow(tmp_path):
    """`tfds` itself imports TensorFlow in 4.9.10; `python -m unime_jax.datasets build` does not."""
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "lines.txt").write_text("first\nsecond\n")
    args = [sys.executable, "-m", "unime_jax.datasets", "build", "nli_simcse"]
    args += ["--manual_dir", str(manual), "--data_dir", str(tmp_path / "tfds")]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(uds.nli_corpus(data_dir=tmp_path / "tfds")) == [("0", "first"), ("1", "second")]
    assert nli_simcse.recorded(data_dir=tmp_path / "tfds")["report"]["rows_read"] == 2
    (manual / "other.csv").write_text("sent0\nx\n")  # two candidate files: which one?
    args[-1] = str(tmp_path / "again")
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "error: nli_simcse:" in done.stderr and "Fix:" in done.stderr
