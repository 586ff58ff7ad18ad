"""MMEB-train converter: row validation and its report, ArrayRecord output, CLI, reader."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from unime_jax.data import mmeb_convert as mmeb
from unime_jax.data import mmeb_train
from unime_jax.demo.tokenizers import build_tokenizer

LONG = " ".join(["word"] * 200)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("qwen2")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """An image root with good, empty, corrupt and missing images, and three input files."""
    base = tmp_path_factory.mktemp("mmeb")
    root = base / "root"
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

    vqa = [  # vqa.jsonl: row index -> expected outcome
        row(),  # 0 good
        row(qi="images/nope.png"),  # 1 missing_image
        row(qi="images/empty.png"),  # 2 empty_image_file
        row(qi="images/corrupt.jpg"),  # 3 corrupt_image
        row(qi="../outside.png"),  # 4 image_outside_root
        row(qi=str(root / "images" / "red.png")),  # 5 image_outside_root (absolute)
        row(qry="", qi=""),  # 6 empty_query
        row(pos="  "),  # 7 empty_target
        row(qi=""),  # 8 placeholder_mismatch: placeholder, no image
        row(
            qry="Find the image", qi="", pos="x", pi="images/blue.jpg"
        ),  # 9 mismatch: no placeholder
        row(qry=LONG, qi="", pos="text"),  # 10 too_long (with a tokenizer)
        None,  # 11 malformed_row: not JSON
        row(pos="<|image_1|> Represent it", pi="images/sub/../blue.jpg"),  # 12 good, normalised
        {**row(), "qry": 5},  # 13 malformed_row: not a string
        row(qi="images/sub/../../images/sub/green.png"),  # 14 good
    ]
    lines = [json.dumps(r) if r is not None else "{not json" for r in vqa]
    (base / "vqa.jsonl").write_text("\n".join(lines[:5]) + "\n\n" + "\n".join(lines[5:]) + "\n")

    retrieval = [
        row(qry="a red picture", qi="", pos="<|image_1|>", pi="images/red.png"),
        row(qry="a blue picture", qi="", pos="<|image_1|>", pi="images/blue.jpg"),
        row(qi="images/corrupt.jpg"),
        row(qry="Find a caption", qi="", pos=None, pi=None),  # empty_target (nulls)
    ]
    pq.write_table(pa.Table.from_pylist(retrieval), base / "retrieval.parquet")

    mixed = [{**row(), "dataset": d} for d in ("nights", "nights", "vqa", "nights")]
    mixed[1]["qry_image_path"] = "images/nope.png"
    pq.write_table(pa.Table.from_pylist(mixed), base / "mixed.parquet")

    inputs = [base / "vqa.jsonl", base / "retrieval.parquet", base / "mixed.parquet"]
    return base, root, inputs


EXPECTED_BAD = {
    "malformed_row": [["vqa", 11], ["vqa", 13]],
    "empty_query": [["vqa", 6]],
    "empty_target": [["vqa", 7], ["retrieval", 3]],
    "placeholder_mismatch": [["vqa", 8], ["vqa", 9]],
    "image_outside_root": [["vqa", 4], ["vqa", 5]],
    "missing_image": [["vqa", 1], ["nights", 1]],
    "empty_image_file": [["vqa", 2]],
    "corrupt_image": [["vqa", 3], ["retrieval", 2]],
    "too_long": [["vqa", 10]],
}
GOOD = [("vqa", 0), ("vqa", 12), ("vqa", 14), ("retrieval", 0), ("retrieval", 1)]
GOOD += [("nights", 0), ("vqa", 15), ("nights", 2)]  # mixed.parquet continues vqa's row count


def test_report_counts_every_bad_row(data, tokenizer, tmp_path):
    _, root, inputs = data
    report = mmeb.convert(
        inputs, root, tmp_path / "out", tokenizer=tokenizer, max_text_tokens=64, progress=False
    )
    assert report.bad_rows == EXPECTED_BAD
    assert report.by_reason == {k: len(v) for k, v in EXPECTED_BAD.items()}
    assert (report.rows_read, report.kept, report.excluded) == (23, 8, 15)
    vqa_bad = {k: sum(d == "vqa" for d, _ in v) for k, v in EXPECTED_BAD.items()}
    assert report.by_dataset["vqa"] == {"read": 16, "kept": 4, "excluded": 12, **vqa_bad}
    assert report.by_dataset["retrieval"] == {
        "read": 4,
        "kept": 2,
        "excluded": 2,
        "corrupt_image": 1,
        "empty_target": 1,
    }
    saved = json.loads((tmp_path / "out" / mmeb.REPORT).read_text())
    assert saved == json.loads(json.dumps(report.to_dict()))
    assert list(saved["by_reason"]) == [r for r in mmeb.REASONS if r in EXPECTED_BAD]
    assert "too_long" in report.table() and "vqa/10" in report.table()

    # The records, in input order, with normalised relative image paths.
    source = mmeb_train.open_dataset(tmp_path / "out")
    records = [source[i] for i in range(len(source))]
    assert [(r["dataset"], r["row"]) for r in records] == GOOD
    assert records[1]["pos_image_path"] == str(root / "images" / "blue.jpg")
    assert records[2]["qry_image_path"] == str(root / "images" / "sub" / "green.png")
    assert records[0]["pos_image_path"] is None
    assert records[3] == {
        "qry": "a red picture",
        "qry_image_path": None,
        "pos_text": "<|image_1|>",
        "pos_image_path": str(root / "images" / "red.png"),
        "dataset": "retrieval",
        "row": 0,
    }
    other = mmeb_train.open_dataset(tmp_path / "out", image_root="/elsewhere")
    assert other[1]["pos_image_path"] == "/elsewhere/images/blue.jpg"

    manifest = json.loads((tmp_path / "out" / mmeb.MANIFEST).read_text())
    assert manifest["count"] == 8
    assert manifest["image_root"] == str(root)
    assert manifest["datasets"] == {"nights": 2, "retrieval": 2, "vqa": 4}
    assert [s["path"] for s in manifest["sources"]] == [str(p) for p in inputs]
    assert manifest["sources"][2]["rows"] == {"nights": 3, "vqa": 1}
    for s in manifest["sources"]:
        assert len(s["sha256"]) == 64
    raw = json.loads(source._source[0])
    assert set(raw) == set(mmeb.RECORD_KEYS)
    assert raw["qry_image_path"] == "images/red.png" and raw["pos_image_path"] == ""


def test_without_tokenizer_long_rows_are_kept(data, tmp_path):
    _, root, inputs = data
    report = mmeb.convert(inputs, root, tmp_path / "out", progress=False)
    assert "too_long" not in report.by_reason and report.kept == 9
    with pytest.raises(ValueError, match="needs a tokenizer"):
        mmeb.convert(inputs, root, tmp_path / "x", max_text_tokens=5, progress=False)


def test_deterministic_sharded_and_atomic(data, tokenizer, tmp_path, monkeypatch):
    _, root, inputs = data
    kwargs = dict(tokenizer=tokenizer, max_text_tokens=64, num_shards=3, progress=False)
    mmeb.convert(inputs, root, tmp_path / "a", **kwargs)
    mmeb.convert(inputs, root, tmp_path / "b", **kwargs)
    shards = sorted(p.name for p in (tmp_path / "a").glob("*.array_record"))
    assert shards == [f"mmeb-0000{i}-of-00003.array_record" for i in range(3)]
    for name in [*shards, mmeb.REPORT]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    manifest = json.loads((tmp_path / "a" / mmeb.MANIFEST).read_text())
    assert [s["count"] for s in manifest["shards"]] == [2, 3, 3]
    assert len(mmeb_train.open_dataset(tmp_path / "a")) == 8

    with pytest.raises(FileExistsError):
        mmeb.convert(inputs, root, tmp_path / "a", **kwargs)
    mmeb.convert(inputs, root, tmp_path / "a", **(kwargs | {"num_shards": 1}), overwrite=True)
    assert len(list((tmp_path / "a").glob("*.array_record"))) == 1

    def crash(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mmeb, "_write_shards", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        mmeb.convert(inputs, root, tmp_path / "c", **kwargs)
    with pytest.raises(RuntimeError, match="disk full"):  # an existing dataset stays intact
        mmeb.convert(inputs, root, tmp_path / "a", **kwargs, overwrite=True)
    assert not (tmp_path / "c").exists()
    assert len(mmeb_train.open_dataset(tmp_path / "a")) == 8
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]  # no temporary directories left


def test_max_rows_per_dataset(data, tmp_path):
    _, root, inputs = data
    report = mmeb.convert(inputs, root, tmp_path / "out", max_rows_per_dataset=2, progress=False)
    assert report.rows_read == 6
    assert report.beyond_limit == {"vqa": 14, "retrieval": 2, "nights": 1}
    assert report.bad_rows == {"missing_image": [["vqa", 1], ["nights", 1]]}
    source = mmeb_train.open_dataset(tmp_path / "out")
    rows = [(source[i]["dataset"], source[i]["row"]) for i in range(len(source))]
    assert rows == [("vqa", 0), ("retrieval", 0), ("retrieval", 1), ("nights", 0)]


def test_cli(data, tokenizer, tmp_path, capsys):
    _, root, inputs = data
    tokenizer.save_pretrained(tmp_path / "tok")
    args = [f"--input={p}" for p in inputs]
    args += ["--image-root", str(root), "--out", str(tmp_path / "out"), "--no-progress"]
    args += ["--tokenizer", str(tmp_path / "tok"), "--max-text-tokens", "64"]
    assert mmeb.main(args) == 0
    out = capsys.readouterr().out
    assert "wrote 8 records" in out and "excluded 15" in out
    assert "missing_image" in out  # the table
    report = json.loads((tmp_path / "out" / mmeb.REPORT).read_text())
    assert report["bad_rows"] == EXPECTED_BAD
    with pytest.raises(SystemExit):
        mmeb.main([*args[:3], "--image-root", str(root), "--out", "x", "--max-text-tokens", "3"])
