"""AnyRes image-feature packing (LLaVA-NeXT / LLaVA-OneVision) as a host-side 4-tap linear map.

HF's ``pack_image_features`` turns the per-tile vision features of one image into the sequence of
image embeddings that replaces the ``<image>`` placeholder tokens.  Its output length and shape
depend on the original image size (best-fit grid, un-padding, OneVision's bilinear downsampling),
which is data-dependent control flow that XLA cannot compile into fixed shapes.  But every packed
row is a fixed linear combination of at most four rows of the tile features (or the learned
``image_newline`` vector), so we compute that combination on the host, here, with numpy only:

    packed[n] = sum_{j<4} weights[n, j] * feats[indices[n, j]]

``feats`` are the vision tower + projector outputs of the image's tiles, ``P`` rows per tile
(tile 0 = base/global tile, tiles 1.. = grid tiles in the row-major order the HF image processor
emits them); index :data:`NEWLINE` is the ``image_newline`` row. :func:`unime_jax.preprocess.
example.collate` shifts the indices into the packed pool of the image's group; the device then
needs only a gather and a weighted sum with static shapes.

Everything here replicates transformers 5.x exactly, including its quirks:

* ``select_best_resolution`` (float maths on Python floats, first best wins ties);
* ``unpad_image``'s ``int(round(x, 7))`` and symmetric ``(cur - new) // 2`` padding, which keeps
  one extra row/column when the difference is odd and can remove *all* rows of a very thin image;
* OneVision's ``ratio > 1.1`` rule, output size ``int(cur // ratio)`` and
  ``F.interpolate(mode="bilinear", align_corners=False)`` (no antialias), with torch's float32
  source-index arithmetic;
* the newline placement: one ``image_newline`` at the end of every row of the (un-padded,
  possibly downsampled) grid and none after the base tile; a lone base tile (OneVision's
  multi-image mode) gets a single trailing newline.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np

NEWLINE = -1
"""Index in layouts meaning "the ``image_newline`` row": the group's first special row (see
:mod:`unime_jax.preprocess.example`)."""

NUM_TAPS = 4
"""Taps per packed row: bilinear downsampling mixes at most 2x2 source rows."""

# Default pinpoints of the HF config classes, used when config.json omits them.
_NEXT_DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
_ONEVISION_DEFAULT_PINPOINTS = tuple(
    (384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7)
)  # [[384, 384], [384, 768], ..., [2304, 2304]] row-major, as in LlavaOnevisionConfig


@dataclass(frozen=True)
class AnyResSpec:
    """Everything that determines an image's AnyRes layout besides its size.

    Frozen and built from tuples so that it is hashable: layouts are cached per (size, spec).
    """

    tile_size: int  # vision_config.image_size, pixels (one tile = one vision-tower forward)
    patch_size: int  # vision_config.patch_size, pixels
    grid_pinpoints: tuple[tuple[int, int], ...]  # (height, width) in pixels, as in the HF config
    # OneVision: N from vision_aspect_ratio "anyres_max_N"; None for LLaVA-NeXT (no downsampling).
    max_num_patches: int | None = None

    def __post_init__(self) -> None:
        # Accept lists (as read from JSON) but store tuples so the spec stays hashable.
        pins = tuple((operator.index(h), operator.index(w)) for h, w in self.grid_pinpoints)
        object.__setattr__(self, "grid_pinpoints", pins)
        if self.tile_size <= 0 or self.patch_size <= 0 or self.patch_size > self.tile_size:
            raise ValueError(f"bad tile/patch size {self.tile_size}/{self.patch_size}")
        if not pins:
            raise ValueError("grid_pinpoints must not be empty")
        for h, w in pins:
            # HF tiles a pinpoint with ceil(h / tile) rows but reshapes features with floor(h / tile)
            # rows; the two only agree (and HF only works) when pinpoints are tile multiples.
            if h <= 0 or w <= 0 or h % self.tile_size or w % self.tile_size:
                raise ValueError(
                    f"grid pinpoint {(h, w)} is not a positive multiple of tile size "
                    f"{self.tile_size}"
                )
        if self.max_num_patches is not None and self.max_num_patches < 1:
            raise ValueError(f"max_num_patches must be >= 1, got {self.max_num_patches}")

    @property
    def patches_per_side(self) -> int:
        """Vision-tower patches along one side of a tile (conv stride floors: 384 // 14 = 27)."""
        return self.tile_size // self.patch_size

    @property
    def patches_per_tile(self) -> int:
        """P: feature rows per tile, with no class token (LLaVA-NeXT's "default" drops it)."""
        return self.patches_per_side**2

    @property
    def max_tiles(self) -> int:
        """Largest :func:`num_tiles` over all image sizes (largest pinpoint grid + base tile).

        Handy as the device-side static tile budget: any image fits in it.
        """
        return (
            max((h // self.tile_size) * (w // self.tile_size) for h, w in self.grid_pinpoints) + 1
        )

    @property
    def taps(self) -> int:
        """Gather taps the device needs: 4 only if OneVision's bilinear downsampling can trigger.

        It triggers when the unpadded grid exceeds 1.1² × max_num_patches tiles; the unpadded grid
        is never larger than the largest pinpoint grid, so small grids need plain gathers only.
        """
        if self.max_num_patches is None:
            return 1
        return 4 if (self.max_tiles - 1) * 100 > 121 * self.max_num_patches else 1

    @classmethod
    def from_hf_config(cls, config_dict: dict[str, Any]) -> AnyResSpec:
        """Build from a LlavaOnevision / LlavaNext ``config.json`` dict.

        ``model_type`` decides the family: OneVision downsamples per ``vision_aspect_ratio``
        (HF default "anyres_max_9" when absent); LLaVA-NeXT never downsamples.
        """
        model_type = config_dict.get("model_type")
        if model_type == "llava_onevision":
            aspect = config_dict.get("vision_aspect_ratio") or "anyres_max_9"
            # Same parsing as HF (str.strip of a character set, then int).
            max_num_patches: int | None = int(aspect.strip("anyres_max_"))  # noqa: B005
            default_pins = _ONEVISION_DEFAULT_PINPOINTS
        elif model_type == "llava_next":
            max_num_patches = None
            default_pins = _NEXT_DEFAULT_PINPOINTS
        else:
            raise ValueError(
                f"AnyRes needs a llava_onevision or llava_next config, got {model_type!r}"
            )
        vision = config_dict.get("vision_config") or {}
        try:
            tile_size, patch_size = vision["image_size"], vision["patch_size"]
        except KeyError as e:
            raise ValueError(f"vision_config lacks {e.args[0]!r}") from None
        if isinstance(tile_size, (list, tuple)):
            if len(set(tile_size)) != 1:
                raise ValueError(f"non-square vision image_size {tile_size} is not supported")
            tile_size = tile_size[0]
        if isinstance(patch_size, (list, tuple)):
            if len(set(patch_size)) != 1:
                raise ValueError(f"non-square vision patch_size {patch_size} is not supported")
            patch_size = patch_size[0]
        pins = config_dict.get("image_grid_pinpoints") or default_pins
        return cls(
            tile_size=int(tile_size),
            patch_size=int(patch_size),
            grid_pinpoints=tuple(tuple(p) for p in pins),
            max_num_patches=max_num_patches,
        )


def _size_hw(image_size_hw: Any) -> tuple[int, int]:
    """Normalise (height, width) given as tuple/list/array to a hashable pair of Python ints."""
    vals = np.asarray(image_size_hw).reshape(-1).tolist()
    if len(vals) != 2:
        raise ValueError(f"image size must be (height, width), got {image_size_hw!r}")
    h, w = (operator.index(v) for v in vals)
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {(h, w)}")
    return h, w


@functools.lru_cache(maxsize=65536)
def _select_best_resolution(
    orig_h: int, orig_w: int, pinpoints: tuple[tuple[int, int], ...]
) -> tuple[int, int]:
    """``transformers.image_processing_utils.select_best_resolution``, bit for bit.

    Maximises the effective (downscaled) resolution, then minimises wasted pixels; the first
    pinpoint wins ties, so the pinpoint order matters and is kept as given.
    """
    best_fit = None
    max_effective = 0
    min_wasted = float("inf")
    for height, width in pinpoints:
        scale = min(width / orig_w, height / orig_h)
        down_w, down_h = int(orig_w * scale), int(orig_h * scale)
        effective = min(down_w * down_h, orig_w * orig_h)
        wasted = (width * height) - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective = effective
            min_wasted = wasted
            best_fit = (height, width)
    # Even when every pinpoint has effective 0 (e.g. 2x2000), the first one wins on wasted < inf.
    assert best_fit is not None
    return best_fit


def num_tiles(image_size_hw: Any, spec: AnyResSpec, *, base_only: bool = False) -> int:
    """Tiles the HF image processor emits for this image: base tile + best-fit grid.

    Equals HF ``image_size_to_num_patches`` (which counts ceil-divided tiles).  ``base_only``
    is OneVision's multi-image mode, where only the base tile is encoded.
    """
    h, w = _size_hw(image_size_hw)
    if base_only:
        return 1
    best_h, best_w = _select_best_resolution(h, w, spec.grid_pinpoints)
    t = spec.tile_size
    return -(-best_h // t) * -(-best_w // t) + 1


def grid_shape(image_size_hw: Any, spec: AnyResSpec) -> tuple[int, int]:
    """(rows, cols) of grid tiles, excluding the base tile (HF ``get_anyres_image_grid_shape``)."""
    h, w = _size_hw(image_size_hw)
    best_h, best_w = _select_best_resolution(h, w, spec.grid_pinpoints)
    return best_h // spec.tile_size, best_w // spec.tile_size


def _unpadded_box(orig_h: int, orig_w: int, cur_h: int, cur_w: int) -> tuple[int, int, int, int]:
    """(top, height, left, width) that HF ``unpad_image`` keeps of a (cur_h, cur_w) patch grid.

    The grid holds the image letterboxed (aspect preserved, centred); un-padding crops the
    letterbox bars.  Note ``slice(pad, cur - pad)`` keeps ``cur - 2 * pad`` rows, i.e. one more
    than ``new`` when ``cur - new`` is odd, and none at all when ``new`` rounds to 0.
    """
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(round(orig_h * (cur_w / orig_w), 7))
        pad = (cur_h - new_h) // 2
        return pad, max(cur_h - 2 * pad, 0), 0, cur_w
    new_w = int(round(orig_w * (cur_h / orig_h), 7))
    pad = (cur_w - new_w) // 2
    return 0, cur_h, pad, max(cur_w - 2 * pad, 0)


def _downsampled_size(h: int, w: int, spec: AnyResSpec) -> tuple[int, int] | None:
    """OneVision's target (height, width) for an un-padded (h, w) grid, or None to keep it.

    HF downsamples when the grid holds more than ~1.1**2 * max_num_patches tiles' worth of
    patches, to ``int(h // ratio) x int(w // ratio)`` (Python float floor-division).
    """
    if spec.max_num_patches is None:
        return None
    ratio = math.sqrt(h * w / (spec.max_num_patches * spec.patches_per_side**2))
    if not ratio > 1.1:
        return None
    out_h, out_w = int(h // ratio), int(w // ratio)
    if out_h == 0 or out_w == 0:
        # torch.nn.functional.interpolate raises on an empty output; HF can't pack this image.
        raise ValueError(
            f"OneVision downsampling of a {h}x{w} patch grid gives an empty {out_h}x{out_w} grid "
            "(HF's interpolate fails on this image too)"
        )
    return out_h, out_w


def _linear_taps(
    in_size: int, out_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """1-D source indices and weights of torch's linear resize, align_corners=False.

    Mirrors ATen's ``compute_source_index_and_lambda`` in float32 (torch's opmath type for
    float32 inputs): src = (in/out) * (dst + 0.5) - 0.5, clamped at 0; i1 = i0 + 1 except at
    the last input row.  Returns (i0, i1, lambda0, lambda1).

    torch's CPU build contracts ``scale * x - 0.5`` into one fused multiply-add (a single
    rounding); evaluating it in float64 is exact here (24-bit * 24-bit product, small
    magnitudes) and rounding once to float32 reproduces it bit for bit, whereas plain float32
    arithmetic is off by up to ~4e-6 in the weights.
    """
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    x = np.arange(out_size, dtype=np.float64) + 0.5
    src = np.maximum((np.float64(scale) * x - 0.5).astype(f32), f32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lam1 = np.clip(src - i0.astype(f32), f32(0), f32(1)).astype(f32)
    i1 = i0 + (i0 < in_size - 1)
    return i0, i1, (f32(1) - lam1).astype(f32), lam1


def _empty_layout(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((n, NUM_TAPS), np.int32), np.zeros((n, NUM_TAPS), np.float32)


@functools.lru_cache(maxsize=4096)
def _layout_cached(
    size: tuple[int, int], spec: AnyResSpec, base_only: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Builds :func:`image_layout`; cached per (size, spec, mode) since sizes repeat in datasets."""
    p, tile_p = spec.patches_per_side, spec.patches_per_tile

    # Base tile: rows 0..P-1, copied as is.
    base_idx, base_w = _empty_layout(tile_p)
    base_idx[:, 0] = np.arange(tile_p)
    base_w[:, 0] = 1.0

    if base_only:
        nl_idx, nl_w = _empty_layout(1)
        nl_idx[0, 0], nl_w[0, 0] = NEWLINE, 1.0
        parts = [(base_idx, base_w), (nl_idx, nl_w)]
    else:
        orig_h, orig_w = size
        rows, cols = grid_shape(size, spec)
        top, h, left, w = _unpadded_box(orig_h, orig_w, rows * p, cols * p)

        def flat(y: np.ndarray, x: np.ndarray) -> np.ndarray:
            # Global patch (y, x) of the stitched grid -> row of feats: HF's
            # view(rows, cols, p, p, D).permute(4, 0, 2, 1, 3) puts tile (y // p, x // p),
            # in-tile patch (y % p, x % p) there; grid tiles start after the base tile.
            tile = 1 + (y // p) * cols + (x // p)
            return tile * tile_p + (y % p) * p + (x % p)

        out = _downsampled_size(h, w, spec)
        if out is None:
            out_h, out_w = h, w
            ys, xs = top + np.arange(h), left + np.arange(w)
            grid_idx = np.zeros((h, w + 1, NUM_TAPS), np.int32)
            grid_w = np.zeros((h, w + 1, NUM_TAPS), np.float32)
            grid_idx[:, :w, 0] = flat(ys[:, None], xs[None, :])
            grid_w[:, :w, 0] = 1.0
        else:
            out_h, out_w = out
            y0, y1, wy0, wy1 = _linear_taps(h, out_h)
            x0, x1, wx0, wx1 = _linear_taps(w, out_w)
            y0, y1, x0, x1 = y0 + top, y1 + top, x0 + left, x1 + left
            grid_idx = np.zeros((out_h, out_w + 1, NUM_TAPS), np.int32)
            grid_w = np.zeros((out_h, out_w + 1, NUM_TAPS), np.float32)
            for j, (ya, yw, xa, xw) in enumerate(
                ((y0, wy0, x0, wx0), (y0, wy0, x1, wx1), (y1, wy1, x0, wx0), (y1, wy1, x1, wx1))
            ):
                grid_idx[:, :out_w, j] = flat(ya[:, None], xa[None, :])
                grid_w[:, :out_w, j] = yw[:, None] * xw[None, :]
        # One image_newline closing every row of the grid (none after the base tile).
        grid_idx[:, out_w, 0] = NEWLINE
        grid_w[:, out_w, 0] = 1.0
        parts = [
            (base_idx, base_w),
            (grid_idx.reshape(-1, NUM_TAPS), grid_w.reshape(-1, NUM_TAPS)),
        ]
        assert out_h * (out_w + 1) + tile_p == sum(len(i) for i, _ in parts)

    indices = np.concatenate([i for i, _ in parts])
    weights = np.concatenate([w for _, w in parts])
    indices.flags.writeable = False  # shared by the cache
    weights.flags.writeable = False
    return indices, weights


def image_layout(
    image_size_hw: Any, spec: AnyResSpec, *, base_only: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The 4-tap map that reproduces HF ``pack_image_features`` for one image.

    Returns ``indices`` int32 (N, 4) and ``weights`` float32 (N, 4), N = num_image_tokens.
    An index is ``tile * P + patch`` (tile 0 = base tile) or :data:`NEWLINE`; unused taps have
    index 0 and weight 0.  Plain gathers use weights (1, 0, 0, 0); OneVision's bilinear
    downsampling uses the 2x2 bilinear weights.  ``base_only`` is OneVision's multi-image mode
    (base tile + one newline).  The arrays are cached and read-only; copy before mutating.
    """
    return _layout_cached(_size_hw(image_size_hw), spec, bool(base_only))


def num_image_tokens(image_size_hw: Any, spec: AnyResSpec, *, base_only: bool = False) -> int:
    """Packed rows for this image: equals ``len(image_layout(...)[0])`` and HF's processor count.

    Computed in closed form (no layout built), mirroring the processors'
    ``_get_number_of_features`` (after their "default"-strategy class-token adjustment).
    """
    size = _size_hw(image_size_hw)
    tile_p = spec.patches_per_tile
    if base_only:
        return tile_p + 1
    rows, cols = grid_shape(size, spec)
    p = spec.patches_per_side
    _, h, _, w = _unpadded_box(size[0], size[1], rows * p, cols * p)
    out = _downsampled_size(h, w, spec)
    if out is not None:
        h, w = out
    return tile_p + h * (w + 1)
