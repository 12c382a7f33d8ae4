"""Pictures of plans: a training plan's placement (one row per node, one box per device, coloured by replica and
stage), a serving plan's replicas on the same grid, and a cascade plan's latency/quality trade-off.

Each picture is a matplotlib `Figure` built without pyplot, so drawing one never changes the caller's backend (a
notebook keeps showing its own plots, and shows these with `display(fig)`); the `save_*_png` functions write them.
matplotlib is imported when a picture is drawn, so the rest of the planners work without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

from planners.cascade import CascadePlan
from planners.cluster import ClusterSpec
from planners.plan import TrainPlan
from planners.serve import ServePlan


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


Box = tuple[object, float, str]
"""How one device is drawn: colour, opacity, and the text under its index and kind."""


def _device_grid(cluster: ClusterSpec, boxes: dict[int, Box], title: str, legend: list[tuple[object, str]]) -> Figure:
    """One row per node, one box per device (`boxes[d]`, or grey "idle"), a title and a legend of colours."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    width = max(n.count for n in cluster.nodes)
    fig = Figure(figsize=(1.6 + 1.25 * width, 0.9 + 0.9 * len(cluster.nodes)))
    ax = fig.subplots()
    for d in cluster.devices:
        x, y = d.local, len(cluster.nodes) - 1 - d.node
        colour, alpha, text = boxes.get(d.index, ("lightgrey", 1.0, "idle"))
        ax.add_patch(Rectangle((x + 0.05, y + 0.08), 0.9, 0.84, facecolor=colour, alpha=alpha, edgecolor="black"))
        ax.text(x + 0.5, y + 0.5, f"#{d.index} {d.kind}\n{text}", ha="center", va="center", fontsize=7)
    ax.set_xlim(0, width)
    ax.set_ylim(0, len(cluster.nodes))
    ax.set_yticks([len(cluster.nodes) - 1 - i + 0.5 for i in range(len(cluster.nodes))])
    ax.set_yticklabels([f"{n.name}\n{n.count}x{n.kind}" for n in cluster.nodes], fontsize=8)
    ax.set_xticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, fontsize=9)
    handles = [Patch(color=colour, label=label) for colour, label in legend[:10]]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def placement_figure(plan: TrainPlan, cluster: ClusterSpec) -> Figure:
    """`plan` drawn on `cluster`: which replica, stage, layers and CP/TP degrees each device holds."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    boxes: dict[int, Box] = {}
    for r, replica in enumerate(plan.replicas):
        depth = len(replica.stages)
        for s, stage in enumerate(replica.stages):
            flags = (" rc" if stage.recompute else "") + (f" {stage.compress}" if stage.compress != "none" else "")
            shape = f"CP{replica.cp} TP{stage.tp}" if replica.cp > 1 else f"TP{stage.tp}"
            text = f"R{r} S{s}\nL{stage.layers[0]}-{stage.layers[1] - 1}\n{shape}{flags}"
            for d in stage.devices:
                boxes[d] = (cmap(r % 10), 1.0 - 0.55 * s / max(depth - 1, 1), text)
    title = f"{plan.model or 'model'} on {plan.cluster or cluster.name}: {len(plan.replicas)} replica(s)"
    if plan.estimate is not None:
        title += f", predicted {plan.estimate.iteration_s * 1e3:.1f} ms/iteration"
    legend = [
        (cmap(r % 10), f"R{r}: {rep.num_microbatches}x{rep.microbatch_size} seq") for r, rep in enumerate(plan.replicas)
    ]
    return _device_grid(cluster, boxes, title, legend)


def save_placement_png(plan: TrainPlan, cluster: ClusterSpec, path: str | Path) -> Path:
    """Draw `plan` on `cluster` into `path` (PNG) and return the path."""
    return _save(placement_figure(plan, cluster), path)


def serve_figure(plan: ServePlan, cluster: ClusterSpec) -> Figure:
    """A serving plan drawn on `cluster`: each replica's model, role, TP degree and routed traffic, coloured by
    model (prefill-only and decode-only replicas lighter)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    models = list(dict.fromkeys(r.model for r in plan.replicas))
    boxes: dict[int, Box] = {}
    for i, r in enumerate(plan.replicas):
        text = f"#{i} {r.model}\n{r.role} TP{r.tp}\n{r.routed_rps:.2f}/s"
        for d in r.devices:
            boxes[d] = (cmap(models.index(r.model) % 10), 1.0 if r.role == "both" else 0.55, text)
    title = (
        f"serving on {plan.cluster or cluster.name}: {len(plan.replicas)} replica(s), "
        f"{plan.price_per_hour:.2f}/h ({plan.objective.replace('_', ' ')})"
    )
    return _device_grid(cluster, boxes, title, [(cmap(k % 10), m) for k, m in enumerate(models)])


def save_serve_png(plan: ServePlan, cluster: ClusterSpec, path: str | Path) -> Path:
    """Draw the serving plan (see `serve_figure`) into `path` (PNG) and return the path."""
    return _save(serve_figure(plan, cluster), path)


def cascade_figure(plan: CascadePlan) -> Figure:
    """The cascade's (latency, quality) Pareto front, the single-model baselines and the chosen point."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    ax.plot(
        [p.latency_s for p in plan.front],
        [p.quality for p in plan.front],
        "o-",
        color="tab:blue",
        label="cascade: Pareto front over thresholds",
    )
    for s in plan.single:
        ax.plot(s.latency_s, s.quality, "s", color="tab:grey")
        ax.annotate(
            f"{s.model} alone", (s.latency_s, s.quality), textcoords="offset points", xytext=(6, -10), fontsize=7
        )
    thresholds = ", ".join(f"{t:.2f}" for t in plan.thresholds)
    ax.plot(plan.latency_s, plan.quality, "*", color="tab:red", markersize=16, label=f"chosen: thresholds {thresholds}")
    ax.set_xlabel("predicted mean latency per request (s)")
    ax.set_ylabel("quality (fraction answered right)")
    bound = f", quality >= {plan.min_quality}" if plan.min_quality is not None else ""
    ax.set_title(
        f"{' -> '.join(plan.models)} at {plan.arrival_rate:g} req/s (latency weight {plan.weight}{bound})", fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def save_cascade_png(plan: CascadePlan, path: str | Path) -> Path:
    """Draw the cascade plan (see `cascade_figure`) into `path` (PNG) and return the path."""
    return _save(cascade_figure(plan), path)
