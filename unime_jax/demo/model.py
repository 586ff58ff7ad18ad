"""The demo model: a tiny LLaVA-OneVision-style model, its tokenizer and image processor, all
built without downloads.

No pretrained base exists offline, so the demo model is randomly initialised (seeded) and
written once as a real HF checkpoint directory (:func:`base_checkpoint`): both stages then load
it through the same loader as a 7B model, and stage 1 can hand stage 2 a merged checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from transformers import LlavaOnevisionImageProcessorPil

from unime_jax.demo import tiny_configs
from unime_jax.demo.tokenizers import build_tokenizer
from unime_jax.export.hf import export_hf
from unime_jax.families import llava
from unime_jax.families.llava_processor import LlavaProcessor

IMAGE_SIZE = 64  # the shapes are rendered at this size; one 64 px tile (+ the base view)
FAMILY = llava.ONEVISION


def demo_hf_config(tokenizer) -> dict:
    """HF-style config of the demo model: SigLIP-like tower (64 px, 16 px patches: 16 tokens a
    tile) + Qwen2-like LLM; one 64×64 pinpoint, so an image is the base view + one tile."""
    return tiny_configs.tiny_llava_config(
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


def build() -> tuple[dict, LlavaProcessor]:
    """The demo model's HF config dict and its host processor (tokenizer + PIL image processor)."""
    tokenizer = build_tokenizer("qwen2")
    hf_config = demo_hf_config(tokenizer)
    image_processor = LlavaOnevisionImageProcessorPil(
        **tiny_configs.image_processor_config(
            "llava_onevision",
            hf_config["vision_config"],
            image_grid_pinpoints=hf_config["image_grid_pinpoints"],
        )
    )
    cfg = FAMILY.parse_config(hf_config)
    return hf_config, FAMILY.processor(cfg, hf_config, tokenizer, image_processor)


def base_checkpoint(directory: str | os.PathLike, *, seed: int = 0) -> Path:
    """The randomly initialised demo model (``nnx.Rngs(seed)``) as an HF checkpoint directory,
    written on first use (atomically) and reused afterwards."""
    directory = Path(directory)
    exists = (directory / "config.json").exists()
    if jax.process_count() > 1:  # all processes take part in the export, or none does
        exists = bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))
    if exists:
        return directory
    hf_config, processor = build()
    module = FAMILY.build(processor.config, rngs=nnx.Rngs(seed), dtype=jnp.float32)
    export_hf(module, directory, hf_config=hf_config, processor=processor)
    return directory
