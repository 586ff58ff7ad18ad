"""Phi-3-V / Phi-3.5-V on device: CLIP crops -> 2x2 merge -> separators -> img_projection -> LLM.

The image units are 336x336 crops of the HD transform, the global view first:
``images["pixels"]`` (G, U, C, H, W), float32 normalised (the host explains why, see
:mod:`unime_jax.preprocess.hd_crops`). CLIP's second-to-last layer without the class token gives
24x24 features per crop, merged 2x2 into 144 rows of 4·1024 in (dh, dw, C) order; the learned
``sub_GN`` (row separator) and ``glb_GN`` (between the crops and the global view) are the group's
two special rows. ``img_projection`` runs over all of them, as the hub model runs it over the
whole image sequence separators included, and the host's gather map puts the rows at the image
tokens, which the processor marks with negative ids.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from unime_jax.models.config import ConfigError, TextConfig, VisionConfig
from unime_jax.models.layers import param, subkey
from unime_jax.models.llava import Projector
from unime_jax.models.multimodal import MultimodalModel
from unime_jax.models.phi3 import Phi3LM
from unime_jax.models.pixels import normalise
from unime_jax.models.vision import VisionTower
from unime_jax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class Phi3VConfig:
    family: str  # "phi3_v"
    text: TextConfig
    vision: VisionConfig | None  # None: text-only (stage 1 builds only the LLM)
    feature_layer: int = -2  # img_processor.layer_idx: CLIP hidden_states index
    hd_order: str = "sub_glb"  # embd_layer.hd_transform_order: crops first, or "glb_sub"

    @property
    def vision_layers_used(self) -> int:
        n = self.vision.num_layers
        used = n + 1 + self.feature_layer if self.feature_layer < 0 else self.feature_layer
        if not 0 < used <= n:
            raise ConfigError(f"img_processor.layer_idx {self.feature_layer} is out of range")
        return used

    @property
    def merged_side(self) -> int:
        """Merged features along one side of a crop: 24 // 2 = 12."""
        return self.vision.patches_per_side // 2

    @property
    def features_per_crop(self) -> int:
        return self.merged_side**2

    def text_only(self) -> Phi3VConfig:
        return dataclasses.replace(self, vision=None)


def merge_2x2(feats: jax.Array, side: int) -> jax.Array:
    """(N, (2s)², C) -> (N, s², 4C): each 2x2 window's features concatenated in (dh, dw) order."""
    n, _, c = feats.shape
    x = feats.reshape(n, side, 2, side, 2, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, side * side, 4 * c)


class Phi3VModel(MultimodalModel):
    def __init__(
        self,
        cfg: Phi3VConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        remat: str = "none",
        attention: str = "xla",
    ):
        self.cfg = cfg
        self.llm = Phi3LM(cfg.text, rngs=rngs, dtype=dtype, remat=remat, attention=attention)
        if cfg.vision is None:  # text-only (stage 1): no vision tower or projector in memory
            self.vision = self.projector = self.sub_gn = self.glb_gn = None
            return
        self.vision = VisionTower(
            cfg.vision, cfg.vision_layers_used, rngs=rngs, dtype=dtype, remat=remat
        )
        d_merged = 4 * cfg.vision.hidden_size
        self.projector = Projector(
            d_merged, cfg.text.hidden_size, "gelu", True, rngs=rngs, dtype=dtype
        )
        self.sub_gn = param(rngs, (d_merged,), ("vision_embed",), dtype=dtype)
        self.glb_gn = param(rngs, (d_merged,), ("vision_embed",), dtype=dtype)

    def image_features(self, images: dict, key: jax.Array | None = None) -> jax.Array:
        """The groups' crops -> (G, U·144 + 2, D): merged crop features, sub_GN, glb_GN, all
        through img_projection."""
        pixels = normalise(images["pixels"], images.get("pixel_lut"), channel_axis=1)
        g, u = pixels.shape[:2]
        crops = constrain(pixels.reshape(g * u, *pixels.shape[2:]), "batch", None, None, None)
        feats = self.vision(crops, subkey(key, 0))[:, 1:]  # drop the class token
        feats = merge_2x2(feats, self.cfg.merged_side).reshape(
            g, -1, 4 * self.cfg.vision.hidden_size
        )
        special = jnp.stack([self.sub_gn[...], self.glb_gn[...]]).astype(feats.dtype)
        feats = jnp.concatenate([feats, jnp.broadcast_to(special, (g, *special.shape))], axis=1)
        return self.projector(feats, subkey(key, 1))

    def token_ids(self, input_ids: jax.Array) -> jax.Array:
        """Image tokens carry negative ids (-k for image k); like the hub model, the clamped id's
        embedding is looked up (and replaced by the image features)."""
        return jnp.maximum(input_ids, 0)

    def image_tokens(self, input_ids: jax.Array) -> jax.Array:
        return input_ids < 0
