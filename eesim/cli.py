"""The ``eesim`` command line.

    eesim compare    every exit rule x KV policy on one workload: table, plot, timeline (the main job)
    eesim simulate   one policy pair: per-request and per-iteration tables, summary, timeline
    eesim execute    one policy pair on the GPU executor (or its CPU fallback): measured, not simulated
    eesim validate   the GPU executor serving in real time against the simulator on the same workload
    eesim trace      describe an exit trace, or write a synthetic one
    eesim profile    measure the GPU executor's components into a parquet profile (resumable)
    eesim calibrate  certify exit thresholds on a recorded trace (Learn-then-Test); writes measure -> threshold JSON
    eesim sweep      a grid of simulations from a TOML/JSON config: resumable parquet, process pool or Ray
    eesim goodput    the highest request rate per policy that meets TTFT / inter-token latency objectives
    eesim train      train the project's early-exit model (GPU; see eesim/model/train.py)
    eesim record     record exit traces from a checkpoint (see eesim/model/record.py)

Bad input ends with one line on stderr naming what is wrong and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from eesim.errors import EesimError

DESCRIPTION = "Simulate and compare early-exit LLM serving policies."


def _common(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and hardware")
    g.add_argument("--model", default="llama2-7b", help="model preset (llama2-7b, llama3-8b, small)")
    g.add_argument("--hardware", default="h100", help="hardware preset (h100, h200)")
    g.add_argument("--memory-gb", type=float, default=0, help="override the hardware's memory (GB)")
    g.add_argument("--cost-model", default="auto",
                   help="what prices an iteration: auto (the bundled H100 profile of the model's shape when the "
                        "hardware is that GPU, else analytical), analytical, profile, or a profile parquet path")
    g = parser.add_argument_group("workload and exits")
    g.add_argument("--workload", default="default",
                   help="'default', a request-trace CSV (arrived_at,num_prefill_tokens,num_decode_tokens or "
                        "TIMESTAMP,ContextTokens,GeneratedTokens), or poisson:rate=R,duration=S / "
                        "gamma:rate=R,duration=S,cv=C")
    g.add_argument("--rate-scale", type=float, default=1.0, help="multiply the workload's arrival rate")
    g.add_argument("--max-requests", type=int, default=0, help="keep only the first N requests (0: all)")
    g.add_argument("--exit-trace", default="default",
                   help="'default' (the project's recorded trace, else synthetic), 'synthetic', or a parquet path")
    g.add_argument("--measure", default="max_prob",
                   help="confidence measure: max_prob, margin, entropy, cosine, classifier, oracle")
    g.add_argument("--threshold", default="0.9",
                   help="a number, decay:VALUE[,tau=4,horizon=256], or calibrated:PATH (from eesim calibrate)")
    g = parser.add_argument_group("serving")
    g.add_argument("--max-num-seqs", type=int, default=256, help="sequences per iteration")
    g.add_argument("--max-batched-tokens", type=int, default=2048, help="tokens per iteration (chunked prefill)")
    g.add_argument("--block-size", type=int, default=16, help="KV block size in tokens")
    g.add_argument("--num-blocks", type=int, default=0, help="KV blocks per replica (0: what memory holds)")
    g.add_argument("--replicas", type=int, default=1)
    g.add_argument("--router", default="round_robin", help="round_robin or least_outstanding")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--step-by-step", action="store_true",
                   help="simulate every iteration on its own (no fast-forward of decode runs); same results")
    g = parser.add_argument_group("output")
    g.add_argument("--out", default="eesim-out", help="output folder")
    g.add_argument("--timeline-iterations", type=int, default=2000,
                   help="iterations per replica written to the timeline")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def _base_config(args: argparse.Namespace):
    from eesim.defaults import load_exit_trace
    from eesim.hardware import hardware_preset
    from eesim.model_spec import model_preset
    from eesim.policies import measure
    from eesim.policies.thresholds import parse_threshold
    from eesim.scheduler import SchedulerConfig
    from eesim.config import SimConfig
    from eesim.workload import load_workload

    if args.rate_scale <= 0:
        raise EesimError(f"--rate-scale must be positive, got {args.rate_scale}")
    if args.max_requests < 0:
        raise EesimError(f"--max-requests must be non-negative, got {args.max_requests}")
    if args.replicas < 1:
        raise EesimError(f"--replicas must be at least 1, got {args.replicas}")
    model = model_preset(args.model)
    hardware = hardware_preset(args.hardware)
    if args.memory_gb:
        hardware = replace(hardware, memory_bytes=args.memory_gb * 1e9)
    conf_measure = measure(args.measure)
    threshold = parse_threshold(args.threshold, conf_measure)
    scheduler = SchedulerConfig(args.max_num_seqs, args.max_batched_tokens, args.block_size, args.num_blocks)
    trace, model, trace_source = load_exit_trace(args.exit_trace, model)
    hardware.kv_blocks(model, args.block_size)  # refuse a model that does not fit before simulating
    workload = load_workload(args.workload, seed=args.seed)
    if args.rate_scale != 1.0:
        workload = workload.scale_rate(args.rate_scale)
    if args.max_requests:
        workload = workload.head(args.max_requests)
    if workload.num_requests == 0:
        raise EesimError(f"workload {args.workload!r} has no requests")
    workload, clipped = workload.clip(model.max_context)
    config = SimConfig(model, hardware, trace, measure=conf_measure, threshold=threshold, scheduler=scheduler,
                       replicas=args.replicas, router=args.router, seed=args.seed,
                       keep_work=args.timeline_iterations, max_run_steps=1 if args.step_by_step else 256,
                       cost_model=args.cost_model)
    from eesim.cost_choice import describe_cost_model

    cost = describe_cost_model(config)  # refuse a bad --cost-model before simulating (the fit is kept for the runs)
    notes = [f"exit trace: {trace_source}; exits at layers {list(model.exit_layers)} of {model.num_layers}",
             f"cost model: {cost}" + (" (--cost-model auto: no bundled profile for this shape and hardware)"
                                      if args.cost_model == "auto" and cost == "analytical" else "")]
    if clipped:
        notes.append(f"{clipped} of {workload.num_requests} requests clipped to the model's {model.max_context}-token context")
    return config, workload, notes


def _describe(config, workload) -> str:
    return (f"{config.model.name} on {config.hardware.name}, {workload.num_requests} requests ({workload.source}), "
            f"{config.measure.name if hasattr(config.measure, 'name') else config.measure} >= {config.threshold}, "
            f"{config.replicas} replica(s)")


def _write_frames(out: Path, frames: dict) -> None:
    from eesim.atomic import write_atomic

    for name, frame in frames.items():
        if name.endswith(".csv"):
            write_atomic(out / name, frame.to_csv(index=False).encode())
        else:
            import io

            buffer = io.BytesIO()
            frame.to_parquet(buffer, index=False)
            write_atomic(out / name, buffer.getvalue())


def _print_table(table, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    rich_table = Table(title=title, title_justify="left")
    for col in table.columns:
        rich_table.add_column(col, justify="left" if col == "policy" else "right")
    for row in table.itertuples(index=False):
        cells = []
        for col, value in zip(table.columns, row):
            if isinstance(value, float):
                cells.append(f"{value:.3f}" if col in ("speedup", "ITL speedup", "quality", "forced") else f"{value:,.1f}")
            else:
                cells.append(str(value))
        rich_table.add_row(*cells)
    Console(width=200).print(rich_table)


def cmd_compare(args: argparse.Namespace) -> int:
    from eesim.comparison import compare, format_table, plot_comparison, policy_pairs
    from eesim.timeline import write_timeline

    config, workload, notes = _base_config(args)
    rules = args.rules.split(",") if args.rules else None
    kvs = args.kv_policies.split(",") if args.kv_policies else None
    started = time.perf_counter()
    summary, results = compare(workload, config, policy_pairs(rules, kvs), progress=not args.quiet)
    elapsed = time.perf_counter() - started
    out = Path(args.out)
    requests = [r.requests.assign(policy=label) for label, r in results.items()]
    iterations = [r.iterations.assign(policy=label) for label, r in results.items()]
    import pandas as pd

    _write_frames(out, {"summary.csv": summary, "summary.parquet": summary,
                        "requests.parquet": pd.concat(requests, ignore_index=True),
                        "iterations.parquet": pd.concat(iterations, ignore_index=True)})
    title = _describe(config, workload)
    plot_comparison(summary, out / "comparison.png", title)
    write_timeline(out / "timeline.json", results, args.timeline_iterations)
    costs = ", ".join(dict.fromkeys(summary["cost_model"].astype(str)))
    _print_table(format_table(summary), f"eesim compare — {title} (simulated; cost model {costs})")
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {out}/summary.csv, summary.parquet, requests.parquet, iterations.parquet, comparison.png, "
          f"timeline.json ({len(results)} runs in {elapsed:.1f} s)")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from eesim.comparison import format_table
    from eesim.simulator import simulate
    from eesim.timeline import write_timeline

    config, workload, notes = _base_config(args)
    config = replace(config, exit_rule=args.rule, kv_policy=args.kv_policy)
    result = simulate(workload, config)
    out = Path(args.out)
    import pandas as pd

    summary = pd.DataFrame([result.summary])
    summary.insert(0, "policy", f"{result.labels['exit_rule']} + {result.labels['kv_policy']}")
    summary["speedup"] = summary["itl_speedup"] = float("nan")
    _write_frames(out, {"summary.csv": summary, "requests.parquet": result.requests,
                        "iterations.parquet": result.iterations})
    write_timeline(out / "timeline.json", {summary["policy"].iloc[0]: result}, args.timeline_iterations)
    _print_table(format_table(summary).drop(columns=["speedup", "ITL speedup"]),
                 f"eesim simulate — {_describe(config, workload)}; cost model {result.labels['cost_model']}")
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {out}/summary.csv, requests.parquet, iterations.parquet, timeline.json")
    return 0


def _executor_run(args: argparse.Namespace):
    """Configuration, workload, notes and a GPU executor for `execute` and `validate`."""
    from eesim.gpu.serve import build_executor

    config, workload, notes = _base_config(args)
    config = replace(config, exit_rule=args.rule, kv_policy=args.kv_policy)
    if args.replicas != 1:
        raise EesimError(f"eesim {args.command} serves one replica (--replicas 1)")
    executor = build_executor(config, args.mode, args.num_blocks or 2048, args.checkpoint, args.device,
                              args.backend, cuda_graphs=not args.no_graphs)
    executor.graphed_owing = not args.no_graphed_owing
    return config, workload, notes, executor


def cmd_execute(args: argparse.Namespace) -> int:
    """Serve the workload on the GPU executor; optionally simulate the same and print the errors."""
    import pandas as pd

    from eesim.gpu.serve import serve

    config, workload, notes, executor = _executor_run(args)
    num_blocks = executor.num_blocks
    warmups = args.warmup if args.warmup >= 0 else int(executor.device.type == "cuda")
    simulated = None
    if args.with_simulation or warmups:  # the warm-up captures for batches up to twice the simulation's largest
        from eesim.simulator import simulate

        simulated = simulate(workload, replace(config, scheduler=replace(config.scheduler, num_blocks=num_blocks)))
    if warmups:  # graphs captured and kernels compiled before the measured pass, as validate does
        from eesim.validate import peak_batch, warm_up

        warm_up(workload, config, executor, warmups, peak_batch(simulated))
    started = time.perf_counter()
    result = serve(workload, config, executor)
    wall = time.perf_counter() - started
    captured = result.labels.get("graph_captures", 0)
    if captured:
        notes.append(f"{captured} CUDA graphs were captured during the measured pass (each stalls its iteration for "
                     f"about a model pass): its latencies include those stalls (--warmup to pass untimed first)")
    rows = {"executor (measured)": result}
    if args.with_simulation:
        rows[f"simulator ({simulated.labels['cost_model']})"] = simulated
    summary = pd.DataFrame([r.summary for r in rows.values()])
    summary.insert(0, "policy", [f"{label}: {result.labels['exit_rule']} + {result.labels['kv_policy']}"
                                 for label in rows])
    summary["speedup"] = summary["itl_speedup"] = float("nan")
    out = Path(args.out)
    _write_frames(out, {"summary.csv": summary, "requests.parquet": result.requests,
                        "iterations.parquet": result.iterations})
    from eesim.comparison import format_table

    _print_table(format_table(summary).drop(columns=["speedup", "ITL speedup"]),
                 f"eesim execute — {config.model.name}, {args.mode} mode, {result.labels['hardware']}, "
                 f"{workload.num_requests} requests ({workload.source})")
    if args.with_simulation:
        from eesim.validate import error_table

        errors = error_table(*(r.summary for r in rows.values()))
        print("simulator vs executor: " + ", ".join(f"{r.metric} {r.error:+.1%}" for r in errors.itertuples()))
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {out}/summary.csv, requests.parquet, iterations.parquet ({wall:.1f} s of wall time)")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Real-time serving on the GPU executor against the simulator on the same workload."""
    import pandas as pd

    from eesim.timeline import write_timeline
    from eesim.validate import validate

    config, workload, notes, executor = _executor_run(args)
    errors, measured, simulated = validate(workload, config, executor)
    out = Path(args.out)
    runs = {"executor (measured, real time)": measured, f"simulator ({simulated.labels['cost_model']})": simulated}
    _write_frames(out, {"errors.csv": errors,
                        "requests.parquet": pd.concat([r.requests.assign(run=k) for k, r in runs.items()]),
                        "iterations.parquet": pd.concat([r.iterations.assign(run=k) for k, r in runs.items()])})
    write_timeline(out / "timeline.json", runs, args.timeline_iterations)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"eesim validate — {config.model.name}, {args.mode} mode, {measured.labels['hardware']}, "
                        f"{measured.labels['exit_rule']} + {measured.labels['kv_policy']}, {workload.num_requests} "
                        f"requests ({workload.source})", title_justify="left")
    for col in ("metric", "measured", "simulated", "error", "95% band (requests)", "goal", "met"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for r in errors.itertuples():
        scale = 1.0 if r.metric.startswith(("throughput", "layers")) else 1e3
        unit = "" if scale == 1.0 else " ms"
        band = "" if pd.isna(r.error_lo) else f"{r.error_lo:+.1%} .. {r.error_hi:+.1%}"
        table.add_row(r.metric, f"{r.measured * scale:,.2f}{unit}", f"{r.simulated * scale:,.2f}{unit}",
                      f"{r.error:+.1%}", band, "" if pd.isna(r.goal) else f"±{r.goal:.0%}",
                      "" if pd.isna(r.goal) else ("yes" if r.met else "no"))
    Console(width=160).print(table)
    captured = measured.labels.get("graph_captures", 0)
    if captured:
        notes.append(f"{captured} CUDA graphs were captured during the timed pass (each stalls its iteration for "
                     f"about a model pass): the latencies measured include those stalls")
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {out}/errors.csv, requests.parquet, iterations.parquet, timeline.json (both runs)")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from eesim.exit_trace import read_exit_trace, synthesize_exit_trace
    from eesim.model_spec import model_preset

    if args.synthesize:
        model = model_preset(args.model)
        trace = synthesize_exit_trace(model.num_layers, model.all_exits, args.sequences, seed=args.seed,
                                      model=model.name)
        trace.write(args.synthesize)
        print(f"wrote {args.synthesize}: {trace.num_sequences} sequences, {trace.num_tokens} tokens")
    if args.path:
        trace = read_exit_trace(args.path)
        for key, value in trace.summary().items():
            print(f"{key}: {value}")
        print(trace.agreement_by_exit().to_string(index=False))
    if not (args.path or args.synthesize):
        raise EesimError("eesim trace: give a trace path to describe, or --synthesize OUT.parquet")
    return 0


def _delegate(module: str):
    def run(args: argparse.Namespace) -> int:
        import importlib

        return importlib.import_module(module).main(args.rest) or 0
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eesim", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command")
    compare = sub.add_parser("compare", help="compare every exit rule x KV policy (the main job)")
    _common(compare)
    compare.add_argument("--rules", default="", help="comma-separated exit rules (default: all registered)")
    compare.add_argument("--kv-policies", default="", help="comma-separated KV policies (default: all registered)")
    compare.set_defaults(func=cmd_compare)
    simulate = sub.add_parser("simulate", help="simulate one exit rule and KV policy")
    _common(simulate)
    simulate.add_argument("--rule", default="all_confident",
                          help="exit rule: a registered name, name:key=value (quorum:q=0.75), or module.Class")
    simulate.add_argument("--kv-policy", default="fill", help="KV policy: a registered name or module.POLICY")
    simulate.set_defaults(func=cmd_simulate)
    execute = sub.add_parser("execute", help="serve one exit rule and KV policy on the GPU executor (measured)")
    _common(execute)
    execute.add_argument("--rule", default="all_confident", help="exit rule (as for simulate)")
    execute.add_argument("--kv-policy", default="fill", help="KV policy (as for simulate)")
    execute.add_argument("--mode", default="replay", choices=("replay", "model"),
                         help="replay: random weights at --model's shape, exits from the trace; model: a "
                              "trained checkpoint's confidences decide")
    execute.add_argument("--checkpoint", default="", help="checkpoint folder for model mode (traces/small)")
    execute.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    execute.add_argument("--backend", default=None, help="kernels: auto, triton or torch")
    execute.add_argument("--no-graphs", action="store_true", help="eager decode, no CUDA graphs")
    execute.add_argument("--warmup", type=int, default=-1,
                         help="untimed passes before the measured one, after capturing the graphs the workload can "
                              "need (default: 1 on CUDA, 0 on CPU; 0: none, compilation and captures then land in "
                              "the measured pass)")
    execute.add_argument("--no-graphed-owing", action="store_true",
                         help="decode steps owing K/V on the general path from their first layer, as before "
                              "2026-11-23 (default: graphed up to where the K/V rides; price with a profile measured "
                              "the same way: eesim profile --no-graphed-owing)")
    execute.add_argument("--with-simulation", action="store_true",
                         help="also simulate the same workload and print the simulator's error per metric "
                              "(meaningful in replay mode on the GPU that --hardware describes)")
    execute.set_defaults(func=cmd_execute)
    validate = sub.add_parser("validate", help="the simulator against the GPU executor serving in real time")
    _common(validate)
    for action in execute._actions:  # the executor's own options, as for execute
        if action.dest in ("rule", "kv_policy", "mode", "checkpoint", "device", "backend", "no_graphs", "no_graphed_owing"):
            validate._add_action(action)
    validate.set_defaults(func=cmd_validate)
    trace = sub.add_parser("trace", help="describe an exit trace, or write a synthetic one")
    trace.add_argument("path", nargs="?", help="exit trace parquet to describe")
    trace.add_argument("--synthesize", metavar="OUT", help="write a synthetic trace for --model")
    trace.add_argument("--model", default="llama2-7b")
    trace.add_argument("--sequences", type=int, default=2000)
    trace.add_argument("--seed", type=int, default=0)
    trace.set_defaults(func=cmd_trace)
    from eesim import calibrate as calibrate_cli, sweep as sweep_cli

    calibrate_cli.add_cli(sub)
    sweep_cli.add_cli(sub)  # registers both `sweep` and `goodput`
    from eesim import profiler as profiler_cli

    profiler_cli.add_cli(sub)
    for name, module in (("train", "eesim.model.train"), ("record", "eesim.model.record")):
        p = sub.add_parser(name, help=f"see python -m {module} --help", add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_delegate(module))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv or ["compare"])
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except EesimError as err:
        print(f"eesim: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eesim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
