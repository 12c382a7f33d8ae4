"""`jaxhet plan train|serve|cascade`: plan training (table, JSON, PNG of the placement), serving (table, JSON), or a
model cascade (thresholds, deployment and simulated latency; JSON, PNG of the latency/quality front)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

import planners
from jaxhet.cli.errors import check_output, user_errors
from planners.picture import save_cascade_png, save_placement_png, save_serve_png

app = typer.Typer(no_args_is_help=True)


@app.callback()
def plan() -> None:
    """Plan training, serving or a model cascade on a heterogeneous cluster."""


ClusterOption = Annotated[
    str, typer.Option(help="Cluster YAML/JSON file, or a built-in name (emulated8, h100x4_l4x4).")
]
DeviceProfileOption = Annotated[
    list[Path] | None,
    typer.Option(help="Measured device profile from `jaxhet profile` for one of the cluster's GPU kinds; repeat."),
]
TimeLimitOption = Annotated[
    float, typer.Option(min=0.1, help="Time limit of the whole planning call in seconds (wall clock).")
]
ModelOption = Annotated[
    str, typer.Option(help=f"Model preset ({', '.join(sorted(planners.PRESETS))}) or a HF config.json path.")
]


def _cluster(cluster: str, device_profiles: list[Path] | None) -> planners.ClusterSpec:
    """The cluster, with measured device figures in place of the catalog's where profiles are given."""
    spec = planners.ClusterSpec.load(cluster)
    for path in device_profiles or []:
        spec = planners.MeasuredProfile.load(path).apply(spec)
    return spec


def _train_table(plan: planners.TrainPlan, cluster: planners.ClusterSpec) -> Table:
    compressed = any(s.compress != "none" for r in plan.replicas for s in r.stages)
    zero = any(s.zero for r in plan.replicas for s in r.stages)
    edge = "edge: codec of the activations sent to the next stage (and their gradients back); " if compressed else ""
    zeros = "zero: ZeRO stage (1: moments split, 3: parameters, gradients and moments too); " if zero else ""
    table = Table(
        title=f"{plan.model} on {plan.cluster} ({cluster.kinds_summary()})",
        caption="CP: context-parallel ranks (each sequence split between them), TP devices each; rc: recompute "
        f"activations; {zeros}{edge}mb x size: micro-batches x sequences each; mem: peak / usable",
    )
    columns = ("replica", "stage", "devices", "GPU", "CP", "TP", "layers", "rc", "zero", "edge", "mb x size", "mem GB")
    shown = {"zero": zero, "edge": compressed}
    for column in (c for c in columns if shown.get(c, True)):
        table.add_column(column, justify="left" if column in ("devices", "GPU") else "right")
    assert plan.estimate is not None
    for r, (replica, mems) in enumerate(zip(plan.replicas, plan.estimate.peak_memory_gb, strict=True)):
        for s, (stage, gb) in enumerate(zip(replica.stages, mems, strict=True)):
            cap = cluster.profile(stage.kind).capacity_bytes / 1e9
            cells = [
                str(r) if s == 0 else "",
                str(s),
                ",".join(map(str, stage.devices)),
                stage.kind,
                str(replica.cp),
                str(stage.tp),
                f"{stage.layers[0]}-{stage.layers[1] - 1}",
                "yes" if stage.recompute else "no",
                *([str(stage.zero)] if zero else []),
                *([stage.compress if s + 1 < len(replica.stages) else ""] if compressed else []),
                f"{replica.num_microbatches} x {replica.microbatch_size}" if s == 0 else "",
                f"{gb:.1f}/{cap:.0f}",
            ]
            table.add_row(*cells)
    return table


def train(
    cluster: ClusterOption = "emulated8",
    device_profile: DeviceProfileOption = None,
    model: ModelOption = "tiny",
    global_batch: Annotated[int, typer.Option(min=1, help="Sequences per iteration.")] = 16,
    seq_len: Annotated[int, typer.Option(min=1, help="Tokens per sequence.")] = 256,
    no_recompute: Annotated[bool, typer.Option("--no-recompute", help="Forbid activation recomputation.")] = False,
    no_zero: Annotated[bool, typer.Option("--no-zero", help="Forbid ZeRO (every stage keeps zero 0).")] = False,
    use_all_devices: Annotated[bool, typer.Option("--use-all-devices", help="Leave no device idle.")] = False,
    compress: Annotated[
        str,
        typer.Option(
            help=f"Lossiest stage-edge codec the planner may use where it pays ({', '.join(planners.COMPRESSIONS)})."
        ),
    ] = "none",
    time_limit: TimeLimitOption = 10.0,
    workers: Annotated[int, typer.Option(min=1, help="CP-SAT worker threads.")] = 2,
    current: Annotated[
        Path | None,
        typer.Option(help="The plan running now (JSON, on this cluster's numbering): the new plan is never slower."),
    ] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write the plan as JSON here.")] = None,
    png: Annotated[Path | None, typer.Option(help="Write a picture of the placement here.")] = None,
) -> None:
    """Find the fastest training plan (replicas, pipelines, CP and TP degrees, layer split, batch shares,
    recomputation and ZeRO stage per stage); with --current, starting from the plan that runs now (e.g. after
    nodes were added to the cluster)."""
    console = Console()
    with user_errors():
        check_output(output, "--output")
        check_output(png, "--png")
        spec = _cluster(cluster, device_profile)
        model_spec = planners.ModelSpec.resolve(model)
        zero_stages = (0,) if no_zero else planners.ZERO_STAGES
        workload = planners.TrainWorkload(
            global_batch, seq_len, recompute=not no_recompute, compress=compress, zero_stages=zero_stages
        )
        running = None
        if current is not None:
            if not current.is_file():
                raise FileNotFoundError(f"--current plan not found: {current}")
            running = planners.TrainPlan.from_json(current.read_text())
        plan, info = planners.plan_training_with_info(
            spec,
            model_spec,
            workload,
            time_limit_s=time_limit,
            num_workers=workers,
            use_all_devices=use_all_devices,
            current=running,
        )
    assert plan.estimate is not None
    console.print(_train_table(plan, spec))
    tokens_s = workload.tokens / plan.estimate.iteration_s
    proof = "optimal under the cost model" if info.status == "OPTIMAL" else "best found within the time limit"
    console.print(
        f"predicted iteration {plan.estimate.iteration_s * 1e3:.2f} ms ({tokens_s:,.0f} tokens/s), "
        f"gradient all-reduce {plan.estimate.grad_sync_s * 1e3:.2f} ms; {proof}",
        highlight=False,
    )
    console.print(
        f"solver: {info.status}, lower bound {info.lower_bound_s * 1e3:.2f} ms, gap {100 * info.gap:.1f}%, "
        f"{info.solve_s:.1f} s of {info.time_limit_s:.1f} s over {info.solves} sub-problems; {info.cells} cell(s), "
        f"micro-batch size {info.microbatch_size}",
        highlight=False,
    )
    console.print(f"spread: {planners.plan_spread(plan, spec).describe(spec)}", highlight=False)
    _write_outputs(console, plan.to_json(), output, png, lambda path: save_placement_png(plan, spec, path))


def _serve_table(plan: planners.ServePlan) -> Table:
    table = Table(title=f"serving on {plan.cluster}: {plan.objective.replace('_', ' ')}")
    for column in ("replica", "model", "role", "GPU", "TP", "devices", "batch", "capacity/s", "routed/s"):
        table.add_column(column, justify="left" if column in ("model", "role", "GPU", "devices") else "right")
    for i, r in enumerate(plan.replicas):
        table.add_row(
            str(i),
            r.model,
            r.role,
            r.kind,
            str(r.tp),
            ",".join(map(str, r.devices)),
            str(r.max_batch),
            f"{r.capacity_rps:.2f}",
            f"{r.routed_rps:.2f}",
        )
    return table


def _routing_table(plan: planners.ServePlan) -> Table:
    """Per request class: the replicas its traffic goes to (prefill or colocated replicas first, then decode)."""
    table = Table(title="routing by request class", caption="latency: time in the replica at its batch, no queueing")
    for column in ("class", "req/s", "in+out tokens", "replica", "role", "GPU", "TP", "routed/s", "latency s"):
        table.add_column(column, justify="left" if column in ("class", "role", "GPU") else "right")
    for klass in plan.classes:
        first = True
        for i, r in enumerate(plan.replicas):
            for share in (s for s in r.classes if s.name == klass.name and s.routed_rps > 1e-9):
                table.add_row(
                    klass.name if first else "",
                    f"{klass.rate:.2f}" if first else "",
                    f"{klass.input_len}+{klass.output_len}" if first else "",
                    str(i),
                    r.role,
                    r.kind,
                    str(r.tp),
                    f"{share.routed_rps:.2f}",
                    f"{share.latency_s:.2f}",
                )
                first = False
    return table


def serve(
    cluster: ClusterOption = "h100x4_l4x4",
    device_profile: DeviceProfileOption = None,
    model: Annotated[
        list[str] | None, typer.Option(help="Model preset or HF config.json path; repeat for several.")
    ] = None,
    rate: Annotated[float, typer.Option(min=1e-9, help="Arrival rate per model, requests/s.")] = 2.0,
    input_len: Annotated[int, typer.Option(min=1, help="Prompt tokens per request.")] = 512,
    output_len: Annotated[int, typer.Option(min=1, help="Generated tokens per request.")] = 128,
    ttft: Annotated[float, typer.Option(min=1e-9, help="Time-to-first-token SLO, seconds.")] = 1.0,
    tpot: Annotated[float, typer.Option(min=1e-9, help="Time-per-output-token SLO, seconds.")] = 0.1,
    budget: Annotated[float | None, typer.Option(help="Price cap per hour for the GPUs used.")] = None,
    trace: Annotated[
        Path | None, typer.Option(help="CSV trace (arrival_s,input_len,output_len): sets rate and lengths.")
    ] = None,
    bucket_edge: Annotated[
        list[int] | None,
        typer.Option(help="With --trace: a prompt length splitting the trace into request classes; repeat."),
    ] = None,
    workload: Annotated[
        Path | None,
        typer.Option(help="Workload YAML/JSON: request classes (rate, lengths, SLOs) and a budget; sets all above."),
    ] = None,
    objective: Annotated[str, typer.Option(help=f"One of {', '.join(planners.SERVE_OBJECTIVES)}.")] = "max_throughput",
    colocate: Annotated[bool, typer.Option("--colocate", help="No prefill/decode disaggregation.")] = False,
    current: Annotated[
        Path | None, typer.Option(help="Running deployment (serve plan JSON) to keep as much of as possible.")
    ] = None,
    failed: Annotated[
        list[int] | None, typer.Option(help="A device of the cluster that failed (with --current); repeat.")
    ] = None,
    time_limit: TimeLimitOption = 20.0,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write the plan as JSON here.")] = None,
    png: Annotated[Path | None, typer.Option(help="Write a picture of the replicas on the cluster here.")] = None,
) -> None:
    """Choose GPU composition, replicas and routing for serving under SLOs and a budget; with --current, re-plan
    after a failure or a workload shift, keeping the running replicas that the new optimum allows."""
    console = Console()
    with user_errors():
        check_output(output, "--output")
        check_output(png, "--png")
        spec = _cluster(cluster, device_profile)
        models = [planners.ModelSpec.resolve(m) for m in (model or ["llama-2-7b"])]
        traffic = _serve_workload(rate, input_len, output_len, ttft, tpot, budget, trace, bucket_edge or [], workload)
        options = {"objective": objective, "disaggregate": not colocate, "time_limit_s": time_limit}
        if current is not None:
            if not current.is_file():
                raise FileNotFoundError(f"current plan not found: {current}")
            running = planners.ServePlan.from_json(current.read_text())
            plan = planners.replan_serving(spec, failed or [], models, traffic, running, **options)
        elif failed:
            raise planners.SpecError("--failed needs --current, the deployment the devices failed under")
        else:
            plan = planners.plan_serving(spec, models, traffic, **options)
    console.print(_serve_table(plan))
    if len(plan.classes) > 1:
        console.print(_routing_table(plan))
    if current is not None:
        console.print(
            f"kept {plan.kept} running replica(s) in place; a running `jaxhet serve` applies the plan written with "
            "-o live, from POST /admin/plan or, when it is its --plan file, on SIGHUP",
            highlight=False,
        )
    served = ", ".join(f"{name}: {r * plan.throughput_scale:.2f} req/s" for name, r in plan.rates.items())
    console.print(f"serves {served} at {plan.price_per_hour:.2f}/h (cost model, no queueing)", highlight=False)
    console.print(f"solver: {plan.status}, objective bound {plan.objective_bound:.4g}", highlight=False)
    _write_outputs(console, plan.to_json(), output, png, lambda path: save_serve_png(plan, spec, path))


def _serve_workload(
    rate: float,
    input_len: int,
    output_len: int,
    ttft: float,
    tpot: float,
    budget: float | None,
    trace: Path | None,
    bucket_edges: list[int],
    workload: Path | None,
) -> planners.ServeWorkload:
    """The traffic `jaxhet plan serve` plans for: a workload file, a trace (bucketed by prompt length), or flags."""
    if workload is not None:
        if trace is not None:
            raise planners.SpecError("--workload and --trace cannot both be given")
        return planners.ServeWorkload.load(workload)
    if trace is not None:
        return planners.ServeWorkload.from_trace(
            trace, bucket_edges, budget_per_hour=budget, ttft_slo_s=ttft, tpot_slo_s=tpot
        )
    if bucket_edges:
        raise planners.SpecError("--bucket-edge needs --trace, the requests to split into classes")
    return planners.ServeWorkload(rate, input_len, output_len, ttft, tpot, budget)


def _front_table(plan: planners.CascadePlan) -> Table:
    table = Table(
        title=f"cascade {' -> '.join(plan.models)}: latency/quality front",
        caption="escalate while confidence < threshold; reach: share of requests each model sees",
    )
    for column in ("", "thresholds", "reach", "quality", "latency s", "price/h"):
        table.add_column(column, justify="left" if column in ("", "thresholds", "reach") else "right")
    for p in plan.front:
        table.add_row(
            "*" if p.thresholds == plan.thresholds else "",
            ", ".join(f"{t:.3f}" for t in p.thresholds),
            " / ".join(f"{r:.0%}" for r in p.reach),
            f"{p.quality:.3f}",
            f"{p.latency_s:.2f}",
            f"{p.price_per_hour:.2f}",
        )
    return table


def cascade(
    cluster: ClusterOption = "h100x4_l4x4",
    device_profile: DeviceProfileOption = None,
    model: Annotated[
        list[str] | None,
        typer.Option(help="Cascade models, smallest first (preset or HF config.json path); repeat for each."),
    ] = None,
    profile: Annotated[
        Path | None,
        typer.Option(help="Cascade profile JSON (per-request confidences and correctness); default: synthetic."),
    ] = None,
    rate: Annotated[float, typer.Option(min=1e-9, help="Arrival rate, requests/s.")] = 4.0,
    input_len: Annotated[int, typer.Option(min=1, help="Prompt tokens per request.")] = 512,
    output_len: Annotated[int, typer.Option(min=1, help="Generated tokens per request.")] = 128,
    ttft: Annotated[float, typer.Option(min=1e-9, help="Time-to-first-token SLO per model, seconds.")] = 2.0,
    tpot: Annotated[float, typer.Option(min=1e-9, help="Time-per-output-token SLO, seconds.")] = 0.1,
    budget: Annotated[float | None, typer.Option(help="Price cap per hour for the GPUs used.")] = None,
    weight: Annotated[float, typer.Option(min=0.0, max=1.0, help="Latency weight (1) against quality (0).")] = 0.5,
    min_quality: Annotated[float | None, typer.Option(help="Least acceptable quality (fraction right).")] = None,
    grid: Annotated[int, typer.Option(min=2, help="Thresholds tried per non-final model.")] = 11,
    utilization: Annotated[float, typer.Option(help="Load cap per replica, as a fraction of its capacity.")] = 0.8,
    colocate: Annotated[bool, typer.Option("--colocate", help="No prefill/decode disaggregation.")] = False,
    simulate: Annotated[int, typer.Option(min=0, help="Requests to simulate on the chosen plan (0: none).")] = 1000,
    current: Annotated[
        Path | None,
        typer.Option(help="Running cascade plan JSON: re-plan keeping as many of its replicas as possible."),
    ] = None,
    time_limit: Annotated[
        float, typer.Option(min=0.1, help="Time limit of each serving MILP the search solves, seconds.")
    ] = 10.0,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write the plan as JSON here.")] = None,
    png: Annotated[Path | None, typer.Option(help="Write the latency/quality front as a PNG here.")] = None,
) -> None:
    """Choose routing thresholds and a deployment for a cascade of models (small to large)."""
    console = Console()
    with user_errors():
        check_output(output, "--output")
        check_output(png, "--png")
        spec = _cluster(cluster, device_profile)
        models = [planners.ModelSpec.resolve(m) for m in (model or ["llama-3-8b", "llama-3-70b"])]
        quality = (
            planners.CascadeProfile.load(profile)
            if profile is not None
            else planners.CascadeProfile.synthetic(len(models))
        )
        workload = planners.ServeWorkload(
            arrival_rate=rate,
            input_len=input_len,
            output_len=output_len,
            ttft_slo_s=ttft,
            tpot_slo_s=tpot,
            budget_per_hour=budget,
        )
        plan = planners.plan_cascade(
            spec,
            models,
            workload,
            quality,
            weight=weight,
            min_quality=min_quality,
            grid=grid,
            utilization=utilization,
            disaggregate=not colocate,
            current=planners.CascadePlan.load(current) if current is not None else None,
            time_limit_s=time_limit,
        )
    console.print(_front_table(plan))
    console.print(_serve_table(plan.deployment))
    if current is not None:
        console.print(f"kept {plan.deployment.kept} running replica(s) in place", highlight=False)
    console.print(
        f"chosen: quality {plan.quality:.3f}, predicted mean latency {plan.latency_s:.2f} s "
        f"(service times at the planned batch, queueing aside), {plan.deployment.price_per_hour:.2f}/h",
        highlight=False,
    )
    for single in plan.single:
        console.print(
            f"{single.model} alone: quality {single.quality:.3f}, latency {single.latency_s:.2f} s, "
            f"{single.price_per_hour:.2f}/h",
            highlight=False,
        )
    if simulate:
        trace = planners.poisson_trace(rate, simulate, input_len, output_len)
        stats = planners.simulate_cascade(plan, spec, models, workload, quality, trace)
        console.print(
            f"simulated {simulate} requests: mean latency {stats.mean_latency_s:.2f} s, "
            f"p90 {stats.percentile(90):.2f} s, quality {stats.quality:.3f}",
            highlight=False,
        )
    _write_outputs(
        console, plan.to_json(), output, png, lambda path: save_cascade_png(plan, path), "latency/quality front"
    )


def _write_outputs(
    console: Console,
    plan_json: str,
    output: Path | None,
    png: Path | None,
    draw: Callable[[Path], object],
    picture: str = "placement picture",
) -> None:
    """Write the plan JSON and the picture asked for; a write the disk refuses is one `user_errors` line (their
    folders were checked before the solve)."""
    with user_errors():
        if output is not None:
            output.write_text(plan_json + "\n")
            console.print(f"plan written to {output}", highlight=False)
        if png is not None:
            draw(png)
            console.print(f"{picture} written to {png}", highlight=False)


app.command("train")(train)
app.command("serve")(serve)
app.command("cascade")(cascade)
