"""LLaVA-OneVision (SigLIP + Qwen2) and LLaVA-1.6 / LLaVA-NeXT (CLIP + Mistral or Llama).

Config from ``config.json`` (class defaults filled in), the device model
(:mod:`unime_jax.models.llava`), the strict weight table for both tensor-name layouts
(transformers 5.x ``model.language_model.*`` / ``model.vision_tower.*`` and the hub's
``language_model.model.*`` / ``vision_tower.vision_model.*``), the host processor (UniME prompts,
AnyRes tiles and gather maps from :mod:`unime_jax.preprocess.anyres`), LoRA groups and export
fillers.
"""

from __future__ import annotations

import functools
import os
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np

from unime_jax import flops
from unime_jax.families.base import Family, ImageShapes
from unime_jax.models.config import ConfigError, TextConfig, VisionConfig
from unime_jax.models.llava import LlavaConfig, LlavaModel
from unime_jax.preprocess import anyres
from unime_jax.preprocess.example import Example, ImageUnits, UnitLayout
from unime_jax.preprocess.images import load_image, pixel_lut
from unime_jax.preprocess.processor import Processor, RowImages, row_images, unpad
from unime_jax.preprocess.text import IMAGE_PROMPT, TEXT_PROMPT
from unime_jax.weights.rules import TRANSPOSE, Conv, Rule, WeightMap
from unime_jax.weights.safetensors import LazyTensor

_L = r"(?P<layer>\d+)"
_LLM = r"language_model\.layers\." + _L
_VIS = r"vision_tower\.encoder\.layers\." + _L


def _rules(vision: VisionConfig | None) -> tuple[Rule, ...]:
    rules = [
        Rule(r"language_model\.embed_tokens\.weight", "llm/embed_tokens"),
        Rule(_LLM + r"\.self_attn\.(?P<p>[qkvo])_proj\.weight", "llm/layers/attn/{p}_proj/kernel", TRANSPOSE),
        Rule(_LLM + r"\.self_attn\.(?P<p>[qkvo])_proj\.bias", "llm/layers/attn/{p}_proj/bias"),
        Rule(_LLM + r"\.mlp\.(?P<p>gate|up|down)_proj\.weight", "llm/layers/mlp/{p}_proj/kernel", TRANSPOSE),
        Rule(_LLM + r"\.mlp\.(?P<p>gate|up|down)_proj\.bias", "llm/layers/mlp/{p}_proj/bias"),
        Rule(_LLM + r"\.input_layernorm\.weight", "llm/layers/input_norm/scale"),
        Rule(_LLM + r"\.post_attention_layernorm\.weight", "llm/layers/post_attn_norm/scale"),
        Rule(r"language_model\.norm\.weight", "llm/norm/scale"),
    ]  # fmt: skip
    if vision is None:
        return tuple(rules)
    conv = Conv((vision.num_channels, vision.patch_size, vision.patch_size))
    rules += [
        Rule(r"vision_tower\.embeddings\.patch_embedding\.weight", "vision/patch_embed/kernel", conv),
        Rule(r"vision_tower\.embeddings\.patch_embedding\.bias", "vision/patch_embed/bias"),
        Rule(r"vision_tower\.embeddings\.class_embedding", "vision/class_embed"),
        Rule(r"vision_tower\.embeddings\.position_embedding\.weight", "vision/position_embed"),
        Rule(r"vision_tower\.pre_layrnorm\.weight", "vision/pre_norm/scale"),
        Rule(r"vision_tower\.pre_layrnorm\.bias", "vision/pre_norm/bias"),
        Rule(_VIS + r"\.self_attn\.(?P<p>q|k|v|out)_proj\.weight", "vision/layers/attn/{p}_proj/kernel", TRANSPOSE),
        Rule(_VIS + r"\.self_attn\.(?P<p>q|k|v|out)_proj\.bias", "vision/layers/attn/{p}_proj/bias"),
        Rule(_VIS + r"\.layer_norm(?P<n>[12])\.weight", "vision/layers/layer_norm{n}/scale"),
        Rule(_VIS + r"\.layer_norm(?P<n>[12])\.bias", "vision/layers/layer_norm{n}/bias"),
        Rule(_VIS + r"\.mlp\.fc(?P<n>[12])\.weight", "vision/layers/mlp/fc{n}/kernel", TRANSPOSE),
        Rule(_VIS + r"\.mlp\.fc(?P<n>[12])\.bias", "vision/layers/mlp/fc{n}/bias"),
        Rule(r"multi_modal_projector\.linear_(?P<n>[12])\.weight", "projector/linear_{n}/kernel", TRANSPOSE),
        Rule(r"multi_modal_projector\.linear_(?P<n>[12])\.bias", "projector/linear_{n}/bias"),
        Rule(r"image_newline", "image_newline"),
    ]  # fmt: skip
    return tuple(rules)


_SKIPS = (
    (r"lm_head\.weight", "the LM head is not used by an embedding model"),
    (r"vision_tower\.post_layernorm\..*", "LLaVA reads vision features before the post-layernorm"),
    (r"vision_tower\.head\..*", "LLaVA does not use SigLIP's pooling head"),
    (r"vision_tower\.embeddings\.position_ids", "a constant buffer, rebuilt in code"),
)
_TEXT_ONLY_SKIP = (
    r"(vision_tower\.|multi_modal_projector\.|image_newline).*",
    "text-only model: vision tower and projector are not built",
)
_ALIASES = (
    ("model.language_model.", "language_model."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
)
# What transformers 5.23's save_pretrained writes for these classes.
_SAVE_PREFIXES = (
    ("language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
_MODULE_PREFIXES = (
    ("language_model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("image_newline", "model.image_newline"),
)


class LlavaProcessor(Processor):
    """UniME prompts, tokenisation and AnyRes tiles for one LLaVA family (module doc)."""

    def __init__(
        self,
        family: str,
        cfg: LlavaConfig,
        spec: anyres.AnyResSpec | None,
        tokenizer,
        image_processor=None,
    ):
        super().__init__(tokenizer, cfg.image_token_id, add_special_tokens=family == "llava_next")
        self.family, self.config, self.spec = family, cfg, spec
        self.image_processor = image_processor
        self.layout = None
        if cfg.vision is not None and image_processor is not None:
            self.layout = UnitLayout(
                rows_per_unit=spec.patches_per_tile,
                special_rows=1,  # image_newline
                taps=spec.taps,
                constants={"pixel_lut": pixel_lut(image_processor)},
            )

    # ---- prompts (UniME, spec §3) ---------------------------------------------------------
    def image_prompt(self) -> str:
        if self.family == "llava_next":
            return f"[INST] {self.image_token}\n{IMAGE_PROMPT} [/INST]"
        return self.chat([{"type": "image"}, {"type": "text", "text": IMAGE_PROMPT + "\n"}])

    def text_prompt(self, text: str) -> str:
        if self.family == "llava_next":
            return f"[INST] {text}{TEXT_PROMPT} [/INST]"
        return self.chat([{"type": "text", "text": text + TEXT_PROMPT + "\n"}])

    # ---- images ---------------------------------------------------------------------------
    def max_units(self, image_size: int = 0) -> int:
        """Tiles of one image: at ``image_size`` x ``image_size``, or the most any size needs."""
        if image_size > 0:
            return anyres.num_tiles((image_size, image_size), self.spec)
        return self.spec.max_tiles

    def base_only(self, num_images: int) -> bool:
        """OneVision encodes each image of a multi-image row as its base tile only."""
        return self.family == "llava_onevision" and num_images > 1

    def _process(self, images: list, raw: bool) -> dict:
        """The HF image processor on one row's images (uint8 tiles when ``raw``)."""
        if self.layout is None:
            raise ValueError("this model was loaded text-only; it cannot take images")
        batch = [images] if self.family == "llava_onevision" else images
        extra = dict(do_rescale=False, do_normalize=False) if raw else {}
        return self.image_processor(images=batch, return_tensors="np", **extra)

    def _unit(self, tiles: np.ndarray, size: tuple[int, int], multi: bool, positions) -> ImageUnits:
        index, weight = anyres.image_layout(size, self.spec, base_only=multi)
        taps = self.spec.taps
        return ImageUnits(
            {"pixels": tiles}, np.asarray(positions), index[:, :taps], weight[:, :taps]
        )

    def encode(self, prompt: str, images: RowImages = None) -> Example:
        images = [load_image(im) for im in row_images(images)]
        ids = self.tokenize(prompt)
        count = ids.count(self.image_token_id)
        if count != len(images):
            raise ValueError(
                f"the prompt has {count} image token(s) but {len(images)} image(s) were given"
            )
        units = []
        if images:
            out = self._process(images, raw=True)
            multi = self.base_only(len(images))
            expanded: list[int] = []
            k = 0
            for token in ids:
                if token != self.image_token_id:
                    expanded.append(token)
                    continue
                size = tuple(int(s) for s in out["image_sizes"][k])
                n_tiles = anyres.num_tiles(size, self.spec, base_only=multi)
                n = anyres.num_image_tokens(size, self.spec, base_only=multi)
                at = len(expanded) + np.arange(n)
                units.append(self._unit(out["pixel_values"][k, :n_tiles], size, multi, at))
                expanded += [self.image_token_id] * n
                k += 1
            ids = expanded
        return Example(np.asarray(ids, np.int32), np.arange(len(ids), dtype=np.int32), units)

    def __call__(self, prompts, images=None, *, max_length=None, padding_side="right") -> dict:
        """What ``LlavaOnevisionProcessor`` / ``LlavaNextProcessor`` return for these prompts:
        image tokens expanded, ``pixel_values`` (num_images, max_tiles, C, H, W) normalised and
        ``image_sizes`` (num_images, 2) for the batch's images in order, and for OneVision
        ``batch_num_images`` (images per row)."""
        images = list(images) if images is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image entries")
        rows, tiles, sizes, counts = [], [], [], []
        for i, (prompt, row) in enumerate(zip(prompts, images)):
            row = [load_image(im) for im in row_images(row)]
            ids = self.tokenize(prompt)
            if ids.count(self.image_token_id) != len(row):
                raise ValueError(
                    f"prompt {i} has {ids.count(self.image_token_id)} image token(s) but "
                    f"{len(row)} image(s)"
                )
            counts.append(len(row))
            if row:
                out = self._process(row, raw=False)
                multi = self.base_only(len(row))
                expanded, k = [], 0
                for token in ids:
                    if token != self.image_token_id:
                        expanded.append(token)
                        continue
                    size = tuple(int(s) for s in out["image_sizes"][k])
                    n = anyres.num_image_tokens(size, self.spec, base_only=multi)
                    expanded += [self.image_token_id] * n
                    tiles.append(out["pixel_values"][k])
                    sizes.append(size)
                    k += 1
                ids = expanded
            rows.append(ids)
        batch = self.pad_hf_batch(rows, max_length, padding_side)
        if tiles:
            n_max = max(t.shape[0] for t in tiles)
            pixel_values = np.zeros((len(tiles), n_max, *tiles[0].shape[1:]), np.float32)
            for k, t in enumerate(tiles):
                pixel_values[k, : t.shape[0]] = t
            batch |= {"pixel_values": pixel_values, "image_sizes": np.asarray(sizes, np.int64)}
            if self.family == "llava_onevision":
                batch["batch_num_images"] = np.asarray(counts, np.int64)
        return batch

    def from_hf(
        self,
        input_ids,
        attention_mask,
        pixel_values=None,
        image_sizes=None,
        batch_num_images=None,
        **unused,
    ) -> list[Example]:
        """Examples from HF processor outputs: image k of the batch (in row-major token order)
        fills the k-th image's tokens, whatever rows hold no image or several."""
        rows = unpad(input_ids, attention_mask)
        if pixel_values is None:
            return [Example(r.astype(np.int32), np.arange(len(r), dtype=np.int32)) for r in rows]
        if image_sizes is None:
            raise ValueError("pixel_values given without image_sizes")
        pixel_values = np.asarray(pixel_values, np.float32)
        if pixel_values.ndim == 4:  # one tile per image
            pixel_values = pixel_values[:, None]
        sizes = [tuple(int(s) for s in size) for size in np.asarray(image_sizes)]
        if batch_num_images is None or self.family != "llava_onevision":
            multi = [False] * len(sizes)
        else:  # transformers: need_patching = [n == 1 for n in batch_num_images for _ in range(n)]
            multi = [int(n) != 1 for n in np.asarray(batch_num_images) for _ in range(int(n))]
        if len(multi) != len(sizes):
            raise ValueError(
                f"batch_num_images counts {len(multi)} images, image_sizes {len(sizes)}"
            )
        examples, k = [], 0
        for i, ids in enumerate(rows):
            positions = np.flatnonzero(ids == self.image_token_id)
            units, used = [], 0
            while used < positions.size:
                if k >= len(sizes):
                    raise ValueError(
                        f"row {i} has image tokens beyond the {len(sizes)} image(s) given"
                    )
                n = anyres.num_image_tokens(sizes[k], self.spec, base_only=multi[k])
                n_tiles = anyres.num_tiles(sizes[k], self.spec, base_only=multi[k])
                if used + n > positions.size or n_tiles > pixel_values.shape[1]:
                    raise ValueError(
                        f"row {i}: image {k} of size {sizes[k]} yields {n} features in "
                        f"{n_tiles} tiles, but the row has {positions.size - used} image tokens "
                        f"left and pixel_values {pixel_values.shape[1]} tiles; expand the image "
                        "token with the processor for this image size"
                    )
                at = positions[used : used + n]
                units.append(self._unit(pixel_values[k, :n_tiles], sizes[k], multi[k], at))
                used += n
                k += 1
            examples.append(
                Example(ids.astype(np.int32), np.arange(len(ids), dtype=np.int32), units)
            )
        if k != len(sizes):
            raise ValueError(f"{len(sizes)} images given, but the batch has tokens for {k}")
        return examples


def complete_config(c: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` with the transformers config classes' defaults filled in: hub files omit
    what equals a default (llava-v1.6-mistral-7b-hf lists no hidden_size or layer count)."""
    import transformers

    try:
        return transformers.CONFIG_MAPPING[c["model_type"]].from_dict(c).to_dict()
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"transformers cannot read this {c['model_type']} config: {e}") from e


class LlavaFamily(Family):
    lora_targets: ClassVar[dict[str, tuple[str, ...]]] = {
        # The LLM's attention and MLP projections (UniME stage 1 and 2).
        "llm": (r"^llm/layers/(attn/[qkvo]_proj|mlp/(gate|up|down)_proj)$",),
        # The vision tower's attention projections (UniME stage 2, VLM2Vec's default).
        "vision_attention": (r"^vision/layers/attn/(q|k|v|out)_proj$",),
    }

    def __init__(self, name: str, architecture: str, image_processor_class: str):
        self.name = name
        self.model_types = (name,)
        self.architecture = architecture
        self._image_processor_class = image_processor_class

    def parse_config(self, c: dict[str, Any]) -> LlavaConfig:
        if c.get("model_type") != self.name:
            raise ConfigError(f"model_type {c.get('model_type')!r} is not {self.name!r}")
        for key in ("text_config", "vision_config"):
            if not isinstance(c.get(key), dict):
                raise KeyError(key)
        c = complete_config(c)
        layer = c.get("vision_feature_layer", -1)
        if not isinstance(layer, int):
            raise ConfigError(f"a list of vision_feature_layer values ({layer}) is not supported")
        strategy = c.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ConfigError(f"vision_feature_select_strategy {strategy!r} is not supported")
        token = c.get("image_token_id", c.get("image_token_index"))
        if token is None:
            raise ConfigError("config.json has neither image_token_id nor image_token_index")
        cfg = LlavaConfig(
            family=self.name,
            text=TextConfig.from_hf(c["text_config"]),
            vision=VisionConfig.from_hf(c["vision_config"]),
            image_token_id=int(token),
            feature_layer=layer,
            select_strategy=strategy,
            projector_act=c.get("projector_hidden_act", "gelu"),
            projector_bias=c.get("multimodal_projector_bias", True),
        )
        cfg.vision_layers_used  # noqa: B018 -- validates vision_feature_layer now
        self.anyres_spec(c)  # validates the pinpoints now
        return cfg

    def anyres_spec(self, c: dict[str, Any]) -> anyres.AnyResSpec:
        try:
            return anyres.AnyResSpec.from_hf_config(c)
        except ValueError as e:
            raise ConfigError(str(e)) from e

    def text_only(self, cfg: LlavaConfig) -> LlavaConfig:
        return cfg.text_only()

    def build(self, cfg, *, rngs, dtype=jnp.float32, remat="none", attention="xla"):
        return LlavaModel(cfg, rngs=rngs, dtype=dtype, remat=remat, attention=attention)

    @functools.lru_cache(maxsize=16)  # noqa: B019 -- families are module-level singletons
    def weight_map(self, cfg: LlavaConfig) -> WeightMap:
        skips, truncated = _SKIPS, ()
        if cfg.vision is None:
            skips = (*_SKIPS, _TEXT_ONLY_SKIP)
        else:
            reason = "vision layers after vision_feature_layer never reach the features"
            truncated = (("vision", cfg.vision_layers_used, cfg.vision.num_layers, reason),)
        return WeightMap(
            rules=_rules(cfg.vision),
            skips=skips,
            aliases=_ALIASES,
            save_prefixes=_SAVE_PREFIXES,
            module_prefixes=_MODULE_PREFIXES,
            truncated=truncated,
        )

    def processor(self, cfg, hf_config, tokenizer, image_processor=None) -> LlavaProcessor:
        spec = self.anyres_spec(hf_config) if cfg.vision is not None else None
        return LlavaProcessor(self.name, cfg, spec, tokenizer, image_processor)

    def load_processor(self, directory: str | os.PathLike, cfg, hf_config) -> LlavaProcessor:
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
        image_processor = None
        if cfg.vision is not None:
            klass = getattr(transformers, self._image_processor_class)
            image_processor = klass.from_pretrained(directory)
        return self.processor(cfg, hf_config, tokenizer, image_processor)

    def image_shapes(self, cfg, hf_config, image_size: int) -> ImageShapes | None:
        if cfg.vision is None:
            return None
        spec = self.anyres_spec(hf_config)
        if image_size > 0:
            size = (image_size, image_size)
            units, tokens = anyres.num_tiles(size, spec), anyres.num_image_tokens(size, spec)
        else:  # the worst case over the pinpoint grids (an image the size of the largest one)
            units = spec.max_tiles
            tokens = max(anyres.num_image_tokens(p, spec) for p in spec.grid_pinpoints)
        v = cfg.vision
        return ImageShapes(
            units=units,
            tokens=tokens,
            unit_arrays={"pixels": ((v.num_channels, v.image_size, v.image_size), np.uint8)},
            constants={"pixel_lut": ((v.num_channels, 256), np.float32)},
            taps=spec.taps,
        )

    def forward_flops(self, cfg: LlavaConfig, rows: int, length: int, units: int) -> float:
        total = flops.decoder_flops(cfg.text, rows, length)
        if units and cfg.vision is not None:
            clip = cfg.vision.kind == "clip"
            total += flops.vit_flops(cfg.vision, cfg.vision_layers_used, units, class_token=clip)
            d_v, d = cfg.vision.hidden_size, cfg.text.hidden_size
            total += flops.mlp_flops(units * cfg.features_per_tile, d_v, d, d)
        return total

    def export_fillers(self, cfg: LlavaConfig, tensors, hf_config) -> list[LazyTensor]:
        """The LM head is a copy of the input embeddings (unless tied); the vision post-layernorm
        and the vision layers after the feature layer are identities (unit norms, zero weights)."""
        out = []

        def constant(name: str, like: LazyTensor, fill: float) -> LazyTensor:
            load = functools.partial(np.full, like.shape, fill, like.dtype)
            return LazyTensor(name, like.shape, like.dtype, load)

        text = hf_config.get("text_config") or {}
        if not hf_config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)):
            embed = tensors["language_model.embed_tokens.weight"]
            out.append(LazyTensor("lm_head.weight", embed.shape, embed.dtype, embed.load))
        norm = tensors["vision_tower.encoder.layers.0.layer_norm1.weight"]
        out += [constant("vision_tower.post_layernorm.weight", norm, 1.0)]
        out += [constant("vision_tower.post_layernorm.bias", norm, 0.0)]
        first = [
            (n, t) for n, t in tensors.items() if n.startswith("vision_tower.encoder.layers.0.")
        ]
        for layer in range(cfg.vision_layers_used, cfg.vision.num_layers):
            for name, t in first:
                name = name.replace(".layers.0.", f".layers.{layer}.", 1)
                out.append(
                    constant(name, t, float("layer_norm" in name and name.endswith("weight")))
                )
        return out


ONEVISION = LlavaFamily(
    "llava_onevision", "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionImageProcessorPil"
)
NEXT = LlavaFamily("llava_next", "LlavaNextForConditionalGeneration", "LlavaNextImageProcessorPil")
