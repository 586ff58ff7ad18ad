"""The views of the shapes world that training and evaluation consume: MMEB-style stage-2 rows,
stage-1 NLI rows, held-out retrieval and SugarCrepe-style sets."""

from __future__ import annotations

import random
from typing import Any

from PIL import Image

from unime_jax.demo.world.negatives import NEGATIVE_TYPES, negative
from unime_jax.demo.world.render import render
from unime_jax.demo.world.scenes import caption, equivalent_captions, make_split
from unime_jax.preprocess.text import IMAGE_PLACEHOLDER

# MMEB-style instructions. Unlike VLM2Vec's "Represent the given image with a caption." /
# "Find an image that matches the caption:", only words of DEFAULT_WORDS are used ("given",
# "caption", "find" and "matches" are not in it). ``<|image_1|>`` is swapped for the model's
# image token before tokenization.
I2T_QUERY = f"{IMAGE_PLACEHOLDER} Represent this image with a sentence."
T2I_QUERY_PREFIX = "Represent the image for this sentence: "
IMAGE_TARGET = f"{IMAGE_PLACEHOLDER} Represent this image."


# ----------------------------------------------------------------------------------------------
# Views consumed by the trainer and the evaluator


def training_rows(seed: int, n: int, *, image_size: int = 64) -> list[dict[str, Any]]:
    """``n`` stage-2 rows (MMEB-train format, PIL images in place of paths) from training scenes.

    Even rows are image→text (``qry`` holds the image placeholder, ``pos_text`` the caption);
    odd rows are text→image (``qry`` holds the caption, ``pos_image`` the picture).
    """
    rows: list[dict[str, Any]] = []
    for i, scene in enumerate(make_split(seed, n, held_out=False)):
        image, text = render(scene, image_size), caption(scene)
        if i % 2 == 0:
            rows.append({"qry": I2T_QUERY, "qry_image": image, "pos_text": text, "pos_image": None})
        else:
            rows.append(
                {
                    "qry": T2I_QUERY_PREFIX + text,
                    "qry_image": None,
                    "pos_text": IMAGE_TARGET,
                    "pos_image": image,
                }
            )
    return rows


def training_sentences(seed: int, n: int) -> list[str]:
    """Captions of the first ``n`` training scenes (the same scenes as ``training_rows``)."""
    return [caption(s) for s in make_split(seed, n, held_out=False)]


def nli_rows(seed: int, n: int, *, held_out: bool = False) -> list[dict[str, str]]:
    """``n`` stage-1 rows in the SimCSE NLI layout (``sent0, sent1, hard_neg``) from the demo
    world: a caption, another true wording of the same scene (the caption itself when the
    grammar has only one), and a one-edit false caption of a random SugarCrepe type."""
    rng = random.Random(f"nli|{int(seed)}|{held_out}")
    rows = []
    for scene in make_split(seed, n, held_out=held_out, unique=held_out):
        text = caption(scene)
        wordings = sorted(equivalent_captions(scene) - {text}) or [text]
        kinds = list(NEGATIVE_TYPES)
        rng.shuffle(kinds)
        hard = next(filter(None, (negative(scene, k, rng) for k in kinds)), "")
        rows.append({"sent0": text, "sent1": rng.choice(wordings), "hard_neg": hard})
    return rows


def retrieval_set(
    seed: int, n: int, *, image_size: int = 64
) -> tuple[list[Image.Image], list[str], list[int]]:
    """Held-out retrieval: ``n`` images with one caption each (all scenes distinct).

    Returns ``(images, captions, image_for_caption)`` with ``image_for_caption[k]`` the index of
    the image that caption ``k`` describes (here simply ``k``).
    """
    scenes = make_split(seed, n, held_out=True, unique=True)
    return [render(s, image_size) for s in scenes], [caption(s) for s in scenes], list(range(n))


def compositional_set(
    seed: int, n: int, *, image_size: int = 64
) -> dict[str, list[tuple[Image.Image, str, str]]]:
    """Held-out SugarCrepe-style splits from ``n`` held-out scenes (the scenes of
    ``retrieval_set(seed, n)``): for each scene and each type in :data:`NEGATIVE_TYPES` that
    applies, one ``(image, caption, negative_caption)``. Split sizes therefore differ (relation
    and swap splits need several objects)."""
    rng = random.Random(f"negatives|{int(seed)}")
    out: dict[str, list[tuple[Image.Image, str, str]]] = {k: [] for k in NEGATIVE_TYPES}
    for scene in make_split(seed, n, held_out=True, unique=True):
        image, text = render(scene, image_size), caption(scene)
        for kind in NEGATIVE_TYPES:
            neg = negative(scene, kind, rng)
            if neg is not None:
                out[kind].append((image, text, neg))
    return out
