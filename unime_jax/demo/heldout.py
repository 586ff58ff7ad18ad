"""Held-out evaluation on the shapes world: retrieval R@1/R@5 both ways and SugarCrepe-style
accuracy, on scenes whose descriptions never occur in training (read from the ``shapes_world``
dataset's ``retrieval`` and ``compositional`` views)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from unime_jax.demo.world import sets
from unime_jax.embedder import Embedder
from unime_jax.eval.datasets import RetrievalSet, SugarCrepeItem
from unime_jax.eval.metrics import compositional_accuracy, image_text_retrieval, sugarcrepe_summary


def evaluate(
    embedder: Embedder,
    retrieval: RetrievalSet,
    compositional: Mapping[str, Sequence[SugarCrepeItem]],
) -> dict[str, float]:
    """Held-out retrieval R@1 (both directions) and SugarCrepe-style accuracy, in %.

    Queries and candidates use the training instructions of :mod:`unime_jax.demo.world.sets`: an
    image is embedded as an image→text query, a caption as a plain target text; for text→image,
    the caption query and the image target forms.
    """
    images, captions = retrieval.image_paths, retrieval.captions  # images: PNG bytes
    image_for_caption, n = retrieval.image_for_caption, len(retrieval.image_paths)
    image_queries = embedder.embed_instructions([sets.I2T_QUERY] * n, images)
    caption_targets = embedder.embed_instructions(captions)
    caption_queries = embedder.embed_instructions([sets.T2I_QUERY_PREFIX + c for c in captions])
    image_targets = embedder.embed_instructions([sets.IMAGE_TARGET] * n, images)
    i2t = image_text_retrieval(caption_targets, image_queries, image_for_caption, ks=(1, 5))
    t2i = image_text_retrieval(caption_queries, image_targets, image_for_caption, ks=(1, 5))
    out = {k: v for k, v in i2t.items() if k.startswith("i2t")} | {
        k: v for k, v in t2i.items() if k.startswith("t2i")
    }

    accuracy = {}
    for name, items in compositional.items():
        imgs, pos, neg = zip(*items)
        image_emb = embedder.embed_instructions([sets.I2T_QUERY] * len(imgs), list(imgs))
        pos_emb, neg_emb = (
            embedder.embed_instructions(list(pos)),
            embedder.embed_instructions(list(neg)),
        )
        accuracy[name] = compositional_accuracy(image_emb, pos_emb, neg_emb)
    summary = sugarcrepe_summary(accuracy)
    out |= {f"sugarcrepe/{k}": v for k, v in summary.items()}
    out["sugarcrepe/mean"] = float(np.mean(list(accuracy.values())))
    return out
