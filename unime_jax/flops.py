"""Analytic FLOPs of the models' forward passes (matmuls and attention, multiply-add = 2).

XLA's cost analysis counts a ``scan`` body once (28 stacked layers count as one) and Pallas
kernels not at all, so MFU is computed from these formulas instead. Elementwise work (norms,
activations, softmax) is left out, as in the usual MFU accounting.
"""

from __future__ import annotations

import itertools

from unime_jax.models.config import TextConfig, VisionConfig


def decoder_flops(text: TextConfig, rows: int, length: int) -> float:
    """Forward FLOPs of ``rows`` causal sequences of ``length`` tokens through the decoder."""
    d, hd = text.hidden_size, text.head_dim
    q, kv = text.num_heads * hd, text.num_kv_heads * hd
    matmul = d * q + 2 * d * kv + q * d + 3 * d * text.intermediate_size
    # Causal attention: token t attends to t + 1 keys, (L + 1) / 2 on average; QK^T and PV.
    attention = 2 * q * (length + 1) / 2
    per_token = 2 * (matmul + attention) * text.num_layers
    return float(rows * length * per_token)  # the embedding lookup is a gather: no FLOPs


def vit_flops(vision: VisionConfig, layers: int, tiles: int, class_token: bool) -> float:
    """Forward FLOPs of ``tiles`` tiles through ``layers`` ViT layers (patch embedding included)."""
    d, f = vision.hidden_size, vision.intermediate_size
    tokens = vision.num_patches + int(class_token)
    patch_embed = 2 * vision.num_channels * vision.patch_size**2 * d * vision.num_patches
    per_token_layer = 2 * (4 * d * d + 2 * d * f) + 2 * 2 * d * tokens  # + full attention
    return float(tiles * (patch_embed + tokens * per_token_layer * layers))


def mlp_flops(rows: int, *dims: int) -> float:
    """A chain of dense layers dims[0] -> dims[1] -> ... over ``rows`` vectors."""
    return float(rows * sum(2 * a * b for a, b in itertools.pairwise(dims)))
