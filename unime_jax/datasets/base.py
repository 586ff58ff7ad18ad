"""What every UniME dataset builder shares, and the reading side they have in common.

Builders write ArrayRecord only (random access is what grain's exact resume needs) and keep
examples in the order they are generated (keys 0, 1, ...), so record ``i`` of a split is the
``i``-th row of its source: row ids and resume positions do not depend on a shuffle. Images are
stored as their files' original bytes (``tfds.features.Image`` given a path or bytes keeps them
as they are; nothing is re-encoded), read back undecoded with :class:`RawBytes` and decoded with
PIL by the readers. A builder's feature spec is pinned to its VERSION (``FEATURE_DIGESTS``): a
changed spec under an unchanged version is refused, so prepared data never silently changes
shape under a version number.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from unime_jax.errors import DataError, UsageError

ARRAY_RECORD = tfds.core.FileFormat.ARRAY_RECORD


class FeatureSpecChanged(RuntimeError):
    """A builder's features changed but its VERSION did not (a bug in the builder)."""


# ---------------------------------------------------------------------------------------------
# features


def image_feature(doc: str = "the image file's original bytes") -> tfds.features.Image:
    return tfds.features.Image(doc=doc)


def optional_image_feature(doc: str) -> tfds.features.Sequence:
    """0 or 1 image (a side without an image has none)."""
    return tfds.features.Sequence(tfds.features.Image(), doc=doc)


class RawBytes(tfds.decode.Decoder):
    """Reads an image feature (or a sequence of them) as the stored bytes, undecoded."""

    def decode_example(self, serialized_example):
        return serialized_example

    def decode_example_np(self, serialized_example):
        return serialized_example

    def decode_batch_example_np(self, serialized_example):
        return list(serialized_example)


def feature_digest(features: tfds.features.FeaturesDict) -> str:
    """sha256 of a feature spec without its docs: what a VERSION promises to readers."""

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in ("description", "doc")}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    text = json.dumps(strip(features.to_json()), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# the builder base


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """ArrayRecord-only builder with examples in generation order and a pinned feature spec.

    Subclasses give ``_features()``, ``FEATURE_DIGESTS`` (``{spec key: feature_digest}``, the
    key is the VERSION, or ``VERSION/<feature set>`` for builders whose configs differ in
    features: see ``_spec_key``), ``MANUAL_DOWNLOAD_INSTRUCTIONS`` and the generators.
    """

    FEATURE_DIGESTS: ClassVar[Mapping[str, str]] = {}
    HOMEPAGE: ClassVar[str] = ""
    CITATION: ClassVar[str] = ""

    def __init__(self, *, file_format: str | tfds.core.FileFormat | None = None, **kwargs: Any):
        if file_format is not None and tfds.core.FileFormat.from_value(file_format) != ARRAY_RECORD:
            raise UsageError(
                f"{self.name}: file_format={file_format!r} is not supported",
                "UniME datasets are ArrayRecord only (random access for grain): drop "
                "--file_format or pass --file_format=array_record",
            )
        super().__init__(file_format=ARRAY_RECORD, **kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9.10 looks a packaged builder's file up with `importlib_resources`, a package
        # it does not depend on (ModuleNotFoundError at build time); this is the file it finds.
        return epath.Path(inspect.getfile(cls))

    def _features(self) -> tfds.features.FeaturesDict:
        raise NotImplementedError

    def _spec_key(self) -> str:
        return str(self.VERSION)

    def reader(self) -> tuple[Callable[[dict], Any], Mapping[str, Any] | None]:
        """``(convert, decoders)``: how :func:`open_split` turns this dataset's records into
        the items UniME's readers give (a module-level ``convert``, for pickling)."""
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        features = self._features()
        key, digest = self._spec_key(), feature_digest(features)
        if self.FEATURE_DIGESTS.get(key) != digest:
            raise FeatureSpecChanged(
                f"{self.name}: the features of {key} have digest {digest}, but FEATURE_DIGESTS "
                f"records {self.FEATURE_DIGESTS.get(key)!r} for it. A changed feature spec needs "
                f"a new VERSION: bump it, add RELEASE_NOTES and FEATURE_DIGESTS for it."
            )
        return tfds.core.DatasetInfo(
            builder=self,
            description=(type(self).__doc__ or "").strip(),
            features=features,
            homepage=self.HOMEPAGE or None,
            citation=self.CITATION or None,
            metadata=tfds.core.MetadataDict(),  # what the parser reported, for the readers
            disable_shuffling=True,
        )

    def _download_and_prepare(self, dl_manager, download_config) -> None:
        try:
            super()._download_and_prepare(dl_manager, download_config)
        except AssertionError as e:  # TFDS's check of `dl_manager.manual_dir`, where first read
            if not str(e).startswith("Manual directory"):
                raise
            raise DataError(
                f"{self.info.full_name}: {str(e).split('. Create it')[0]}",
                self.MANUAL_DOWNLOAD_INSTRUCTIONS.strip(),
            ) from None

    def manual_path(self, dl_manager, *parts: str, is_dir: bool = False) -> Path:
        """``manual_dir/parts``, which must exist (else the manual download instructions)."""
        path = Path(dl_manager.manual_dir, *parts)
        if not (path.is_dir() if is_dir else path.is_file()):
            raise DataError(
                f"{self.name}: {path} not found in the manual dir {dl_manager.manual_dir}",
                self.MANUAL_DOWNLOAD_INSTRUCTIONS.strip(),
            )
        return path

    def write_json(self, name: str, obj: Any) -> None:
        """A JSON file beside the prepared data (the version directory being written)."""
        (epath.Path(self.data_path) / name).write_text(json.dumps(obj, indent=1) + "\n")


def checked_image(image: str | os.PathLike | bytes, name: str) -> str | os.PathLike | bytes:
    """``image`` (a path or encoded bytes), once it decodes in full: a truncated or damaged file
    stops the build naming it (``name``: its file name) instead of failing an evaluation later.
    TFDS then stores the file's bytes as they are."""
    from unime_jax.preprocess.images import ImageError, load_image

    try:
        load_image(image)
    except ImageError as e:
        raise DataError(
            f"image {name}: {e.what}",
            "replace the file with a readable copy (or leave its rows out) and build again",
        ) from e
    return image


# ---------------------------------------------------------------------------------------------
# reading


def decode_image(data: bytes) -> Image.Image:
    """A PIL image over stored bytes (decoded lazily, when its pixels are first used)."""
    return Image.open(io.BytesIO(data))


def text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def build_command(builder: tfds.core.DatasetBuilder) -> str:
    """The command that builds ``builder`` (``tfds build``'s flags; see ``__main__``); for a
    builder whose configs are built together (``BUILD_ALL_CONFIGS``), without ``--config``."""
    together = getattr(builder, "BUILD_ALL_CONFIGS", False)
    config = f" --config {builder.builder_config.name}" if builder.builder_config else ""
    config = "" if together else config
    return (
        f"python -m unime_jax.datasets build {builder.name}{config} --manual_dir DIR "
        f"--data_dir {builder.data_dir_root}"
    )


def prepared(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    config: str | tfds.core.BuilderConfig | None = None,
) -> tfds.core.DatasetBuilder:
    """The builder of a prepared dataset; a :class:`DataError` with the build command if absent."""
    from unime_jax.datasets import BUILDERS

    classes = {b.name: b for b in BUILDERS}
    if name not in classes:
        raise UsageError(f"no dataset builder named {name!r}", f"use one of {sorted(classes)}")
    if isinstance(config, str) and config not in classes[name].builder_configs:
        raise UsageError(
            f"{name} has no config {config!r}",
            f"use one of {sorted(classes[name].builder_configs)}",
        )
    builder = classes[name](config=config, data_dir=data_dir)
    with quiet_variant_warnings():
        ready = builder.is_prepared()
    if not ready:
        versions = sorted(
            p.name for p in builder.data_path.parent.glob("*") if p.is_dir() and p.name[0].isdigit()
        )
        found = f" (found version(s) {versions}: rebuild for {builder.version})" if versions else ""
        raise DataError(
            f"{builder.info.full_name} is not prepared in {builder.data_dir_root}{found}",
            f"build it: {build_command(builder)}",
        )
    return builder


class _NoVariantWarnings(logging.Filter):
    """TFDS warns "Variant folder ... has no dataset_info.json" whenever it looks for a dataset
    that is not prepared yet: expected here, and said better by our own error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Variant folder")


@contextlib.contextmanager
def quiet_variant_warnings() -> Iterator[None]:
    absl = logging.getLogger("absl")
    quiet = _NoVariantWarnings()
    absl.addFilter(quiet)
    try:
        yield
    finally:
        absl.removeFilter(quiet)


class Records(Sequence):
    """A prepared split as random access over the items UniME's readers use (``len``, ``[i]``,
    batched ``_getitems`` for grain); picklable, for grain worker processes. ``convert`` turns a
    TFDS record (images as bytes) into an item; it must be a module-level function."""

    def __init__(
        self,
        source,
        convert: Callable[[dict], Any],
        where: str,
        rebuild: str,
        shards: Sequence[str] = (),
    ):
        self._source = source
        self._convert = convert
        self.where = where
        self._rebuild = rebuild
        self._shards = list(shards)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Any:
        n = len(self._source)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} records")
        return self._getitems([index % n])[0]

    def __iter__(self) -> Iterator[Any]:
        for start in range(0, len(self), 256):
            yield from self._getitems(range(start, min(start + 256, len(self))))

    def _getitems(self, indices: Sequence[int]) -> list[Any]:
        try:
            raw = self._source.__getitems__(list(indices))
        except Exception as e:  # an I/O error: name the dataset and its damaged shard files
            damaged = [p for p in self._shards if not readable(p)]
            raise DataError(
                f"{self.where} cannot be read ({type(e).__name__}: {e})"
                + (f"; damaged shard(s): {damaged}" if damaged else ""),
                "the prepared data is damaged (a disk error, an interrupted copy): build it "
                f"again: {self._rebuild} --overwrite",
            ) from e
        return [self._convert(r) for r in raw]

    def __repr__(self) -> str:
        return f"Records({self.where}, {len(self)} records)"


def readable(path: str) -> bool:
    """Whether an ArrayRecord file opens and its last record reads (a truncated file fails)."""
    import grain

    try:
        records = grain.sources.ArrayRecordDataSource([path])
        if len(records):
            records[len(records) - 1]
    except Exception:
        return False
    return True


def check_reads(builder: tfds.core.DatasetBuilder, convert: Callable[[dict], Any]) -> None:
    """A :class:`UsageError` when ``builder`` holds other records than ``convert`` makes items
    of (sentences named where image-text pairs are read, ...), before any record is read."""
    own = builder.reader()[0]
    if own is not convert:
        kind = convert.__module__.rsplit(".", 1)[-1]
        raise UsageError(
            f"{builder.info.full_name} holds {own.__module__.rsplit('.', 1)[-1]}-style records, "
            f"but {kind}-style records are read here",
            f"name a dataset of {kind}'s kind (the README's dataset table says which is which)",
        )


def open_split(
    builder: tfds.core.DatasetBuilder,
    split: str,
    convert: Callable[[dict], Any],
    decoders: Mapping[str, Any] | None = None,
) -> Records:
    """``split`` of a prepared builder through ``tfds.data_source``, items made by ``convert``
    (which must be the builder's own reader: :func:`check_reads`)."""
    check_reads(builder, convert)
    if split not in builder.info.splits:
        raise UsageError(
            f"{builder.info.full_name} has no split {split!r}",
            f"use one of {sorted(builder.info.splits)}",
        )
    config = builder.builder_config
    if config is not None and any(c is config for c in type(builder).BUILDER_CONFIGS):
        config = config.name  # by name: an unpickled copy must not pose as the registered one
    source = tfds.data_source(
        builder.name,
        split=split,
        data_dir=builder.data_dir_root,
        download=False,
        decoders=dict(decoders or {}),
        builder_kwargs={"config": config, "version": str(builder.version)},
    )
    where = f"{builder.info.full_name} [{split}] in {builder.data_dir_root}"
    shards = [str(p) for p in builder.info.splits[split].filepaths]
    return Records(source, convert, where, build_command(builder), shards)


def read_json(builder: tfds.core.DatasetBuilder, name: str) -> Any:
    """A JSON file written beside the prepared data (``Builder.write_json``)."""
    path = Path(builder.data_dir) / name
    if not path.is_file():
        raise DataError(f"{path} not found", f"rebuild: {build_command(builder)} --overwrite")
    return json.loads(path.read_text())
