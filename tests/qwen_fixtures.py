"""Torch-side helpers for the Qwen2-VL / Qwen2.5-VL tests: tiny random checkpoints with unusual
sizes, the transformers reference (hidden states after the final norm), the reference
processor, and the position numbering of older transformers.

Not a test module (no ``test_`` prefix). Everything is built offline.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)
from transformers.processing_utils import ProcessorMixin

from tests.hf_fixtures import randomize_weights
from unime_jax.demo.tokenizers import build_tokenizer

CLASSES = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
}
PATCH, MERGE = 6, 2  # factor 12 px instead of 28: small grids, many shapes
# head_dim 20 (half 10 = mrope 2+4+4); theta 100 so the h/w slots turn visibly at small positions.
TEXT = dict(
    hidden_size=80, intermediate_size=136, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=1024,
    rope_parameters={"rope_type": "default", "mrope_section": [2, 4, 4], "rope_theta": 100.0},
)  # fmt: skip
VISION = {
    "qwen2_vl": dict(
        depth=3, embed_dim=48, num_heads=4, mlp_ratio=3, hidden_size=80, hidden_act="quick_gelu"
    ),
    # Windows of 24 px = 2x2 merged units; layers 1 and 3 attend over whole images.
    "qwen2_5_vl": dict(
        depth=4, hidden_size=48, intermediate_size=56, num_heads=4, out_hidden_size=80,
        hidden_act="silu", window_size=24, fullatt_block_indexes=[1, 3],
    ),
}  # fmt: skip
IMAGE_PROCESSOR = dict(
    patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2,
    min_pixels=(PATCH * MERGE) ** 2 * 4, max_pixels=(PATCH * MERGE) ** 2 * 60,
)  # fmt: skip


def tiny_config(family: str, tokenizer, tie: bool) -> dict[str, Any]:
    """transformers 5.x layout: text fields nested under ``text_config``."""
    ids = {
        k: tokenizer.convert_tokens_to_ids(t)
        for k, t in (
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        )
    }
    text = dict(TEXT, vocab_size=len(tokenizer), tie_word_embeddings=tie)
    text |= {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    vision = dict(VISION[family], patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2)
    return dict(text_config=text, vision_config=vision, tie_word_embeddings=tie, **ids)


def save_tiny_qwen(
    path: str | pathlib.Path, family: str, *, seed: int = 0, tie: bool = False
) -> pathlib.Path:
    """A tiny random ``family`` checkpoint + tokenizer + image processor in ``path``."""
    config_cls, model_cls = CLASSES[family]
    path = pathlib.Path(path)
    tokenizer = build_tokenizer("qwen2_vl")
    torch.manual_seed(seed)
    model = model_cls(config_cls(**tiny_config(family, tokenizer, tie))).to(torch.float32).eval()
    randomize_weights(model, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(**IMAGE_PROCESSOR).save_pretrained(path)
    return path


def flatten_config(path: pathlib.Path) -> None:
    """Rewrite config.json in the hub's flat layout (text fields at the top, ``rope_scaling``
    with ``type: mrope``), as Qwen/Qwen2-VL-7B-Instruct publishes it."""
    config = json.loads((path / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    text.pop("model_type")
    config |= text
    config["rope_theta"] = rope["rope_theta"]
    config["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    (path / "config.json").write_text(json.dumps(config, indent=2))


def rename_to_module_names(path: pathlib.Path) -> None:
    """Rewrite tensor names to transformers 5.x's module tree (``model.language_model.*``,
    ``model.visual.*``): what e.g. ``torch.save(model.state_dict())`` based tools write."""

    def rename(key: str) -> str:
        if key.startswith("visual."):
            return "model." + key
        if key.startswith("model."):
            return "model.language_model." + key[len("model.") :]
        return key

    file = path / "model.safetensors"
    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {rename(k): handle.get_tensor(k) for k in handle.keys()}
    save_file(tensors, str(file), metadata=metadata)


def load_hf_model(path: str | pathlib.Path):
    """The saved torch model in eval mode, float32, eager attention."""
    family = json.loads((pathlib.Path(path) / "config.json").read_text())["model_type"]
    model_cls = CLASSES[family][1]
    return model_cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


_INT_INPUTS = {"input_ids", "attention_mask", "image_grid_thw", "mm_token_type_ids", "position_ids"}


def hf_hidden_states(model, **np_inputs: Any) -> np.ndarray:
    """Final-layer hidden states after the final RMSNorm (``hidden_states[-1]``), (B, T, D)."""
    inputs = {
        k: torch.from_numpy(np.ascontiguousarray(v)).long()
        if k in _INT_INPUTS
        else torch.from_numpy(np.ascontiguousarray(v)).float()
        for k, v in np_inputs.items()
        if v is not None
    }
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, use_cache=False, return_dict=True)
    return out.hidden_states[-1].to(torch.float32).numpy()


class ReferenceProcessor(Qwen2VLProcessor):
    """transformers' own ``Qwen2VLProcessor`` without its video processor (which needs
    torchvision): token expansion, padding and ``mm_token_type_ids`` as transformers does them."""

    def __init__(self, image_processor, tokenizer):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer)


def legacy_position_ids(
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    image_grid_thw: np.ndarray | None,
    image_token_id: int,
    vision_start_token_id: int,
) -> np.ndarray:
    """(3, B, T) position ids as transformers 4.45-4.57 ``Qwen2VLModel.get_rope_index`` computed
    them (a port of that loop for images): a row has as many M-RoPE images as
    ``<|vision_start|>`` tokens followed by an image token, each found as the next image token;
    everything else counts on like text."""
    b, t = input_ids.shape
    position_ids = np.ones((3, b, t), np.int64)
    if image_grid_thw is None:
        pos = np.cumsum(attention_mask, -1) - 1
        return np.broadcast_to(np.where(attention_mask == 0, 1, pos), (3, b, t)).copy()
    image_index = 0
    for i in range(b):
        ids = input_ids[i][attention_mask[i] == 1]
        starts = np.flatnonzero(ids == vision_start_token_id)
        image_nums = int(np.sum(ids[starts + 1] == image_token_id))
        tokens = ids.tolist()
        parts, st = [], 0
        for _ in range(image_nums):
            ed = tokens.index(image_token_id, st)
            _, h, w = (int(x) for x in image_grid_thw[image_index])
            image_index += 1
            gh, gw = h // MERGE, w // MERGE
            st_idx = parts[-1].max() + 1 if parts else 0
            parts.append(np.broadcast_to(np.arange(ed - st), (3, ed - st)) + st_idx)
            t_index = np.zeros(gh * gw, np.int64)
            h_index = np.repeat(np.arange(gh), gw)
            w_index = np.tile(np.arange(gw), gh)
            parts.append(np.stack([t_index, h_index, w_index]) + (ed - st) + st_idx)
            st = ed + gh * gw
        if st < len(tokens):
            st_idx = parts[-1].max() + 1 if parts else 0
            parts.append(
                np.broadcast_to(np.arange(len(tokens) - st), (3, len(tokens) - st)) + st_idx
            )
        position_ids[:, i, attention_mask[i] == 1] = np.concatenate(parts, axis=1)
    return position_ids
