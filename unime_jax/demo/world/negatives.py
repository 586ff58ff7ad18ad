"""SugarCrepe-style negatives: minimal edits of a scene's true description that are false for it
(replace / swap / add an object, attribute or relation); a type that cannot produce a false
caption for a scene gives ``None``."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

from unime_jax.demo.world.scenes import (
    COLOURS,
    RELATIONS,
    SHAPES,
    SIZE_WORDS,
    Description,
    ObjectDesc,
    Scene,
    caption,
    is_true,
)
from unime_jax.eval.metrics import SUGARCREPE_SPLITS

# The SugarCrepe split names double as the negative types (one source of truth).
NEGATIVE_TYPES: tuple[str, ...] = SUGARCREPE_SPLITS


# ----------------------------------------------------------------------------------------------
# Negatives


def _rng_for(scene: Scene, kind: str) -> random.Random:
    return random.Random(f"{kind}|{caption(scene)}")


def _candidates(scene: Scene, kind: str) -> list[Description]:
    """All minimal edits of the true description of type ``kind`` (not yet checked for falsity)."""
    true = scene.describe()
    objs, rel = list(true.objects), true.relation
    out: list[Description] = []

    def with_objects(new: list[ObjectDesc]) -> Description:
        return Description(tuple(new), rel)

    if kind == "replace_att":
        present = {o.colour for o in objs}
        for i, o in enumerate(objs):
            for c in COLOURS:
                if c not in present:
                    out.append(
                        with_objects([*objs[:i], ObjectDesc(c, o.shape, o.size), *objs[i + 1 :]])
                    )
    elif kind == "replace_obj":
        present = {o.shape for o in objs}
        for i, o in enumerate(objs):
            for s in SHAPES:
                if s not in present:
                    out.append(
                        with_objects([*objs[:i], ObjectDesc(o.colour, s, o.size), *objs[i + 1 :]])
                    )
    elif kind == "replace_rel":
        if rel is not None:
            out.extend(Description(true.objects, r) for r in RELATIONS if r != rel)
    elif kind in ("swap_att", "swap_obj"):
        for i, j in itertools.combinations(range(len(objs)), 2):
            a, b = objs[i], objs[j]
            new = list(objs)
            if kind == "swap_att" and a.colour != b.colour:
                new[i], new[j] = (
                    ObjectDesc(b.colour, a.shape, a.size),
                    ObjectDesc(a.colour, b.shape, b.size),
                )
            elif kind == "swap_obj" and a.shape != b.shape:
                new[i], new[j] = (
                    ObjectDesc(a.colour, b.shape, a.size),
                    ObjectDesc(b.colour, a.shape, b.size),
                )
            else:
                continue
            out.append(with_objects(new))
    elif kind == "add_obj":
        present = {(o.colour, o.shape) for o in objs}
        for c, s in itertools.product(COLOURS, SHAPES):
            if (c, s) not in present:
                out.append(with_objects([*objs, ObjectDesc(c, s)]))
    elif kind == "add_att":
        for i, o in enumerate(objs):
            if o.size is None:
                for w in SIZE_WORDS:
                    out.append(
                        with_objects([*objs[:i], ObjectDesc(o.colour, o.shape, w), *objs[i + 1 :]])
                    )
    else:
        raise ValueError(f"unknown negative type {kind!r}; expected one of {NEGATIVE_TYPES}")
    return out


def negative_description(
    scene: Scene, kind: str, rng: random.Random | None = None
) -> Description | None:
    """A minimal edit of type ``kind`` of the scene's description that is false for the scene,
    chosen with ``rng`` (default: a generator seeded from the caption and ``kind``), or None."""
    candidates = _candidates(scene, kind)
    if not candidates:
        return None
    rng = _rng_for(scene, kind) if rng is None else rng
    while candidates:  # uniform over the false candidates, testing lazily
        desc = candidates.pop(int(rng.random() * len(candidates)))
        if not is_true(desc, scene):
            return desc
    return None


def negative(scene: Scene, kind: str, rng: random.Random | None = None) -> str | None:
    """The negative caption of type ``kind`` (one of :data:`NEGATIVE_TYPES`), or None."""
    desc = negative_description(scene, kind, rng)
    return None if desc is None else desc.text()


def _negative_fn(kind: str) -> Callable[..., str | None]:
    def fn(scene: Scene, rng: random.Random | None = None) -> str | None:
        return negative(scene, kind, rng)

    fn.__name__ = kind
    fn.__doc__ = f"SugarCrepe-style ``{kind}`` negative caption for ``scene``, or None."
    return fn


replace_obj = _negative_fn("replace_obj")
replace_att = _negative_fn("replace_att")
replace_rel = _negative_fn("replace_rel")
swap_obj = _negative_fn("swap_obj")
swap_att = _negative_fn("swap_att")
add_obj = _negative_fn("add_obj")
add_att = _negative_fn("add_att")
