"""The typed batch every model takes: :class:`ModelInputs`.

Rows are token sequences; images travel as a *packed pool* of image units per group of rows:

- ``input_ids``, ``attention_mask``: (B, T) int32;
- ``positions``: (B, T) int32, or (B, T, 3) for M-RoPE (temporal, height, width); computed on
  the host, so the device never needs to know how a family numbers its positions;
- ``images``: the family's image units, every array with a leading *group* axis G (e.g.
  ``pixels`` (G, U, C, H, W) uint8 for LLaVA tiles, plus ``pixel_lut`` (G, C, 256), the exact
  rescale-and-normalise table of the image processor); ``None`` when no row has an image, and then
  no vision tower runs at all;
- ``image_index`` / ``image_weight``: (B, T, taps). Rows are split evenly and contiguously over the
  G groups (row ``r`` belongs to group ``r // (B / G)``); at an image-token position the input
  embedding is ``sum_j weight[j] * features[group][index[j]]``, where ``features[group]`` are the
  feature rows the family's tower computes from the group's units (then its special rows such as
  LLaVA's ``image_newline``). Reordering tiles, unpadding, newlines and OneVision's bilinear
  downsampling are all such weighted gathers, computed on the host.

A group is the unit of locality: every device holds whole groups, so the gather never crosses
devices. Packing (units of many rows share one pool) means a text-only row costs no tile, and a
side or batch without images costs no tower (``images`` is ``None``).
"""

from __future__ import annotations

from typing import Any

import flax.struct

Array = Any  # jax.Array on device, np.ndarray on the host


@flax.struct.dataclass
class ModelInputs:
    input_ids: Array
    attention_mask: Array
    positions: Array
    images: dict[str, Array] | None = None
    image_index: Array | None = None
    image_weight: Array | None = None

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_groups(self) -> int:
        """Groups of rows that share an image pool (1 when there are no images)."""
        if not self.images:
            return 1
        return next(iter(self.images.values())).shape[0]
