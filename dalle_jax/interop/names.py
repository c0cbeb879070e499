"""Flat, framework-neutral parameter names for dalle_jax models, and the strict check every import goes through.

A model's parameters (a pure dict from `nnx.state(model, nnx.Param).to_pure_dict()`) become `{"a.b.c": array}`.
Layer stacks are always named per layer (`encoder.layers.3.self_attn.q_proj.kernel`), whether the model scans a
stacked stack (one array with a leading layer axis) or keeps a list of layers, so files do not depend on
`scan_layers`.
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import numpy as np

LAYERS_KEY = "layers"


def _is_stacked(node) -> bool:
    """A scanned layer stack: a dict under "layers" whose keys are module names, not layer indices."""
    return isinstance(node, Mapping) and bool(node) and all(isinstance(k, str) for k in node)


def _layer_count(stack) -> int:
    return int(jax.tree.leaves(stack)[0].shape[0])


def flatten(params, *, take: Callable = lambda x, i: x[i]) -> dict:
    """Nested params -> {dotted name: leaf}, unstacking scanned layer stacks with `take(leaf, i)`."""
    flat = {}

    def walk(node, prefix: str, parent_key):
        if isinstance(node, Mapping):
            if parent_key == LAYERS_KEY and _is_stacked(node):
                for i in range(_layer_count(node)):
                    walk(jax.tree.map(lambda x, i=i: take(x, i), node), f"{prefix}{i}.", None)
                return
            for key, child in node.items():
                walk(child, f"{prefix}{key}.", key)
            return
        flat[prefix[:-1]] = node

    walk(params, "", None)
    return flat


def shapes(params) -> dict[str, tuple[int, ...]]:
    """{dotted name: shape} of params or of their abstract (ShapeDtypeStruct) version."""
    def take(x, i):
        return jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype)
    return {k: tuple(v.shape) for k, v in flatten(params, take=take).items()}


def unflatten_like(flat: Mapping[str, np.ndarray], template, *, source: str) -> dict:
    """The inverse of `flatten`: arrays named as `flatten(template)` names them, nested (and stacked where the
    template's layers are stacked) like `template`. Raises, naming every difference, unless the names and shapes
    match the template exactly."""
    check_names_and_shapes({k: tuple(np.shape(v)) for k, v in flat.items()}, shapes(template), source=source)

    def build(node, prefix: str, parent_key):
        if isinstance(node, Mapping):
            if parent_key == LAYERS_KEY and _is_stacked(node):
                layers = [build(jax.tree.map(lambda x: x, node), f"{prefix}{i}.", "layer")
                          for i in range(_layer_count(node))]
                return jax.tree.map(lambda *xs: np.stack(xs), *layers)
            return {key: build(child, f"{prefix}{key}.", key) for key, child in node.items()}
        return np.asarray(flat[prefix[:-1]])

    return build(template, "", None)


def check_names_and_shapes(found: Mapping[str, tuple], expected: Mapping[str, tuple], *, source: str) -> None:
    """Raises ValueError naming the missing and unexpected names and the shape mismatches between `found` (what a
    file holds) and `expected` (what the target model needs); silent partial loads are never allowed."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(k for k in set(found) & set(expected) if tuple(found[k]) != tuple(expected[k]))
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{source} does not have the expected layout:"]
    if missing:
        lines.append(f"  missing {len(missing)} key(s): " + _listing(f"{k} {tuple(expected[k])}" for k in missing))
    if unexpected:
        lines.append(f"  unexpected {len(unexpected)} key(s): "
                     + _listing(f"{k} {tuple(found[k])}" for k in unexpected))
    if mismatched:
        lines.append(f"  {len(mismatched)} shape mismatch(es): " + _listing(
            f"{k} is {tuple(found[k])}, expected {tuple(expected[k])}" for k in mismatched))
    raise ValueError("\n".join(lines))


def _listing(items, limit: int = 12) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items) - limit} more)"
