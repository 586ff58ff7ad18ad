"""Shared by the evaluation tests: hand-built unit vectors, a table-lookup encoder, a hash
encoder at chance level, and a tiny image root."""

import hashlib

import numpy as np
from PIL import Image


def unit(*pairs, dim=8):
    """A unit vector from (axis, weight) pairs."""
    v = np.zeros(dim)
    for axis, w in pairs:
        v[axis] += w
    return v / np.linalg.norm(v)


class FakeEncoder:
    """Looks every input up in fixed tables; records what it was asked to embed."""

    def __init__(self, texts=None, images=None, instructions=None):
        self.texts, self.images, self.instructions = texts or {}, images or {}, instructions or {}
        self.calls = []

    def embed_texts(self, texts):
        self.calls.append(("texts", list(texts)))
        return np.stack([self.texts[t] for t in texts])

    def embed_images(self, images):
        self.calls.append(("images", list(images)))
        return np.stack([self.images[str(i)] for i in images])

    def embed_instructions(self, texts, images=None):
        images = list(images) if images is not None else [None] * len(texts)
        self.calls.append(("instructions", list(zip(texts, images))))
        return np.stack([self.instructions[(t, im)] for t, im in zip(texts, images)])


class HashEncoder:
    """Random unit vectors seeded by a hash of each input: deterministic, near chance."""

    dim = 64

    def _vec(self, key):
        seed = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little")
        v = np.random.default_rng(seed).standard_normal(self.dim)
        return v / np.linalg.norm(v)

    def embed_texts(self, texts):
        return np.stack([self._vec(("t", t)) for t in texts])

    def embed_images(self, images):
        return np.stack([self._vec(("i", str(i))) for i in images])

    def embed_instructions(self, texts, images=None):
        images = images or [None] * len(texts)
        return np.stack([self._vec(("q", t, str(i))) for t, i in zip(texts, images)])


def make_image_root(tmp_path):
    """``tmp_path`` with an image root ``imgs/`` of three tiny images, and a picture outside it."""
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name in ("a.png", "b.png", "sub/c.png"):
        Image.new("RGB", (4, 4), (10, 20, 30)).save(tmp_path / "imgs" / name)
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.png")
    return tmp_path


def oracle_encoder(retrieval, sugarcrepe=None) -> FakeEncoder:
    """Knows the answers: an image and its captions share a one-hot vector; every SugarCrepe
    negative points elsewhere. Retrieval R@k and SugarCrepe accuracy are exactly 100."""
    paths = sorted({str(p) for p in retrieval.image_paths} | {
        str(item[0]) for items in (sugarcrepe or {}).values() for item in items
    })  # fmt: skip
    axis = {p: i for i, p in enumerate(paths)}
    dim = len(paths) + 1  # the last axis: where negatives point

    def onehot(i):
        v = np.zeros(dim)
        v[i] = 1.0
        return v

    images = {p: onehot(axis[p]) for p in paths}
    texts = {c: onehot(axis[str(retrieval.image_paths[i])])
             for c, i in zip(retrieval.captions, retrieval.image_for_caption)}  # fmt: skip
    for items in (sugarcrepe or {}).values():
        for image, caption, negative in items:
            texts.setdefault(caption, onehot(axis[str(image)]))
            texts.setdefault(negative, onehot(dim - 1))  # or the image it truly describes
    return FakeEncoder(texts=texts, images=images)
