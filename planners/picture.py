"""Pictures of plans: a training plan's placement (one row per node, one box per device, coloured by replica and
stage) and a cascade plan's latency/quality trade-off.

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


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def placement_figure(plan: TrainPlan, cluster: ClusterSpec) -> Figure:
    """`plan` drawn on `cluster`: which replica, stage, layers and TP degree each device holds."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    owner: dict[int, tuple[int, int]] = {}
    for r, replica in enumerate(plan.replicas):
        for s, stage in enumerate(replica.stages):
            for d in stage.devices:
                owner[d] = (r, s)
    width = max(n.count for n in cluster.nodes)
    fig = Figure(figsize=(1.6 + 1.25 * width, 0.9 + 0.9 * len(cluster.nodes)))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["tab10"]
    for d in cluster.devices:
        x, y = d.local, len(cluster.nodes) - 1 - d.node
        if d.index in owner:
            r, s = owner[d.index]
            stage = plan.replicas[r].stages[s]
            depth = len(plan.replicas[r].stages)
            colour, alpha = cmap(r % 10), 1.0 - 0.55 * s / max(depth - 1, 1)
            flags = " rc" if stage.recompute else ""
            text = f"R{r} S{s}\nL{stage.layers[0]}-{stage.layers[1] - 1}\nTP{stage.tp}{flags}"
        else:
            colour, alpha, text = "lightgrey", 1.0, "idle"
        ax.add_patch(Rectangle((x + 0.05, y + 0.08), 0.9, 0.84, facecolor=colour, alpha=alpha, edgecolor="black"))
        ax.text(x + 0.5, y + 0.5, f"#{d.index} {d.kind}\n{text}", ha="center", va="center", fontsize=7)
    ax.set_xlim(0, width)
    ax.set_ylim(0, len(cluster.nodes))
    ax.set_yticks([len(cluster.nodes) - 1 - i + 0.5 for i in range(len(cluster.nodes))])
    ax.set_yticklabels([f"{n.name}\n{n.count}x{n.kind}" for n in cluster.nodes], fontsize=8)
    ax.set_xticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    title = f"{plan.model or 'model'} on {plan.cluster or cluster.name}: {len(plan.replicas)} replica(s)"
    if plan.estimate is not None:
        title += f", predicted {plan.estimate.iteration_s * 1e3:.1f} ms/iteration"
    ax.set_title(title, fontsize=9)
    handles = [
        Patch(color=cmap(r % 10), label=f"R{r}: {rep.num_microbatches}x{rep.microbatch_size} seq")
        for r, rep in enumerate(plan.replicas[:10])
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def save_placement_png(plan: TrainPlan, cluster: ClusterSpec, path: str | Path) -> Path:
    """Draw `plan` on `cluster` into `path` (PNG) and return the path."""
    return _save(placement_figure(plan, cluster), path)


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
