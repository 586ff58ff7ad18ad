"""Qwen2-VL / Qwen2.5-VL on device: vision tower + merger -> features at the image tokens -> Qwen2
decoder with M-RoPE.

The decoder is :class:`~unime_jax.models.llm.DecoderLM`; its (B, T, 3) M-RoPE positions come
from the host (the family's processor numbers them, in transformers 5.x's or the older way), so
nothing here depends on how they were counted. Each merge-window unit of a group's pool gives one
feature row (:mod:`unime_jax.models.qwen_vision`); the host's gather map puts row i of an image
at its i-th ``<|image_pad|>`` token. A batch without images never runs the tower.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from unime_jax.models.config import TextConfig
from unime_jax.models.llm import DecoderLM
from unime_jax.models.multimodal import MultimodalModel
from unime_jax.models.qwen_vision import QwenVisionConfig, QwenVisionTower


@dataclasses.dataclass(frozen=True)
class QwenVLConfig:
    family: str  # "qwen2_vl" or "qwen2_5_vl"
    text: TextConfig
    vision: QwenVisionConfig | None  # None: text-only (stage 1 builds only the LLM)
    image_token_id: int
    vision_start_token_id: int

    def text_only(self) -> QwenVLConfig:
        return dataclasses.replace(self, vision=None)


class QwenVLModel(MultimodalModel):
    def __init__(
        self,
        cfg: QwenVLConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jax.numpy.float32,
        remat: str = "none",
        attention: str = "xla",
    ):
        self.cfg = cfg
        self.llm = DecoderLM(cfg.text, rngs=rngs, dtype=dtype, remat=remat, attention=attention)
        self.vision = None  # text-only (stage 1): no vision tower in memory
        if cfg.vision is not None:
            self.vision = nnx.data(
                QwenVisionTower(
                    cfg.vision, rngs=rngs, dtype=dtype, remat=remat, attention=attention
                )
            )

    def image_features(self, images: dict, key: jax.Array | None = None) -> jax.Array:
        """The groups' merge windows -> (G, U, D): the tower with its PatchMerger."""
        return self.vision(images, key)
