"""Training with activation checkpointing runs the layers stacked ([L, ...] per weight, under lax.scan).

Why: recomputation inside a loop body cannot be hoisted. Unrolled, XLA CPU expands jax.checkpoint's optimization
barriers and schedules the recomputed forward next to the original, so `--remat full` saved nothing there
(measured: the same temp bytes as no remat, tiny model, 2-8 layers); under scan the backward loop recomputes layer i
in iteration i, and `full` keeps one [B, T, D] input per layer. The scanned program also compiles in a time flat in
depth, which is what lets `memory-plan` compile neox-20b's 44 layers on CPU in seconds.

These helpers turn the unrolled trees the checkpoint gives ({"layers": {0: ..., 1: ...}}) into the stacked layout:
shapes, shardings (the layer axis is never split) and arrays (one weight at a time, each per-layer buffer freed once
copied: the peak is the tree plus one stacked weight, not two trees).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def stacked_for(remat: str) -> bool:
    """Whether the train step runs its layers stacked: exactly when it checkpoints activations."""
    return remat != "none"


def _layers(tree: dict) -> list:
    layers = tree.get("layers", {})
    return [layers[i] for i in range(len(layers))]


def stack_abstract(tree: dict) -> dict:
    """ShapeDtypeStructs of an unrolled tree -> the stacked tree's ([L, ...] under "layers")."""
    layers = _layers(tree)
    if not layers:  # nothing per layer in this tree (the frozen part of full training)
        return tree
    stacked = jax.tree.map(lambda x: jax.ShapeDtypeStruct((len(layers), *x.shape), x.dtype), layers[0])
    return {**tree, "layers": stacked}


def stack_shardings(tree: dict) -> dict:
    """NamedShardings of an unrolled tree -> the stacked tree's: each layer's spec behind an unsplit layer axis."""
    if not _layers(tree):
        return tree
    layer0 = _layers(tree)[0]
    return {**tree, "layers": jax.tree.map(lambda s: NamedSharding(s.mesh, P(None, *s.spec)), layer0)}


def stack_arrays(tree: dict, shardings: dict) -> dict:
    """An unrolled tree of arrays -> stacked, placed on `shardings` (stack_shardings of the unrolled ones). Consumes
    `tree`: each layer's buffer of a weight is deleted once that weight is stacked."""
    layers = _layers(tree)
    if not layers:
        return tree
    leaves = [jax.tree.leaves(layer) for layer in layers]
    treedef = jax.tree.structure(layers[0])
    out = []
    for j, sharding in enumerate(jax.tree.leaves(shardings["layers"])):
        parts = [leaves[i][j] for i in range(len(layers))]
        out.append(jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)(*parts))
        for x in parts:
            x.delete()
    return {**tree, "layers": jax.tree.unflatten(treedef, out)}


def is_stacked(tree: dict) -> bool:
    return "layers" in tree and 0 not in tree["layers"]


def unstack_host(tree: dict) -> dict:
    """A stacked tree of host (numpy) arrays -> unrolled; unrolled trees pass through."""
    if not is_stacked(tree):
        return tree
    n = jax.tree.leaves(tree["layers"])[0].shape[0]
    return {**tree, "layers": {i: jax.tree.map(lambda x, i=i: x[i], tree["layers"]) for i in range(n)}}
