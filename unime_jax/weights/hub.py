"""Where a checkpoint comes from: a local HF directory (or a hub id when a network exists), and
its ``config.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from unime_jax.weights.safetensors import CheckpointError


def resolve_checkpoint(path_or_id: str | os.PathLike) -> Path:
    """A local checkpoint directory; a hub id is downloaded when a network is available."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_id)
    if path.exists():
        raise CheckpointError(
            f"checkpoint path {name} is a file, not a directory",
            "pass the directory that holds config.json and the *.safetensors files",
        )
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(
            f"checkpoint directory {name} does not exist",
            "pass an HF checkpoint directory (config.json + *.safetensors)",
        )
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.py"]
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:  # network errors come in many types; the advice is the same
        local = f"/path/to/{name.split('/')[-1]}"
        raise CheckpointError(
            f"{name!r} is not a local directory and could not be fetched from the HF hub ({e})",
            f"on a machine with network access run `hf download {name} --local-dir {local}` "
            f"(older huggingface_hub: `huggingface-cli download {name} --local-dir {local}`), "
            "copy that directory here and pass its path instead",
        ) from e


def read_config(directory: str | os.PathLike) -> dict:
    """``config.json`` of an HF model directory as a dict; errors name the file."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{directory} has no config.json", "pass an HF model directory (config.json + weights)"
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})", "restore the file") from e
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{path} is not an HF config: it holds a JSON {type(config).__name__}",
            "restore the file",
        )
    return config
