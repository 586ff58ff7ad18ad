"""Export trained models as Hugging Face checkpoints and PEFT LoRA adapters.

:func:`export_hf` writes a directory that ``LlavaOnevisionForConditionalGeneration`` /
``LlavaNextForConditionalGeneration.from_pretrained`` loads with no missing or unexpected weights,
LoRA merged. Tensor names are those transformers 5.x ``save_pretrained`` writes for these classes
(``language_model.model.*``, ``language_model.lm_head.weight``, ``vision_tower.*``,
``multi_modal_projector.*``, ``image_newline``); each parameter's name comes from the loader's rule
table (:mod:`unime_jax.weights.name_maps`), its transform undone and its layer axis split.
:func:`export_peft_adapter` writes the adapters alone, in PEFT's LoRA format.

Parameters may be sharded over a multi-host mesh: tensors are gathered one at a time (a stacked
parameter one layer at a time) and only process 0 writes, into ``<out_dir>.tmp``, renamed once
complete, so an interrupted export never leaves a directory that looks finished.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import json
import os
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from unime_jax.models.config import ConfigError, LlavaConfig, VisionConfig
from unime_jax.models.lora import linear_paths, merge_lora
from unime_jax.models.mllm import LlavaModel
from unime_jax.models.runtime import EmbeddingModel
from unime_jax.processing import Processor
from unime_jax.weights.loader import DTYPES, read_config
from unime_jax.weights.name_maps import canonical_name, match, source_name
from unime_jax.weights.safetensors_io import DTYPES as ST_DTYPES
from unime_jax.weights.safetensors_io import INDEX_FILE, SINGLE_FILE, CheckpointReader

# Canonical prefix -> the prefix in files written by ``save_pretrained`` (transformers 5.23).
SAVE_PREFIXES = (
    ("language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
# Canonical prefix -> module path inside the transformers model (PEFT keys and target_modules).
MODULE_PREFIXES = (
    ("language_model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("image_newline", "model.image_newline"),
)
ARCHITECTURES = {
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".index.json")
_ST_CODES = {np.dtype(v): k for k, v in ST_DTYPES.items()}


class ExportError(ValueError):
    """An export that cannot be done as asked; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One tensor of the output: final name, layout, and a loader that returns its host data."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    load: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _prefixed(canonical: str, prefixes: tuple[tuple[str, str], ...]) -> str:
    for prefix, replacement in prefixes:
        if canonical.startswith(prefix):
            return replacement + canonical[len(prefix) :]
    return canonical


def _resolve(model: LlavaModel | EmbeddingModel, dtype: str | None):
    """(module, the dtype floating tensors are cast to, or None to keep theirs)."""
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not supported; use None or one of {sorted(DTYPES)}")
    module = model.module if isinstance(model, EmbeddingModel) else model
    return module, None if dtype is None else np.dtype(DTYPES[dtype])


def _cast_to(dtype: Any, cast: np.dtype | None) -> np.dtype:
    floating = jnp.issubdtype(dtype, jnp.floating)  # integer buffers keep their type
    return np.dtype(cast if cast is not None and floating else dtype)


def _gather(x: jax.Array) -> np.ndarray:
    """The full value on the host; a collective on multi-host meshes (every process calls it)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _hf_shape(shape: tuple[int, ...], transform: str | None, vision: VisionConfig | None):
    if transform == "T":
        return tuple(reversed(shape))
    if transform == "conv":  # our (C*p*p, D) kernel of VisionTower.patchify -> (D, C, p, p)
        return (shape[1], vision.num_channels, vision.patch_size, vision.patch_size)
    return tuple(shape)


def _load_param(value, layer, transform, vision, dtype: np.dtype) -> np.ndarray:
    x = value if layer is None else value[layer]  # sliced on device: one layer is gathered
    array = _gather(x.astype(dtype) if x.dtype != dtype else x)
    if transform == "T":
        return array.T
    return array.T.reshape(_hf_shape(array.shape, transform, vision)) if transform else array


def _module_tensors(module: LlavaModel, cast: np.dtype | None) -> list[_Tensor]:
    """Every parameter as HF tensors (one per layer of a stacked parameter)."""
    vision, out = module.cfg.vision, []
    for path, var in nnx.state(module, nnx.Param).flat_state():
        path = tuple(str(p) for p in path)
        stacked = "layers" in (var.get_metadata().get("out_sharding") or ())
        value = var.get_value()
        dtype = _cast_to(value.dtype, cast)
        for layer in range(value.shape[0]) if stacked else [None]:
            name = source_name(path, layer)
            if name is None:
                raise ExportError(f"parameter {'/'.join(path)} has no rule in LLAVA_RULES")
            transform = match(name).transform
            shape = _hf_shape(tuple(value.shape[1:] if stacked else value.shape), transform, vision)
            load = functools.partial(_load_param, value, layer, transform, vision, dtype)
            out.append(_Tensor(_prefixed(name, SAVE_PREFIXES), shape, dtype, load))
    return out


def _filler_tensors(module: LlavaModel, ours: list[_Tensor], hf_config: dict) -> list[_Tensor]:
    """Without a base checkpoint: tensors transformers expects that never influence an embedding.
    The LM head is a copy of the input embeddings (unless tied); the vision post-layernorm and the
    vision layers after the feature layer are identities (unit norms, zero projections)."""
    cfg, out = module.cfg, []
    by_name = {canonical_name(t.name): t for t in ours}

    def constant(name: str, like: _Tensor, fill: float) -> _Tensor:
        load = functools.partial(np.full, like.shape, fill, like.dtype)
        return _Tensor(_prefixed(name, SAVE_PREFIXES), like.shape, like.dtype, load)

    text = hf_config.get("text_config") or {}
    if not hf_config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)):
        embed = by_name["language_model.embed_tokens.weight"]
        out.append(dataclasses.replace(embed, name=_prefixed("lm_head.weight", SAVE_PREFIXES)))
    norm = by_name["vision_tower.encoder.layers.0.layer_norm1.weight"]
    out += [constant("vision_tower.post_layernorm.weight", norm, 1.0)]
    out += [constant("vision_tower.post_layernorm.bias", norm, 0.0)]
    first = [(n, t) for n, t in by_name.items() if n.startswith("vision_tower.encoder.layers.0.")]
    for layer in range(cfg.vision_layers_used, cfg.vision.num_layers):
        for name, t in first:
            name = name.replace(".layers.0.", f".layers.{layer}.", 1)
            out.append(constant(name, t, float("layer_norm" in name and name.endswith("weight"))))
    return out


def _base_tensors(base: Path, ours: list[_Tensor], cast: np.dtype | None) -> list[_Tensor]:
    """The base checkpoint's tensors that the module does not hold, renamed to the save layout;
    those it does hold must have the module's shapes."""
    reader, held, out = CheckpointReader(base), {canonical_name(t.name): t for t in ours}, []
    for name in reader:
        canon, shape = canonical_name(name), tuple(reader.shape(name))
        if canon in held:
            if shape != held[canon].shape:
                raise ExportError(
                    f"tensor {name!r} in {base} has shape {shape}, but the model's is "
                    f"{held[canon].shape}; is base_dir the checkpoint the model was loaded from?"
                )
            continue
        source = reader.get(name)  # a memory map: read only when the tensor is written
        dtype = _cast_to(source.dtype, cast)
        load = functools.partial(lambda s, d: np.asarray(s).astype(d, copy=False), source, dtype)
        out.append(_Tensor(_prefixed(canon, SAVE_PREFIXES), shape, dtype, load))
    return out


def _check_config(hf_config: dict, cfg: LlavaConfig, source: str) -> None:
    """The written config.json must describe exactly the exported module."""
    try:
        described = LlavaConfig.from_hf(hf_config)
    except (ConfigError, KeyError) as e:
        raise ExportError(f"{source} is not a supported LLaVA config: {e}") from e
    a = dataclasses.asdict(described.text_only() if cfg.vision is None else described)
    b, diffs = dataclasses.asdict(cfg), []
    for key, x in a.items():
        if isinstance(x, dict) and isinstance(b[key], dict):  # text, vision, anyres
            diffs += [f"{key}.{k}: {v!r} != {b[key][k]!r}" for k, v in x.items() if v != b[key][k]]
        elif x != b[key]:
            diffs.append(f"{key}: {x!r} != {b[key]!r}")
    if diffs:
        raise ExportError(f"{source} describes another model (config vs model): {diffs[:8]}")


def _write_file(path: Path, tensors: list[_Tensor]) -> None:
    """A safetensors file written tensor by tensor: the header needs only shapes and dtypes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        if t.name in header:  # e.g. a base holding one tensor under both name layouts
            raise ExportError(f"two tensors would be written as {t.name!r}")
        header[t.name] = dict(
            dtype=_ST_CODES[t.dtype], shape=t.shape, data_offsets=(offset, offset + t.nbytes)
        )
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # 8-byte aligned data, as the safetensors library writes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors:
            array = t.load()
            if tuple(array.shape) != t.shape or array.dtype != t.dtype:
                raise ExportError(f"{t.name} is {array.dtype}{array.shape}, not {t.dtype}{t.shape}")
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        f.flush()
        os.fsync(f.fileno())


def _write_weights(tensors: list[_Tensor], directory: Path, single: str, limit: int | None):
    """``single`` when everything fits in ``limit`` bytes, else numbered shards and an index."""
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for t in tensors:
        if limit is not None and shards[-1] and size + t.nbytes > limit:
            shards, size = [*shards, []], 0
        shards[-1].append(t)
        size += t.nbytes
    if len(shards) == 1:
        return _write_file(directory / single, shards[0])
    stem, ext = single.split(".", 1)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}"
        _write_file(directory / file, shard)
        weight_map |= dict.fromkeys((t.name for t in shard), file)
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _on_lead(fn: Callable[[], Any]) -> Any:
    """Runs ``fn`` on process 0 only; its exception is raised on every process (the others would
    otherwise wait forever in the next gather)."""
    result, error = None, None
    if jax.process_index() == 0:
        try:
            result = fn()
        except Exception as e:
            error = e
    if jax.process_count() > 1:  # every process takes part in the broadcast
        failed = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
        if failed and error is None:
            raise ExportError("the export failed on process 0; see its error")
    if error is not None:
        raise error
    return result


def _export(out: Path, overwrite: bool, tensors: list[_Tensor], prepare, single: str, limit):
    """Checks ``out``; ``prepare(tmp)`` writes the other files on process 0 and returns tensors
    only process 0 reads; the weights go into ``tmp``, which then replaces ``out``."""
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")

    def setup() -> list[_Tensor]:
        if out.exists() and not out.is_dir():
            raise ExportError(f"{out} exists and is not a directory")
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise ExportError(f"{out} is not empty; pass overwrite=True to replace it")
        shutil.rmtree(tmp, ignore_errors=True)  # left over from an interrupted export
        tmp.mkdir(parents=True)
        try:
            return prepare(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    extra = _on_lead(setup)
    lead = jax.process_index() == 0
    try:
        if lead:
            _write_weights(sorted(tensors + extra, key=lambda t: t.name), tmp, single, limit)
            if out.exists():  # the old directory goes only once the new one is complete
                shutil.rmtree(old, ignore_errors=True)
                out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:  # the same gathers, in the same order, as process 0's writer
            for t in sorted(tensors, key=lambda t: t.name):
                t.load()
    except BaseException:
        if lead:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"unime_jax export {out}")
    return out


def export_hf(
    model: LlavaModel | EmbeddingModel,
    out_dir: str | os.PathLike,
    *,
    base_dir: str | os.PathLike | None = None,
    hf_config: dict | None = None,
    processor: Processor | None = None,
    dtype: str | None = None,
    max_shard_size: int | str = "50GB",
    overwrite: bool = False,
) -> Path:
    """Writes ``model`` (LoRA merged, on a copy) as an HF checkpoint directory; returns its path.

    With ``base_dir`` (the HF checkpoint the model was loaded from), its config.json, tokenizer
    and processor files are copied, and every base tensor the model does not hold (the vision
    tower and projector of a text-only model, the LM head) is copied unchanged, one at a time.
    Without it, ``hf_config`` (the HF config dict) and ``processor`` are required, and the LM head
    is a copy of the input embeddings. Given with ``base_dir``, they replace the base's files.

    ``dtype``: None keeps each tensor's dtype; "bfloat16" / "float32" cast floating tensors.
    ``max_shard_size``: bytes or "5GB"-style, as in ``save_pretrained``. A non-empty ``out_dir``
    is only replaced with ``overwrite=True``. Every process of a multi-host run must call this.
    """
    from transformers.utils.hub import convert_file_size_to_int

    module, cast = _resolve(model, dtype)
    if any(layer.lora_a is not None for layer in linear_paths(module).values()):
        module = nnx.clone(module)  # new Variables: the caller's model keeps its adapters
        merge_lora(module)
    cfg, out, base = module.cfg, Path(out_dir), None if base_dir is None else Path(base_dir)
    if base is None and (hf_config is None or processor is None):
        raise ExportError(
            "without base_dir, both hf_config (the HF config dict) and processor are required"
        )
    if base is None and cfg.vision is None:
        raise ExportError(
            "a text-only model has no vision tower or projector; pass base_dir to take them from "
            "the base checkpoint"
        )
    if base is not None and base.resolve() == out.resolve():
        raise ExportError(f"out_dir {out} is base_dir; write the export to another directory")
    tensors = _module_tensors(module, cast)
    if base is None:
        tensors += _filler_tensors(module, tensors, hf_config)
    embed_dtype = next(t.dtype for t in tensors if t.name.endswith("embed_tokens.weight")).name

    def prepare(tmp: Path) -> list[_Tensor]:
        config = copy.deepcopy(hf_config) if hf_config is not None else read_config(base)
        _check_config(
            config, cfg, "hf_config" if hf_config is not None else str(base / "config.json")
        )
        extra = [] if base is None else _base_tensors(base, tensors, cast)
        for file in sorted(base.iterdir()) if base is not None else []:
            weights = file.name.endswith(_WEIGHT_SUFFIXES)
            if file.is_file() and not weights and file.name != "config.json":
                shutil.copy(file, tmp / file.name)
        config.setdefault("architectures", [ARCHITECTURES[cfg.family]])
        config["dtype"] = embed_dtype  # what from_pretrained(dtype="auto") loads the model in
        if "torch_dtype" in config:
            config["torch_dtype"] = embed_dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if processor is not None:
            processor.tokenizer.save_pretrained(tmp)
            if processor.image_processor is not None:
                processor.image_processor.save_pretrained(tmp)
        return extra

    limit = convert_file_size_to_int(max_shard_size)
    return _export(out, overwrite, tensors, prepare, SINGLE_FILE, limit)


def export_peft_adapter(
    model: LlavaModel | EmbeddingModel,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str,
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes the model's LoRA adapters as a PEFT adapter directory; returns its path.

    ``peft.PeftModel.from_pretrained(hf_model, out_dir)`` on the base HF model then computes what
    the adapted model computes: ``lora_A`` is our A transposed (r, in), ``lora_B`` our B
    transposed (out, r), scaling lora_alpha / r. ``target_modules`` is a regex matching exactly
    the adapted modules (not, e.g., CLIP layers after the feature layer); adapters whose rank or
    alpha differ from the most common get ``rank_pattern`` / ``alpha_pattern`` entries.
    """
    module, cast = _resolve(model, dtype)
    depth = {"llm": module.cfg.text.num_layers}
    depth["vision"] = module.cfg.vision.num_layers if module.cfg.vision else None
    sentinel = 987654321  # a layer index that appears nowhere else in a tensor name
    tensors, adapted = [], []  # adapted: (module-name regex, r, alpha, dropout) per Linear
    for path, layer in sorted(linear_paths(module).items()):
        if layer.lora_a is None:
            continue
        stacked = "layers" in (layer.kernel.get_metadata().get("out_sharding") or ())
        count = layer.kernel.shape[0] if stacked else None
        template = source_name((*path.split("/"), "kernel"), sentinel if stacked else None)
        if template is None or match(template).transform != "T":
            raise ExportError(f"the LoRA adapter on {path} has no PEFT equivalent")
        template = _prefixed(template.removesuffix(".weight"), MODULE_PREFIXES)
        rank = layer.lora_a.shape[-1]
        alpha = layer.lora_scale * rank
        alpha = int(alpha) if float(alpha).is_integer() else alpha
        for i in range(count) if stacked else [None]:
            name = "base_model.model." + template.replace(str(sentinel), str(i))
            for key, var in (("lora_A", layer.lora_a), ("lora_B", layer.lora_b)):
                value = var.get_value()
                dt = _cast_to(value.dtype, cast)
                load = functools.partial(_load_param, value, i, "T", None, dt)
                shape = tuple(reversed(value.shape[1:] if stacked else value.shape))
                tensors.append(_Tensor(f"{name}.{key}.weight", shape, dt, load))
        pattern = re.escape(template)
        if stacked:  # every layer of the HF model, or exactly those the model has
            every = count == depth[path.split("/")[0]]
            layers = r"\d+" if every else "(?:" + "|".join(map(str, range(count))) + ")"
            pattern = pattern.replace(str(sentinel), layers)
        adapted.append((pattern, rank, alpha, layer.lora_dropout))
    if not adapted:
        raise ExportError("the model has no LoRA adapters to export (see models.lora.apply_lora)")
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

    def prepare(tmp: Path) -> list[_Tensor]:
        text = json.dumps(adapter_config, indent=2, sort_keys=True) + "\n"
        (tmp / "adapter_config.json").write_text(text)
        return []

    return _export(Path(out_dir), overwrite, tensors, prepare, "adapter_model.safetensors", None)
