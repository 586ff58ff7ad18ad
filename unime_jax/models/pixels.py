"""Pixels on device: images travel as uint8 and are rescaled and normalised here.

The host sends, per group, a (C, 256) lookup table built exactly like the HF image processor's
rescale (float64 multiply, cast to float32) and normalise ((x - mean) / std in float32), so a
uint8 pixel maps to the very float the processor would have produced, at a quarter of the bytes
of float32 pixels. Float pixels (e.g. what an HF processor returns) pass through unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def normalise(pixels: jax.Array, lut: jax.Array | None, channel_axis: int) -> jax.Array:
    """``pixels`` (G, ...) uint8 with channels on ``channel_axis`` (counted after G), ``lut``
    (G, C, 256) float32 → float32 pixels; float ``pixels`` are returned as they are."""
    if not jnp.issubdtype(pixels.dtype, jnp.integer):
        return pixels
    if lut is None:
        raise ValueError("uint8 pixels need their pixel_lut")

    def one_group(p, table):  # p: (...), table: (C, 256)
        lookup = lambda pc, tc: tc[pc.astype(jnp.int32)]  # noqa: E731
        return jax.vmap(lookup, in_axes=(channel_axis, 0), out_axes=channel_axis)(p, table)

    return jax.vmap(one_group)(pixels, lut)
