"""Torch-side reference for the Phi-3-V tests: tiny random checkpoints in the hub layout, and a
model assembled from transformers' native ``Phi3Model`` (LongRoPE) and ``CLIPVisionModel``.

Phi-3-V itself is hub remote code (not available offline), so the image embedding that joins
the two is written here from the published architecture (shared/BACKBONES.md): CLIP features of
layer ``layer_idx`` without the class token, 2x2 merge, ``sub_GN`` per row, ``glb_GN`` between
the crop block and the global view, ``img_projection`` over the whole sequence, written where the
ids are negative. The HD transform is written here too, with PIL and torch (no torchvision).
Not a test module (no ``test_`` prefix).
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, Phi3Config, Phi3Model

from tests.hf_fixtures import randomize_weights
from unime_jax.demo.tokenizers import build_tokenizer

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def tiny_config(
    vocab_size: int,
    pad_id: int,
    *,
    original_max: int = 600,
    crop: int = 336,
    order: str = "sub_glb",
    **overrides: Any,
) -> dict[str, Any]:
    """A Phi-3-V config.json in the hub's flat layout, with a tiny top-level CLIP vision_config
    (3 layers, so that layer_idx -2 is neither the embeddings nor the last layer)."""
    head_dim = 16
    rng = np.random.default_rng(0)
    short = (1 + rng.random(head_dim // 2)).round(3).tolist()
    long = (1 + 8 * rng.random(head_dim // 2)).round(3).tolist()
    side = crop // 14 // 2
    config = {
        "model_type": "phi3_v",
        "architectures": ["Phi3VForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": 4 * head_dim,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "original_max_position_embeddings": original_max,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "su", "short_factor": short, "long_factor": long},
        "sliding_window": 262144,
        "tie_word_embeddings": False,
        "pad_token_id": pad_id,
        "bos_token_id": 1,
        "eos_token_id": pad_id,
        "embd_layer": {
            "embedding_cls": "image",
            "hd_transform_order": order,
            "projection_cls": "mlp",
            "use_hd_transform": True,
            "with_learnable_separator": True,
        },
        "img_processor": {
            "image_dim_out": 32,
            "model_name": "openai/clip-vit-large-patch14-336",
            "name": "clip_vision_model",
            "num_img_tokens": side * side,
        },
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "image_size": crop,
            "patch_size": 14,
            "projection_dim": 32,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        },
    }
    config.update(overrides)
    return config


class ImageEmbedding(nn.Module):
    """Phi-3-V's image embedding (module doc), under the hub's module names."""

    def __init__(self, config: dict):
        super().__init__()
        vision = CLIPVisionConfig(**config["vision_config"], attn_implementation="eager")
        # transformers 5's CLIPVisionModel is the tower itself; the hub's (4.x) wraps it as
        # ``vision_model``. A container restores the hub's module and tensor names.
        self.img_processor = nn.Module()
        self.img_processor.vision_model = CLIPVisionModel(vision)
        c, d = vision.hidden_size, config["hidden_size"]
        self.img_projection = nn.Sequential(nn.Linear(4 * c, d), nn.GELU(), nn.Linear(d, d))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, 4 * c))
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, 4 * c))
        self.layer_idx = config["img_processor"].get("layer_idx", -2)
        self.order = config["embd_layer"]["hd_transform_order"]
        self.crop = vision.image_size

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """(num_images, crops, 3, S, S), (num_images, 2) -> per image (tokens, D)."""
        n = pixel_values.shape[0]
        tower = self.img_processor.vision_model
        out = tower(pixel_values.flatten(0, 1), output_hidden_states=True)
        feats = out.hidden_states[self.layer_idx][:, 1:]
        g = math.isqrt(feats.shape[1])
        s, c = g // 2, feats.shape[-1]
        feats = feats.reshape(n, -1, g * g, c)

        def merge(x):  # (k, g*g, C) -> (k, s, s, 4C)
            k = x.shape[0]
            return x.reshape(k, s, 2, s, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(k, s, s, 4 * c)

        images = []
        for i in range(n):
            h, w = (int(v) // self.crop for v in image_sizes[i])
            glb = merge(feats[i, :1])
            glb = torch.cat([glb, self.sub_GN.repeat(1, s, 1, 1)], dim=2).reshape(1, -1, 4 * c)
            sub = merge(feats[i, 1 : 1 + h * w]).reshape(1, h, w, s, s, 4 * c)
            sub = sub.permute(0, 1, 3, 2, 4, 5).reshape(1, h * s, w * s, 4 * c)
            sub = torch.cat([sub, self.sub_GN.repeat(1, h * s, 1, 1)], dim=2).reshape(1, -1, 4 * c)
            blocks = [sub, self.glb_GN, glb] if self.order == "sub_glb" else [glb, self.glb_GN, sub]
            images.append(self.img_projection(torch.cat(blocks, dim=1))[0])
        return images


class Phi3VReference(nn.Module):
    """``Phi3VForCausalLM``'s module tree: a native Phi3Model with ``vision_embed_tokens``."""

    def __init__(self, config: dict):
        super().__init__()
        # transformers 5.23 refuses the hub's "su" type (it wants original_max_position_embeddings
        # inside the rope dict); "longrope" with the top-level key is the same rope.
        rope = {k: v for k, v in config["rope_scaling"].items() if k != "type"}
        rope |= {"rope_type": "longrope", "rope_theta": config["rope_theta"]}
        keys = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "rms_norm_eps",
        )
        keys += ("num_attention_heads", "num_key_value_heads", "max_position_embeddings")
        keys += ("original_max_position_embeddings", "pad_token_id", "bos_token_id", "eos_token_id")
        text = Phi3Config(
            **{k: config[k] for k in keys},
            rope_parameters=rope,
            sliding_window=config["sliding_window"],
            attn_implementation="eager",
        )
        self.model = Phi3Model(text)
        self.model.vision_embed_tokens = ImageEmbedding(config)
        self.lm_head = nn.Linear(config["hidden_size"], config["vocab_size"], bias=False)

    def hub_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.contiguous() for k, v in self.state_dict().items()}

    def load_hub(self, path: pathlib.Path) -> None:
        """Strict: every tensor of the checkpoint is used and every parameter is filled."""
        tensors = {}
        for file in sorted(path.glob("*.safetensors")):
            tensors |= load_file(str(file))
        self.load_state_dict(tensors, strict=True)

    @torch.no_grad()
    def embeds(self, ids: torch.Tensor, images: list[torch.Tensor]) -> torch.Tensor:
        """One row's input embeddings: image k's features over the k-th run of negative ids."""
        out = self.model.embed_tokens(ids.clamp_min(0))
        positions = torch.nonzero(ids < 0).flatten().tolist()
        used = 0
        for feats in images:
            start = positions[used]
            out[start : start + len(feats)] = feats
            used += len(feats)
        assert used == len(positions), "image tokens without features"
        return out

    @torch.no_grad()
    def hidden(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None):
        out = self.model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state


def save_tiny_phi3_v(
    path: str | pathlib.Path, *, seed: int = 0, num_crops: int = 4, **config_overrides: Any
) -> pathlib.Path:
    """A tiny random checkpoint in the hub layout: config.json, model.safetensors, tokenizer
    (the offline "phi3" style) and preprocessor_config.json."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer("phi3")
    config = tiny_config(len(tokenizer), tokenizer.pad_token_id, **config_overrides)
    torch.manual_seed(seed)
    model = Phi3VReference(config).eval()
    randomize_weights(model, seed=seed)
    save_file(model.hub_state_dict(), str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(path)
    side = config["vision_config"]["image_size"] // config["vision_config"]["patch_size"] // 2
    processor_config = {
        "image_processor_type": "Phi3VImageProcessor",
        "num_crops": num_crops,
        "num_img_tokens": side * side,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
    }
    (path / "preprocessor_config.json").write_text(json.dumps(processor_config, indent=2))
    return path


def load_reference(path: str | pathlib.Path) -> Phi3VReference:
    path = pathlib.Path(path)
    model = Phi3VReference(json.loads((path / "config.json").read_text())).eval()
    model.load_hub(path)
    return model


def reference_hidden_states(model: Phi3VReference, **batch: Any) -> np.ndarray:
    """(B, T, D) final hidden states, each row run alone and unpadded, as ``Phi3VProcessor``
    encodes it (LongRoPE's factors then follow the row's own length); zeros at padding."""
    ids, mask = torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["attention_mask"]) > 0
    images = []
    if batch.get("pixel_values") is not None:
        with torch.no_grad():
            images = model.model.vision_embed_tokens(
                torch.as_tensor(batch["pixel_values"]), torch.as_tensor(batch["image_sizes"])
            )
    out = np.zeros((*ids.shape, model.model.config.hidden_size), np.float32)
    k = 0
    for i in range(len(ids)):
        row = ids[i][mask[i]]
        mine = []
        negatives = int((row < 0).sum())
        while sum(len(f) for f in mine) < negatives:
            mine.append(images[k])
            k += 1
        hidden = model.hidden(model.embeds(row, mine)[None])[0]
        out[i, mask[i].numpy()] = hidden.numpy()
    assert k == len(images), "images without image tokens"
    return out


def batched_hidden_states(model: Phi3VReference, input_ids, attention_mask) -> np.ndarray:
    """A text batch through transformers' own padded forward (position_ids = arange(T))."""
    ids = torch.as_tensor(input_ids)
    with torch.no_grad():
        embeds = model.model.embed_tokens(ids)
        return model.hidden(embeds, torch.as_tensor(attention_mask)).numpy()


def reference_pixels(image: Image.Image, num_crops: int, crop: int = 336):
    """The hub ``Phi3VImageProcessor`` for one image, with PIL and torch: (crops + 1, 3, S, S)
    [global, crops...] and the padded (H, W)."""
    image = image.convert("RGB")
    width, height = image.size
    transposed = width < height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
        width, height = image.size
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = int(scale * crop)
    new_h = int(new_w / ratio)
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)  # torchvision on PIL
    target = int(np.ceil(new_h / crop) * crop)
    top = int((target - new_h) / 2)
    padded = Image.new("RGB", (new_w, target), (255, 255, 255))
    padded.paste(image, (0, top))
    if transposed:
        padded = padded.transpose(Image.Transpose.TRANSPOSE)
    x = torch.from_numpy(np.array(padded)).permute(2, 0, 1).float().div(255)
    x = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    glb = torch.nn.functional.interpolate(x[None], size=(crop, crop), mode="bicubic")
    h, w = x.shape[1] // crop, x.shape[2] // crop
    crops = x.reshape(1, 3, h, crop, w, crop).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, crop, crop)
    return torch.cat([glb, crops]).numpy(), (x.shape[1], x.shape[2])
