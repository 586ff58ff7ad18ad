"""Reading a dataset written by :mod:`unime_jax.data.mmeb_convert`: random access over its
ArrayRecord shards, image paths resolved against the image root."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unime_jax.data.mmeb_convert import FORMAT, MANIFEST


class MmebSource:
    """Random-access view of a converted dataset (``len``, ``[i]``); picklable for grain workers.

    Items are dicts with ``qry``, ``pos_text`` (str), ``qry_image_path``, ``pos_image_path``
    (absolute path strings, or ``None`` without an image), ``dataset`` and ``row``.
    """

    def __init__(self, directory: str | os.PathLike, image_root: str | os.PathLike | None = None):
        import grain

        self.directory = Path(directory).resolve()
        manifest_path = self.directory / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path} not found: not a converted MMEB dataset")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest_path}: unknown format {self.manifest.get('format')!r}")
        self.image_root = str(Path(image_root or self.manifest["image_root"]).resolve())
        paths = [str(self.directory / s["path"]) for s in self.manifest["shards"]]
        self._source = grain.sources.ArrayRecordDataSource(paths) if paths else []
        if len(self._source) != self.manifest["count"]:
            raise ValueError(
                f"{self.directory}: shards hold {len(self._source)} records, the manifest says "
                f"{self.manifest['count']}"
            )

    def __len__(self) -> int:
        return len(self._source)

    def _decode(self, raw: bytes) -> dict[str, Any]:
        record = json.loads(raw)
        for key in ("qry_image_path", "pos_image_path"):
            record[key] = os.path.join(self.image_root, record[key]) if record[key] else None
        return record

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._decode(self._source[index])

    def _getitems(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self._decode(r) for r in self._source.__getitems__(list(indices))]

    def __repr__(self) -> str:
        return f"MmebSource({self.directory}, {len(self)} records, images in {self.image_root})"


def open_dataset(
    out_dir: str | os.PathLike, image_root: str | os.PathLike | None = None
) -> MmebSource:
    """The converted dataset in ``out_dir``; ``image_root`` overrides the manifest's."""
    return MmebSource(out_dir, image_root)
