"""Stage-2 grain pipeline: fixed shapes, shuffling, host sharding, resumable state, bad rows,
and parity of the pipeline's arrays with the processor → model path."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from tests import hf_fixtures
from unime_jax.data import mmeb
from unime_jax.data.pipeline import FIELDS, PairTransform, make_batch_iterator
from unime_jax.models import load_pretrained
from unime_jax.processing import Processor

L = 96  # query and target length: fits every image below (at most 74 tokens)
SIZES = [(20, 30), (32, 16), (40, 60), (8, 8)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = hf_fixtures.save_tiny_llava(tmp_path_factory.mktemp("ov"), "llava_onevision", seed=1)
    model = load_pretrained(path)
    return model, Processor.from_pretrained(path, model.config)


@pytest.fixture(scope="module")
def transform(tiny):
    model, processor = tiny
    return PairTransform(processor, max_tiles=model.max_tiles, query_length=L, target_length=L)


def make_images(root):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i, (h, w) in enumerate(SIZES):
        names.append(f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / names[-1])
    return names


def make_rows(n, names):
    """MMEB-style rows: image query → text, text → image target, text → text; unique queries."""
    rows = []
    for i in range(n):
        image = names[i % len(names)]
        kind = i % 3
        rows.append(
            {
                "qry": f"<|image_1|> Represent image {i}" if kind == 0 else f"Find item {i}",
                "qry_image_path": image if kind == 0 else "",
                "pos_text": "<|image_1|>" if kind == 1 else f"answer {i}",
                "pos_image_path": image if kind == 1 else "",
            }
        )
    return rows


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """12 in-memory records with absolute image paths (the offline demo's form)."""
    root = tmp_path_factory.mktemp("images")
    names = make_images(root)
    rows = make_rows(12, names)
    for r in rows:
        for key in ("qry_image_path", "pos_image_path"):
            r[key.replace("_path", "")] = str(root / r.pop(key)) if r[key] else None
    return rows


@pytest.fixture(scope="module")
def lookup(records, transform):
    return {transform.map(r)["query_input_ids"].tobytes(): i for i, r in enumerate(records)}


def row_ids(batch, lookup):
    return [lookup[ids.tobytes()] for ids in batch["query_input_ids"]]


def take(iterator, k):
    return [next(iterator) for _ in range(k)]


def test_batch_shapes_and_dtypes(records, transform, tiny):
    model, _ = tiny
    it = make_batch_iterator(
        records, transform, global_batch_size=4, seed=0, process_count=1, process_index=0
    )
    batch = next(it)
    taps = model.config.anyres.taps  # 4 only where OneVision can downsample
    expected = {
        "input_ids": ((4, L), np.int32),
        "attention_mask": ((4, L), np.int32),
        "pixel_values": ((4, model.max_tiles, 3, 32, 32), np.float32),
        "image_index": ((4, L, taps), np.int32),
        "image_weight": ((4, L, taps), np.float32),
    }
    assert set(batch) == {f"{s}_{f}" for s in ("query", "target") for f in FIELDS}
    for side in ("query", "target"):
        for field, (shape, dtype) in expected.items():
            assert batch[f"{side}_{field}"].shape == shape, (side, field)
            assert batch[f"{side}_{field}"].dtype == dtype, (side, field)
    assert it.skipped == {}


def test_examples_without_images(records, transform, tiny):
    _, processor = tiny
    text_only = records[2]  # "Find item 2" → "answer 2"
    assert text_only["qry_image"] is None and text_only["pos_image"] is None
    ex = transform.map(text_only)
    for side in ("query", "target"):
        assert not ex[f"{side}_pixel_values"].any()
        assert not ex[f"{side}_image_index"].any() and not ex[f"{side}_image_weight"].any()
    n = int(ex["query_attention_mask"].sum())
    assert n == len(processor.tokenizer("Find item 2")["input_ids"])
    assert ex["query_attention_mask"][:n].all() and not ex["query_attention_mask"][n:].any()
    image_query = transform.map(records[0])
    assert image_query["query_pixel_values"].any() and image_query["query_image_weight"].any()
    assert not image_query["target_pixel_values"].any()
    # The converter's key names work too.
    converted = {
        "qry": "Find item 2",
        "qry_image_path": "",
        "pos_text": "answer 2",
        "pos_image_path": None,
    }
    for k, v in transform.map(converted).items():
        np.testing.assert_array_equal(v, ex[k])


def test_shuffle_is_seeded(records, transform, lookup):
    def epoch(**kw):
        it = make_batch_iterator(
            records,
            transform,
            global_batch_size=4,
            num_epochs=1,
            process_count=1,
            process_index=0,
            **kw,
        )
        return [i for b in it for i in row_ids(b, lookup)]

    a, b, c = epoch(seed=1), epoch(seed=1), epoch(seed=2)
    assert a == b and a != c
    assert sorted(a) == sorted(c) == list(range(12))
    assert epoch(seed=1, shuffle=False) == list(range(12))


def test_two_hosts_get_disjoint_rows(records, transform, lookup):
    def host(index, count, batch):
        it = make_batch_iterator(
            records, transform, global_batch_size=batch, seed=3, num_epochs=1,
            process_index=index, process_count=count,
        )  # fmt: skip
        return [row_ids(b, lookup) for b in it]

    h0, h1, single = host(0, 2, 4), host(1, 2, 4), host(0, 1, 4)
    assert len(h0) == len(h1) == 3 and all(len(b) == 2 for b in h0 + h1)
    rows0, rows1 = {i for b in h0 for i in b}, {i for b in h1 for i in b}
    assert not rows0 & rows1 and rows0 | rows1 == set(range(12))
    # Step s of both hosts together is step s of a one-host run with the same global batch.
    for s in range(3):
        assert sorted(h0[s] + h1[s]) == sorted(single[s])
    # Finite epochs keep whole global batches only: 12 rows, batch 8 → one step per host.
    assert len(host(0, 2, 8)) == len(host(1, 2, 8)) == 1


def test_resume_from_state(records, transform):
    rows = [
        *records,
        {**records[2], "qry": " ".join(["word"] * 200)},
    ]  # one bad row, to count skips too
    kw = dict(global_batch_size=4, seed=7, process_count=1, process_index=0)  # forever
    it = make_batch_iterator(rows, transform, **kw)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    rest = take(it, 5)  # crosses several epoch boundaries (13 rows, 4 per batch)
    assert it.skipped == {"too_long": 2}
    resumed = make_batch_iterator(rows, transform, **kw)
    resumed.set_state(state)
    assert resumed.skipped == state["skipped"]
    for a, b in zip(rest, take(resumed, 5)):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert resumed.skipped == it.skipped
    assert resumed.metrics()["data/skipped/too_long"] == 2
    assert resumed.metrics()["data/skipped/total"] == 2


def test_rows_broken_after_conversion_are_skipped(tmp_path, transform, caplog):
    root = tmp_path / "images"
    names = make_images(root)
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in make_rows(12, names)))
    mmeb.convert([tmp_path / "pairs.jsonl"], root, tmp_path / "out", progress=False)
    source = mmeb.open_dataset(tmp_path / "out")
    assert len(source) == 12
    (root / names[1]).unlink()  # used by rows 1 (target) and 9 (query)
    (root / names[0]).write_bytes(b"\x89PNG broken")  # rows 0 (query), 4 (target)
    with caplog.at_level(logging.WARNING, logger="unime_jax.data.pipeline"):
        it = make_batch_iterator(
            source,
            transform,
            global_batch_size=2,
            seed=0,
            num_epochs=1,
            process_count=1,
            process_index=0,
        )
        batches = list(it)
    assert len(batches) == 4  # 8 good rows
    assert it.skipped == {"corrupt_image": 2, "missing_image": 2}
    warned = " ".join(r.getMessage() for r in caplog.records)
    for row in ("pairs/0", "pairs/1", "pairs/4", "pairs/9"):
        assert f"skipping row {row} " in warned


def test_pipeline_arrays_match_processor_and_model(records, transform, tiny):
    """The per-example arrays, batched, give the embeddings of the processor → model path."""
    model, p = tiny
    it = make_batch_iterator(
        records,
        transform,
        global_batch_size=4,
        seed=0,
        shuffle=False,
        process_count=1,
        process_index=0,
    )
    batch, rows = next(it), records[:4]
    for side, text, image in (("query", "qry", "qry_image"), ("target", "pos_text", "pos_image")):
        prefix = f"{side}_"
        got = model.run(
            {k[len(prefix) :]: v for k, v in batch.items() if k.startswith(prefix)}, pool=True
        )
        inputs = p([p.instruction(r[text]) for r in rows], [r[image] for r in rows], max_length=L)
        want = model.embed(**inputs)
        np.testing.assert_allclose(got, want, atol=2e-6)
        np.testing.assert_array_equal(batch[f"{prefix}input_ids"], inputs["input_ids"])


@pytest.mark.slow  # starts a worker process (~30 s here: it imports jax and transformers)
def test_worker_processes_give_the_same_batches_and_counts(records, transform, tmp_path):
    rows = [*records, {**records[0], "qry_image": str(tmp_path / "gone.png")}]
    kw = dict(global_batch_size=4, seed=5, num_epochs=1, process_count=1, process_index=0)
    local = make_batch_iterator(rows, transform, **kw)
    want = list(local)
    workers = make_batch_iterator(rows, transform, worker_count=1, **kw)
    try:
        got = list(workers)
    finally:
        workers.close()
    assert len(got) == len(want) == 2  # 12 of 13 rows (whole global batches), 1 of them bad
    for a, b in zip(want, got):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # Bad rows are filtered (and counted) in this process even when workers transform them.
    assert workers.skipped == local.skipped == {"missing_image": 1}
