"""State that several device groups hold at once: one copy per group, identical where groups share leaves.

A plan's replicas each hold the whole model: every stage of every replica keeps its own layers' parameters (and
optimizer moments) on its own devices, in its own tensor-parallel layout. Such state is a list of *copies*, one
per device group: trees shaped like the whole model, with `None` where the group holds nothing. A leaf held by
several groups (the same layers in different replicas; a tied embedding at both ends of one pipeline) has
identical copies in all of them: each step they reduce the same summed gradient (`meshes.transfer.Transfers.
sum_copies`) and apply the same update, so every replica is a backup of the others. Checkpoints, strategy
switches and the elastic drop read one copy of each leaf (`first_copies`) from the groups they name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from meshes.transfer import Transfers, is_none

Copies = list[Any]


def place(transfers: Transfers, tree: Any, shardings: Sequence[Any]) -> Copies:
    """One copy of `tree` (whole-model structure; host values alike on every process, or arrays anywhere) per
    group of `shardings` (trees like `tree`, a sharding where the group holds the leaf, None elsewhere), in
    buffers of their own: the optimizer donates them. Leaves going between the same two device sets travel
    together (`Transfers.tree`)."""
    leaves, treedef = jax.tree.flatten(tree)
    sources, targets, where = [], [], []
    for g, group in enumerate(shardings):
        for i, target in enumerate(treedef.flatten_up_to(group)):
            if target is not None:
                sources.append(leaves[i])
                targets.append(target)
                where.append((g, i))
    out: list[list[Any]] = [[None] * len(leaves) for _ in shardings]
    for (g, i), moved in zip(where, transfers.tree(sources, targets, copy=True), strict=True):
        out[g][i] = moved
    return [treedef.unflatten(group) for group in out]


def first_copies(copies: Copies, among: Sequence[int] | None = None) -> Any:
    """The whole tree, each leaf taken (without a copy) from the first group of `among` (default: all, in order)
    holding it. Raises when a leaf has no copy in those groups, naming it."""
    groups = range(len(copies)) if among is None else among
    chosen = [copies[g] for g in groups]

    def first(path, *candidates):
        for candidate in candidates:
            if candidate is not None:
                return candidate
        raise ValueError(f"no copy of {jax.tree_util.keystr(path)} in device groups {list(groups)}")

    return jax.tree_util.tree_map_with_path(first, *chosen, is_leaf=is_none)
