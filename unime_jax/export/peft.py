"""Export a model's LoRA adapters as a PEFT adapter directory.

``peft.PeftModel.from_pretrained(hf_model, out_dir)`` on the base HF model then computes what the
adapted model computes: ``lora_A`` is our A transposed (r, in), ``lora_B`` our B transposed
(out, r), scaling lora_alpha / r. Names come from the family's weight table, like the HF export.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import re
from pathlib import Path

from unime_jax import families
from unime_jax.export.hf import (
    ExportError,
    cast_to,
    load_param,
    resolve_module,
    write_export,
)
from unime_jax.models.lora import linear_paths
from unime_jax.weights.loader import is_stacked
from unime_jax.weights.rules import TRANSPOSE, Transpose
from unime_jax.weights.safetensors import LazyTensor


def export_peft_adapter(
    model,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str,
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes the model's LoRA adapters as a PEFT adapter directory; returns its path.

    ``target_modules`` is a regex matching exactly the adapted modules (not, e.g., CLIP layers
    after the feature layer); adapters whose rank or alpha differ from the most common get
    ``rank_pattern`` / ``alpha_pattern`` entries.
    """
    module, cast = resolve_module(model, dtype)
    wmap = families.get(module.cfg.family).weight_map(module.cfg)
    totals = {first: total for first, _, total, _ in wmap.truncated}  # layers in the HF model
    sentinel = 987654321  # a layer index that appears nowhere else in a tensor name
    tensors, adapted = [], []  # adapted: (module-name regex, r, alpha, dropout) per Linear
    for path, layer in sorted(linear_paths(module).items()):
        if layer.lora_a is None:
            continue
        stacked = is_stacked(layer.kernel)
        count = layer.kernel.shape[0] if stacked else None
        template = wmap.source_name((*path.split("/"), "kernel"), sentinel if stacked else None)
        if template is None or not isinstance(wmap.match(template).transform, Transpose):
            raise ExportError(f"the LoRA adapter on {path} has no PEFT equivalent")
        template = wmap.module(template.removesuffix(".weight"))
        rank = layer.lora_a.shape[-1]
        alpha = layer.lora_scale * rank
        alpha = int(alpha) if float(alpha).is_integer() else alpha
        for i in range(count) if stacked else [None]:
            name = "base_model.model." + template.replace(str(sentinel), str(i))
            for key, var in (("lora_A", layer.lora_a), ("lora_B", layer.lora_b)):
                value = var.get_value()
                dt = cast_to(value.dtype, cast)
                load = functools.partial(load_param, value, i, TRANSPOSE.to_checkpoint, dt)
                shape = tuple(reversed(value.shape[1:] if stacked else value.shape))
                tensors.append(LazyTensor(f"{name}.{key}.weight", shape, dt, load))
        pattern = re.escape(template)
        if stacked:  # every layer of the HF model, or exactly those the model has
            every = count == totals.get(path.split("/")[0], count)
            layers = r"\d+" if every else "(?:" + "|".join(map(str, range(count))) + ")"
            pattern = pattern.replace(str(sentinel), layers)
        adapted.append((pattern, rank, alpha, layer.lora_dropout))
    if not adapted:
        raise ExportError(
            "the model has no LoRA adapters to export", "apply them with models.lora.apply_lora"
        )
    common = collections.Counter(a[1:] for a in adapted)  # PEFT has one default r, alpha, dropout
    rank, alpha, dropout = max(common, key=common.get)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": str(base_model_name_or_path),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": "|".join(a[0] for a in adapted),
        "rank_pattern": {a[0]: a[1] for a in adapted if a[1] != rank},
        "alpha_pattern": {a[0]: a[2] for a in adapted if a[2] != alpha},
        "bias": "none",
        "inference_mode": True,
    }

    def prepare(tmp: Path) -> list[LazyTensor]:
        text = json.dumps(adapter_config, indent=2, sort_keys=True) + "\n"
        (tmp / "adapter_config.json").write_text(text)
        return []

    return write_export(
        Path(out_dir), overwrite, tensors, prepare, "adapter_model.safetensors", None
    )
