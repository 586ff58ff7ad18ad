"""Torch-side helpers for parity tests: tiny random HF LLaVA checkpoints and reference outputs.

Not a test module (no ``test_`` prefix). Everything is built offline from ``unime_jax.tiny``.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    PreTrainedModel,
)

from unime_jax.demo import tiny_configs as tiny
from unime_jax.demo.tokenizers import build_tokenizer

_FAMILIES: dict[str, tuple[type, type, type]] = {
    "llava_onevision": (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
    ),
    "llava_next": (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil),
}
_DEFAULT_TOKENIZER = {"qwen2": "qwen2", "mistral": "mistral", "llama": "mistral"}


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


@torch.no_grad()
def randomize_weights(model: nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Re-draw every parameter so that no weight keeps a structured init value.

    transformers initialises norm weights to 1 and biases to 0, which would let a loader that
    drops, swaps or misnames those tensors still pass a parity test. Norm weights become
    1 + N(0, 2*std) (keeps activations well scaled); everything else, including norm biases,
    q/k/v biases, embeddings, the CLIP class embedding and image_newline, becomes N(0, std).
    """
    gen = torch.Generator().manual_seed(seed)
    norm_weights = {id(m.weight) for m in model.modules() if _is_norm(m) and m.weight is not None}
    for param in model.parameters():  # shared (tied) parameters are yielded once
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if id(param) in norm_weights:
            param.copy_(1.0 + 2 * std * noise)
        else:
            param.copy_(std * noise)


def save_tiny_llava(
    path: str | pathlib.Path,
    family: str,
    *,
    seed: int = 0,
    text: str | None = None,
    vision: str | None = None,
    tokenizer_style: str | None = None,
    max_shard_size: str | int | None = None,
    init_std: float = 0.05,
    padding_side: str = "right",
    hub_layout: bool = False,
    **config_overrides: Any,
) -> pathlib.Path:
    """Write a tiny random ``family`` checkpoint + tokenizer + image processor to ``path``.

    ``family`` is "llava_onevision" (default SigLIP + Qwen2) or "llava_next" (CLIP + Mistral).
    ``text`` is "qwen2" | "mistral" | "llama"; the tokenizer style defaults to qwen2 for a Qwen2
    decoder and to mistral otherwise. ``max_shard_size`` (e.g. "50KB") forces a sharded
    checkpoint with ``model.safetensors.index.json``; otherwise one ``model.safetensors``.

    transformers 5.23 saves the vision tower flat (``vision_tower.encoder...``) while the llava-hf
    hub checkpoints nest it (``vision_tower.vision_model.encoder...``); both load in HF. With
    ``hub_layout=True`` the files are rewritten to the hub naming.
    """
    config_cls, model_cls, processor_cls = _FAMILIES[family]
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)

    text = text or ("qwen2" if family == "llava_onevision" else "mistral")
    tokenizer = build_tokenizer(
        tokenizer_style or _DEFAULT_TOKENIZER[text], padding_side=padding_side
    )
    video_id = getattr(tokenizer, "video_token_id", None)
    cfg_dict = tiny.tiny_llava_config(
        family,
        len(tokenizer),
        tokenizer.image_token_id,
        vision=vision,
        text=text,
        video_token_id=video_id if family == "llava_onevision" else None,
        **config_overrides,
    )
    cfg_dict.pop("model_type")
    text_ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    text_ids["bos_token_id"] = tokenizer.bos_token_id
    for key, value in text_ids.items():
        cfg_dict["text_config"].setdefault(key, value)
    config = config_cls(**cfg_dict)

    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    randomize_weights(model, seed=seed, std=init_std)

    save_kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **save_kwargs)
    if hub_layout:
        _rename_vision_keys(path)
    tokenizer.save_pretrained(path)
    processor_cfg = tiny.image_processor_config(
        family, cfg_dict["vision_config"], image_grid_pinpoints=cfg_dict["image_grid_pinpoints"]
    )
    processor_cls(**processor_cfg).save_pretrained(path)
    return path


def _rename_vision_keys(path: pathlib.Path) -> None:
    """Rewrite saved tensor names ``vision_tower.X`` -> ``vision_tower.vision_model.X``."""

    def rename(key: str) -> str:
        return "vision_tower.vision_model." + key[13:] if key.startswith("vision_tower.") else key

    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata()
            names = handle.keys()  # safe_open handles are not iterable
            tensors = {rename(k): handle.get_tensor(k) for k in names}
        save_file(tensors, str(file), metadata=metadata)
    index_file = path / "model.safetensors.index.json"
    if index_file.exists():
        index = json.loads(index_file.read_text())
        index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def load_hf_model(path: str | pathlib.Path) -> PreTrainedModel:
    """The saved torch model in eval mode, float32, eager attention (the plainest reference)."""
    model_cls = _FAMILIES[AutoConfig.from_pretrained(path).model_type][1]
    model = model_cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


_INT_INPUTS = {"input_ids", "attention_mask", "image_sizes", "batch_num_images", "position_ids"}


def hf_hidden_states(model: PreTrainedModel, **np_inputs: Any) -> np.ndarray:
    """Final-layer decoder hidden states *after* the final RMSNorm, shape (B, T, D), float32.

    Inputs are numpy arrays (input_ids, attention_mask, pixel_values, image_sizes, and for
    llava-onevision optionally batch_num_images); ``None`` values are dropped.

    In transformers 5 the language model's ``hidden_states`` (length num_layers + 1) are recorded
    by hooks on the decoder layers (``capture_outputs``) and the last entry is then *replaced* by
    ``last_hidden_state``, the output of ``language_model.norm`` (``tie_last_hidden_states=True``
    for Qwen2, Mistral and Llama). So ``hidden_states[0]`` is the merged input embeddings (image
    features scattered in), ``[i]`` for 0 < i < num_layers the raw output of decoder layer i - 1,
    and ``[-1]`` is post-norm; the last layer's pre-norm output is not exposed at all. The final
    norm is hooked as well and must agree exactly.
    """
    inputs: dict[str, torch.Tensor] = {}
    for key, value in np_inputs.items():
        if value is None:
            continue
        array = np.asarray(value)
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        inputs[key] = tensor.long() if key in _INT_INPUTS else tensor.float()

    captured: list[torch.Tensor] = []
    norm = model.model.language_model.norm
    handle = norm.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.no_grad():
            outputs = model(**inputs, output_hidden_states=True, use_cache=False, return_dict=True)
    finally:
        handle.remove()

    final = outputs.hidden_states[-1]
    if len(captured) != 1 or not torch.equal(captured[0], final):
        raise AssertionError("hidden_states[-1] is not the output of the final norm")
    return final.detach().to(torch.float32).numpy()
