"""One encoded example, and collating examples into a packed :class:`ModelInputs` batch.

A family's processor turns (prompt, images) into an :class:`Example`: token ids with the image
tokens already expanded, positions, and per image an :class:`ImageUnits` — the image's units
(LLaVA tiles, Qwen2-VL merge windows, ...) and, for each of its image tokens, the feature rows
(within this image's own units) that make its embedding. :func:`collate` then pads rows to one
length and packs the units of each group of rows into one pool, turning image-local indices into
group-local ones. The same two steps serve training, the Embedder and evaluation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from unime_jax.models.inputs import ModelInputs


@dataclasses.dataclass(frozen=True)
class UnitLayout:
    """What a family's units look like on device.

    ``rows_per_unit``: feature rows the tower makes of one unit (LLaVA: patches per tile);
    ``special_rows``: learned rows after a group's unit features (LLaVA: 1, the newline), which
    image indices address as -1, -2, ...; ``taps``: gather taps per image token (4 when LLaVA-
    OneVision's bilinear downsampling can trigger, else 1); ``constants``: per-batch arrays every
    group carries (e.g. the (C, 256) ``pixel_lut`` for uint8 pixels).
    """

    rows_per_unit: int
    special_rows: int = 0
    taps: int = 1
    constants: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ImageUnits:
    """One image: ``arrays`` (each (n_units, ...)), the sequence positions of its image tokens
    (``token_positions`` (n,)), and their gather ``index`` / ``weight`` (n, taps): a feature row
    ``unit * rows_per_unit + r`` of this image, or -1, -2, ... for the special rows."""

    arrays: dict[str, np.ndarray]
    token_positions: np.ndarray
    index: np.ndarray
    weight: np.ndarray

    @property
    def num_units(self) -> int:
        return len(next(iter(self.arrays.values())))


@dataclasses.dataclass
class Example:
    """One row: ``input_ids`` (L,), ``positions`` (L,) or (L, 3), and its images in token order."""

    input_ids: np.ndarray
    positions: np.ndarray
    images: list[ImageUnits] = dataclasses.field(default_factory=list)

    @classmethod
    def sequential(cls, input_ids, images: Sequence[ImageUnits] = ()) -> Example:
        """A row whose positions count its tokens 0, 1, ... (1-D RoPE families)."""
        ids = np.asarray(input_ids, np.int32)
        return cls(ids, np.arange(len(ids), dtype=np.int32), list(images))

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_units(self) -> int:
        return sum(image.num_units for image in self.images)


def round_budget(units: int) -> int:
    """The pool size for ``units``: the next power of two (few shapes, few compilations)."""
    return 1 << max(units - 1, 0).bit_length() if units > 0 else 0


def contiguous_groups(rows: int, groups: int) -> np.ndarray:
    """Rows split evenly and contiguously over groups: row r is in group r // (rows / groups)."""
    return np.arange(rows) // (rows // groups)


def collate(
    examples: Sequence[Example],
    layout: UnitLayout,
    *,
    length: int,
    pad_id: int,
    groups: int = 1,
    row_groups: Sequence[int] | None = None,
    unit_budget: int | None = None,
    padding_side: str = "right",
) -> ModelInputs:
    """Pads ``examples`` to ``length`` tokens and packs their image units per group (numpy).

    ``row_groups[r]`` is row r's group (default: :func:`contiguous_groups`, the layout the model
    expects; training passes GradCache's, which becomes contiguous once chunked); a group's
    images fill its pool in row and image order. ``unit_budget`` is the pool size per group
    (default: :func:`round_budget` of the largest need); a group needing more raises
    ``ValueError`` naming its rows. Without any image in the batch, ``images`` is ``None`` (the
    model then runs no vision tower).
    """
    b = len(examples)
    if b == 0 or groups <= 0 or b % groups:
        raise ValueError(f"{b} rows cannot be split into {groups} equal groups")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be left or right, got {padding_side!r}")
    too_long = [i for i, e in enumerate(examples) if len(e) > length]
    if too_long:
        raise ValueError(f"rows {too_long} are longer than {length} tokens")
    pos_shape = examples[0].positions.shape[1:]
    input_ids = np.full((b, length), pad_id, np.int32)
    mask = np.zeros((b, length), np.int32)
    positions = np.zeros((b, length, *pos_shape), np.int32)
    starts = []
    for i, e in enumerate(examples):
        start = 0 if padding_side == "right" else length - len(e)
        sl = slice(start, start + len(e))
        input_ids[i, sl], mask[i, sl], positions[i, sl] = e.input_ids, 1, e.positions
        starts.append(start)
    out = ModelInputs(input_ids, mask, positions)
    images = [img for e in examples for img in e.images]
    if not images:
        return out

    member = np.asarray(contiguous_groups(b, groups) if row_groups is None else row_groups)
    rows_of = [np.flatnonzero(member == k) for k in range(groups)]
    needs = [sum(examples[i].num_units for i in rows) for rows in rows_of]
    budget = round_budget(max(needs)) if unit_budget is None else unit_budget
    for rows, need in zip(rows_of, needs):
        if need > budget:
            raise ValueError(
                f"rows {rows.tolist()} need {need} image units, more than the budget of "
                f"{budget} per group; raise the unit budget or use fewer images per row"
            )
    first = images[0].arrays
    pool = {key: np.zeros((groups, budget, *a.shape[1:]), a.dtype) for key, a in first.items()} | {
        key: np.broadcast_to(c, (groups, *c.shape)).copy() for key, c in layout.constants.items()
    }
    index = np.zeros((b, length, layout.taps), np.int32)
    weight = np.zeros((b, length, layout.taps), np.float32)
    special = budget * layout.rows_per_unit  # the group's first special row
    for k, rows in enumerate(rows_of):
        unit = 0
        for i in rows:
            for img in examples[i].images:
                n = img.num_units
                for key, a in img.arrays.items():
                    if key not in pool or a.shape[1:] != pool[key].shape[2:]:
                        raise ValueError(f"row {i}: image array {key!r} {a.shape} does not stack")
                    pool[key][k, unit : unit + n] = a
                taps = img.index.shape[1]
                if taps > layout.taps:
                    raise ValueError(
                        f"row {i}: an image needs {taps} taps, the layout has {layout.taps}"
                    )
                idx = np.where(
                    img.index >= 0, img.index + unit * layout.rows_per_unit, special - img.index - 1
                )
                at = starts[i] + img.token_positions
                index[i, at, :taps] = idx
                weight[i, at, :taps] = img.weight
                unit += n
    return dataclasses.replace(out, images=pool, image_index=index, image_weight=weight)
