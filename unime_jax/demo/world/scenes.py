"""Deterministic synthetic compositional image–text data ("shapes world") for the offline demo.

A *scene* holds 1–3 flat-coloured shapes on a white canvas. Its caption names every object
(optional size word, colour, shape) and, for two-object scenes, their spatial relation::

    "a red circle"                                   one object
    "a big green triangle left of a blue square"     two objects, relation from the positions
    "a pink star, a small black cross and a purple diamond"   three objects, listed left to right

Every word used (captions and instructions) is in :data:`unime_jax.demo.tokenizers.DEFAULT_WORDS`, so the
offline word-level tokenizer never emits ``<unk>``.

Semantics (what makes a caption true for a scene, see :func:`is_true`): the caption's objects
must match the scene's objects one-to-one (same count, same size word, colour and shape; an
object without a size word is drawn at a third, medium size, so "a big red circle" is false for
a medium red circle), and a relation "X rel Y" must hold between the matched objects. Relations
are unambiguous by construction: two-object scenes are laid out along one axis, with a
separation much larger than the offset across it.

SugarCrepe-style negatives (:data:`NEGATIVE_TYPES`) minimally edit the true description and are
kept only if the edited description is false for the scene; a type that cannot produce a false
caption for a scene returns ``None``.

Held-out split: a scene belongs to the held-out world iff the CRC32 of its *canonical
description* (order-free: "B right of A" is the same scene as "A left of B") is divisible by
:data:`HELD_OUT_MODULUS` (about 1/5 of all descriptions). Training scenes are drawn only from the
other descriptions, so no held-out caption — nor any rephrasing of it — ever appears in
training, independently of seeds and sizes. Held-out scenes still use only words and
colour–shape pairs that training also sees (it tests new combinations, not new words).

Only the standard library and PIL are used: scenes are drawn with ``random.Random``, whose
``random()`` stream Python keeps reproducible across versions; rendering is exact (no
antialiasing), so every pixel is either the background or one of the scene's colours.
"""

from __future__ import annotations

import itertools
import random
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

# ----------------------------------------------------------------------------------------------
# Vocabulary

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 160, 40),
    "blue": (30, 70, 230),
    "yellow": (245, 210, 0),
    "orange": (255, 130, 0),
    "purple": (140, 40, 190),
    "pink": (255, 105, 180),
    "black": (0, 0, 0),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")

# Size word -> half-extent of the object's bounding box, as a fraction of the canvas side.
# ``None`` (no size word in the caption) is the medium size.
SIZE_RADIUS: dict[str | None, float] = {"small": 0.10, None: 0.15, "big": 0.20}
SIZE_WORDS: tuple[str, ...] = ("small", "big")

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION: dict[str, str] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}

HELD_OUT_MODULUS = 5

_N_OBJECTS_P = (0.25, 0.5, 0.25)  # probabilities of 1, 2, 3 objects per scene
_SIZE_P = (0.5, 0.25, 0.25)  # None (medium), small, big
_MARGIN = 0.03  # minimum distance from an object's box to the canvas edge
_GAP = 0.06  # minimum gap between two object boxes
_MAX_CROSS_OFFSET = 0.05  # two-object scenes: max offset across the layout axis


# ----------------------------------------------------------------------------------------------
# Data structures


@dataclass(frozen=True)
class ObjectDesc:
    """What a caption says about one object: optional size word, colour, shape."""

    colour: str
    shape: str
    size: str | None = None

    def phrase(self) -> str:
        """Noun phrase with its article, e.g. "a big red circle", "an orange star"."""
        words = [w for w in (self.size, self.colour, self.shape) if w is not None]
        article = "an" if words[0][0] in "aeiou" else "a"
        return " ".join([article, *words])


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: its description plus the centre (x right, y down) in [0, 1]."""

    desc: ObjectDesc
    x: float
    y: float

    @property
    def radius(self) -> float:
        """Half-extent of the object's bounding box (fraction of the canvas side)."""
        return SIZE_RADIUS[self.desc.size]


@dataclass(frozen=True)
class Description:
    """A caption in structured form. ``relation`` (if any) holds from objects[0] to objects[1];
    further objects are listed after it ("... and a green star")."""

    objects: tuple[ObjectDesc, ...]
    relation: str | None = None

    def text(self) -> str:
        """Render the caption string (lowercase, no final full stop)."""
        phrases = [o.phrase() for o in self.objects]
        if self.relation is not None:
            head, rest = f"{phrases[0]} {self.relation} {phrases[1]}", phrases[2:]
        else:
            head, rest = phrases[0], phrases[1:]
        if not rest:
            return head
        if len(rest) == 1:
            return f"{head} and {rest[0]}"
        return f"{head}, {', '.join(rest[:-1])} and {rest[-1]}"


@dataclass(frozen=True)
class Scene:
    """1–3 objects in caption order (two objects: subject first; three: left to right)."""

    objects: tuple[SceneObject, ...]

    @property
    def relation(self) -> str | None:
        """Relation from objects[0] to objects[1] for two-object scenes, else None."""
        if len(self.objects) != 2:
            return None
        return relation_of(self.objects[0], self.objects[1])

    def describe(self) -> Description:
        """The scene's true description (the one :func:`caption` renders)."""
        return Description(tuple(o.desc for o in self.objects), self.relation)


def relation_of(a: SceneObject, b: SceneObject) -> str:
    """Spatial relation of ``a`` with respect to ``b`` along the dominant axis."""
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


# ----------------------------------------------------------------------------------------------
# Captions, parsing, truth


def caption(scene: Scene) -> str:
    """The scene's caption, e.g. "a red circle left of a big blue square"."""
    return scene.describe().text()


def equivalent_captions(scene: Scene) -> set[str]:
    """Every caption the grammar can produce that is true for ``scene`` (all object orders;
    "A left of B" and "B right of A")."""
    objs = scene.objects
    if len(objs) == 2:
        a, b = objs
        return {
            Description((a.desc, b.desc), relation_of(a, b)).text(),
            Description((b.desc, a.desc), relation_of(b, a)).text(),
        }
    return {Description(tuple(o.desc for o in p)).text() for p in itertools.permutations(objs)}


def canonical_key(scene: Scene) -> str:
    """Order-free identity of what the scene shows (used for the held-out split and dedup)."""
    objs = scene.objects
    if len(objs) == 2:
        a, b = objs
        if relation_of(a, b) in ("right of", "below"):
            a, b = b, a
        return f"{a.desc.phrase()} {relation_of(a, b)} {b.desc.phrase()}"
    return " & ".join(sorted(o.desc.phrase() for o in objs))


def is_held_out(scene: Scene) -> bool:
    """Whether the scene belongs to the held-out world (see module docstring)."""
    return zlib.crc32(canonical_key(scene).encode()) % HELD_OUT_MODULUS == 0


_REL_RE = re.compile(r" (left of|right of|above|below) ")
_PHRASE_SPLIT_RE = re.compile(r", | and ")


def _parse_phrase(phrase: str) -> ObjectDesc:
    words = phrase.split()
    if len(words) not in (3, 4) or words[0] not in ("a", "an"):
        raise ValueError(f"not an object phrase: {phrase!r}")
    size = words[1] if len(words) == 4 else None
    colour, shape = words[-2], words[-1]
    if size not in (None, *SIZE_WORDS) or colour not in COLOURS or shape not in SHAPES:
        raise ValueError(f"not an object phrase: {phrase!r}")
    return ObjectDesc(colour, shape, size)


def parse_caption(text: str) -> Description:
    """Inverse of :meth:`Description.text` (raises ValueError on text outside the grammar)."""
    chunks = _PHRASE_SPLIT_RE.split(text)
    relation = None
    match = _REL_RE.search(chunks[0])
    if match:
        relation = match.group(1)
        chunks = [chunks[0][: match.start()], chunks[0][match.end() :], *chunks[1:]]
    desc = Description(tuple(_parse_phrase(c) for c in chunks), relation)
    if desc.text() != text:
        raise ValueError(f"caption outside the grammar: {text!r}")
    return desc


def is_true(desc: Description, scene: Scene) -> bool:
    """Whether ``desc`` is a true caption of ``scene``: its objects match the scene's one-to-one
    and its relation (if any) holds between the matched objects."""
    objs = scene.objects
    if len(desc.objects) != len(objs):
        return False
    for perm in itertools.permutations(objs):
        if any(d != o.desc for d, o in zip(desc.objects, perm)):
            continue
        if desc.relation is None or relation_of(perm[0], perm[1]) == desc.relation:
            return True
    return False


# ----------------------------------------------------------------------------------------------
# Scene sampling


def _free_coord(rng: random.Random, r: float) -> float:
    return rng.uniform(r + _MARGIN, 1.0 - r - _MARGIN)


def _pick(rng: random.Random, probs: Sequence[float]) -> int:
    """Index drawn with the given probabilities (from ``rng.random()`` only, which Python
    guarantees reproducible across versions, unlike ``choices``/``sample``)."""
    u, acc = rng.random(), 0.0
    for i, p in enumerate(probs):
        acc += p
        if u < acc:
            return i
    return len(probs) - 1


def random_scene(rng: random.Random) -> Scene:
    """Draw one scene: 1–3 objects with distinct colour–shape pairs, no overlaps."""
    n = _pick(rng, _N_OBJECTS_P) + 1
    colours = list(COLOURS)
    sizes: list[str | None] = [None, "small", "big"]
    descs: list[ObjectDesc] = []
    while len(descs) < n:
        d = ObjectDesc(
            colours[int(rng.random() * len(colours))],
            SHAPES[int(rng.random() * len(SHAPES))],
            sizes[_pick(rng, _SIZE_P)],
        )
        if all((d.colour, d.shape) != (e.colour, e.shape) for e in descs):
            descs.append(d)
    if n == 1:
        r = SIZE_RADIUS[descs[0].size]
        return Scene((SceneObject(descs[0], _free_coord(rng, r), _free_coord(rng, r)),))
    if n == 2:
        r1, r2 = SIZE_RADIUS[descs[0].size], SIZE_RADIUS[descs[1].size]
        # Along the layout axis: [margin | slack0 | box1 | gap + slack1 | box2 | slack2 | margin].
        slack = 1.0 - 2 * _MARGIN - 2 * r1 - 2 * r2 - _GAP
        u, v = sorted((rng.uniform(0.0, slack), rng.uniform(0.0, slack)))
        a1 = _MARGIN + u + r1
        a2 = a1 + r1 + _GAP + (v - u) + r2
        # Across it: a shared line plus a small jitter each, kept inside the canvas.
        half = _MAX_CROSS_OFFSET / 2
        base = _free_coord(rng, max(r1, r2) + half)
        c1, c2 = base + rng.uniform(-half, half), base + rng.uniform(-half, half)
        if rng.random() < 0.5:  # horizontal layout
            o1, o2 = SceneObject(descs[0], a1, c1), SceneObject(descs[1], a2, c2)
        else:
            o1, o2 = SceneObject(descs[0], c1, a1), SceneObject(descs[1], c2, a2)
        # Subject first; which object is the subject is random so all four relations occur.
        return Scene((o1, o2) if rng.random() < 0.5 else (o2, o1))
    # Three objects, an "L" layout (always fits, even three big ones): one object in a column
    # (or row) of its own, the other two stacked in the neighbouring column, random slack.
    i = int(rng.random() * 3)  # the object on its own (no shuffle(): not version-stable)
    descs = [descs[i], *descs[:i], *descs[i + 1 :]]
    ra, rb, rc = (SIZE_RADIUS[d.size] for d in descs)
    rbc = max(rb, rc)
    u, v = sorted((rng.uniform(0.0, 1.0), rng.uniform(0.0, 1.0)))
    slack_u = 1.0 - 2 * _MARGIN - 2 * ra - 2 * rbc - _GAP
    ua = _MARGIN + u * slack_u + ra
    col_b = ua + ra + _GAP + (v - u) * slack_u  # left edge of the stacked column
    ub = col_b + rb + rng.uniform(0.0, 2 * (rbc - rb))
    uc = col_b + rc + rng.uniform(0.0, 2 * (rbc - rc))
    slack_v = 1.0 - 2 * _MARGIN - 2 * rb - 2 * rc - _GAP
    t0, t1 = sorted((rng.uniform(0.0, slack_v), rng.uniform(0.0, slack_v)))
    vb = _MARGIN + t0 + rb
    vc = vb + rb + _GAP + (t1 - t0) + rc
    va = _free_coord(rng, ra)
    uvs = [(ua, va), (ub, vb), (uc, vc)]
    if rng.random() < 0.5:  # single object on the other side
        uvs = [(1.0 - uu, vv) for uu, vv in uvs]
    if rng.random() < 0.5:  # rows instead of columns
        uvs = [(vv, uu) for uu, vv in uvs]
    objs = [SceneObject(d, x, y) for d, (x, y) in zip(descs, uvs)]
    return Scene(tuple(sorted(objs, key=lambda o: (o.x, o.y))))


def make_split(seed: int, n: int, *, held_out: bool, unique: bool = False) -> list[Scene]:
    """``n`` deterministic scenes of the training (``held_out=False``) or held-out world.

    The two worlds never share a canonical description (hence never a caption), see
    :func:`is_held_out`. ``unique=True`` also makes every scene's canonical description distinct
    within the list (needed for retrieval, where two images must not share a caption). The same
    ``(seed, held_out)`` gives the same stream: the first ``k`` scenes of ``make_split(s, n)`` are
    those of ``make_split(s, k)``.
    """
    rng = random.Random(f"shapes|{int(seed)}|{int(held_out)}")
    scenes: list[Scene] = []
    seen: set[str] = set()
    attempts = 0
    while len(scenes) < n:
        attempts += 1
        if attempts > 1000 + 200 * n:
            raise RuntimeError(f"could not draw {n} distinct scenes (unique={unique})")
        scene = random_scene(rng)
        if is_held_out(scene) != held_out:
            continue
        if unique:
            key = canonical_key(scene)
            if key in seen:
                continue
            seen.add(key)
        scenes.append(scene)
    return scenes
