"""The offline demo: a tiny LLaVA-OneVision-style model, its tokenizer and image processor, all
built without downloads, and the held-out evaluation on the synthetic shapes world.

No pretrained base exists offline, so the demo model is randomly initialised (seeded) and
written once as a real HF checkpoint directory (:func:`base_checkpoint`): both stages then load
it through the same loader as a 7B model, and stage 1 can hand stage 2 a merged checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import LlavaOnevisionImageProcessorPil

from unime_jax import tiny
from unime_jax.data import shapes
from unime_jax.embedder import Embedder
from unime_jax.eval.metrics import compositional_accuracy, image_text_retrieval, sugarcrepe_summary
from unime_jax.models.config import LlavaConfig
from unime_jax.models.mllm import LlavaModel
from unime_jax.processing import Processor
from unime_jax.weights import export

IMAGE_SIZE = 64  # the shapes are rendered at this size; one 64 px tile (+ the base view)


def demo_hf_config(tokenizer) -> dict:
    """HF-style config of the demo model: SigLIP-like tower (64 px, 16 px patches: 16 tokens a
    tile) + Qwen2-like LLM; one 64×64 pinpoint, so an image is the base view + one tile."""
    return tiny.tiny_llava_config(
        "llava_onevision",
        len(tokenizer),
        tokenizer.image_token_id,
        vision_config={
            "image_size": IMAGE_SIZE,
            "patch_size": 16,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        text_config={
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE]],
    )


def build() -> tuple[LlavaConfig, Processor]:
    """The demo model's config and its host processor (tokenizer + PIL image processor)."""
    tokenizer = tiny.build_tokenizer("qwen2")
    hf_config = demo_hf_config(tokenizer)
    config = LlavaConfig.from_hf(hf_config)
    image_processor = LlavaOnevisionImageProcessorPil(
        **tiny.image_processor_config(
            "llava_onevision",
            hf_config["vision_config"],
            image_grid_pinpoints=hf_config["image_grid_pinpoints"],
        )
    )
    return config, Processor(tokenizer, image_processor, config)


def base_checkpoint(directory: str | os.PathLike, *, seed: int = 0) -> Path:
    """The randomly initialised demo model (``nnx.Rngs(seed)``) as an HF checkpoint directory,
    written on first use (atomically) and reused afterwards."""
    directory = Path(directory)
    if (directory / "config.json").exists():
        return directory
    config, processor = build()
    module = LlavaModel(config, rngs=nnx.Rngs(seed), dtype=jnp.float32)
    hf_config = demo_hf_config(processor.tokenizer)
    export.export_hf(module, directory, hf_config=hf_config, processor=processor)
    return directory


def evaluate(embedder: Embedder, *, seed: int = 1, n: int = 200) -> dict[str, float]:
    """Held-out retrieval R@1 (both directions) and SugarCrepe-style accuracy, in %.

    Queries and candidates use the training instructions of :mod:`unime_jax.data.shapes`: an
    image is embedded as an image→text query, a caption as a plain target text; for text→image,
    the caption query and the image target forms.
    """
    images, captions, image_for_caption = shapes.retrieval_set(seed, n, image_size=IMAGE_SIZE)
    image_queries = embedder.embed_instructions([shapes.I2T_QUERY] * n, images)
    caption_targets = embedder.embed_instructions(captions)
    caption_queries = embedder.embed_instructions([shapes.T2I_QUERY_PREFIX + c for c in captions])
    image_targets = embedder.embed_instructions([shapes.IMAGE_TARGET] * n, images)
    i2t = image_text_retrieval(caption_targets, image_queries, image_for_caption, ks=(1, 5))
    t2i = image_text_retrieval(caption_queries, image_targets, image_for_caption, ks=(1, 5))
    out = {k: v for k, v in i2t.items() if k.startswith("i2t")} | {
        k: v for k, v in t2i.items() if k.startswith("t2i")
    }

    splits = shapes.compositional_set(seed, n, image_size=IMAGE_SIZE)
    accuracy = {}
    for name, items in splits.items():
        imgs, pos, neg = zip(*items)
        image_emb = embedder.embed_instructions([shapes.I2T_QUERY] * len(imgs), list(imgs))
        pos_emb, neg_emb = (
            embedder.embed_instructions(list(pos)),
            embedder.embed_instructions(list(neg)),
        )
        accuracy[name] = compositional_accuracy(image_emb, pos_emb, neg_emb)
    summary = sugarcrepe_summary(accuracy)
    out |= {f"sugarcrepe/{k}": v for k, v in summary.items()}
    out["sugarcrepe/mean"] = float(np.mean(list(accuracy.values())))
    return out
