"""Load HF LLaVA-NeXT / LLaVA-OneVision checkpoints into a sharded NNX state, without torch.

The model is first built abstractly (``nnx.eval_shape``); each parameter is then created
directly in its target sharding with ``jax.make_array_from_callback``, whose callback reads only
the slice a device owns from the memory-mapped safetensors. No host ever materialises the full
model.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from unime_jax import sharding
from unime_jax.models.config import ConfigError, LlavaConfig
from unime_jax.models.mllm import LlavaModel
from unime_jax.models.runtime import EmbeddingModel
from unime_jax.weights.name_maps import (
    VISION_PREFIXES,
    canonical_name,
    match,
    skip_reason,
    source_name,
)
from unime_jax.weights.safetensors_io import CheckpointError, CheckpointReader

log = logging.getLogger(__name__)


def resolve_checkpoint(path_or_id: str | os.PathLike) -> Path:
    """A local checkpoint directory; a hub id is downloaded when a network is available."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_id)
    if path.exists():
        raise CheckpointError(
            f"checkpoint path {name} is a file, not a directory; pass the directory that "
            "holds config.json and the *.safetensors files"
        )
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(f"checkpoint directory {name} does not exist")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:  # network errors come in many types; the advice is the same
        local = f"/path/to/{name.split('/')[-1]}"
        raise CheckpointError(
            f"{name!r} is not a local directory and could not be fetched from the HF hub ({e}). "
            f"On a machine with network access run `hf download {name} --local-dir {local}` "
            f"(older huggingface_hub: `huggingface-cli download {name} --local-dir {local}`), "
            "copy that directory here and pass its path instead."
        ) from e


def read_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json; is it an HF model directory?")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{path} is not an HF config: it holds a JSON {type(config).__name__}"
        )
    return config


def parse_config(directory: str | os.PathLike) -> LlavaConfig:
    """``config.json`` as a :class:`LlavaConfig`; errors name the file."""
    path = Path(directory) / "config.json"
    raw = read_config(directory)
    try:
        cfg = LlavaConfig.from_hf(raw)
        if cfg.vision is not None:
            cfg.vision_layers_used  # noqa: B018 -- validates vision_feature_layer now
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    except KeyError as e:
        raise ConfigError(f"{path} lacks the required key {e}") from e
    return cfg


def _transform(array: np.ndarray, transform: str | None) -> np.ndarray:
    """Lazy view in our layout; transposes of a memmap stay memory-mapped."""
    if transform == "T":
        return array.T
    if transform == "conv":  # (D, C, p, p) -> (C*p*p, D), the order of VisionTower.patchify
        return array.reshape(array.shape[0], -1).T
    return array


def _checkpoint_shape(expected: tuple[int, ...], transform: str | None) -> str:
    """The shape a checkpoint tensor must have to become a parameter of shape ``expected``."""
    if transform == "T":
        return str(tuple(reversed(expected)))
    if transform == "conv":
        return f"({expected[1]}, C, p, p) with C*p*p = {expected[0]}"
    return str(tuple(expected))


def _assign(
    reader: CheckpointReader,
    flat_abstract: dict,
    text_only: bool,
    vision_layers: int | None,
    vision_total: int | None = None,
):
    """Maps every checkpoint tensor to (param path, layer) or a logged skip; strict both ways.

    ``vision_layers``: vision layers the model builds; ``vision_total``: layers in config.json
    (checkpoint layers in between are skipped, beyond it they are an error).
    """
    sources: dict[tuple, dict[int | None, tuple[str, str | None]]] = collections.defaultdict(dict)
    skipped: dict[str, list[str]] = collections.defaultdict(list)
    unexpected = []
    for name in reader:
        canon = canonical_name(name)
        reason = skip_reason(canon)
        if reason is None and text_only and canon.startswith(VISION_PREFIXES):
            reason = "text-only model: vision tower and projector are not built"
        m = match(canon) if reason is None else None
        if (
            m is not None
            and m.target[0] == "vision"
            and m.layer is not None
            and vision_layers is not None
            and m.layer >= vision_layers
        ):
            if vision_total is not None and m.layer >= vision_total:
                raise CheckpointError(
                    f"tensor {name!r} is vision layer {m.layer}, but config.json has "
                    f"{vision_total} vision layers; does config.json belong to these weights?"
                )
            reason, m = "vision layers after vision_feature_layer never reach the features", None
        if reason is not None:
            skipped[reason].append(name)
            continue
        if m is None or m.target not in flat_abstract:
            unexpected.append(name)
            continue
        var = flat_abstract[m.target]
        stacked = "layers" in (var.get_metadata().get("out_sharding") or ())
        if stacked != (m.layer is not None):
            unexpected.append(name)
            continue
        if stacked and m.layer >= var.shape[0]:
            raise CheckpointError(
                f"tensor {name!r} is layer {m.layer}, but config.json has {var.shape[0]} layers; "
                "does config.json belong to these weights?"
            )
        expected = tuple(var.shape[1:] if stacked else var.shape)
        shape = tuple(reader.shape(name))
        try:
            got = tuple(_transform(np.empty(shape, np.uint8), m.transform).shape)
        except ValueError:  # e.g. a conv weight that is not 4-D
            got = None
        if got != expected:
            raise CheckpointError(
                f"tensor {name!r} has shape {shape}, but config.json implies "
                f"{_checkpoint_shape(expected, m.transform)} (parameter {'/'.join(m.target)} "
                f"{expected}); does config.json belong to these weights?"
            )
        if m.layer in sources[m.target]:
            other = sources[m.target][m.layer][0]
            raise CheckpointError(
                f"tensors {other!r} and {name!r} both map to {'/'.join(m.target)}"
            )
        sources[m.target][m.layer] = (name, m.transform)
    if unexpected:
        raise CheckpointError(
            f"{len(unexpected)} unexpected tensor(s) in {reader.directory}, not part of this "
            f"architecture: {sorted(unexpected)[:10]}"
        )
    missing = []
    for path, var in flat_abstract.items():
        stacked = "layers" in (var.get_metadata().get("out_sharding") or ())
        wanted = range(var.shape[0]) if stacked else [None]
        for i in wanted:
            if i not in sources[path]:
                item = "/".join(path) + ("" if i is None else f"[layer {i}]")
                missing.append(f"{item} <- {source_name(path, i) or '?'}")
    if missing:
        raise CheckpointError(
            f"{len(missing)} parameter(s) missing from {reader.directory} (parameter <- "
            "checkpoint tensor, named without its layout prefix such as model. or "
            f"language_model.model.): {missing[:10]}"
        )
    for reason, names in skipped.items():
        shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
        log.info("skipped %d checkpoint tensor(s) (%s): %s", len(names), shown, reason)
    return sources


def load_state(directory, cfg: LlavaConfig, mesh: Mesh, dtype=jnp.float32, remat: bool = False):
    """(graphdef, state) of a :class:`LlavaModel` with weights from ``directory``, sharded on ``mesh``."""
    reader = CheckpointReader(directory)
    abstract = nnx.eval_shape(lambda: LlavaModel(cfg, rngs=nnx.Rngs(0), dtype=dtype, remat=remat))
    graphdef, abstract_state = nnx.split(abstract)
    flat = dict(abstract_state.flat_state())
    vision_layers = cfg.vision_layers_used if cfg.vision is not None else None
    vision_total = cfg.vision.num_layers if cfg.vision is not None else None
    sources = _assign(reader, flat, cfg.vision is None, vision_layers, vision_total)
    shardings = dict(sharding.state_shardings(abstract_state, mesh).flat_state())

    def fill(path, var):
        per_layer = sources[path]
        target_dtype = var.dtype

        def callback(index):
            if None in per_layer:
                name, tf = per_layer[None]
                return np.asarray(_transform(reader.get(name), tf)[index], dtype=target_dtype)
            layers = range(var.shape[0])[index[0]]
            parts = [
                _transform(reader.get(per_layer[i][0]), per_layer[i][1])[index[1:]] for i in layers
            ]
            return np.stack(parts).astype(target_dtype)

        sharding_ = shardings[path]
        sharding_ = sharding_.value if isinstance(sharding_, nnx.Variable) else sharding_
        return jax.make_array_from_callback(var.shape, sharding_, callback)

    for path, var in flat.items():
        var.set_value(fill(path, var))
    return graphdef, abstract_state


DTYPES = {
    "float32": jnp.float32,
    "fp32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
}


def load_pretrained(
    path: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    dtype: str = "float32",
    text_only: bool = False,
    max_tiles: int | None = None,
    remat: bool = False,
) -> EmbeddingModel:
    """Loads an HF ``LlavaOnevisionForConditionalGeneration`` / ``LlavaNextForConditionalGeneration``
    checkpoint directory (or hub id, when a network exists) into an :class:`EmbeddingModel`.

    ``text_only`` builds only the LLM (stage 1); ``max_tiles`` fixes the number of image tiles
    the device sees per example (default: the most any image can need).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    directory = resolve_checkpoint(path)
    cfg = parse_config(directory)
    if text_only:
        cfg = cfg.text_only()
    mesh = mesh or sharding.make_mesh()
    graphdef, state = load_state(directory, cfg, mesh, DTYPES[dtype], remat=remat)
    tiles = 0 if text_only else (max_tiles or cfg.anyres.max_tiles)
    return EmbeddingModel(cfg, graphdef, state, mesh, tiles)
