"""Tests of the synthetic shapes world (unime_jax.demo.world)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from PIL import Image

from unime_jax.demo.tokenizers import DEFAULT_WORDS, build_tokenizer
from unime_jax.demo.world import negatives as N
from unime_jax.demo.world import render as R
from unime_jax.demo.world import scenes as S
from unime_jax.demo.world import sets as V


@functools.cache
def _held_out_scenes() -> list[S.Scene]:
    return S.make_split(0, 400, held_out=True, unique=True)


@functools.cache
def _train_scenes() -> list[S.Scene]:
    return S.make_split(0, 1500, held_out=False)


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.uint8)


def test_determinism():
    a, b = S.make_split(7, 300, held_out=False), S.make_split(7, 300, held_out=False)
    assert [S.caption(s) for s in a] == [S.caption(s) for s in b]
    assert all(np.array_equal(_pixels(R.render(x)), _pixels(R.render(y))) for x, y in zip(a, b))
    # A prefix of a longer split is the shorter split.
    assert S.make_split(7, 50, held_out=False) == a[:50]
    # Another seed gives other scenes.
    assert [S.caption(s) for s in S.make_split(8, 300, held_out=False)] != [S.caption(s) for s in a]

    r1, r2 = V.training_rows(3, 12), V.training_rows(3, 12)
    for x, y in zip(r1, r2):
        assert {k: v for k, v in x.items() if "image" not in k} == {
            k: v for k, v in y.items() if "image" not in k
        }
        for key in ("qry_image", "pos_image"):
            assert (x[key] is None) == (y[key] is None)
            if x[key] is not None:
                assert x[key].tobytes() == y[key].tobytes()

    c1, c2 = V.compositional_set(5, 60), V.compositional_set(5, 60)
    for kind in N.NEGATIVE_TYPES:
        assert [t[1:] for t in c1[kind]] == [t[1:] for t in c2[kind]]
        assert [t[0].tobytes() for t in c1[kind]] == [t[0].tobytes() for t in c2[kind]]
    # The default negative choice depends only on the scene.
    s = _held_out_scenes()[0]
    assert N.negative(s, "replace_att") == N.negative(s, "replace_att")


@pytest.mark.parametrize("style", ["qwen2", "mistral"])
def test_no_unknown_tokens(style):
    tok = build_tokenizer(style)
    texts = set(V.training_sentences(0, 1500))
    texts |= set(V.retrieval_set(1, 100)[1])
    for triples in V.compositional_set(0, 200).values():
        texts |= {t for _, cap, neg in triples for t in (cap, neg)}
    for row in V.training_rows(0, 40):
        texts |= {row["qry"].replace(V.IMAGE_PLACEHOLDER, tok.image_token)}
        texts |= {row["pos_text"].replace(V.IMAGE_PLACEHOLDER, tok.image_token)}
    vocab_words = {*S.COLOURS, *S.SHAPES, *S.SIZE_WORDS, *" ".join(S.RELATIONS).split()}
    assert vocab_words <= set(DEFAULT_WORDS)
    for text in sorted(texts):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, text


def test_captions_parse_and_equivalents():
    for scene in _train_scenes()[:500]:
        cap = S.caption(scene)
        assert cap == cap.lower()
        assert S.parse_caption(cap) == scene.describe()
        assert S.is_true(scene.describe(), scene)
        for alt in S.equivalent_captions(scene):  # every rephrasing is true as well
            assert S.is_true(S.parse_caption(alt), scene)
        n = len(scene.objects)
        assert len(S.equivalent_captions(scene)) == {1: 1, 2: 2, 3: 6}[n]
        assert (scene.relation is not None) == (n == 2)
    with pytest.raises(ValueError):
        S.parse_caption("a red dog")


def _changed(a: tuple[S.ObjectDesc, ...], b: tuple[S.ObjectDesc, ...]) -> list[int]:
    return [i for i, (x, y) in enumerate(zip(a, b)) if x != y]


@pytest.mark.parametrize("kind", N.NEGATIVE_TYPES)
def test_negatives_are_minimal_and_false(kind):
    n_made = 0
    for scene in _held_out_scenes():
        true, cap = scene.describe(), S.caption(scene)
        neg = N.negative(scene, kind)
        objs = true.objects
        colours_differ = any(a.colour != b.colour for a in objs for b in objs)
        shapes_differ = any(a.shape != b.shape for a in objs for b in objs)
        applicable = {
            "replace_obj": True,
            "replace_att": True,
            "replace_rel": len(objs) == 2,
            "swap_obj": shapes_differ,
            "swap_att": colours_differ,
            "add_obj": True,
            "add_att": any(o.size is None for o in objs),
        }[kind]
        if kind in ("swap_obj", "swap_att") and len(objs) == 3 and applicable:
            applicable = neg is not None  # a 3-object swap can be a no-op for every pair
        assert (neg is not None) == applicable, (kind, cap, neg)
        if neg is None:
            continue
        n_made += 1
        d = S.parse_caption(neg)
        # False for the scene, under every ordering / phrasing of its true caption.
        assert neg != cap
        assert neg not in S.equivalent_captions(scene)
        assert not S.is_true(d, scene)
        # The mutated scene (same positions, edited objects) gets the negative as its caption.
        if kind != "add_obj":
            mutated = S.Scene(
                tuple(S.SceneObject(o, so.x, so.y) for o, so in zip(d.objects, scene.objects))
            )
            if kind != "replace_rel":
                assert S.caption(mutated) == neg
                assert S.caption(mutated) not in S.equivalent_captions(scene)
        # Minimal edit.
        new = d.objects
        if kind == "add_obj":
            assert new[: len(objs)] == objs and len(new) == len(objs) + 1
            assert (new[-1].colour, new[-1].shape) not in {(o.colour, o.shape) for o in objs}
            assert d.relation == true.relation
            continue
        assert len(new) == len(objs)
        changed = _changed(objs, new)
        if kind == "replace_rel":
            assert not changed and d.relation not in (None, true.relation)
            continue
        assert d.relation == true.relation
        if kind == "replace_att":
            (i,) = changed
            assert new[i].colour not in {o.colour for o in objs}
            assert (new[i].shape, new[i].size) == (objs[i].shape, objs[i].size)
        elif kind == "replace_obj":
            (i,) = changed
            assert new[i].shape not in {o.shape for o in objs}
            assert (new[i].colour, new[i].size) == (objs[i].colour, objs[i].size)
        elif kind == "add_att":
            (i,) = changed
            assert objs[i].size is None and new[i].size in S.SIZE_WORDS
        else:
            i, j = changed
            field = "colour" if kind == "swap_att" else "shape"
            other = "shape" if kind == "swap_att" else "colour"
            assert getattr(new[i], field) == getattr(objs[j], field)
            assert getattr(new[j], field) == getattr(objs[i], field)
            for k in (i, j):
                assert getattr(new[k], other) == getattr(objs[k], other)
                assert new[k].size == objs[k].size
    assert n_made > 50


def test_held_out_disjoint_from_training():
    train_text = set(V.training_sentences(0, 3000))
    for row in V.training_rows(1, 1000):
        if row["qry_image"] is not None:
            train_text.add(row["pos_text"])
        else:
            train_text.add(row["qry"].removeprefix(V.T2I_QUERY_PREFIX))
    held: set[str] = set()
    for scene in S.make_split(0, 300, held_out=True) + S.make_split(1, 300, held_out=True):
        assert S.is_held_out(scene)
        held |= S.equivalent_captions(scene)
    held |= set(V.retrieval_set(2, 200)[1])
    held |= {cap for triples in V.compositional_set(3, 100).values() for _, cap, _ in triples}
    assert held and not (held & train_text)
    assert not any(S.is_held_out(s) for s in _train_scenes())


def test_render_pixels():
    size = 64
    areas: dict[tuple[str, str | None], list[int]] = {}
    for scene in _train_scenes()[:600]:
        img = R.render(scene, size)
        assert img.size == (size, size) and img.mode == "RGB"
        px = _pixels(img).reshape(-1, 3).astype(np.int64)
        codes, counts = np.unique(px[:, 0] << 16 | px[:, 1] << 8 | px[:, 2], return_counts=True)
        present = {(c >> 16, (c >> 8) & 255, c & 255): n for c, n in zip(codes.tolist(), counts)}
        expected = {S.COLOURS[o.desc.colour] for o in scene.objects}
        # Exactly the background and the scene's colours, each with a solid patch.
        assert set(present) == expected | {S.BACKGROUND}
        assert all(present[c] >= 30 for c in expected)
        assert all(o.x * size >= 1 and o.y * size >= 1 for o in scene.objects)
        if len(scene.objects) == 1:
            o = scene.objects[0].desc
            areas.setdefault((o.shape, o.size), []).append(present[S.COLOURS[o.colour]])
        # The relation agrees with where the colours actually are.
        if len(scene.objects) == 2 and len(expected) == 2:
            a, b = scene.objects
            pix = _pixels(img)

            def centroid(colour: str, pix: np.ndarray = pix) -> np.ndarray:
                ys, xs = np.nonzero((pix == S.COLOURS[colour]).all(-1))
                return np.array([xs.mean(), ys.mean()])

            dx, dy = centroid(b.desc.colour) - centroid(a.desc.colour)
            observed = (
                ("left of" if dx > 0 else "right of")
                if abs(dx) > abs(dy)
                else ("above" if dy > 0 else "below")
            )
            assert observed == scene.relation
            assert max(abs(dx), abs(dy)) > 3 * min(abs(dx), abs(dy))
    # Size words are visible: per shape, small < medium < big pixel areas, without overlap.
    for shape in S.SHAPES:
        small, medium, big = (areas.get((shape, w), []) for w in ("small", None, "big"))
        if small and medium:
            assert max(small) < min(medium)
        if medium and big:
            assert max(medium) < min(big)


def test_views_format():
    rows = V.training_rows(0, 20)
    assert len(rows) == 20
    caps = V.training_sentences(0, 20)
    for i, (row, cap) in enumerate(zip(rows, caps)):
        assert set(row) == {"qry", "qry_image", "pos_text", "pos_image"}
        if i % 2 == 0:
            assert row["qry"] == V.I2T_QUERY and row["pos_text"] == cap
            assert isinstance(row["qry_image"], Image.Image) and row["pos_image"] is None
        else:
            assert row["qry"] == V.T2I_QUERY_PREFIX + cap and row["pos_text"] == V.IMAGE_TARGET
            assert isinstance(row["pos_image"], Image.Image) and row["qry_image"] is None

    images, captions, image_for_caption = V.retrieval_set(0, 150)
    assert len(images) == len(captions) == len(image_for_caption) == 150
    assert image_for_caption == list(range(150))
    scenes = S.make_split(0, 150, held_out=True, unique=True)
    assert len({S.canonical_key(s) for s in scenes}) == 150
    assert captions == [S.caption(s) for s in scenes]

    comp = V.compositional_set(0, 200)
    assert tuple(comp) == N.NEGATIVE_TYPES
    for kind, triples in comp.items():
        assert triples, kind
        for img, cap, neg in triples:
            assert isinstance(img, Image.Image) and img.size == (64, 64)
            assert cap != neg
    # Splits come from the scenes of retrieval_set(seed, n).
    assert {c for _, c, _ in comp["replace_att"]} == set(V.retrieval_set(0, 200)[1])
