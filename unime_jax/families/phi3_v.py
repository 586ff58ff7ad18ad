"""Phi-3-V / Phi-3.5-V (CLIP ViT-L/14-336 + HD crops + Phi-3-mini): UniME-Phi3.5-V-4.2B.

The hub model is remote code (``Phi3VForCausalLM``, ``model_type`` "phi3_v"): its config is flat
Phi-3 plus ``embd_layer`` (HD transform, separators, projection) and ``img_processor`` (CLIP
ViT-L/14-336, implied by name). A top-level ``vision_config`` (CLIPVisionConfig fields) wins over
that implied tower: small test checkpoints and future variants carry one. Tensor names are the
hub's (``model.layers.*``, ``model.vision_embed_tokens.*``), read strictly and written back by
export. The processor is the torch-free ``Phi3VProcessor``: each text chunk between
``<|image_N|>`` tags tokenised on its own, image k's tokens written as ``-k``
(:mod:`unime_jax.preprocess.hd_crops` for the pixels and gather maps).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, ClassVar

import numpy as np

from unime_jax import flops
from unime_jax.families.base import (
    Family,
    ImageShapes,
    identity_vision_fillers,
    lm_head_filler,
    vision_encoder_rules,
)
from unime_jax.models.config import ConfigError, VisionConfig
from unime_jax.models.phi3 import phi3_text_config
from unime_jax.models.phi3_v import Phi3VConfig, Phi3VModel
from unime_jax.preprocess import hd_crops
from unime_jax.preprocess.example import Example, ImageUnits, UnitLayout
from unime_jax.preprocess.images import load_image
from unime_jax.preprocess.processor import (
    Processor,
    RowImages,
    images_per_prompt,
    row_images,
    unpad,
)
from unime_jax.preprocess.text import IMAGE_PLACEHOLDER, IMAGE_PROMPT, TEXT_PROMPT
from unime_jax.weights.rules import TRANSPOSE, Conv, Rule, Transform, WeightMap
from unime_jax.weights.safetensors import LazyTensor

# What the hub model builds for img_processor "clip_vision_model" (CLIP ViT-L/14-336).
CLIP_VIT_L_336 = dict(
    model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
    num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
    layer_norm_eps=1e-5, hidden_act="quick_gelu", num_channels=3,
)  # fmt: skip
DEFAULT_NUM_CROPS = 4  # Phi-3.5-vision-instruct's preprocessor_config.json (UniME's setting)
IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")

_L = r"(?P<layer>\d+)"
_LLM = r"model\.layers\." + _L
_EMB = r"model\.vision_embed_tokens\."
_CLIP = _EMB + r"img_processor\.vision_model\."
_VIS = _CLIP + r"encoder\.layers\." + _L


@dataclasses.dataclass(frozen=True)
class Reshape(Transform):
    """A vector parameter stored with leading unit axes (``sub_GN`` (1, 1, 1, D))."""

    shape: tuple[int, ...]

    def to_param(self, array):
        return array.reshape(-1)

    def to_checkpoint(self, array):
        return array.reshape(self.shape)

    def checkpoint_shape(self, param_shape):
        return self.shape


def _rules(cfg: Phi3VConfig) -> tuple[Rule, ...]:
    rules = [
        Rule(r"model\.embed_tokens\.weight", "llm/embed_tokens"),
        Rule(_LLM + r"\.self_attn\.(?P<p>qkv|o)_proj\.weight", "llm/layers/attn/{p}_proj/kernel", TRANSPOSE),
        Rule(_LLM + r"\.mlp\.(?P<p>gate_up|down)_proj\.weight", "llm/layers/mlp/{p}_proj/kernel", TRANSPOSE),
        Rule(_LLM + r"\.input_layernorm\.weight", "llm/layers/input_norm/scale"),
        Rule(_LLM + r"\.post_attention_layernorm\.weight", "llm/layers/post_attn_norm/scale"),
        Rule(r"model\.norm\.weight", "llm/norm/scale"),
    ]  # fmt: skip
    v = cfg.vision
    if v is None:
        return tuple(rules)
    d = 4 * v.hidden_size
    rules += [
        Rule(_CLIP + r"embeddings\.patch_embedding\.weight", "vision/patch_embed/kernel", Conv((v.num_channels, v.patch_size, v.patch_size))),
        Rule(_CLIP + r"embeddings\.class_embedding", "vision/class_embed"),
        Rule(_CLIP + r"embeddings\.position_embedding\.weight", "vision/position_embed"),
        Rule(_CLIP + r"pre_layrnorm\.weight", "vision/pre_norm/scale"),
        Rule(_CLIP + r"pre_layrnorm\.bias", "vision/pre_norm/bias"),
        *vision_encoder_rules(_VIS),
        # img_projection = Sequential(Linear, GELU, Linear): modules 0 and 2.
        Rule(_EMB + r"img_projection\.0\.weight", "projector/linear_1/kernel", TRANSPOSE),
        Rule(_EMB + r"img_projection\.0\.bias", "projector/linear_1/bias"),
        Rule(_EMB + r"img_projection\.2\.weight", "projector/linear_2/kernel", TRANSPOSE),
        Rule(_EMB + r"img_projection\.2\.bias", "projector/linear_2/bias"),
        Rule(_EMB + r"sub_GN", "sub_gn", Reshape((1, 1, 1, d))),
        Rule(_EMB + r"glb_GN", "glb_gn", Reshape((1, 1, d))),
    ]  # fmt: skip
    return tuple(rules)


_SKIPS = (
    (r"lm_head\.weight", "the LM head is not used by an embedding model"),
    (_CLIP + r"post_layernorm\..*", "Phi-3-V reads CLIP features before the post-layernorm"),
    (_CLIP + r"embeddings\.position_ids", "a constant buffer, rebuilt in code"),
    (_EMB + r"wte\.weight", "the image embedding's alias of model.embed_tokens (one module)"),
)
_TEXT_ONLY_SKIP = (_EMB + r".*", "text-only model: vision tower and projection are not built")


class Phi3VProcessor(Processor):
    """UniME prompts, per-chunk tokenisation and HD crops for Phi-3-V (module doc).

    A prompt's k-th ``<|image_N|>`` tag takes the row's k-th image, and its tokens carry ``-N``:
    the hub's ids for its own prompts (tags 1..n in order), and MMEB's rows, whose every image is
    ``<|image_1|>``, work too. The model, like the hub's, fills image runs in order.
    """

    family = "phi3_v"

    def __init__(self, cfg: Phi3VConfig, tokenizer, image_processor=None):
        # Not Processor.__init__: Phi-3-V has no image token in its vocabulary; the processor
        # splits prompts at the tags instead.
        self.tokenizer, self.config = tokenizer, cfg
        self.image_token, self.image_token_id = IMAGE_PLACEHOLDER, -1
        self.add_special_tokens = True  # the hub tokenises every chunk with the tokenizer's BOS
        self.pad_id = 0 if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)
        self.image_processor, self.layout = image_processor, None
        if cfg.vision is not None and image_processor is not None:
            if image_processor.crop_size != cfg.vision.image_size:
                raise ConfigError(
                    f"crops of {image_processor.crop_size} px do not fit a vision tower of "
                    f"{cfg.vision.image_size} px"
                )
            self.layout = UnitLayout(rows_per_unit=cfg.features_per_crop, special_rows=2)

    # ---- prompts (UniME, spec §3) ---------------------------------------------------------
    def image_prompt(self) -> str:
        return f"<|user|>\n{IMAGE_PLACEHOLDER}\n{IMAGE_PROMPT}<|end|>\n<|assistant|>\n"

    def text_prompt(self, text: str) -> str:
        return f"<|user|>\n{text}{TEXT_PROMPT}<|end|>\n<|assistant|>\n"

    # ---- images ---------------------------------------------------------------------------
    def max_units(self, image_size: int = 0) -> int:
        """Crops + global view of one image (``image_size`` square, or the worst case)."""
        if image_size <= 0:
            return self.image_processor.num_crops + 1
        h, w = self.image_processor.size(image_size, image_size)
        return 1 + (h // self._crop) * (w // self._crop)

    @property
    def _crop(self) -> int:
        return self.config.vision.image_size

    def num_tokens(self, size_hw: tuple[int, int]) -> int:
        return hd_crops.num_image_tokens(size_hw, self._crop, self.config.merged_side)

    def _layout(self, size_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        return hd_crops.image_layout(
            size_hw, self._crop, self.config.merged_side, self.config.hd_order
        )

    def _row(self, prompt: str, images: list, where: str) -> tuple[list[int], list, list[int]]:
        """(ids with image runs, [(units, size)] per image, the runs' start offsets)."""
        chunks = IMAGE_TAG.split(prompt)  # text, tag number, text, ...
        tags = [int(n) for n in chunks[1::2]]
        if len(tags) != len(images):
            raise ValueError(f"{where} has {len(tags)} image token(s) but {len(images)} image(s)")
        if images and self.layout is None:
            raise ValueError("this model was loaded text-only; it cannot take images")
        ids, pictures, starts = self.tokenize(chunks[0]), [], []
        for tag, image, text in zip(tags, images, chunks[2::2]):
            units, size = self.image_processor.units(load_image(image))
            starts.append(len(ids))
            ids += [-tag] * self.num_tokens(size)
            ids += self.tokenize(text)
            pictures.append((units, size))
        return ids, pictures, starts

    def _units(self, units: np.ndarray, size, start: int) -> ImageUnits:
        index, weight = self._layout(size)
        return ImageUnits({"pixels": units}, start + np.arange(len(index)), index, weight)

    def encode(self, prompt: str, images: RowImages = None) -> Example:
        ids, pictures, starts = self._row(prompt, row_images(images), "the prompt")
        units = [self._units(u, size, s) for (u, size), s in zip(pictures, starts)]
        return Example.sequential(ids, units)

    def __call__(self, prompts, images=None, *, max_length=None, padding_side="right") -> dict:
        """What ``Phi3VProcessor`` returns for each prompt, padded into one batch:
        ``input_ids`` with -N image runs, ``attention_mask``, and for the batch's images in
        order ``pixel_values`` (num_images, num_crops + 1, 3, 336, 336) and ``image_sizes``."""
        images = images_per_prompt(prompts, images)
        rows, pictures = [], []
        for i, (prompt, row) in enumerate(zip(prompts, images)):
            ids, found, _ = self._row(prompt, row_images(row), f"prompt {i}")
            rows.append(ids)
            pictures += found
        batch = self.pad_hf_batch(rows, max_length, padding_side)
        if pictures:
            crop, n = self._crop, self.image_processor.num_crops + 1
            pixel_values = np.zeros((len(pictures), n, 3, crop, crop), np.float32)
            for k, (units, _) in enumerate(pictures):
                pixel_values[k, : len(units)] = units
            sizes = np.asarray([size for _, size in pictures], np.int64)
            batch |= {"pixel_values": pixel_values, "image_sizes": sizes}
        return batch

    def from_hf(
        self, input_ids, attention_mask, pixel_values=None, image_sizes=None, **unused
    ) -> list[Example]:
        """Examples from ``Phi3VProcessor`` outputs (padded into a batch, either side): image k of
        the batch fills the k-th run of negative ids, as the hub model fills them."""
        rows = unpad(input_ids, attention_mask)
        if pixel_values is None:
            if any((r < 0).any() for r in rows):
                raise ValueError("input_ids hold image tokens but no pixel_values were given")
            return [Example.sequential(r) for r in rows]
        if image_sizes is None:
            raise ValueError("pixel_values given without image_sizes")
        pixel_values = np.asarray(pixel_values, np.float32)
        sizes = [tuple(int(s) for s in size) for size in np.asarray(image_sizes).reshape(-1, 2)]
        examples, k = [], 0
        for i, ids in enumerate(rows):
            positions = np.flatnonzero(ids < 0)
            units, used = [], 0
            while used < positions.size:
                if k >= len(sizes):
                    raise ValueError(f"row {i} has image tokens beyond the {len(sizes)} image(s)")
                n = self.num_tokens(sizes[k])
                crops = 1 + (sizes[k][0] // self._crop) * (sizes[k][1] // self._crop)
                at = positions[used : used + n]
                if at.size != n or at[-1] - at[0] != n - 1 or crops > pixel_values.shape[1]:
                    raise ValueError(
                        f"row {i}: image {k} of size {sizes[k]} needs a run of {n} image tokens "
                        f"and {crops} crops; the row's next run and pixel_values "
                        f"{pixel_values.shape} do not match"
                    )
                units.append(self._units(pixel_values[k, :crops], sizes[k], int(at[0])))
                used += n
                k += 1
            examples.append(Example.sequential(ids, units))
        if k != len(sizes):
            raise ValueError(f"{len(sizes)} images given, but the batch has tokens for {k}")
        return examples


def vision_config(c: dict[str, Any]) -> VisionConfig:
    """A top-level ``vision_config`` if the config has one, else what ``img_processor`` names."""
    if isinstance(c.get("vision_config"), dict):
        return VisionConfig.from_hf({"model_type": "clip_vision_model", **c["vision_config"]})
    proc = c.get("img_processor") or {}
    if proc.get("name") != "clip_vision_model":
        raise ConfigError(
            f"img_processor {proc.get('name')!r} is not supported (clip_vision_model)"
        )
    name = proc.get("model_name", "openai/clip-vit-large-patch14-336")
    if name != "openai/clip-vit-large-patch14-336":
        raise ConfigError(f"img_processor.model_name {name!r} is not CLIP ViT-L/14-336")
    return VisionConfig.from_hf(CLIP_VIT_L_336)


class Phi3VFamily(Family):
    name = "phi3_v"
    model_types = ("phi3_v",)
    architecture = "Phi3VForCausalLM"
    model_class = Phi3VModel
    lora_targets: ClassVar[dict[str, tuple[str, ...]]] = {
        # The LLM's fused attention and MLP projections (UniME stage 1 and 2).
        "llm": (r"^llm/layers/(attn/(qkv|o)_proj|mlp/(gate_up|down)_proj)$",),
        # CLIP's attention projections (UniME stage 2, VLM2Vec's default).
        "vision_attention": (r"^vision/layers/attn/(q|k|v|out)_proj$",),
    }

    def parse_config(self, c: dict[str, Any]) -> Phi3VConfig:
        if c.get("model_type") != self.name:
            raise ConfigError(f"model_type {c.get('model_type')!r} is not {self.name!r}")
        embd = c.get("embd_layer")
        if not isinstance(embd, dict):
            raise KeyError("embd_layer")
        wanted = {
            "use_hd_transform": True,
            "with_learnable_separator": True,
            "projection_cls": "mlp",
        }
        for key, value in wanted.items():
            if embd.get(key) != value:
                raise ConfigError(
                    f"embd_layer.{key}={embd.get(key)!r} is not supported ({value!r})"
                )
        vision = vision_config(c)
        proc = c.get("img_processor") or {}
        if proc.get("image_dim_out", vision.hidden_size) != vision.hidden_size:
            raise ConfigError(
                f"img_processor.image_dim_out {proc['image_dim_out']} is not the vision width "
                f"{vision.hidden_size}"
            )
        if proc.get("type_feature", "patch") != "patch" or vision.patches_per_side % 2:
            raise ConfigError("only patch features of an even patch grid can be merged 2x2")
        order = embd.get("hd_transform_order", "glb_sub")  # the hub class's default
        if order not in ("sub_glb", "glb_sub"):
            raise ConfigError(f"embd_layer.hd_transform_order {order!r} is not supported")
        cfg = Phi3VConfig(
            family=self.name,
            text=phi3_text_config(c),
            vision=vision,
            feature_layer=int(proc.get("layer_idx", -2)),
            hd_order=order,
        )
        cfg.vision_layers_used  # noqa: B018 -- validates layer_idx now
        return cfg

    @functools.lru_cache(maxsize=16)  # noqa: B019 -- families are module-level singletons
    def weight_map(self, cfg: Phi3VConfig) -> WeightMap:
        if cfg.vision is None:
            return WeightMap(rules=_rules(cfg), skips=(*_SKIPS, _TEXT_ONLY_SKIP))
        reason = "CLIP layers after img_processor.layer_idx never reach the features"
        truncated = (("vision", cfg.vision_layers_used, cfg.vision.num_layers, reason),)
        return WeightMap(rules=_rules(cfg), skips=_SKIPS, truncated=truncated)

    def processor(self, cfg, hf_config, tokenizer, image_processor=None) -> Phi3VProcessor:
        return Phi3VProcessor(cfg, tokenizer, image_processor)

    def load_processor(self, directory: str | os.PathLike, cfg, hf_config) -> Phi3VProcessor:
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
        image_processor = None
        if cfg.vision is not None:
            crop = cfg.vision.image_size
            image_processor = hd_crops.HDImageProcessor.from_pretrained(directory, crop)
        return self.processor(cfg, hf_config, tokenizer, image_processor)

    def image_shapes(self, cfg, hf_config, image_size: int) -> ImageShapes | None:
        """At ``hf_config["num_crops"]`` crops, else Phi-3.5-V's 4 (config.json does not hold
        the crop count; preprocessor_config.json does)."""
        if cfg.vision is None:
            return None
        num_crops, crop, side = (
            hf_config.get("num_crops", DEFAULT_NUM_CROPS),
            cfg.vision.image_size,
            cfg.merged_side,
        )
        if image_size > 0:
            size = hd_crops.hd_size(image_size, image_size, num_crops, crop)
            units = 1 + (size[0] // crop) * (size[1] // crop)
            tokens = hd_crops.num_image_tokens(size, crop, side)
        else:  # the tallest grid: num_crops crops in one column
            units = num_crops + 1
            tokens = hd_crops.num_image_tokens((num_crops * crop, crop), crop, side)
        shape = (cfg.vision.num_channels, crop, crop)
        return ImageShapes(units, tokens, {"pixels": (shape, np.float32)}, {}, taps=1)

    def forward_flops(self, cfg: Phi3VConfig, rows: int, length: int, units: int) -> float:
        total = flops.decoder_flops(cfg.text, rows, length)
        if units and cfg.vision is not None:
            total += flops.vit_flops(cfg.vision, cfg.vision_layers_used, units, class_token=True)
            d_in, d = 4 * cfg.vision.hidden_size, cfg.text.hidden_size
            total += flops.mlp_flops(units * cfg.features_per_crop, d_in, d, d)
        return total

    def export_fillers(self, cfg: Phi3VConfig, tensors, hf_config) -> list[LazyTensor]:
        """The LM head as a copy of the input embeddings (unless tied); CLIP's post-layernorm and
        the layers after the feature layer as identities (unit norms, zero weights)."""
        out = lm_head_filler(tensors, "model.embed_tokens.weight", hf_config)
        if cfg.vision is not None:
            used, total = cfg.vision_layers_used, cfg.vision.num_layers
            out += identity_vision_fillers(tensors, _CLIP.replace("\\", ""), used, total)
        return out


PHI3_V = Phi3VFamily()
