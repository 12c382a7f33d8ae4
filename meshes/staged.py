"""What an HSPMD executor needs from a model: its pipeline stages, each written for one tensor-parallel shard.

`meshes` never imports a model. A model package implements `StagedModel` (jaxhet's is `jaxhet.parallel.StagedLlama`):
it slices whole-model parameters into a stage's share (by selection, so the executor maps a stage's leaves back to
the whole model's by their paths) and builds the stage's program for a given TP degree. Parameters are pytrees
(nested dicts of arrays).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

from meshes.fsdp import Zero3

Params = Any


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """A pipeline stage's share of the model: blocks `layers[0] <= i < layers[1]`, and whether it holds the
    input embedding (`first`) and the final norm, head and loss (`last`)."""

    layers: tuple[int, int]
    first: bool
    last: bool


@dataclasses.dataclass(frozen=True)
class StageProgram:
    """One stage as a per-shard function plus the layout of its parameters across the stage's TP axis.

    `apply(params, hidden, batch)` sees one TP shard's parameters (sliced per `param_specs`) and the activations,
    whole or, under context parallelism, this shard's slice of the sequence; it returns the activations for the
    next stage or, on the last stage, the micro-batch's loss *sum* over the whole sequence (so that micro-batches
    and replicas of different sizes combine exactly by token count).
    """

    apply: Callable[[Params, Any, dict], Any]
    param_specs: Any


class StagedModel(Protocol):
    num_layers: int

    def stage_params(self, params: Params, spec: StageSpec) -> Params: ...

    def stage_program(
        self,
        spec: StageSpec,
        tp: int,
        tp_axis: str,
        cp_axis: str | None = None,
        *,
        recompute: bool = False,
        zero3: Zero3 | None = None,
    ) -> StageProgram:
        """The stage for `tp` shards over `tp_axis`; with `cp_axis`, the sequence is also split over that axis.

        With `recompute` (a plan's `Stage.recompute`), the program rematerialises its blocks in the backward pass
        instead of keeping their activations; its values and gradients are those without.

        With `zero3` (a plan's `Stage.zero == 3`), `param_specs` is the ZeRO-3 layout `zero3.layout` gives (each
        leaf split over the mesh axes its tensor-parallel layout replicates it on) and the program gathers each
        block's parameters (`Zero3Layout.gather`) inside a `jax.checkpoint` region with `Zero3Layout.policy`, and
        the embedding, final norm and head inside the regions that use them: one gather per parameter and use in
        the forward pass, again in the backward pass for every use whose gradient needs the parameter (all but the
        embedding lookup), none kept in between; gradients come out in the stored layout, reduce-scattered over
        `cp`. Its values and gradients are those without.
        """
        ...
