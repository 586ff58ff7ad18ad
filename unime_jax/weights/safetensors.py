"""A minimal, strict safetensors reader built on ``numpy.memmap``, and its writer.

Why not ``safetensors.numpy``: it has no bfloat16 and reads whole tensors. Memory-mapping lets
each host read only the slices its devices own, so a 7B checkpoint never sits unsharded in one
host's memory. Every structural problem (missing file, truncated data, bad header) is reported
with the file and tensor it concerns.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from unime_jax.errors import DataError

SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(DataError):
    """A checkpoint directory that cannot be read as it is; the message says what to fix."""


class SafetensorsFile:
    """Lazy tensors of one ``.safetensors`` file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"safetensors file {self.path} does not exist")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path} is not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(
                    f"{self.path} is corrupt: header length {n} exceeds the file size {size}"
                )
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(
                    f"{self.path} is corrupt: its header is not valid JSON ({e})"
                ) from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path} is corrupt: its header is not a JSON object")
        header.pop("__metadata__", None)
        self._start = 8 + n
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            try:
                dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
                begin, end = (int(x) for x in entry["data_offsets"])
                shape = tuple(int(d) for d in entry["shape"])
            except (AttributeError, KeyError, TypeError, ValueError) as e:
                raise CheckpointError(
                    f"{self.path} is corrupt: header entry of tensor {name!r} is malformed "
                    f"({entry!r})"
                ) from e
            if dtype is None:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}"
                )
            expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if begin < 0 or end - begin != expected or self._start + end > size:
                raise CheckpointError(
                    f"{self.path} is corrupt or truncated: tensor {name!r} {shape} needs bytes "
                    f"{self._start + begin}..{self._start + end} of a {size}-byte file"
                )
            self._entries[name] = (np.dtype(dtype), shape, begin, end)
        self._mmap: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def get(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view; slicing it reads only the touched pages."""
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        dtype, shape, begin, end = self._entries[name]
        raw = self._mmap[self._start + begin : self._start + end]
        return raw.view(dtype).reshape(shape)


class CheckpointReader:
    """All tensors of an HF checkpoint directory (single file, or shards with an index)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        self._where: dict[str, SafetensorsFile] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e!r})") from e
            if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()
            ):
                raise CheckpointError(
                    f"{index} is not a valid safetensors index: weight_map must map tensor "
                    "names to shard file names"
                )
            files = {}
            for name in sorted(set(weight_map.values())):
                if not (self.directory / name).is_file():
                    raise CheckpointError(
                        f"{index} refers to shard {name}, which is not in {self.directory}; "
                        "the download is incomplete (fetch every model-*.safetensors file)"
                    )
                files[name] = SafetensorsFile(self.directory / name)
            for tensor, file in weight_map.items():
                if tensor not in files[file]._entries:
                    raise CheckpointError(
                        f"{index} lists {tensor!r} in {file}, but that file does not hold it"
                    )
                self._where[tensor] = files[file]
        elif (self.directory / SINGLE_FILE).is_file():
            single = SafetensorsFile(self.directory / SINGLE_FILE)
            self._where = dict.fromkeys(single.keys(), single)
        else:
            found = sorted(p.name for p in self.directory.glob("*.safetensors"))
            if not found:
                raise CheckpointError(
                    f"no safetensors weights in {self.directory}: expected {SINGLE_FILE} or "
                    f"{INDEX_FILE} with its shards (.bin/.pt checkpoints are not read; "
                    "re-save them with save_pretrained(..., safe_serialization=True))"
                )
            for file in found:
                st = SafetensorsFile(self.directory / file)
                for name in st.keys():
                    if name in self._where:
                        raise CheckpointError(
                            f"tensor {name!r} is in both {self._where[name].path.name} and "
                            f"{file} in {self.directory}, and there is no {INDEX_FILE} to say "
                            "which to use"
                        )
                    self._where[name] = st

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        return self._where[name].get(name)


# ---------------------------------------------------------------------------------------------
# writing


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """One tensor to write: final name, layout, and a loader that returns its host data (called
    once, when the tensor is written, so only one tensor is in host memory at a time)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    load: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


_CODES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}


def write_file(path: Path, tensors: list[LazyTensor]) -> None:
    """A safetensors file written tensor by tensor: the header needs only shapes and dtypes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        if t.name in header:  # e.g. a base holding one tensor under both name layouts
            raise CheckpointError(f"two tensors would be written as {t.name!r}")
        header[t.name] = dict(
            dtype=_CODES[t.dtype], shape=t.shape, data_offsets=(offset, offset + t.nbytes)
        )
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # 8-byte aligned data, as the safetensors library writes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors:
            array = t.load()
            if tuple(array.shape) != t.shape or array.dtype != t.dtype:
                raise CheckpointError(
                    f"{t.name} is {array.dtype}{array.shape}, not {t.dtype}{t.shape}"
                )
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        f.flush()
        os.fsync(f.fileno())


def write_checkpoint(
    tensors: list[LazyTensor], directory: Path, single: str, limit: int | None
) -> None:
    """``single`` when everything fits in ``limit`` bytes, else numbered shards and an index."""
    shards: list[list[LazyTensor]] = [[]]
    size = 0
    for t in tensors:
        if limit is not None and shards[-1] and size + t.nbytes > limit:
            shards, size = [*shards, []], 0
        shards[-1].append(t)
        size += t.nbytes
    if len(shards) == 1:
        return write_file(directory / single, shards[0])
    stem, ext = single.split(".", 1)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}"
        write_file(directory / file, shard)
        weight_map |= dict.fromkeys((t.name for t in shard), file)
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
