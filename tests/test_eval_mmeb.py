"""MMEB-eval: dataset tables, loader errors, and Precision@1 with both overall conventions on
hand-checked answers."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.eval_fixtures import FakeEncoder, HashEncoder, make_image_root, unit
from unime_jax.eval import evaluators as ev
from unime_jax.eval import mmeb_eval as mmeb

# ---------------------------------------------------------------------------------------------
# MMEB

CORRECT = (unit((0, 1.0)), [unit((0, 1.0)), unit((1, 1.0))])
WRONG = (unit((0, 1.0)), [unit((1, 1.0)), unit((0, 1.0))])
TIE = (unit((0, 1.0)), [unit((1, 1.0)), unit((2, 1.0))])  # both score 0: a tie is wrong


def mmeb_fixture(spec):
    """``{dataset: [CORRECT | WRONG | TIE, ...]}`` → (encoder, rows_by_dataset). Every row's
    query has an image; candidate texts are unique per row."""
    table, rows_by = {}, {}
    for name, outcomes in spec.items():
        rows = []
        for r, (q, cands) in enumerate(outcomes):
            qry = (f"<|image_1|> {name} query {r}", f"{name}/{r}.jpg")
            table[qry] = q
            tgts = [(f"{name} row {r} candidate {c}", None) for c in range(len(cands))]
            table.update(zip(tgts, cands))
            rows.append(
                mmeb.MmebRow(name, r, *qry, tuple(t for t, _ in tgts), tuple(i for _, i in tgts))
            )
        rows_by[name] = rows
    return FakeEncoder(instructions=table), rows_by


def test_mmeb_known_answers_and_both_overall_conventions():
    encoder, rows = mmeb_fixture(
        {
            "ImageNet-1K": [CORRECT, WRONG],  # classification, IND: 50
            "place365": [CORRECT],  # classification, OOD: 100 (name canonicalised)
            "OK-VQA": [WRONG, TIE],  # vqa, IND: 0 (the tie is wrong)
            "MSCOCO_t2i": [CORRECT, CORRECT],  # retrieval, IND: 100
            "RefCOCO": [CORRECT, TIE],  # grounding, OOD: 50
            "MyOwnSet": [CORRECT],  # unknown: reported, left out of aggregates
        }
    )
    out = ev.evaluate_mmeb(encoder, rows)
    assert out["per_dataset"] == {
        "ImageNet-1K": 50.0,
        "Place365": 100.0,
        "OK-VQA": 0.0,
        "MSCOCO_t2i": 100.0,
        "RefCOCO": 50.0,
        "MyOwnSet": 100.0,
    }
    assert out["meta_task"] == {
        "classification": 75.0,
        "vqa": 0.0,
        "retrieval": 100.0,
        "grounding": 50.0,
    }
    assert out["IND"] == pytest.approx((50 + 0 + 100) / 3)
    assert out["OOD"] == pytest.approx((100 + 50) / 2)
    assert out["overall_datasets"] == pytest.approx((50 + 100 + 0 + 100 + 50) / 5)  # 60
    assert out["overall_meta"] == pytest.approx((75 + 0 + 100 + 50) / 4)  # 56.25
    assert out["unknown_datasets"] == ["MyOwnSet"]
    assert len(out["missing_datasets"]) == 36 - 5 and "VizWiz" in out["missing_datasets"]
    assert out["num_rows"]["OK-VQA"] == 2


def test_mmeb_embeds_each_distinct_input_once_and_handles_text_only_queries():
    e0, e1, e2 = unit((0, 1.0)), unit((1, 1.0)), unit((2, 1.0))
    table = {
        ("<|image_1|> Represent the image", "a.jpg"): e0,
        ("<|image_1|> Represent the image", "b.jpg"): e1,
        ("Find a photo of a cat", None): e1,
        ("cat", None): e0,
        ("dog", None): e1,
        ("<|image_1|> Represent", "b.jpg"): e1,
        ("<|image_1|> Represent", "c.jpg"): e2,
    }
    rows = {
        "VOC2007": [  # shared label candidates: "cat"/"dog" embedded once
            mmeb.MmebRow("VOC2007", 0, "<|image_1|> Represent the image", "a.jpg", ("cat", "dog"), (None, None)),
            mmeb.MmebRow("VOC2007", 1, "<|image_1|> Represent the image", "b.jpg", ("dog", "cat"), (None, None)),
            mmeb.MmebRow("VOC2007", 2, "<|image_1|> Represent the image", "b.jpg", ("cat", "dog"), (None, None)),
        ],
        "CIRR": [  # text query, image candidates
            mmeb.MmebRow(
                "CIRR", 0, "Find a photo of a cat", None,
                ("<|image_1|> Represent", "<|image_1|> Represent"), ("b.jpg", "c.jpg"),
            ),
        ],
    }  # fmt: skip
    encoder = FakeEncoder(instructions=table)
    out = ev.evaluate_mmeb(encoder, rows)
    assert out["per_dataset"] == {"VOC2007": pytest.approx(200 / 3), "CIRR": 100.0}
    voc, cirr = (inputs for _, inputs in encoder.calls)
    assert len(voc) == len(set(voc)) == 4  # 2 query images + 2 labels, not 9 inputs
    assert cirr == [
        ("Find a photo of a cat", None),
        ("<|image_1|> Represent", "b.jpg"),
        ("<|image_1|> Represent", "c.jpg"),
    ]


def test_mmeb_tables():
    assert len(mmeb.MMEB_DATASETS) == len(set(mmeb.MMEB_DATASETS)) == 36
    assert {t: len(v) for t, v in mmeb.MMEB_META_TASKS.items()} == {
        "classification": 10,
        "vqa": 10,
        "retrieval": 12,
        "grounding": 4,
    }
    assert len(mmeb.MMEB_IND) == 20 and len(mmeb.MMEB_OOD) == 16
    assert set(mmeb.MMEB_DATASETS) >= mmeb.MMEB_IND
    assert mmeb.mmeb_meta_task("visual7w_pointing") == "grounding"
    assert mmeb.mmeb_meta_task("Visual7W") == "vqa"
    assert mmeb.mmeb_split("MSCOCO") == "IND" and mmeb.mmeb_split("RefCOCO-Matching") == "OOD"
    assert mmeb.mmeb_meta_task("Something") == "unknown" == mmeb.mmeb_split("Something")
    assert mmeb.mmeb_dataset_name("x/ImageNet_1K.jsonl") == "ImageNet-1K"
    assert mmeb.mmeb_dataset_name("x/Wiki-SS-NQ/test-00000-of-00001.parquet") == "Wiki-SS-NQ"


@pytest.fixture
def root(tmp_path):
    return make_image_root(tmp_path)


def mmeb_row(q="<|image_1|> Represent the given image", qi="a.png", t=("cat", "dog"), ti=None):
    return {"qry_text": q, "qry_img_path": qi, "tgt_text": list(t), "tgt_img_path": ti}


def test_mmeb_loader_jsonl_and_parquet(root):
    d = root / "mmeb"
    d.mkdir()
    rows = [
        mmeb_row(),
        mmeb_row(q="Find the cat", qi="", t=["<|image_1|> Represent", "<|image_1|> x"], ti=["b.png", "sub/c.png"]),
        mmeb_row(ti=["", ""]),
    ]  # fmt: skip
    (d / "voc2007.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (d / "FashionIQ").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), d / "FashionIQ" / "test-00000-of-00001.parquet")
    (d / "MyNewSet.jsonl").write_text(json.dumps(rows[0]))
    out = mmeb.load_mmeb(d, root / "imgs")
    assert sorted(out) == ["FashionIQ", "MyNewSet", "VOC2007"]
    for name in ("FashionIQ", "VOC2007"):
        r0, r1, r2 = out[name]
        assert r0.qry_image.endswith("a.png") and r0.tgt_images == (None, None)
        assert r1.qry_image is None and r1.tgt_images[1].endswith("c.png")
        assert r2.tgt_texts == ("cat", "dog") and r2.tgt_images == (None, None)
    assert len(mmeb.load_mmeb(d, root / "imgs", max_rows=2)["VOC2007"]) == 2
    # an unknown dataset is evaluated and reported, but stays out of the aggregates
    result = ev.evaluate_mmeb(HashEncoder(), out)
    assert mmeb.mmeb_meta_task("MyNewSet") == "unknown"
    assert result["unknown_datasets"] == ["MyNewSet"] and "MyNewSet" in result["per_dataset"]
    assert result["overall_datasets"] == pytest.approx(
        (result["per_dataset"]["VOC2007"] + result["per_dataset"]["FashionIQ"]) / 2
    )


def test_mmeb_loader_errors(root):
    f = root / "CIRR.jsonl"
    lines = [
        json.dumps(mmeb_row()),  # 1 ok
        json.dumps(mmeb_row(qi="nope.png")),  # 2 missing image
        "{broken",  # 3 malformed
        json.dumps(mmeb_row(qi="../outside.png")),  # 4 escapes the root
        json.dumps(mmeb_row(qi="")),  # 5 placeholder without image
        json.dumps(mmeb_row(ti=["a.png"])),  # 6 unequal candidate lists
        json.dumps(mmeb_row(t=[])),  # 7 no candidates
    ]
    f.write_text("\n".join(lines))
    with pytest.raises(mmeb.DatasetError) as e:  # a malformed line is reported before the rest
        mmeb.load_mmeb_file(f, root / "imgs")
    assert "line 3: malformed JSON" in str(e.value)
    f.write_text("\n".join(lines[:2] + lines[3:]))
    with pytest.raises(mmeb.DatasetError) as e:
        mmeb.load_mmeb_file(f, root / "imgs")
    msg = str(e.value)
    assert "CIRR.jsonl: 5 problem(s)" in msg
    assert "line 2: image file" in msg and "nope.png" in msg
    assert "line 3: image path '../outside.png' leaves the image root" in msg
    assert "line 4: query has 1 <|image_1|> placeholder(s) and no image" in msg
    assert "line 5: tgt_img_path has 1 entries but tgt_text has 2" in msg
    assert "line 6: no candidates" in msg
    bad = root / "bad.parquet"
    pq.write_table(pa.table({"qry_text": ["x"]}), bad)
    with pytest.raises(mmeb.DatasetError, match="missing MMEB-eval columns"):
        mmeb.load_mmeb_file(bad, root / "imgs")
