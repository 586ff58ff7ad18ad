"""On-disk embedding cache shared by the evaluators: a rerun of an evaluation embeds nothing.

Layout: ``<directory>/<model fingerprint>/`` holds ``meta.json`` (what the fingerprint
describes, for people) and ``chunk-*.npz`` files, each with ``keys`` (sha256 hex of the inputs)
and ``emb`` (float32 rows). A chunk is written to a temporary file, fsynced and renamed into
place, so a crash leaves either a whole chunk or none; an unreadable chunk is reported and
ignored (its inputs are embedded again). Chunks get unique names, so processes never overwrite
each other.

Keys: an input's key hashes its kind (``text`` / ``image`` / ``instruction``), its text and
the sha256 of its image bytes (a file's, or encoded bytes given as such, e.g. from a TFDS dataset:
the same key as the file; pixels for an in-memory PIL image), so renaming or moving an image keeps
its entry and editing it does not. Prompts, processor settings and the model live in the
fingerprint (see :func:`checkpoint_fingerprint`, :func:`params_fingerprint`,
:func:`processor_fingerprint`, :func:`code_fingerprint`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from unime_jax.files import atomic_write

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".npz")
STALE_TMP_SECONDS = 3600  # a temporary file this old belongs to a process that died


def digest(obj: Any) -> str:
    """sha256 hex of a JSON-able object (keys sorted, unknown types via ``str``)."""
    text = json.dumps(obj, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# input keys

_FILE_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256: hash each file once


def image_digest(image: Image.Image | bytes | str | os.PathLike) -> str:
    """sha256 of an image file's bytes (a path, or the encoded bytes themselves, as TFDS
    datasets give them: the same key either way), or of a PIL image's mode, size and pixels."""
    if isinstance(image, bytes):
        return hashlib.sha256(image).hexdigest()
    if isinstance(image, Image.Image):
        h = hashlib.sha256(f"{image.mode}:{image.size}:".encode())
        h.update(image.tobytes())
        return h.hexdigest()
    path = Path(image)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist") from None
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _FILE_DIGESTS:
        with path.open("rb") as f:
            _FILE_DIGESTS[memo] = hashlib.file_digest(f, "sha256").hexdigest()
    return _FILE_DIGESTS[memo]


def input_key(
    kind: str, text: str | None, image: Image.Image | bytes | str | os.PathLike | None
) -> str:
    """The cache key of one encoder input."""
    image_part = None if image is None else image_digest(image)
    return digest([kind, text, image_part])


# ---------------------------------------------------------------------------------------------
# model fingerprints


def checkpoint_fingerprint(directory: str | os.PathLike) -> dict:
    """What identifies an HF checkpoint directory, without reading its weights: the bytes of
    every small file (config, tokenizer, processor and chat-template files: the prompts and
    processor settings) and, per weight file, its name, size, modification time and (for
    safetensors) its header of tensor names, shapes, dtypes and offsets. A re-saved or edited
    checkpoint changes a modification time; a copy gets new times too (costing one cold run).
    Large non-weight files count by size and time only."""
    directory = Path(directory)
    files = {}
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        st = path.stat()
        if path.suffix in WEIGHT_SUFFIXES or st.st_size > 64 << 20:
            entry: Any = [st.st_size, st.st_mtime_ns]
            if path.suffix == ".safetensors":
                entry.append(_safetensors_header_digest(path))
        else:
            entry = hashlib.sha256(path.read_bytes()).hexdigest()
        files[path.name] = entry
    if not files:
        raise FileNotFoundError(f"checkpoint directory {directory} holds no files")
    return {"checkpoint": str(directory.resolve()), "files": files}


def _safetensors_header_digest(path: Path) -> str | None:
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size < 256 << 20:
            return None  # not a safetensors header; size and time still identify the file
        return hashlib.sha256(f.read(size)).hexdigest()


def params_fingerprint(state: Any) -> str:
    """An exact digest of every parameter bit, computed where the parameters live.

    Per leaf: two wrap-around uint32 sums of the raw bits times position-dependent odd
    multipliers. Integer sums do not depend on summation order, so the digest is the same for
    any mesh; any single changed element changes both sums, and swapped elements change them
    too. Leaf paths, shapes and dtypes are hashed alongside. One pass over the weights on the
    device; only 8 bytes per leaf come back to the host.
    """
    import jax
    import jax.numpy as jnp

    def leaf(x):
        x = jnp.asarray(x)
        bits = jax.lax.bitcast_convert_type(
            x,
            {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize],
        )
        flat = bits.reshape(-1).astype(jnp.uint32)
        i = jnp.arange(flat.size, dtype=jnp.uint32)
        a = jnp.sum(flat * (i * np.uint32(0x9E3779B1) | np.uint32(1)), dtype=jnp.uint32)
        b = jnp.sum((flat ^ (i * np.uint32(0x85EBCA6B))) * np.uint32(0xC2B2AE35), dtype=jnp.uint32)
        return jnp.stack([a, b])

    leaves = jax.tree_util.tree_leaves_with_path(state)
    sums = jax.device_get(jax.jit(lambda xs: [leaf(x) for x in xs])([x for _, x in leaves]))
    return digest(
        [
            (jax.tree_util.keystr(path), list(np.shape(x)), str(x.dtype), s.tolist())
            for (path, x), s in zip(leaves, sums)
        ]
    )


def processor_fingerprint(processor: Any) -> dict:
    """The host-side settings that shape a model's inputs: prompt family, tokenizer (class,
    vocabulary, special tokens, chat template) and the image processor's configuration."""
    tok = processor.tokenizer
    image_processor = getattr(processor, "image_processor", None)
    return {
        "family": processor.family,
        "position_mode": getattr(processor, "position_mode", None),  # Qwen2-VL's M-RoPE variant
        "image_token": processor.image_token,
        "tokenizer": [
            type(tok).__name__,
            digest(sorted(tok.get_vocab().items())),
            getattr(tok, "chat_template", None),
            tok.all_special_tokens,
        ],
        "image_processor": image_processor.to_dict() if image_processor is not None else None,
    }


def code_fingerprint() -> str:
    """Digest of the source that turns inputs into embeddings (the model, weight loading and
    name mapping, preprocessing, the Embedder), so a change there never serves embeddings of
    the old code. Other modules (training, export, evaluation) do not count."""
    root = Path(__file__).resolve().parents[1]
    files = sorted(
        [
            *root.glob("models/**/*.py"),
            *root.glob("preprocess/**/*.py"),
            *root.glob("families/**/*.py"),
            *(root / "weights" / f for f in ("loader.py", "rules.py", "safetensors.py", "hub.py")),
            root / "inference.py",
            root / "embedder.py",
        ]
    )
    h = hashlib.sha256()
    for path in (p for p in files if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# the cache


class EmbeddingCache:
    """Embeddings by input key for one model fingerprint; ``directory=None`` keeps them in
    memory only. ``writable=False`` reads without writing (e.g. on all but one host of a
    multi-host job sharing a file system). ``hits`` / ``misses`` count looked-up keys."""

    def __init__(
        self,
        directory: str | os.PathLike | None,
        fingerprint: str,
        *,
        meta: Mapping[str, Any] | None = None,
        writable: bool = True,
    ):
        self.fingerprint = fingerprint
        self.path = Path(directory).expanduser() / fingerprint if directory else None
        self.writable = writable
        self.hits = self.misses = 0
        self._mem: dict[str, np.ndarray] = {}
        self._on_disk: dict[str, Path] = {}  # key -> chunk file not loaded yet
        if self.path is None:
            return
        if writable:
            self.path.mkdir(parents=True, exist_ok=True)
            if meta is not None and not (self.path / "meta.json").exists():
                text = json.dumps(dict(meta), indent=1, sort_keys=True, default=str)
                atomic_write(self.path / "meta.json", text)
            self._remove_stale_tmp()
        for chunk in sorted(self.path.glob("chunk-*.npz")) if self.path.is_dir() else []:
            try:
                with np.load(chunk, allow_pickle=False) as z:
                    keys = z["keys"].astype(str)
            except Exception as e:  # any unreadable chunk is only a lost speed-up
                warnings.warn(f"embedding cache: ignoring unreadable {chunk} ({e})", stacklevel=2)
                continue
            self._on_disk.update(dict.fromkeys(keys, chunk))

    def __len__(self) -> int:
        return len(self._mem.keys() | self._on_disk.keys())

    def lookup(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached embedding of each key that has one."""
        for chunk in {self._on_disk[k] for k in keys if k not in self._mem and k in self._on_disk}:
            self._load(chunk)
        found = {k: self._mem[k] for k in keys if k in self._mem}
        self.hits += sum(k in found for k in keys)
        self.misses += sum(k not in found for k in keys)
        return found

    def put(self, keys: Sequence[str], emb: np.ndarray) -> None:
        """Stores embeddings (one row per key) in memory and, if on disk, as one new chunk."""
        emb = np.asarray(emb, np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(keys):
            raise ValueError(f"{len(keys)} keys but embeddings of shape {emb.shape}")
        self._mem.update(zip(keys, emb))
        if self.path is None or not self.writable:
            return
        name = f"chunk-{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.npz"
        key_array = np.asarray(keys, dtype="S64")
        atomic_write(self.path / name, lambda f: np.savez(f, keys=key_array, emb=emb))

    def _load(self, chunk: Path) -> None:
        try:
            with np.load(chunk, allow_pickle=False) as z:
                keys, emb = z["keys"].astype(str), z["emb"]
        except Exception as e:
            warnings.warn(f"embedding cache: ignoring unreadable {chunk} ({e})", stacklevel=3)
            keys, emb = [], []
        for k in [k for k, c in self._on_disk.items() if c == chunk]:
            del self._on_disk[k]
        self._mem.update(zip(keys, emb))

    def _remove_stale_tmp(self) -> None:
        now = time.time()
        for tmp in self.path.glob(".tmp-*"):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                    tmp.unlink()


@contextlib.contextmanager
def _quiet(encoder: Any) -> Iterator[None]:
    """Turns an encoder's own progress bar off while :class:`CachedEncoder` shows one."""
    if not hasattr(encoder, "progress"):
        yield
        return
    before, encoder.progress = encoder.progress, False
    try:
        yield
    finally:
        encoder.progress = before


class CachedEncoder:
    """An encoder (``embed_texts`` / ``embed_images`` / ``embed_instructions``) that answers from
    an :class:`EmbeddingCache` and embeds only the distinct inputs it lacks, ``chunk_size`` at a
    time (rounded up to the encoder's ``batch_size``), storing each chunk as soon as it is
    done, so an interrupted run resumes where it stopped. Shows one progress bar per call."""

    def __init__(
        self,
        encoder: Any,
        cache: EmbeddingCache,
        *,
        chunk_size: int = 256,
        progress: bool = True,
        label: str = "",
    ):
        self.encoder, self.cache = encoder, cache
        batch = max(int(getattr(encoder, "batch_size", 1) or 1), 1)
        self.chunk_size = -(-chunk_size // batch) * batch
        self.progress, self.label = progress, label

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        return self._embed(
            "text", [input_key("text", t, None) for t in texts], texts, self.encoder.embed_texts
        )

    def embed_images(self, images: Sequence) -> np.ndarray:
        images = list(images)
        return self._embed(
            "image",
            [input_key("image", None, im) for im in images],
            images,
            self.encoder.embed_images,
        )

    def embed_instructions(
        self, texts: Sequence[str], images: Sequence | None = None
    ) -> np.ndarray:
        texts = list(texts)
        images = list(images) if images is not None else [None] * len(texts)
        keys = [input_key("instruction", t, im) for t, im in zip(texts, images)]
        pairs = list(zip(texts, images))
        return self._embed(
            "input",
            keys,
            pairs,
            lambda chunk: self.encoder.embed_instructions(
                [t for t, _ in chunk], [im for _, im in chunk]
            ),
        )

    def _embed(self, what: str, keys: list[str], inputs: list, compute: Callable) -> np.ndarray:
        found = self.cache.lookup(keys)
        todo: dict[str, Any] = {}
        for k, x in zip(keys, inputs):
            if k not in found:
                todo.setdefault(k, x)
        bar = tqdm(
            total=len(todo),
            desc=f"{self.label}embedding {what}s ({len(set(found))} cached)",
            unit=what,
            disable=not self.progress or not todo,
        )
        todo_keys = list(todo)
        with bar, _quiet(self.encoder):
            for start in range(0, len(todo_keys), self.chunk_size):
                chunk = todo_keys[start : start + self.chunk_size]
                emb = np.asarray(compute([todo[k] for k in chunk]), np.float32)
                if emb.ndim != 2 or emb.shape[0] != len(chunk):
                    raise ValueError(f"encoder returned shape {emb.shape} for {len(chunk)} inputs")
                self.cache.put(chunk, emb)
                found.update(zip(chunk, emb))
                bar.update(len(chunk))
        if not keys:
            return np.zeros((0, 0), np.float32)
        return np.stack([found[k] for k in keys])


def with_cache(encoder: Any, cache: EmbeddingCache | None) -> Any:
    """``encoder`` answering from ``cache`` (unchanged when ``cache`` is None or it already does)."""
    if cache is None or (isinstance(encoder, CachedEncoder) and encoder.cache is cache):
        return encoder
    return CachedEncoder(encoder, cache)
