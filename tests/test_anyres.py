"""Parity of the host-side AnyRes 4-tap layout with HF transformers' pack_image_features.

The references are HF's own functions: the models' ``pack_image_features`` (called unbound with
a minimal ``self``), ``image_size_to_num_patches`` / ``get_anyres_image_grid_shape`` and the
processors' ``_get_number_of_features`` (processors built with ``object.__new__`` since the real
constructors need a tokenizer and image processor).
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionModel,
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)
from transformers.models.llava_onevision.processing_llava_onevision import (
    LlavaOnevisionProcessor,
)

from unime_jax.preprocess.anyres import (
    NEWLINE,
    AnyResSpec,
    grid_shape,
    image_layout,
    num_image_tokens,
    num_tiles,
)

ONEVISION_PINS = tuple((384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7))
NEXT_PINS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def _pins(tile: int, shapes: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    return tuple((tile * r, tile * c) for r, c in shapes)


_SMALL_GRID = [(r, c) for r in range(1, 5) for c in range(1, 5)]
_NEXT_LIKE = [(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)]

# (name, family, spec) — family "ov" or "next".  Small tiles keep the HF reference cheap.
SPECS = [
    ("ov_real", "ov", AnyResSpec(384, 14, ONEVISION_PINS, 9)),
    ("ov_real_max1", "ov", AnyResSpec(384, 14, ONEVISION_PINS, 1)),
    ("next_real", "next", AnyResSpec(336, 14, NEXT_PINS, None)),
    ("ov_t32p8_max1", "ov", AnyResSpec(32, 8, _pins(32, _SMALL_GRID), 1)),
    ("ov_t32p8_max2", "ov", AnyResSpec(32, 8, _pins(32, _SMALL_GRID), 2)),
    ("ov_t32p8_max9", "ov", AnyResSpec(32, 8, _pins(32, _SMALL_GRID), 9)),
    ("ov_t28p14_max1", "ov", AnyResSpec(28, 14, _pins(28, _SMALL_GRID), 1)),
    ("ov_t30p8_max2", "ov", AnyResSpec(30, 8, _pins(30, [(1, 1), (1, 5), (5, 1), (3, 4)]), 2)),
    # p = 3 is odd, so un-padding can leave a single patch row, which downsampling then empties.
    ("ov_t30p8_max1", "ov", AnyResSpec(30, 8, _pins(30, [(1, 1), (1, 5), (5, 1), (3, 4)]), 1)),
    ("next_t32p8", "next", AnyResSpec(32, 8, _pins(32, _NEXT_LIKE), None)),
    ("next_t28p14_grid", "next", AnyResSpec(28, 14, _pins(28, _SMALL_GRID), None)),
    ("next_t30p8", "next", AnyResSpec(30, 8, _pins(30, [(1, 1), (1, 5), (5, 1), (3, 4)]), None)),
]

FIXED_SIZES = [
    (1, 1),
    (2, 3),
    (5, 7),
    (20, 900),
    (900, 20),
    (1, 2000),
    (2000, 1),
    (3, 2000),
    (2000, 3),
    (64, 64),
    (384, 384),
    (1000, 1000),
    (2000, 2000),
    (1999, 1333),
    (1333, 1999),
    (336, 672),
    (672, 336),
    (672, 672),
    (1008, 336),
    (336, 1008),
    (384, 2304),
    (2304, 2304),
    (480, 640),
    (640, 480),
    (720, 1280),
    (33, 97),
    (97, 33),
]


def _sizes(spec: AnyResSpec, seed: int, n_random: int) -> list[tuple[int, int]]:
    """Fixed edge cases + exact pinpoints + deterministic random sizes up to 2000 px."""
    rng = np.random.default_rng(seed)
    rand = [tuple(int(v) for v in rng.integers(1, 2001, size=2)) for _ in range(n_random)]
    # Log-uniform too, so that small and extreme-aspect sizes are well represented.
    rand += [
        tuple(int(v) for v in np.exp(rng.uniform(0, np.log(2000), size=2)).round().clip(1, 2000))
        for _ in range(n_random)
    ]
    return FIXED_SIZES + list(spec.grid_pinpoints) + rand


def _hf_self(spec: AnyResSpec) -> types.SimpleNamespace:
    """Just what pack_image_features reads from ``self``."""
    vision = types.SimpleNamespace(image_size=spec.tile_size, patch_size=spec.patch_size)
    config = types.SimpleNamespace(
        vision_config=vision, image_grid_pinpoints=[list(p) for p in spec.grid_pinpoints]
    )
    return types.SimpleNamespace(config=config)


def _hf_pack(family: str, spec: AnyResSpec, feats, size, newline):
    image_sizes = torch.tensor([size], dtype=torch.long)
    if family == "ov":
        out, lens = LlavaOnevisionModel.pack_image_features(
            _hf_self(spec),
            [feats],
            image_sizes,
            image_newline=newline,
            vision_aspect_ratio=f"anyres_max_{spec.max_num_patches}",
        )
    else:
        out, lens = LlavaNextModel.pack_image_features(
            _hf_self(spec), [feats], image_sizes, "default", image_newline=newline
        )
    assert int(lens[0]) == out[0].shape[0]
    return out[0].numpy()


def _apply(feats_ext: np.ndarray, indices: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The device-side 4-tap map, in numpy."""
    return np.einsum("nj,njd->nd", weights, feats_ext[indices])


def _ours(spec: AnyResSpec, feats: np.ndarray, newline: np.ndarray, size, base_only=False):
    """Our layout applied to a feats_ext padded to a larger static tile budget, as on device."""
    indices, weights = image_layout(size, spec, base_only=base_only)
    assert indices.dtype == np.int32 and weights.dtype == np.float32
    assert indices.shape == weights.shape == (num_image_tokens(size, spec, base_only=base_only), 4)
    max_tiles = spec.max_tiles + 2
    tile_p, d = spec.patches_per_tile, feats.shape[-1]
    feats_ext = np.full((max_tiles * tile_p + 1, d), np.nan, np.float32)  # padding: poison
    feats_ext[: feats.shape[0] * tile_p] = feats.reshape(-1, d)
    feats_ext[-1] = newline
    resolved = np.where(indices == NEWLINE, max_tiles * tile_p, indices)  # as collate places it
    # Every tap reads a real tile row or the newline row, never the padding beyond num_tiles.
    real = (resolved < feats.shape[0] * tile_p) | (resolved == max_tiles * tile_p)
    assert real.all()
    return _apply(feats_ext, resolved, weights)


def _check_one(family: str, spec: AnyResSpec, size, gen: torch.Generator, d: int = 3) -> bool:
    """Compare with HF for one size; returns whether OneVision downsampling happened."""
    n = num_tiles(size, spec)
    assert n == image_size_to_num_patches(
        size, [list(p) for p in spec.grid_pinpoints], spec.tile_size
    )
    assert grid_shape(size, spec) == tuple(
        get_anyres_image_grid_shape(
            list(size), [list(p) for p in spec.grid_pinpoints], spec.tile_size
        )
    )
    feats = torch.randn(n, spec.patches_per_tile, d, generator=gen)
    newline = torch.randn(d, generator=gen)
    try:
        ref = _hf_pack(family, spec, feats, size, newline)
    except RuntimeError as e:  # interpolate to an empty grid: HF can't pack this image
        assert "greater than 0" in str(e)
        with pytest.raises(ValueError, match="empty"):
            image_layout(size, spec)
        return False
    got = _ours(spec, feats.numpy(), newline.numpy(), size)
    assert got.shape == ref.shape, (size, got.shape, ref.shape)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5, err_msg=str(size))
    _, weights = image_layout(size, spec)
    return bool(np.any(weights[:, 1:] != 0))


@pytest.mark.parametrize(("name", "family", "spec"), SPECS, ids=[s[0] for s in SPECS])
def test_pack_matches_hf(name, family, spec):
    gen = torch.Generator().manual_seed(0)
    downsampled = [
        _check_one(family, spec, s, gen) for s in _sizes(spec, seed=len(name), n_random=25)
    ]
    if family == "next":
        assert not any(downsampled)  # plain gathers only
    else:  # both regimes of OneVision's ratio > 1.1 rule are covered for every spec
        assert any(downsampled) and not all(downsampled)


def test_empty_downsampled_grid_raises_like_hf():
    """A 1-row un-padded grid downsampled to 0 rows: HF's interpolate raises, and so do we."""
    spec = AnyResSpec(30, 8, _pins(30, [(1, 1), (1, 5), (5, 1), (3, 4)]), 1)
    size = (14, 2000)
    assert grid_shape(size, spec) == (1, 5)
    feats = torch.zeros(num_tiles(size, spec), spec.patches_per_tile, 2)
    with pytest.raises(RuntimeError, match="greater than 0"):
        _hf_pack("ov", spec, feats, size, torch.zeros(2))
    with pytest.raises(ValueError, match="empty"):
        image_layout(size, spec)
    with pytest.raises(ValueError, match="empty"):
        num_image_tokens(size, spec)
    assert _check_one("ov", spec, size, torch.Generator().manual_seed(0)) is False


def test_unpadded_grid_without_columns():
    """A very tall thin image can lose every grid column to un-padding (HF keeps only newlines)."""
    spec = AnyResSpec(336, 14, NEXT_PINS, None)
    size = (2000, 1)
    indices, _ = image_layout(size, spec)
    grid = indices[spec.patches_per_tile :, 0]
    assert len(grid) > 0 and np.all(grid == NEWLINE)
    _check_one("next", spec, size, torch.Generator().manual_seed(0))


def test_ov_real_downsampling_triggers():
    """anyres_max_9 with the real 384/14 config downsamples large images but not small ones."""
    spec = SPECS[0][2]
    _, w = image_layout((2000, 2000), spec)
    assert np.any(w[:, 1:] != 0)
    _, w = image_layout((384, 768), spec)
    assert np.all(w[:, 1:] == 0) and np.all(w[:, 0] == 1)


@pytest.mark.parametrize(("name", "family", "spec"), SPECS[:2], ids=[s[0] for s in SPECS[:2]])
def test_ov_multi_image_base_only(name, family, spec):
    """OneVision multi-image mode: only the base tile is encoded, followed by one newline."""
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(1, spec.patches_per_tile, 3, generator=gen)
    newline = torch.randn(3, generator=gen)
    ref = _hf_pack(family, spec, feats, (1000, 700), newline)
    got = _ours(spec, feats.numpy(), newline.numpy(), (1000, 700), base_only=True)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    assert num_tiles((1000, 700), spec, base_only=True) == 1
    proc = _ov_processor(spec)
    assert num_image_tokens((1000, 700), spec, base_only=True) == proc.num_image_tokens + 1


def _ov_processor(spec: AnyResSpec) -> LlavaOnevisionProcessor:
    proc = object.__new__(LlavaOnevisionProcessor)
    proc.image_processor = types.SimpleNamespace(
        image_grid_pinpoints=[list(p) for p in spec.grid_pinpoints]
    )
    proc.num_image_tokens = spec.patches_per_tile
    proc.vision_feature_select_strategy = "full"
    proc.vision_aspect_ratio = f"anyres_max_{spec.max_num_patches}"
    return proc


def _next_processor(spec: AnyResSpec, cls_tokens: int, strategy: str) -> LlavaNextProcessor:
    proc = object.__new__(LlavaNextProcessor)
    proc.image_processor = types.SimpleNamespace(
        image_grid_pinpoints=[list(p) for p in spec.grid_pinpoints]
    )
    proc.patch_size = spec.patch_size
    proc.num_additional_image_tokens = cls_tokens
    proc.vision_feature_select_strategy = strategy
    return proc


@pytest.mark.parametrize(("name", "family", "spec"), SPECS, ids=[s[0] for s in SPECS])
def test_token_count_matches_processor(name, family, spec):
    if family == "ov":
        procs = [_ov_processor(spec)]
    else:  # CLIP (class token dropped by "default") and a no-class-token tower with "full"
        procs = [_next_processor(spec, 1, "default"), _next_processor(spec, 0, "full")]
    for size in _sizes(spec, seed=100 + len(name), n_random=200):
        try:
            ours = num_image_tokens(size, spec)
        except ValueError:  # HF's model can't pack it (empty interpolate); checked elsewhere
            assert family == "ov"
            continue
        for proc in procs:
            ref = proc._get_number_of_features(size[0], size[1], spec.tile_size, spec.tile_size)
            ref -= proc.vision_feature_select_strategy == "default"
            assert ours == ref, (size, ours, ref)
        assert len(image_layout(size, spec)[0]) == ours


def test_layout_structure():
    """Newlines close each grid row and nothing else; base tile first; indices in range."""
    spec = AnyResSpec(32, 8, _pins(32, _SMALL_GRID), None)
    indices, weights = image_layout((50, 130), spec)
    rows, cols = grid_shape((50, 130), spec)
    tile_p = spec.patches_per_tile
    np.testing.assert_array_equal(indices[:tile_p, 0], np.arange(tile_p))
    nl = np.flatnonzero(indices[:, 0] == NEWLINE)
    assert nl[-1] == len(indices) - 1 and np.all(nl >= tile_p)
    assert len(set(np.diff(nl).tolist())) == 1  # equal row lengths
    assert indices.max() < num_tiles((50, 130), spec) * tile_p
    assert np.all(indices[:, 1:] == 0) and np.all(weights == (weights[:, :1] == weights))
    assert not indices.flags.writeable
    assert rows * cols + 1 == num_tiles((50, 130), spec)


def test_bilinear_weights_sum_to_one():
    spec = AnyResSpec(384, 14, ONEVISION_PINS, 9)
    indices, weights = image_layout((1999, 1333), spec)
    np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-6)
    assert num_image_tokens((1999, 1333), spec) == len(indices)


def test_from_hf_config():
    ov = {
        "model_type": "llava_onevision",
        "vision_config": {"image_size": 384, "patch_size": 14},
        "image_grid_pinpoints": [list(p) for p in ONEVISION_PINS],
    }
    spec = AnyResSpec.from_hf_config(ov)
    assert spec == AnyResSpec(384, 14, ONEVISION_PINS, 9)
    assert spec.patches_per_side == 27 and spec.patches_per_tile == 729 and spec.max_tiles == 37
    assert (
        AnyResSpec.from_hf_config({**ov, "vision_aspect_ratio": "anyres_max_4"}).max_num_patches
        == 4
    )
    assert AnyResSpec.from_hf_config({**ov, "image_grid_pinpoints": None}) == spec
    nxt = {"model_type": "llava_next", "vision_config": {"image_size": 336, "patch_size": 14}}
    spec = AnyResSpec.from_hf_config(nxt)
    assert spec == AnyResSpec(336, 14, NEXT_PINS, None) and spec.patches_per_tile == 576
    assert spec.max_tiles == 5
    with pytest.raises(ValueError):
        AnyResSpec.from_hf_config({**nxt, "model_type": "llava"})
    with pytest.raises(ValueError):
        AnyResSpec(336, 14, ((336, 600),))  # not a tile multiple: HF would fail to reshape
    hash(spec)  # usable as a cache key


def test_taps_only_where_downsampling_can_happen():
    pins = ((32, 32), (32, 64), (64, 64))
    assert AnyResSpec(32, 8, pins).taps == 1  # LLaVA-NeXT
    assert AnyResSpec(32, 8, pins, max_num_patches=9).taps == 1  # 4 tiles never exceed 9
    assert AnyResSpec(32, 8, pins, max_num_patches=2).taps == 4
    for size in [(20, 900), (64, 64), (900, 20), (300, 300)]:
        _, w = image_layout(size, AnyResSpec(32, 8, pins, max_num_patches=9))
        assert np.all(w[:, 1:] == 0)  # a 1-tap spec must never need the other taps
