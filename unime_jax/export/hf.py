"""Export a trained model as a Hugging Face checkpoint that transformers loads (LoRA merged).

Tensor names are those transformers' ``save_pretrained`` writes for the family's class; each
parameter's name comes from the family's weight table (the loader's), its transform undone and
its layer axis split, so ``load_pretrained`` reads the export back bit for bit.

Parameters may be sharded over a multi-host mesh: tensors are gathered one at a time (a stacked
parameter one layer at a time) and only process 0 writes, into ``<out_dir>.tmp``, renamed once
complete, so an interrupted export never leaves a directory that looks finished.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from unime_jax import families
from unime_jax.errors import DataError, UsageError
from unime_jax.families.base import Family
from unime_jax.models.config import ConfigError, param_dtype
from unime_jax.models.lora import linear_paths, merge_lora
from unime_jax.preprocess.processor import Processor
from unime_jax.weights.hub import read_config
from unime_jax.weights.loader import is_stacked
from unime_jax.weights.rules import WeightMap
from unime_jax.weights.safetensors import (
    SINGLE_FILE,
    CheckpointReader,
    LazyTensor,
    write_checkpoint,
)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".index.json")


class ExportError(UsageError):
    """An export that cannot be done as asked; the message says what to change."""


def resolve_module(model, dtype: str | None):
    """(module, the dtype floating tensors are cast to, or None to keep theirs); ``model`` is a
    module or an :class:`~unime_jax.inference.EmbeddingModel` (anything with ``.module``)."""
    try:
        cast = None if dtype is None else np.dtype(param_dtype(dtype))
    except ConfigError as e:
        raise ExportError(e.what) from e
    module = model.module if hasattr(model, "module") and hasattr(model, "graphdef") else model
    return module, cast


def cast_to(dtype: Any, cast: np.dtype | None) -> np.dtype:
    floating = jnp.issubdtype(dtype, jnp.floating)  # integer buffers keep their type
    return np.dtype(cast if cast is not None and floating else dtype)


def gather(x: jax.Array) -> np.ndarray:
    """The full value on the host; a collective on multi-host meshes (every process calls it)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def load_param(value, layer, to_checkpoint, dtype: np.dtype) -> np.ndarray:
    x = value if layer is None else value[layer]  # sliced on device: one layer is gathered
    return to_checkpoint(gather(x.astype(dtype) if x.dtype != dtype else x))


def module_tensors(module, wmap: WeightMap, cast: np.dtype | None) -> list[LazyTensor]:
    """Every parameter as HF tensors (one per layer of a stacked parameter), canonical names."""
    out = []
    for path, var in nnx.state(module, nnx.Param).flat_state():
        path = tuple(str(p) for p in path)
        value = var.get_value()
        dtype = cast_to(value.dtype, cast)
        stacked = is_stacked(var)
        for layer in range(value.shape[0]) if stacked else [None]:
            name = wmap.source_name(path, layer)
            if name is None:
                raise ExportError(f"parameter {'/'.join(path)} has no rule in the weight table")
            transform = wmap.match(name).transform
            shape = transform.checkpoint_shape(tuple(value.shape[1:] if stacked else value.shape))
            load = functools.partial(load_param, value, layer, transform.to_checkpoint, dtype)
            out.append(LazyTensor(name, shape, dtype, load))
    return out


def base_tensors(
    base: Path, wmap: WeightMap, ours: dict[str, LazyTensor], cast
) -> list[LazyTensor]:
    """The base checkpoint's tensors that the module does not hold (canonical names); those it
    does hold must have the module's shapes."""
    reader, out = CheckpointReader(base), []
    for name in reader:
        canon, shape = wmap.canonical(name), tuple(reader.shape(name))
        if canon in ours:
            if shape != ours[canon].shape:
                raise ExportError(
                    f"tensor {name!r} in {base} has shape {shape}, but the model's is "
                    f"{ours[canon].shape}",
                    "pass as base_dir the checkpoint the model was loaded from",
                )
            continue
        source = reader.get(name)  # a memory map: read only when the tensor is written
        dtype = cast_to(source.dtype, cast)
        load = functools.partial(lambda s, d: np.asarray(s).astype(d, copy=False), source, dtype)
        out.append(LazyTensor(canon, shape, dtype, load))
    return out


def check_config(family: Family, hf_config: dict, cfg: Any, source: str) -> None:
    """The written config.json must describe exactly the exported module."""
    try:
        described = family.parse_config(hf_config)
    except (ConfigError, KeyError) as e:
        raise ExportError(f"{source} is not a supported {family.name} config: {e}") from e
    if getattr(cfg, "vision", True) is None:
        described = family.text_only(described)
    diffs = _differences(dataclasses.asdict(described), dataclasses.asdict(cfg))
    if diffs:
        raise ExportError(f"{source} describes another model (config vs model): {diffs[:8]}")


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key, x in a.items():
        y = b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}: {x!r} != {y!r}")
    return out


def on_lead(fn: Callable[[], Any]) -> Any:
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
            raise DataError("the export failed on process 0; see its error")
    if error is not None:
        raise error
    return result


def write_export(out: Path, overwrite: bool, tensors, prepare, single: str, limit) -> Path:
    """Checks ``out``; ``prepare(tmp)`` writes the other files on process 0 and returns tensors
    only process 0 reads; the weights go into ``tmp``, which then replaces ``out``."""
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")

    def setup() -> list[LazyTensor]:
        if out.exists() and not out.is_dir():
            raise ExportError(f"{out} exists and is not a directory", "choose another out_dir")
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise ExportError(f"{out} is not empty", "pass overwrite=True to replace it")
        shutil.rmtree(tmp, ignore_errors=True)  # left over from an interrupted export
        tmp.mkdir(parents=True)
        try:
            return prepare(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    extra = on_lead(setup)
    lead = jax.process_index() == 0
    try:
        if lead:
            write_checkpoint(sorted(tensors + extra, key=lambda t: t.name), tmp, single, limit)
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
    model,
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
    Without it, ``hf_config`` (the HF config dict) and ``processor`` are required, and the family
    fills what transformers expects (e.g. the LM head as a copy of the input embeddings). Given
    with ``base_dir``, they replace the base's files.

    ``dtype``: None keeps each tensor's dtype; "bfloat16" / "float32" cast floating tensors.
    ``max_shard_size``: bytes or "5GB"-style, as in ``save_pretrained``. A non-empty ``out_dir``
    is only replaced with ``overwrite=True``. Every process of a multi-host run must call this.
    """
    from transformers.utils.hub import convert_file_size_to_int

    module, cast = resolve_module(model, dtype)
    if any(layer.lora_a is not None for layer in linear_paths(module).values()):
        module = nnx.clone(module)  # new Variables: the caller's model keeps its adapters
        merge_lora(module)
    cfg, out, base = module.cfg, Path(out_dir), None if base_dir is None else Path(base_dir)
    if base is None and (hf_config is None or processor is None):
        raise ExportError(
            "without base_dir, both hf_config (the HF config dict) and processor are required"
        )
    if base is not None and base.resolve() == out.resolve():
        raise ExportError(f"out_dir {out} is base_dir", "write the export to another directory")
    config = copy.deepcopy(hf_config) if hf_config is not None else read_config(base)
    family = families.for_config(config)
    if base is None and getattr(cfg, "vision", True) is None:
        raise ExportError(
            "a text-only model has no vision tower or projector",
            "pass base_dir to take them from the base checkpoint",
        )
    wmap = family.weight_map(cfg)
    tensors = module_tensors(module, wmap, cast)
    by_name = {t.name: t for t in tensors}
    if base is None:
        tensors += family.export_fillers(cfg, by_name, config)
    embed_dtype = next(t.dtype for t in tensors if t.name.endswith("embed_tokens.weight")).name
    tensors = [dataclasses.replace(t, name=wmap.saved(t.name)) for t in tensors]

    def prepare(tmp: Path) -> list[LazyTensor]:
        source = "hf_config" if hf_config is not None else str(base / "config.json")
        check_config(family, config, cfg, source)
        extra = [] if base is None else base_tensors(base, wmap, by_name, cast)
        extra = [dataclasses.replace(t, name=wmap.saved(t.name)) for t in extra]
        for file in sorted(base.iterdir()) if base is not None else []:
            weights = file.name.endswith(_WEIGHT_SUFFIXES)
            if file.is_file() and not weights and file.name != "config.json":
                shutil.copy(file, tmp / file.name)
        config.setdefault("architectures", [family.architecture])
        config["dtype"] = embed_dtype  # what from_pretrained(dtype="auto") loads the model in
        if "torch_dtype" in config:
            config["torch_dtype"] = embed_dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if processor is not None:
            processor.tokenizer.save_pretrained(tmp)
            if getattr(processor, "image_processor", None) is not None:
                processor.image_processor.save_pretrained(tmp)
        return extra

    limit = convert_file_size_to_int(max_shard_size)
    return write_export(out, overwrite, tensors, prepare, SINGLE_FILE, limit)
