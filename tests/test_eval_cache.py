"""Embedding cache: hits and misses, no recomputation on rerun, invalidation when the model or
an input changes, crash safety, and the model fingerprints."""

import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from unime_jax import sharding
from unime_jax.eval import cache as ec
from unime_jax.eval import datasets as ds
from unime_jax.eval import evaluators as ev


class CountingEncoder:
    """Deterministic unit vectors from a hash of each input; counts what it embeds."""

    dim = 16

    def __init__(self):
        self.embedded = {"texts": 0, "images": 0, "instructions": 0}

    def _vec(self, key):
        seed = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little")
        v = np.random.default_rng(seed).standard_normal(self.dim)
        return v / np.linalg.norm(v)

    @staticmethod
    def _image_key(image):
        if isinstance(image, bytes):  # a file's bytes, as the TFDS datasets give images
            return hashlib.sha256(image).hexdigest()
        with open(image, "rb") as f:  # by content, like the cache: renaming keeps the embedding
            return hashlib.sha256(f.read()).hexdigest()

    def embed_texts(self, texts):
        self.embedded["texts"] += len(texts)
        return np.stack([self._vec(("t", t)) for t in texts])

    def embed_images(self, images):
        self.embedded["images"] += len(images)
        return np.stack([self._vec(("i", self._image_key(i))) for i in images])

    def embed_instructions(self, texts, images=None):
        images = list(images) if images is not None else [None] * len(texts)
        self.embedded["instructions"] += len(texts)
        return np.stack(
            [self._vec(("q", t, i and self._image_key(i))) for t, i in zip(texts, images)]
        )

    def total(self):
        return sum(self.embedded.values())


@pytest.fixture
def coco(tmp_path):
    """4 images (2 captions each) in COCO caption format."""
    (tmp_path / "imgs").mkdir()
    for i in range(4):
        Image.new("RGB", (8 + i, 6), (40 * i, 20, 200 - 40 * i)).save(tmp_path / f"imgs/{i}.png")
    ann = {
        "images": [{"id": i, "file_name": f"{i}.png"} for i in range(4)],
        "annotations": [
            {"image_id": i, "id": 10 * i + j, "caption": f"picture {i} caption {j}"}
            for i in range(4)
            for j in range(2)
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(ann))
    return tmp_path


def load(root):
    return ds.load_coco_captions(root / "captions.json", root / "imgs")


def test_rerun_embeds_nothing_and_gives_the_same_numbers(coco):
    enc = CountingEncoder()
    first = ev.evaluate_retrieval(enc, load(coco), cache=ec.EmbeddingCache(coco / "c", "m1"))
    assert enc.embedded == {"texts": 8, "images": 4, "instructions": 0}
    cache = ec.EmbeddingCache(coco / "c", "m1")  # a new process: read back from disk
    assert len(cache) == 12
    again = ev.evaluate_retrieval(enc, load(coco), cache=cache)
    assert enc.total() == 12 and again == first
    assert (cache.hits, cache.misses) == (12, 0)
    assert first == ev.evaluate_retrieval(CountingEncoder(), load(coco))  # same as uncached


def test_a_tfds_dataset_reuses_the_embeddings_of_its_files(coco):
    """The evaluation CLI reads images as bytes from a TFDS dataset; their keys are the files'
    keys, so embeddings cached from the files (or another build of the same files) are hits."""
    import unime_jax.datasets as uds

    manual = coco / "manual"  # the layout of coco_captions/mini
    manual.mkdir()
    (manual / "captions_val2017.json").write_text((coco / "captions.json").read_text())
    (manual / "images").symlink_to(coco / "imgs")
    uds.prepare("coco_captions", data_dir=coco / "tfds", config="mini", manual_dir=manual)
    from_tfds = uds.retrieval_set("coco_captions", data_dir=coco / "tfds", config="mini")
    assert from_tfds.image_paths == [(coco / f"imgs/{i}.png").read_bytes() for i in range(4)]
    enc = CountingEncoder()
    first = ev.evaluate_retrieval(enc, load(coco), cache=ec.EmbeddingCache(coco / "c", "m"))
    cache = ec.EmbeddingCache(coco / "c", "m")
    assert ev.evaluate_retrieval(enc, from_tfds, cache=cache) == first
    assert enc.total() == 12 and (cache.hits, cache.misses) == (12, 0)


def test_model_change_invalidates(coco):
    enc = CountingEncoder()
    ev.evaluate_retrieval(enc, load(coco), cache=ec.EmbeddingCache(coco / "c", "m1"))
    ev.evaluate_retrieval(enc, load(coco), cache=ec.EmbeddingCache(coco / "c", "m2"))
    assert enc.total() == 24
    assert sorted(p.name for p in (coco / "c").iterdir()) == ["m1", "m2"]


def test_input_changes_invalidate_only_what_changed(coco):
    enc = CountingEncoder()
    ev.evaluate_retrieval(enc, load(coco), cache=ec.EmbeddingCache(coco / "c", "m"))
    # new pixels in one image, one caption edited, one image renamed (same bytes)
    Image.new("RGB", (8, 6), (1, 2, 3)).save(coco / "imgs/0.png")
    ann = json.loads((coco / "captions.json").read_text())
    ann["annotations"][3]["caption"] = "an edited caption"
    os.rename(coco / "imgs/2.png", coco / "imgs/renamed.png")
    ann["images"][2]["file_name"] = "renamed.png"
    (coco / "captions.json").write_text(json.dumps(ann))
    before = dict(enc.embedded)
    ev.evaluate_retrieval(enc, load(coco), cache=ec.EmbeddingCache(coco / "c", "m"))
    assert enc.embedded["images"] - before["images"] == 1
    assert enc.embedded["texts"] - before["texts"] == 1


def test_instructions_and_duplicates_embedded_once(coco):
    enc = CountingEncoder()
    cached = ec.CachedEncoder(enc, ec.EmbeddingCache(None, "m"), progress=False)
    img = str(coco / "imgs/1.png")
    texts = ["<|image_1|> find it", "a text", "<|image_1|> find it", "a text"]
    images = [img, None, img, None]
    out = cached.embed_instructions(texts, images)
    assert enc.embedded["instructions"] == 2
    np.testing.assert_allclose(out, enc.embed_instructions(texts, images))
    # same text, other kind: a different key
    cached.embed_texts(["a text"])
    assert enc.embedded["texts"] == 1
    # an in-memory PIL image keys by its pixels
    pil = Image.open(img)
    assert ec.image_digest(pil) == ec.image_digest(Image.open(img))
    assert ec.image_digest(pil) != ec.image_digest(Image.new("RGB", pil.size))


class Crashing(CountingEncoder):
    def __init__(self, crash_after):
        super().__init__()
        self.crash_after = crash_after

    def embed_texts(self, texts):
        if self.embedded["texts"] >= self.crash_after:
            raise KeyboardInterrupt
        return super().embed_texts(texts)


def test_interrupted_run_keeps_finished_chunks_and_ignores_debris(coco):
    texts = [f"sentence {i}" for i in range(10)]
    enc = Crashing(crash_after=4)
    cache = ec.EmbeddingCache(coco / "c", "m")
    with pytest.raises(KeyboardInterrupt):
        ec.CachedEncoder(enc, cache, chunk_size=4, progress=False).embed_texts(texts)
    folder = coco / "c" / "m"
    assert len(list(folder.glob("chunk-*.npz"))) == 1
    # debris: a truncated chunk (e.g. copied by hand) and a stale temporary file
    (folder / "chunk-0-broken.npz").write_bytes(b"PK\x03\x04 truncated")
    stale = folder / ".tmp-dead.npz"
    stale.write_bytes(b"partial")
    os.utime(stale, (time.time() - 2 * ec.STALE_TMP_SECONDS,) * 2)
    with pytest.warns(UserWarning, match="ignoring unreadable"):
        cache = ec.EmbeddingCache(coco / "c", "m")
    assert len(cache) == 4 and not stale.exists()
    fresh = CountingEncoder()
    out = ec.CachedEncoder(fresh, cache, chunk_size=4, progress=False).embed_texts(texts)
    assert fresh.embedded["texts"] == 6
    np.testing.assert_allclose(out, CountingEncoder().embed_texts(texts))
    assert not list(folder.glob(".tmp-*"))


def test_read_only_cache_does_not_write(coco):
    cache = ec.EmbeddingCache(coco / "c", "m", writable=False)
    ec.CachedEncoder(CountingEncoder(), cache, progress=False).embed_texts(["x"])
    assert not (coco / "c").exists() and len(cache) == 1


def test_params_fingerprint_is_exact_and_mesh_independent():
    rng = np.random.default_rng(0)
    state = {
        "w": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(8), jnp.bfloat16),
        "step": jnp.arange(3, dtype=jnp.int32),
    }
    fp = ec.params_fingerprint(state)
    mesh = sharding.make_mesh()
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    sharded = dict(state, w=jax.device_put(state["w"], spec))
    assert ec.params_fingerprint(sharded) == fp
    assert ec.params_fingerprint(dict(state, w=state["w"].at[3, 5].add(1e-6))) != fp
    swapped = state["w"].at[0, 0].set(state["w"][0, 1]).at[0, 1].set(state["w"][0, 0])
    assert ec.params_fingerprint(dict(state, w=swapped)) != fp
    assert ec.params_fingerprint(dict(state, b=state["b"].astype(jnp.float32))) != fp


def test_checkpoint_fingerprint_tracks_config_and_weights(tmp_path):
    from safetensors.numpy import save_file

    (tmp_path / "config.json").write_text('{"model_type": "llava_onevision"}')
    save_file({"w": np.zeros((2, 2), np.float32)}, str(tmp_path / "model.safetensors"))
    fp = ec.checkpoint_fingerprint(tmp_path)
    assert ec.checkpoint_fingerprint(tmp_path) == fp
    (tmp_path / "config.json").write_text('{"model_type": "llava_next"}')
    fp2 = ec.checkpoint_fingerprint(tmp_path)
    assert fp2 != fp
    save_file({"w": np.ones((2, 2), np.float32)}, str(tmp_path / "model.safetensors"))
    st = (tmp_path / "model.safetensors").stat()
    os.utime(tmp_path / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert ec.checkpoint_fingerprint(tmp_path) != fp2
