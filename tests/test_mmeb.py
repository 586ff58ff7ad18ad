"""The MMEB-train builder: every bad row reported under its reason and never written, the
records in input order with the files' image bytes, per-dataset configs and limits,
deterministic output, and a crash that leaves nothing that looks prepared."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import unime_jax.datasets as uds
from unime_jax.data import pairs
from unime_jax.datasets import mmeb_rows, mmeb_train
from unime_jax.errors import DataError
from unime_jax.preprocess.images import load_image

LONG = " ".join(["word"] * 200)


@pytest.fixture(scope="module")
def manual(tmp_path_factory):
    """A manual dir: good, empty, corrupt and missing images, three row files (sorted: mixed,
    retrieval, vqa) and one that is not UTF-8; an image outside it."""
    base = tmp_path_factory.mktemp("mmeb")
    root = base / "manual"
    (root / "images" / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)

    def picture(shape):
        return Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8))

    picture((20, 30)).save(root / "images" / "red.png")
    picture((32, 16)).save(root / "images" / "blue.jpg")
    picture((8, 8)).save(root / "images" / "sub" / "green.png")
    (root / "images" / "empty.png").write_bytes(b"")
    (root / "images" / "corrupt.jpg").write_bytes(rng.bytes(300))
    picture((8, 8)).save(base / "outside.png")

    def row(qry="<|image_1|> What is shown?", qi="images/red.png", pos="red", pi=""):
        return {"qry": qry, "qry_image_path": qi, "pos_text": pos, "pos_image_path": pi}

    # mixed.parquet comes first: nights 0-2 and vqa 0; vqa.jsonl continues at vqa row 1.
    mixed = [{**row(), "dataset": d} for d in ("nights", "nights", "vqa", "nights")]
    mixed[1]["qry_image_path"] = "images/nope.png"
    pq.write_table(pa.Table.from_pylist(mixed), root / "mixed.parquet")
    retrieval = [
        row(qry="a red picture", qi="", pos="<|image_1|>", pi="images/red.png"),
        row(qry="a blue picture", qi="", pos="<|image_1|>", pi="images/blue.jpg"),
        row(qi="images/corrupt.jpg"),
        row(qry="Find a caption", qi="", pos=None, pi=None),  # empty_target (nulls)
    ]
    pq.write_table(pa.Table.from_pylist(retrieval), root / "retrieval.parquet")
    vqa = [  # vqa row = index + 1 -> expected outcome
        row(),  # 1 good
        row(qi="images/nope.png"),  # 2 missing_image
        row(qi="images/empty.png"),  # 3 empty_image_file
        row(qi="images/corrupt.jpg"),  # 4 corrupt_image
        row(qi="../outside.png"),  # 5 image_outside_root
        row(qi=str(root / "images" / "red.png")),  # 6 image_outside_root (absolute)
        row(qry="", qi=""),  # 7 empty_query
        row(pos="  "),  # 8 empty_target
        row(qi=""),  # 9 placeholder_mismatch: placeholder, no image
        row(qry="Find the image", qi="", pos="x", pi="images/blue.jpg"),  # 10 no placeholder
        row(qry=LONG, qi="", pos="text"),  # 11 good: length is training's business
        None,  # 12 malformed_row: not JSON
        row(pos="<|image_1|> Represent it", pi="images/sub/../blue.jpg"),  # 13 good, normalised
        {**row(), "qry": 5},  # 14 malformed_row: not a string
        row(qi="images/sub/../../images/sub/green.png"),  # 15 good
    ]
    lines = [json.dumps(r) if r is not None else "{not json" for r in vqa]
    (root / "vqa.jsonl").write_text("\n".join(lines[:5]) + "\n\n" + "\n".join(lines[5:]) + "\n")
    (root / "zz_extra.jsonl").write_bytes(b'{"qry": "caf\xe9"}\n')  # not UTF-8
    return root


EXPECTED_BAD = {
    "malformed_row": [["vqa", 12], ["vqa", 14], ["zz_extra", 0]],
    "empty_query": [["vqa", 7]],
    "empty_target": [["retrieval", 3], ["vqa", 8]],
    "placeholder_mismatch": [["vqa", 9], ["vqa", 10]],
    "image_outside_root": [["vqa", 5], ["vqa", 6]],
    "missing_image": [["nights", 1], ["vqa", 2]],
    "empty_image_file": [["vqa", 3]],
    "corrupt_image": [["retrieval", 2], ["vqa", 4]],
}
GOOD = [("nights", 0), ("vqa", 0), ("nights", 2), ("retrieval", 0), ("retrieval", 1)]
GOOD += [("vqa", 1), ("vqa", 11), ("vqa", 13), ("vqa", 15)]


def build(manual, data_dir, config="all"):
    return uds.prepare("mmeb_train", data_dir=data_dir, config=config, manual_dir=manual)


@pytest.fixture(scope="module")
def built(manual, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    build(manual, data_dir)
    return data_dir


def test_report_counts_every_bad_row(built, manual):
    report = uds.mmeb_train.report(data_dir=built)
    sources = report.pop("sources")
    assert [s["path"] for s in sources] == [
        str(manual / n)
        for n in ("mixed.parquet", "retrieval.parquet", "vqa.jsonl", "zz_extra.jsonl")
    ]
    assert sources[0]["rows"] == {"nights": 3, "vqa": 1} and len(sources[0]["sha256"]) == 64
    assert report["bad_rows"] == EXPECTED_BAD
    assert report["by_reason"] == {k: len(v) for k, v in EXPECTED_BAD.items()}
    assert list(report["by_reason"]) == [r for r in mmeb_rows.REASONS if r in EXPECTED_BAD]
    assert (report["rows_read"], report["kept"], report["excluded"]) == (24, 9, 15)
    assert report["by_dataset"]["retrieval"] == {
        "read": 4, "kept": 2, "excluded": 2, "corrupt_image": 1, "empty_target": 1,
    }  # fmt: skip
    assert report["malformed"]["zz_extra/0"] == (
        "zz_extra.jsonl line 1: not UTF-8 (invalid continuation byte at byte 12)"
    )
    assert report["malformed"]["vqa/12"].startswith("vqa.jsonl line 13: not JSON")


def test_records_hold_the_files_bytes_in_input_order(built, manual):
    source = uds.source("mmeb_train", "train", data_dir=built, config="all")
    items = list(source)
    assert [(x["dataset"], x["row"]) for x in items] == GOOD
    raw = tfds.data_source(
        "mmeb_train/all", split="train", data_dir=built, download=False,
        decoders=mmeb_train.DECODERS,
    )  # fmt: skip
    assert raw[7]["pos_image"] == [(manual / "images" / "blue.jpg").read_bytes()]
    assert raw[7]["pos_image_path"] == b"images/blue.jpg"  # normalised
    assert raw[8]["qry_image_path"] == b"images/sub/green.png"
    assert raw[3]["qry_image"] == [] and items[3]["qry_image"] is None
    np.testing.assert_array_equal(
        np.asarray(load_image(items[3]["pos_image"])),
        np.asarray(load_image(manual / "images" / "red.png")),
    )
    assert items[3]["qry"] == "a red picture" and items[3]["pos_text"] == "<|image_1|>"
    assert pairs.normalize_record(items[3])["id"] == "retrieval/0"


def test_per_dataset_configs_and_row_limits(built, manual, tmp_path):
    # A one-dataset config keeps the row numbers the dataset has in `all`.
    config = mmeb_train.MmebTrainConfig(name="nights_only", subset="nights")
    build(manual, tmp_path, config)
    nights = uds.source("mmeb_train", "train", data_dir=tmp_path, config=config)
    assert [(x["dataset"], x["row"]) for x in nights] == [g for g in GOOD if g[0] == "nights"]
    first2 = mmeb_train.MmebTrainConfig(name="first2", max_rows_per_dataset=2)
    build(manual, tmp_path, first2)
    report = uds.mmeb_train.report(data_dir=tmp_path, config=first2)
    assert report["rows_read"] == 7
    assert report["beyond_limit"] == {"nights": 1, "retrieval": 2, "vqa": 14}
    assert report["bad_rows"] == {
        "malformed_row": [["zz_extra", 0]],
        "missing_image": [["nights", 1]],
    }
    rows = uds.source("mmeb_train", "train", data_dir=tmp_path, config=first2)
    assert [(x["dataset"], x["row"]) for x in rows] == [
        ("nights", 0), ("vqa", 0), ("retrieval", 0), ("retrieval", 1), ("vqa", 1)
    ]  # fmt: skip


def test_deterministic_and_a_crash_leaves_nothing_prepared(built, manual, tmp_path, monkeypatch):
    again = tmp_path / "again"
    build(manual, again)
    ours = sorted((built / "mmeb_train" / "all" / "1.0.0").glob("*.array_record*"))
    theirs = sorted((again / "mmeb_train" / "all" / "1.0.0").glob("*.array_record*"))
    assert [p.name for p in ours] == [p.name for p in theirs] and ours
    for a, b in zip(ours, theirs):
        assert a.read_bytes() == b.read_bytes()

    calls = {"n": 0}
    real = mmeb_rows.Validator.row

    def crash_on_fifth(self, row):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk full")
        return real(self, row)

    monkeypatch.setattr(mmeb_rows.Validator, "row", crash_on_fifth)
    with pytest.raises(RuntimeError, match="disk full"):
        build(manual, tmp_path / "crashed")
    with pytest.raises(DataError, match="is not prepared") as e:
        uds.source("mmeb_train", "train", data_dir=tmp_path / "crashed", config="all")
    assert "python -m unime_jax.datasets build mmeb_train --config all" in e.value.fix


def test_without_row_files_says_what_to_download(tmp_path):
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no row files") as e:
        build(tmp_path / "manual", tmp_path / "tfds")
    assert "TIGER-Lab/MMEB-train" in str(e.value)


def test_hf_layout_names_datasets_by_folder(manual, tmp_path):
    root = tmp_path / "hf"
    shutil.copytree(manual / "images", root / "images")
    (root / "OK-VQA").mkdir()
    row = {"qry": "<|image_1|> q", "qry_image_path": "images/red.png", "pos_text": "a"}
    rows = [row | {"pos_image_path": ""}] * 2
    pq.write_table(pa.Table.from_pylist(rows), root / "OK-VQA" / "original-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:1]), root / "OK-VQA" / "diverse-00000.parquet")
    build(root, tmp_path / "tfds")
    got = uds.source("mmeb_train", "train", data_dir=tmp_path / "tfds", config="all")
    assert [(x["dataset"], x["row"]) for x in got] == [("OK-VQA", 0), ("OK-VQA", 1)]
