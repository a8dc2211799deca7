"""``interleaf``: simulate, compare and draw pipeline schedules from the command line (torch-free).

    interleaf simulate --schedule zb-v --pp 4 --microbatches 8 [--vp 2] [--costs F,I,W[,comm]]
                       [--memory-limit X] [--png out.png] [--trace out.json] [--csv out.csv] [--json]
    interleaf compare  --pp 4 --microbatches 8 [--vp 2] [--costs F,I,W[,comm]] [--memory-limit X] [--json]
    interleaf plan     --pp 4 --microbatches 8 [--costs F,I,W[,comm]] [--memory-limit X] [--activation-gib G]
    interleaf draw     --from-csv in.csv | --from-json in.json  [same outputs as simulate]

Costs are one rank's whole share of the model for one micro-batch (split evenly over its vp chunks); activation
memory is 1 per micro-batch per rank share, so 1F1B's rank 0 peaks at pp. simulate, draw and compare also print
the lower bound no order of the shape can beat (``schedule.simulate.lower_bound``). Bad arguments print one line
on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from typing import Any, NoReturn, Sequence

from .schedule.costs import CostModel
from .schedule.ir import PipelineShape, Schedule
from .schedule.simulate import DeadlockError, LowerBound, SimulationResult, lower_bound, simulate

__all__ = ["main"]

EXIT_BAD_ARGS = 2
EXIT_FAILED = 1
_BASELINE = "1f1b"


class _UsageError(ValueError):
    """A command-line mistake: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line instead of usage + message."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see '{self.prog} --help')")


@dataclass(frozen=True, slots=True)
class _Costs:
    """Per-rank costs from ``--costs F,I,W[,comm]``."""

    forward: float = 1.0
    backward_input: float = 1.0
    backward_weight: float = 1.0
    comm: float = 0.0

    def model(self, shape: PipelineShape) -> CostModel:
        return CostModel.uniform(
            shape,
            forward=self.forward,
            backward_input=self.backward_input,
            backward_weight=self.backward_weight,
            comm=self.comm,
        )

    def as_dict(self) -> dict[str, float]:
        return {"F": self.forward, "I": self.backward_input, "W": self.backward_weight, "comm": self.comm}

    def __str__(self) -> str:
        return f"F={self.forward:g} I={self.backward_input:g} W={self.backward_weight:g} comm={self.comm:g}"


def _parse_costs(text: str) -> _Costs:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (3, 4):
        raise argparse.ArgumentTypeError(
            f"expected F,I,W or F,I,W,comm (e.g. 1,1,1 or 1,1,0.5,0.1), got {text!r}"
        )
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"costs must be numbers, got {text!r}") from None
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"costs must be non-negative finite numbers, got {text!r}")
    if values[0] + values[1] + values[2] <= 0:
        raise argparse.ArgumentTypeError(f"F+I+W must be positive, got {text!r}")
    return _Costs(*values)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _memory(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _registry() -> Any:
    """The schedule registry (``build_schedule``, ``schedule_shape``, ``SCHEDULE_NAMES``)."""
    from .schedule import registry

    return registry


def _add_cost_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--costs",
        type=_parse_costs,
        default=_Costs(),
        metavar="F,I,W[,comm]",
        help="per-rank time of forward, input-grad backward, weight-grad backward for one micro-batch, and "
        "p2p time (default 1,1,1,0)",
    )
    p.add_argument(
        "--memory-limit",
        type=_memory,
        default=None,
        metavar="X",
        help="per-rank activation-memory cap, in micro-batches of activations (1F1B's rank 0 needs pp)",
    )


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--png", metavar="FILE", help="write a PNG timeline (needs matplotlib)")
    p.add_argument("--trace", metavar="FILE", help="write a Chrome-trace JSON (chrome://tracing, ui.perfetto.dev)")
    p.add_argument("--csv", metavar="FILE", help="write the schedule as CSV (torch pipelining / torchtitan format)")
    p.add_argument(
        "--lowered",
        action="store_true",
        help="with --csv: include SEND/RECV actions (torch's 'compute_comms' format)",
    )
    p.add_argument("--width", type=_positive_int, default=160, help="ASCII timeline width in columns (default 160)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _build_parser() -> _Parser:
    parser = _Parser(prog="interleaf", description="Simulate, compare and draw pipeline-parallel schedules.")
    sub = parser.add_subparsers(dest="command", metavar="{simulate,compare,plan,draw}", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("simulate", help="build one schedule, simulate it, print its numbers and timeline")
    p.add_argument("--schedule", required=True, metavar="NAME", help="schedule name (see 'interleaf compare')")
    p.add_argument("--pp", type=_positive_int, required=True, help="pipeline-parallel ranks")
    p.add_argument("--microbatches", "-m", type=_positive_int, required=True, help="micro-batches per step")
    p.add_argument("--vp", type=_positive_int, default=None, help="model chunks per rank (default: the schedule's)")
    _add_cost_args(p)
    _add_output_args(p)

    p = sub.add_parser("compare", help="simulate every schedule for one shape, side by side")
    p.add_argument("--pp", type=_positive_int, required=True, help="pipeline-parallel ranks")
    p.add_argument("--microbatches", "-m", type=_positive_int, required=True, help="micro-batches per step")
    p.add_argument(
        "--vp", type=_positive_int, default=None, help="model chunks per rank, for every schedule (default: each one's)"
    )
    _add_cost_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    p = sub.add_parser("plan", help="pick the fastest schedule that fits and print the DeepSpeed config block")
    p.add_argument("--pp", type=_positive_int, required=True, help="pipeline-parallel ranks")
    p.add_argument("--microbatches", "-m", type=_positive_int, required=True, help="micro-batches per step")
    _add_cost_args(p)
    p.add_argument(
        "--activation-gib",
        type=_memory,
        default=None,
        metavar="G",
        help="GiB of activations one micro-batch holds on a rank: with --memory-limit, sets memory_limit_gib "
        "when auto is recommended",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    p = sub.add_parser("draw", help="load a schedule from CSV or JSON, validate, simulate and draw it")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-csv", dest="from_csv", metavar="FILE", help="schedule CSV (one row per rank)")
    source.add_argument("--from-json", dest="from_json", metavar="FILE", help="schedule JSON written by ds_plugins.schedule.io.to_json")
    p.add_argument("--name", default=None, help="schedule name for titles (default: the file name)")
    p.add_argument("--placement", choices=("loop", "v"), default=None, help="stage placement (default: inferred)")
    _add_cost_args(p)
    _add_output_args(p)
    return parser


def _bounds(schedule: Schedule, costs: _Costs) -> tuple[LowerBound, LowerBound]:
    """What no order of the schedule's shape can beat: any order, and orders with a full backward B."""
    model = costs.model(schedule.shape)
    return lower_bound(schedule.shape, model), lower_bound(schedule.shape, model, split_backward=False)


def _schedule_summary(schedule: Schedule, result: SimulationResult, costs: _Costs, limit: float | None) -> dict:
    shape = schedule.shape
    bound, full = _bounds(schedule, costs)
    return {
        "schedule": schedule.name,
        "pp": shape.pp,
        "vp": shape.vp,
        "microbatches": shape.microbatches,
        "placement": shape.placement,
        "costs": costs.as_dict(),
        "memory_limit": limit,
        "makespan": result.makespan,
        "bubble_fraction": result.bubble_fraction,
        "peak_activation_memory": list(result.peak_activation_memory),
        "busy": list(result.busy),
        "idle": list(result.idle),
        "lower_bound": bound.as_dict(),
        "lower_bound_full_backward": full.as_dict(),
    }


def _check_and_simulate(schedule: Schedule, costs: CostModel, limit: float | None) -> SimulationResult:
    from .schedule.validate import validate

    validate(schedule, costs, limit)
    return simulate(schedule, costs)


def _write_outputs(args: argparse.Namespace, schedule: Schedule, result: SimulationResult) -> list[str]:
    from .schedule import draw, io
    from .schedule.lowering import add_communication

    written = []
    if args.csv:
        if args.lowered:
            from .schedule.validate import validate

            lowered = add_communication(schedule)
            validate(lowered)  # every SEND has its RECV, and the programs run over an in-order transport
            io.to_csv(lowered, args.csv)
        else:
            io.to_csv(schedule, args.csv)
        written.append(args.csv)
    if args.trace:
        draw.save_chrome_trace(result, args.trace, name=schedule.name)
        written.append(args.trace)
    if args.png:
        draw.save_png(result, args.png, name=schedule.name, shape=schedule.shape)
        written.append(args.png)
    return written


def _report(args: argparse.Namespace, schedule: Schedule, result: SimulationResult, out: Any) -> None:
    from .schedule.draw import ascii_timeline

    written = _write_outputs(args, schedule, result)
    summary = _schedule_summary(schedule, result, args.costs, args.memory_limit)
    if args.json:
        summary["outputs"] = written
        out.write(json.dumps(summary) + "\n")
        return
    shape = schedule.shape
    bound, full = _bounds(schedule, args.costs)
    lines = [
        f"{schedule.name}: pp={shape.pp} vp={shape.vp} microbatches={shape.microbatches} "
        f"placement={shape.placement}; per-rank costs {args.costs}",
        f"makespan {result.makespan:g}   bubble {result.bubble_fraction:.1%}   "
        f"max peak activation memory {max(result.peak_activation_memory):g}"
        + (f" (limit {args.memory_limit:g})" if args.memory_limit is not None else ""),
        f"lower bound: {bound}; makespan {_above(result.makespan, bound)} above it",
    ]
    if not schedule.splits_backward:
        lines.append(f"  with a full backward B, as this schedule: {full}; makespan "
                     f"{_above(result.makespan, full)} above it")
    lines += [
        "",
        f"{'rank':>4}  {'busy':>8}  {'idle':>8}  {'bubble':>7}  {'peak memory':>11}",
    ]
    for rank in range(shape.pp):
        idle = result.idle[rank]
        share = idle / result.makespan if result.makespan > 0 else 0.0
        lines.append(
            f"{rank:>4}  {result.busy[rank]:>8g}  {idle:>8g}  {share:>7.1%}  {result.peak_activation_memory[rank]:>11g}"
        )
    lines += ["", ascii_timeline(result, max_width=args.width)]
    lines += [f"wrote {path}" for path in written]
    out.write("\n".join(lines) + "\n")


def _cmd_simulate(args: argparse.Namespace, out: Any) -> int:
    registry = _registry()
    _check_name(args.schedule, registry)
    shape = registry.schedule_shape(args.schedule, pp=args.pp, microbatches=args.microbatches, vp=args.vp)
    costs = args.costs.model(shape)
    schedule = registry.build_schedule(
        args.schedule,
        pp=args.pp,
        microbatches=args.microbatches,
        vp=args.vp,
        costs=costs,
        memory_limit=args.memory_limit,
    )
    result = _check_and_simulate(schedule, args.costs.model(schedule.shape), args.memory_limit)
    _report(args, schedule, result, out)
    return 0


def _cmd_draw(args: argparse.Namespace, out: Any) -> int:
    import os

    from .schedule import io

    path = args.from_csv or args.from_json
    name = args.name or os.path.splitext(os.path.basename(path))[0]
    try:
        if args.from_csv:
            schedule = io.from_csv(path, name=name, placement=args.placement)
        else:
            schedule = io.from_json(path)
            if args.name:
                schedule = Schedule(args.name, schedule.shape, schedule.actions)
    except FileNotFoundError:
        raise _UsageError(f"no such file: {path}") from None
    result = _check_and_simulate(schedule, args.costs.model(schedule.shape), args.memory_limit)
    _report(args, schedule, result, out)
    return 0


def _check_name(name: str, registry: Any) -> None:
    if name not in registry.SCHEDULE_NAMES:
        raise _UsageError(f"unknown schedule {name!r}; choose one of {', '.join(registry.SCHEDULE_NAMES)}")


def _compare_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    registry = _registry()
    rows: list[dict[str, Any]] = []
    for name in registry.SCHEDULE_NAMES:
        row: dict[str, Any] = {"schedule": name}
        try:
            shape = registry.schedule_shape(name, pp=args.pp, microbatches=args.microbatches, vp=args.vp)
            costs = args.costs.model(shape)
            schedule = registry.build_schedule(
                name, pp=args.pp, microbatches=args.microbatches, vp=args.vp, costs=costs,
                memory_limit=args.memory_limit,
            )
            result = _check_and_simulate(schedule, args.costs.model(schedule.shape), args.memory_limit)
        except (ValueError, DeadlockError) as exc:
            row["error"] = _one_line(exc)
            rows.append(row)
            continue
        bound = lower_bound(schedule.shape, args.costs.model(schedule.shape))
        row.update(
            vp=schedule.shape.vp,
            placement=schedule.shape.placement,
            makespan=result.makespan,
            bubble_fraction=result.bubble_fraction,
            max_peak_activation_memory=max(result.peak_activation_memory),
            peak_activation_memory=list(result.peak_activation_memory),
            lower_bound=bound.as_dict(),
            ratio_to_lower_bound=result.makespan / bound.makespan if bound.makespan > 0 else None,
        )
        rows.append(row)
    baseline = next((r for r in rows if r["schedule"] == _BASELINE and "makespan" in r), None)
    if baseline is None:
        # 1F1B could not run with these arguments (a vp > 1 or a tight memory cap): the ratios still compare
        # against plain 1F1B (one chunk per rank, no cap) on the same costs.
        try:
            shape = registry.schedule_shape(_BASELINE, pp=args.pp, microbatches=args.microbatches)
            schedule = registry.build_schedule(
                _BASELINE, pp=args.pp, microbatches=args.microbatches, costs=args.costs.model(shape)
            )
            baseline = {"makespan": simulate(schedule, args.costs.model(schedule.shape)).makespan}
        except (ValueError, DeadlockError):
            baseline = None
    for row in rows:
        if "makespan" in row and baseline is not None and baseline["makespan"] > 0:
            row["ratio_to_1f1b"] = row["makespan"] / baseline["makespan"]
    return rows


def _cmd_compare(args: argparse.Namespace, out: Any) -> int:
    rows = _compare_rows(args)
    if args.json:
        out.write(
            json.dumps(
                {
                    "pp": args.pp,
                    "microbatches": args.microbatches,
                    "vp": args.vp,
                    "costs": args.costs.as_dict(),
                    "memory_limit": args.memory_limit,
                    "schedules": rows,
                }
            )
            + "\n"
        )
        return 0
    header = (f"{'schedule':<17} {'vp':>2}  {'makespan':>9}  {'bubble':>7}  {'max peak mem':>12}  {'vs bound':>8}  "
              f"{'vs 1f1b':>7}")
    lines = [
        f"pp={args.pp} microbatches={args.microbatches} per-rank costs {args.costs}"
        + (f" memory limit {args.memory_limit:g}" if args.memory_limit is not None else ""),
        header,
        "-" * len(header),
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['schedule']:<17} not available: {row['error']}")
            continue
        ratio = f"{row['ratio_to_1f1b']:.3f}" if "ratio_to_1f1b" in row else "-"
        to_bound = f"{row['ratio_to_lower_bound']:.3f}" if row["ratio_to_lower_bound"] is not None else "-"
        lines.append(
            f"{row['schedule']:<17} {row['vp']:>2}  {row['makespan']:>9.4g}  {row['bubble_fraction']:>7.1%}  "
            f"{row['max_peak_activation_memory']:>12.4g}  {to_bound:>8}  {ratio:>7}"
        )
    shapes = dict.fromkeys((r["placement"], r["vp"]) for r in rows if "makespan" in r)  # in row order, once each
    for placement, vp in shapes:
        shape = PipelineShape(pp=args.pp, microbatches=args.microbatches, vp=vp, placement=placement)
        lines.append(f"lower bound: {lower_bound(shape, args.costs.model(shape))}")
    out.write("\n".join(lines) + "\n")
    return 0


def _above(makespan: float, bound: LowerBound) -> str:
    return f"{makespan / bound.makespan - 1:.1%}" if bound.makespan > 0 else "-"


def _cmd_plan(args: argparse.Namespace, out: Any) -> int:
    args.vp = None  # every schedule at its own vp; auto searches both placements
    rows = _compare_rows(args)
    names = [r["schedule"] for r in rows]
    built = [r for r in rows if "makespan" in r]
    if not built:
        raise _UsageError(
            "no schedule fits these arguments: " + "; ".join(f"{r['schedule']}: {r['error']}" for r in rows)
        )

    def rank_key(row: dict[str, Any]) -> tuple:
        # Shortest first; on a tie the lower memory peak, then a handcrafted schedule over auto's search.
        return (round(row["makespan"], 9), row["max_peak_activation_memory"], row["schedule"] == "auto",
                names.index(row["schedule"]))

    best = min(built, key=rank_key)
    pipeline: dict[str, Any] = {"schedule": best["schedule"], "virtual_stages": best["vp"]}
    if best["schedule"] == "auto" and args.memory_limit is not None and args.activation_gib is not None:
        pipeline["memory_limit_gib"] = args.memory_limit * args.activation_gib
    block = {"interleaf": {"pipeline": pipeline}}
    if args.json:
        out.write(json.dumps({"recommended": best, "config": block, "schedules": rows}) + "\n")
        return 0
    lines = [
        f"pp={args.pp} microbatches={args.microbatches} per-rank costs {args.costs}"
        + (f" memory limit {args.memory_limit:g}" if args.memory_limit is not None else ""),
        "",
        "fastest first:",
    ]
    for row in sorted(built, key=rank_key):
        ratio = f", {row['ratio_to_1f1b']:.3f} x 1f1b" if "ratio_to_1f1b" in row else ""
        lines.append(
            f"  {row['schedule']:<17} makespan {row['makespan']:<8.4g} bubble {row['bubble_fraction']:>6.1%}  "
            f"peak memory {row['max_peak_activation_memory']:g}{ratio}"
        )
    for row in rows:
        if "error" in row:
            lines.append(f"  {row['schedule']:<17} not available: {row['error']}")
    if best["schedule"] == "auto":
        lines.append("\nauto wins: at run time it re-plans from the F/I/W times it measures (auto_warmup_iterations).")
    lines += ["", "DeepSpeed config (add to your ds_config JSON):", json.dumps(block, indent=2)]
    out.write("\n".join(lines) + "\n")
    return 0


def _one_line(exc: BaseException) -> str:
    """The first line of an error: a ScheduleError's problem without its grid."""
    problem = getattr(exc, "problem", None)
    text = problem if isinstance(problem, str) else str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


_COMMANDS = {"simulate": _cmd_simulate, "compare": _cmd_compare, "plan": _cmd_plan, "draw": _cmd_draw}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``interleaf`` console script; returns the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        return _COMMANDS[args.command](args, sys.stdout)
    except (ValueError, DeadlockError) as exc:  # _UsageError, ScheduleError, bad shapes or costs
        sys.stderr.write(f"interleaf: error: {_one_line(exc)}\n")
        grid = getattr(exc, "grid", None)
        if isinstance(grid, str) and grid:  # an invalid schedule: show where, under the one-line reason
            sys.stderr.write(grid + "\n")
        return EXIT_BAD_ARGS
    except ImportError as exc:
        sys.stderr.write(f"interleaf: error: {_one_line(exc)}\n")
        return EXIT_FAILED
    except OSError as exc:
        sys.stderr.write(f"interleaf: error: {exc.strerror or exc}: {exc.filename or ''}\n".rstrip() + "\n")
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
