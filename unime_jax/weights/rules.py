"""Strict weight-name tables: HF checkpoint tensor names <-> paths in our NNX state.

A family describes its checkpoints with a :class:`WeightMap`: the prefixes under which the same
tensor appears in different layouts (canonicalised first), one :class:`Rule` per parameter kind
with a :class:`Transform` between the checkpoint's array and ours, and the tensors that are
skipped on purpose with the reason. Every canonical name must match exactly one rule or one skip,
or loading fails; export walks the same table backwards, so names and transforms live once.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np


class Transform:
    """Checkpoint array <-> parameter array. ``to_param`` must stay lazy on memory maps (views)."""

    def to_param(self, array: np.ndarray) -> np.ndarray:
        return array

    def to_checkpoint(self, array: np.ndarray) -> np.ndarray:
        return array

    def checkpoint_shape(self, param_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(param_shape)


IDENTITY = Transform()


class Transpose(Transform):
    """HF ``nn.Linear`` weight (out, in) <-> our kernel (in, out)."""

    def to_param(self, array):
        return array.T

    def to_checkpoint(self, array):
        return array.T

    def checkpoint_shape(self, param_shape):
        return tuple(reversed(param_shape))


TRANSPOSE = Transpose()


@dataclasses.dataclass(frozen=True)
class Conv(Transform):
    """A patch convolution with stride = kernel (Conv2d (D, C, p, p) or Conv3d (D, C, t, p, p))
    <-> the (C·[t·]p·p, D) kernel of a matmul over flattened patches in the same order."""

    kernel: tuple[int, ...]  # (C, p, p) or (C, t, p, p)

    def to_param(self, array):
        if array.ndim != len(self.kernel) + 1:
            raise ValueError(f"a {len(self.kernel) + 1}-D conv weight was expected")
        return array.reshape(array.shape[0], -1).T

    def to_checkpoint(self, array):
        return array.T.reshape(array.shape[1], *self.kernel)

    def checkpoint_shape(self, param_shape):
        return (param_shape[1], *self.kernel)


@dataclasses.dataclass(frozen=True)
class Rule:
    """``pattern`` matches a canonical name; ``target`` is a '/'-path formatted with the match's
    named groups; a ``layer`` group makes it one slice of a stacked parameter."""

    pattern: str
    target: str
    transform: Transform = IDENTITY


@dataclasses.dataclass(frozen=True)
class Match:
    target: tuple[str, ...]
    layer: int | None
    transform: Transform


@dataclasses.dataclass(frozen=True)
class WeightMap:
    """A family's checkpoint naming (module doc).

    ``aliases``: (checkpoint prefix, canonical prefix), first match wins; ``save_prefixes``:
    (canonical prefix, the prefix ``save_pretrained`` writes); ``module_prefixes``: (canonical
    prefix, the module path in the transformers model, for PEFT keys).
    """

    rules: tuple[Rule, ...]
    skips: tuple[tuple[str, str], ...] = ()
    aliases: tuple[tuple[str, str], ...] = ()
    save_prefixes: tuple[tuple[str, str], ...] = ()
    module_prefixes: tuple[tuple[str, str], ...] = ()
    # (first path element, layers built, layers in config.json, why the rest is skipped): e.g.
    # CLIP layers after LLaVA's feature layer, which never reach the features.
    truncated: tuple[tuple[str, int, int, str], ...] = ()

    def canonical(self, name: str) -> str:
        return _replace_prefix(name, self.aliases)

    def saved(self, canonical: str) -> str:
        return _replace_prefix(canonical, self.save_prefixes)

    def module(self, canonical: str) -> str:
        return _replace_prefix(canonical, self.module_prefixes)

    def match(self, name: str) -> Match | None:
        for rule in self.rules:
            m = re.fullmatch(rule.pattern, name)
            if m:
                groups = m.groupdict()
                layer = groups.pop("layer", None)
                target = tuple(rule.target.format(**groups).split("/"))
                return Match(target, None if layer is None else int(layer), rule.transform)
        return None

    def skip_reason(self, name: str) -> str | None:
        for pattern, reason in self.skips:
            if re.fullmatch(pattern, name):
                return reason
        return None

    def source_name(self, target: tuple[str, ...], layer: int | None) -> str | None:
        """The canonical checkpoint name that ``match`` maps to ``target`` (and ``layer``);
        None when no rule produces it. Export and error messages use it."""
        path = "/".join(target)
        for rule in self.rules:
            template = re.escape(rule.target).replace(r"\{", "{").replace(r"\}", "}")
            regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template)
            m = re.fullmatch(regex, path)
            if m is None or (("(?P<layer>" in rule.pattern) != (layer is not None)):
                continue
            groups = {**m.groupdict(), "layer": str(layer)}
            name = re.sub(r"\(\?P<(\w+)>[^)]*\)", lambda g, v=groups: v[g.group(1)], rule.pattern)
            name = name.replace("\\", "")
            back = self.match(name)
            if back is not None and back.target == tuple(target):
                return name
        return None


def _replace_prefix(name: str, prefixes: tuple[tuple[str, str], ...]) -> str:
    for prefix, replacement in prefixes:
        if name.startswith(prefix):
            return replacement + name[len(prefix) :]
    return name
