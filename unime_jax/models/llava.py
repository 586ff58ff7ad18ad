"""LLaVA-NeXT / LLaVA-OneVision on device: vision tower -> projector -> AnyRes placement -> LLM.

The image units are tiles: ``images["pixels"]`` (G, U, C, H, W) (uint8 with ``pixel_lut``, or
normalised floats). The tower and projector turn a group's U tiles into U·P feature rows, then
``image_newline`` is appended as the group's last row; the host's gather map (see
:mod:`unime_jax.preprocess.anyres`) places them, unpadded, downsampled and with newlines, at the
image tokens. A batch without images never runs the tower.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from unime_jax.models.config import ConfigError, TextConfig, VisionConfig
from unime_jax.models.layers import Linear, activation, param, subkey
from unime_jax.models.llm import DecoderLM
from unime_jax.models.multimodal import MultimodalModel
from unime_jax.models.pixels import normalise
from unime_jax.models.vision import VisionTower
from unime_jax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    family: str  # "llava_onevision" or "llava_next"
    text: TextConfig
    vision: VisionConfig | None  # None: text-only (stage 1 builds only the LLM)
    image_token_id: int
    feature_layer: int = -1
    select_strategy: str = "full"  # "default" drops the class token
    projector_act: str = "gelu"
    projector_bias: bool = True

    @property
    def vision_layers_used(self) -> int:
        """How many vision layers reach the selected features (hidden_states[feature_layer])."""
        n = self.vision.num_layers
        used = n + 1 + self.feature_layer if self.feature_layer < 0 else self.feature_layer
        if not 0 < used <= n:
            raise ConfigError(
                f"vision_feature_layer {self.feature_layer} is out of range for {n} layers"
            )
        return used

    @property
    def features_per_tile(self) -> int:
        return self.vision.num_patches

    def text_only(self) -> LlavaConfig:
        return dataclasses.replace(self, vision=None)


class Projector(nnx.Module):
    """LLaVA's multimodal projector: linear -> activation -> linear."""

    def __init__(
        self, d_vision: int, d_text: int, act: str, bias: bool, *, rngs, dtype=jnp.float32
    ):
        self.linear_1 = Linear(
            d_vision, d_text, ("vision_embed", "embed"), bias=bias, rngs=rngs, dtype=dtype
        )
        self.linear_2 = Linear(d_text, d_text, ("mlp", "embed"), bias=bias, rngs=rngs, dtype=dtype)
        self.act = activation(act)

    def __call__(self, x, key=None):
        return self.linear_2(self.act(self.linear_1(x, subkey(key, 0))), subkey(key, 1))


class LlavaModel(MultimodalModel):
    def __init__(
        self,
        cfg: LlavaConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        remat: str = "none",
        attention: str = "xla",
    ):
        self.cfg = cfg
        self.llm = DecoderLM(cfg.text, rngs=rngs, dtype=dtype, remat=remat, attention=attention)
        if cfg.vision is None:  # text-only (stage 1): no vision tower or projector in memory
            self.vision = self.projector = self.image_newline = None
            return
        self.vision = VisionTower(
            cfg.vision, cfg.vision_layers_used, rngs=rngs, dtype=dtype, remat=remat
        )
        d = cfg.text.hidden_size
        self.projector = Projector(
            cfg.vision.hidden_size, d, cfg.projector_act, cfg.projector_bias, rngs=rngs, dtype=dtype
        )
        self.image_newline = param(rngs, (d,), ("embed",), dtype=dtype)

    def image_features(self, images: dict, key: jax.Array | None = None) -> jax.Array:
        """The groups' tiles -> feature rows (G, U*P + 1, D): tile features, then the newline."""
        pixels = normalise(images["pixels"], images.get("pixel_lut"), channel_axis=1)
        g, u = pixels.shape[:2]
        tiles = constrain(pixels.reshape(g * u, *pixels.shape[2:]), "batch", None, None, None)
        feats = self.vision(tiles, subkey(key, 0))
        if self.cfg.select_strategy == "default":  # drop the class token
            feats = feats[:, 1:]
        feats = self.projector(feats, subkey(key, 1)).reshape(g, -1, self.cfg.text.hidden_size)
        newline = jnp.broadcast_to(
            self.image_newline[...].astype(feats.dtype), (g, 1, feats.shape[-1])
        )
        return jnp.concatenate([feats, newline], axis=1)
