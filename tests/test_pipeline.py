"""Stage-2 grain pipeline: packed batches, shuffling, host sharding, resumable state, bad rows,
and parity of the pipeline's batches with the processor → model path."""

import json
import logging

import jax
import numpy as np
import pytest
from PIL import Image

from tests import hf_fixtures
from unime_jax import sharding
from unime_jax.data import pairs
from unime_jax.data.pairs import PairTransform
from unime_jax.data.pipeline import BatchCollator, make_batch_iterator, row_groups
from unime_jax.gradcache import interleave_chunks
from unime_jax.inference import EmbeddingModel, load_pretrained

L = 96  # query and target length: fits every image below (at most 74 tokens)
SIZES = [(20, 30), (32, 16), (40, 60), (8, 8)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = hf_fixtures.save_tiny_llava(tmp_path_factory.mktemp("ov"), "llava_onevision", seed=1)
    model = load_pretrained(path)
    return model, model.processor


@pytest.fixture(scope="module")
def transform(tiny):
    _, processor = tiny
    return PairTransform(
        processor, lengths={"query": L, "target": L}, max_units=processor.max_units()
    )


def iterator(source, transform, *, data_parallel=1, num_chunks=1, **kw):
    collator = BatchCollator(
        transform.processor, transform.lengths, data_parallel=data_parallel, num_chunks=num_chunks
    )
    return make_batch_iterator(source, transform, collator, reasons=pairs.REASONS, **kw)


def assert_same_batch(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


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
    def padded(example):
        return transform.processor.batch([example], length=L).input_ids[0].tobytes()

    return {padded(transform.map(r)["query"]): i for i, r in enumerate(records)}


def row_ids(batch, lookup):
    return [lookup[ids.tobytes()] for ids in batch["query"].input_ids]


def take(iterator, k):
    return [next(iterator) for _ in range(k)]


def test_batch_shapes_and_dtypes(records, transform, tiny):
    _, processor = tiny
    it = iterator(records, transform, global_batch_size=4, seed=0, process_count=1, process_index=0)
    batch = next(it)
    assert set(batch) == {"query", "target"}
    taps = processor.layout.taps  # 4 only where OneVision can downsample
    for side in ("query", "target"):
        x = batch[side]
        assert x.input_ids.shape == x.attention_mask.shape == x.positions.shape == (4, L)
        assert x.input_ids.dtype == x.attention_mask.dtype == x.positions.dtype == np.int32
        if x.images is None:  # this side of this batch is text only: no tower at all
            continue
        pixels = x.images["pixels"]
        assert pixels.dtype == np.uint8 and pixels.shape[0] == 1 and pixels.shape[2:] == (3, 32, 32)
        assert x.images["pixel_lut"].shape == (1, 3, 256)
        assert x.image_index.shape == x.image_weight.shape == (4, L, taps)
    assert it.skipped == {}


def test_examples_without_images(records, transform, tiny):
    _, processor = tiny
    text_only = records[2]  # "Find item 2" → "answer 2"
    assert text_only["qry_image"] is None and text_only["pos_image"] is None
    ex = transform.map(text_only)
    for side in ("query", "target"):
        assert ex[side].images == [] and ex[side].num_units == 0
    assert list(ex["query"].input_ids) == processor.tokenizer("Find item 2")["input_ids"]
    image_query = transform.map(records[0])
    assert image_query["query"].num_units == 2 and image_query["target"].num_units == 0
    # The converter's key names work too.
    converted = {
        "qry": "Find item 2",
        "qry_image_path": "",
        "pos_text": "answer 2",
        "pos_image_path": None,
    }
    for side, example in transform.map(converted).items():
        np.testing.assert_array_equal(example.input_ids, ex[side].input_ids)


def test_packed_groups_follow_the_gradcache_chunks(records, transform, tiny):
    """With 2 data-parallel ranks and 2 chunks, each chunk's rows find their image units in
    their own rank's group, and every row embeds as it does alone."""
    model, processor = tiny
    rows = records[:8]
    it = iterator(
        rows, transform, data_parallel=2, num_chunks=2, global_batch_size=8, seed=0,
        shuffle=False, process_count=1, process_index=0,
    )  # fmt: skip
    batch = next(it)
    np.testing.assert_array_equal(row_groups(8, 2, 2), [0, 1, 0, 1, 2, 3, 2, 3])
    on_two = EmbeddingModel.from_module(
        model.module, model.family, processor, sharding.make_mesh({"fsdp": 2}, jax.devices()[:2])
    )
    for side, text, image in (("query", "qry", "qry_image"), ("target", "pos_text", "pos_image")):
        chunks = interleave_chunks(batch[side], 2)
        alone = model.embed_examples(
            [processor.encode(processor.instruction(r[text]), r[image]) for r in rows]
        )
        for j in range(2):
            chunk = jax.tree.map(lambda x, j=j: x[j], chunks)  # rows j, j+2, j+4, j+6
            got = on_two.run(chunk, pool=True)  # one group per device
            np.testing.assert_allclose(got, alone[j::2], atol=2e-6)


def test_shuffle_is_seeded(records, transform, lookup):
    def epoch(**kw):
        it = iterator(
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
        it = iterator(
            records, transform, global_batch_size=batch, seed=3, num_epochs=1,
            process_index=index, process_count=count,
        )  # fmt: skip
        return [row_ids(b, lookup) for b in it]

    h0, h1, single = host(0, 2, 4), host(1, 2, 4), host(0, 1, 4)
    assert len(h0) == len(h1) == 3 and all(len(b) == 2 for b in h0 + h1)
    rows0, rows1 = {i for b in h0 for i in b}, {i for b in h1 for i in b}
    assert not rows0 & rows1 and rows0 | rows1 == set(range(12))
    # Step s of both hosts together is step s of a one-host run, in the same order: host 0 holds
    # the first half of the global batch, host 1 the second.
    for s in range(3):
        assert h0[s] + h1[s] == single[s]
    # Finite epochs keep whole global batches only: 12 rows, batch 8 → one step per host.
    assert len(host(0, 2, 8)) == len(host(1, 2, 8)) == 1


def test_resume_from_state(records, transform):
    rows = [
        *records,
        {**records[2], "qry": " ".join(["word"] * 200)},
    ]  # one bad row, to count skips too
    kw = dict(global_batch_size=4, seed=7, process_count=1, process_index=0)  # forever
    it = iterator(rows, transform, **kw)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    rest = take(it, 5)  # crosses several epoch boundaries (13 rows, 4 per batch)
    assert it.skipped == {"too_long": 2}
    resumed = iterator(rows, transform, **kw)
    resumed.set_state(state)
    assert resumed.skipped == state["skipped"]
    for a, b in zip(rest, take(resumed, 5)):
        assert_same_batch(a, b)
    assert resumed.skipped == it.skipped
    assert resumed.metrics()["data/skipped/too_long"] == 2
    assert resumed.metrics()["data/skipped/total"] == 2


def test_rows_with_unusable_images_are_skipped(tmp_path, transform, caplog):
    root = tmp_path / "images"
    names = make_images(root)
    source = [
        r
        | {"dataset": "pairs", "row": i}
        | {k: str(root / r[k]) if r.get(k) else None for k in ("qry_image_path", "pos_image_path")}
        for i, r in enumerate(make_rows(12, names))
    ]
    (root / names[1]).unlink()  # used by rows 1 (target) and 9 (query)
    (root / names[0]).write_bytes(b"\x89PNG broken")  # rows 0 (query), 4 (target)
    with caplog.at_level(logging.WARNING, logger="unime_jax.data.pipeline"):
        it = iterator(
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


def test_pipeline_batches_match_processor_and_model(records, transform, tiny):
    """The pipeline's packed batches give the embeddings of the HF-format processor → model path."""
    model, p = tiny
    it = iterator(
        records, transform, data_parallel=8, global_batch_size=8, seed=0, shuffle=False,
        process_count=1, process_index=0,
    )  # fmt: skip
    batch, rows = next(it), records[:8]
    for side, text, image in (("query", "qry", "qry_image"), ("target", "pos_text", "pos_image")):
        got = model.run(batch[side], pool=True)
        inputs = p([p.instruction(r[text]) for r in rows], [r[image] for r in rows], max_length=L)
        want = model.embed(**inputs)
        np.testing.assert_allclose(got, want, atol=2e-6)
        np.testing.assert_array_equal(batch[side].input_ids, inputs["input_ids"])


@pytest.mark.slow  # starts a worker process (~30 s here: it imports jax and transformers)
def test_worker_processes_give_the_same_batches_and_counts(records, transform, tmp_path):
    rows = [*records, {**records[0], "qry_image": str(tmp_path / "gone.png")}]
    kw = dict(global_batch_size=4, seed=5, num_epochs=1, process_count=1, process_index=0)
    local = iterator(rows, transform, **kw)
    want = list(local)
    workers = iterator(rows, transform, worker_count=1, **kw)
    try:
        got = list(workers)
    finally:
        workers.close()
    assert len(got) == len(want) == 2  # 12 of 13 rows (whole global batches), 1 of them bad
    for a, b in zip(want, got):
        assert_same_batch(a, b)
    # Bad rows are filtered (and counted) in this process even when workers transform them.
    assert workers.skipped == local.skipped == {"missing_image": 1}
