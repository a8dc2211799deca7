"""Where a profiled step's GPU time goes: kernels, idle gaps between them, and what the host was doing when a
gap ended (torch.profiler chrome traces, CUDA).

A pipeline rank's "busy" time (CUDA events around each action) can exceed the summed time of the kernels it
launched: inside an action the GPU waits for the host to enqueue the next kernel. ``device_gaps`` splits one
profiled step into kernel time and gaps, and attributes each gap whose closing kernel was launched *during* the
gap (the GPU was waiting for the host) to the outermost CPU op running at that launch::

    with torch.profiler.profile(activities=[CPU, CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(format_gaps(device_gaps(prof)))

It reads the profiler's chrome trace (kernels, CUDA runtime calls and CPU ops joined by their correlation ids),
the format ``prof.export_chrome_trace`` writes. When the executor ran with ``annotate_actions`` (ranges named
``"interleaf <action>"``, e.g. ``"interleaf 0F3"``), every kernel whose launch lies inside such a range is
counted to that action: kernel time, span and gaps per (kind, stage) (``actions`` in the summary).
:func:`profile_step` profiles one step on every rank of a benchmark and prints the summaries. Used by
``benchmarks/pipeline.py --profile``, ``benchmarks/megatron.py --profile`` and
``tests/runtime/probe_executor_gpu.py --actions``.
"""
from __future__ import annotations

import bisect
import json
import os
import tempfile
import time
from collections import defaultdict
from typing import Any, Callable, Iterable

from ds_plugins.runtime.executor import ACTION_ANNOTATION_PREFIX
from ds_plugins.schedule.ir import Action

__all__ = ["device_gaps", "format_gaps", "gaps_from_file", "gaps_from_trace", "host_dispatch_us", "profile_step"]

GAP_US = 20.0
"""Idle time between two kernels below this is launch latency, not a gap."""
_DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def host_dispatch_us(device: Any, ops: int = 20000) -> float:
    """Host microseconds to issue one tiny CUDA op from Python (``x.add_(1)`` on 8 elements, the GPU far ahead of
    nothing): how fast this host enqueues work. A step whose kernels are short against it is host-bound; hosts of
    the same GPU kind differ by tens of percent, so benchmarks report it next to the card."""
    import torch

    x = torch.zeros(8, device=device)
    for _ in range(1000):
        x.add_(1)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(ops):
        x.add_(1)
    issued = time.perf_counter() - t0
    torch.cuda.synchronize(device)
    return 1e6 * issued / ops


def add_profile_arguments(parser: Any, rows: str) -> None:
    """``--profile`` and ``--trace-dir`` of the pipeline benchmarks (``rows``: which of the script's rows are
    profiled); check them with :func:`check_profile_arguments` after parsing."""
    parser.add_argument("--profile", action="store_true",
                        help=f"{rows}: profile one more step per rank after the timed ones (torch.profiler, not "
                             "timed) and print kernel time vs device busy vs gaps, the host ops behind the gaps, "
                             "host issue time, step span and, for interleaf rows, kernel time per action kind and "
                             "stage (benchmarks/device_gaps.py; kernel figures need CUDA); the JSON gets every "
                             "rank's summary")
    parser.add_argument("--trace-dir", default=None,
                        help="with --profile: also write each rank's chrome trace of the profiled step here "
                             "(<variant>_m<m>_rank<r>.json.gz, for chrome://tracing or Perfetto)")


def check_profile_arguments(parser: Any, args: Any) -> None:
    if args.trace_dir and not args.profile:
        parser.error("--trace-dir needs --profile")


def device_gaps(prof: Any, *, top: int = 8, trace_path: str | None = None) -> dict[str, Any]:
    """:func:`gaps_from_trace` of a finished ``torch.profiler.profile``. ``trace_path``: keep the exported chrome
    trace there (``.json`` or ``.json.gz``); else it goes to a temporary file."""
    if trace_path:
        os.makedirs(os.path.dirname(trace_path) or ".", exist_ok=True)
        prof.export_chrome_trace(trace_path)  # a profile exports its trace once: summarise the written file
        return gaps_from_file(trace_path, top=top)
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        return gaps_from_file(path, top=top)
    finally:
        os.unlink(path)


def gaps_from_file(path: str, *, top: int = 8) -> dict[str, Any]:
    """:func:`gaps_from_trace` of a chrome trace file (``.json`` or ``.json.gz``, as ``export_chrome_trace``
    writes them)."""
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return gaps_from_trace(json.load(f), top=top)


def gaps_from_trace(trace: dict[str, Any], *, top: int = 8) -> dict[str, Any]:
    """Summary of one profiled step: ``kernels`` (count), ``kernel_ms`` (summed device time of kernels, copies and
    memsets; NCCL kernels not included: ``nccl_ms`` is theirs), ``busy_ms`` (union
    of kernel intervals), ``extent_ms`` (first kernel start to last kernel end), ``gap_ms`` (extent - busy),
    ``host_bound_gap_ms`` (gaps whose closing kernel was launched during the gap), ``by_kernel`` (name ->
    [launches, ms]) and ``host_ops`` (the ``top`` outermost CPU ops running at those late launches, with the gap
    time they account for). All zeros when the trace holds no kernel (CPU runs).

    With the executor's action ranges in the trace, ``actions`` maps ``"<stage><kind>"`` (e.g. ``"3F"``; sorted by
    stage, then F, B, I, W) to the (kind, stage)'s totals over the step: ``count`` (actions), ``host_ms`` (time
    the host spent inside the ranges: issuing the actions), ``kernel_ms`` / ``nccl_ms`` (device time of the
    kernels launched inside them), ``span_ms`` (per action, first kernel start to last kernel end, summed),
    ``gap_before_ms`` (device idle right before each action's first kernel: waiting for its input or for the
    host to reach it) and ``gap_inside_ms`` (device idle between the action's own kernels: mostly launch-bound).
    A kernel belongs to the range its launch lies in, whichever host thread launched it (the autograd engine runs
    CUDA backward on its own thread while the range's thread waits). ``outside_actions_kernel_ms``: kernel time
    launched outside every range (p2p, gradient reduction, the step's tail); ``None`` without ranges."""
    events = trace.get("traceEvents", [])
    # device work: kernels, and the copies/memsets the GPU runs between them; NCCL kernels apart (a receive
    # kernel runs from its launch until the peer's data arrives: waiting, not computing)
    device = [e for e in events if e.get("cat") in _DEVICE_CATS and e.get("dur", 0) > 0]
    nccl_ms = sum(e["dur"] for e in device if _is_nccl(e)) / 1e3
    kernels = sorted((e for e in device if not _is_nccl(e)), key=lambda e: e["ts"])
    by_kernel: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for k in kernels:
        by_kernel[k["name"]][0] += 1
        by_kernel[k["name"]][1] += k["dur"] / 1e3
    summary: dict[str, Any] = {"kernels": sum(1 for k in kernels if k["cat"] == "kernel"),
                               "kernel_ms": sum(v[1] for v in by_kernel.values()), "nccl_ms": nccl_ms,
                               "busy_ms": 0.0, "extent_ms": 0.0, "gap_ms": 0.0, "host_bound_gap_ms": 0.0,
                               "by_kernel": {k: list(v) for k, v in by_kernel.items()}, "host_ops": [],
                               "actions": None, "outside_actions_kernel_ms": None}
    launch_at = {e["args"]["correlation"]: e["ts"] for e in events
                 if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    ranges = _action_ranges(events)
    owner = _ActionOwner(ranges, launch_at)
    actions: dict[tuple[int, str], dict[str, float]] = {}
    if ranges:
        for begin, stop, action in ranges:
            totals = actions.setdefault((action.stage, action.kind.value), _action_totals())
            totals["count"] += 1
            totals["host_ms"] += (stop - begin) / 1e3
        outside = 0.0
        for e in device:
            index = owner.index(e)
            if index is None:
                outside += 0.0 if _is_nccl(e) else e["dur"] / 1e3
                continue
            action = ranges[index][2]
            actions[(action.stage, action.kind.value)]["nccl_ms" if _is_nccl(e) else "kernel_ms"] += e["dur"] / 1e3
        summary["outside_actions_kernel_ms"] = outside
    if not kernels:
        summary["actions"] = _sorted_actions(actions) if ranges else None
        return summary
    # outermost CPU ops per thread: the ones not inside another op of the same thread (per thread sorted and
    # disjoint, so the one running at a time is found by bisection: a host-bound step has thousands of late launches)
    outer: list[tuple[list[float], list[dict]]] = []
    for tid_ops in _by_thread(e for e in events if e.get("cat") == "cpu_op").values():
        mine: list[dict] = []
        end = float("-inf")
        for op in tid_ops:
            if op["ts"] >= end:
                mine.append(op)
                end = op["ts"] + op.get("dur", 0)
        outer.append(([op["ts"] for op in mine], mine))
    busy = host_bound = 0.0
    end = kernels[0]["ts"]
    late: dict[str, float] = defaultdict(float)
    spans: dict[int, list[float]] = {}  # action range index -> [first kernel start, last kernel end]
    for k in kernels:
        start, stop = k["ts"], k["ts"] + k["dur"]
        gap = start - end
        index = owner.index(k)
        if index is not None:
            action = ranges[index][2]
            totals = actions[(action.stage, action.kind.value)]
            if gap > 0:
                totals["gap_inside_ms" if index in spans else "gap_before_ms"] += gap / 1e3
            span = spans.setdefault(index, [start, stop])
            span[1] = max(span[1], stop)
        if gap > GAP_US:
            launched = launch_at.get(k.get("args", {}).get("correlation"))
            if launched is not None and launched > end:  # the GPU sat idle until the host enqueued this kernel
                host_bound += gap
                late[_running_op(outer, launched)] += gap
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    summary.update(busy_ms=busy / 1e3, extent_ms=(end - kernels[0]["ts"]) / 1e3, host_bound_gap_ms=host_bound / 1e3)
    summary["gap_ms"] = summary["extent_ms"] - summary["busy_ms"]
    summary["host_ops"] = [[name, ms / 1e3] for name, ms in sorted(late.items(), key=lambda kv: -kv[1])[:top]]
    if ranges:
        for index, (first, last) in spans.items():
            action = ranges[index][2]
            actions[(action.stage, action.kind.value)]["span_ms"] += (last - first) / 1e3
        summary["actions"] = _sorted_actions(actions)
    return summary


def _running_op(outer: list[tuple[list[float], list[dict]]], at: float) -> str:
    """Name of the outermost CPU op running at ``at`` (the first thread's that has one), or "(no op)"."""
    for starts, ops in outer:
        i = bisect.bisect_right(starts, at) - 1
        if i >= 0 and at <= ops[i]["ts"] + ops[i].get("dur", 0):
            return ops[i]["name"]
    return "(no op)"


def _action_totals() -> dict[str, float]:
    return {"count": 0, "host_ms": 0.0, "kernel_ms": 0.0, "nccl_ms": 0.0, "span_ms": 0.0, "gap_before_ms": 0.0,
            "gap_inside_ms": 0.0}


_KIND_ORDER = {"F": 0, "B": 1, "I": 2, "W": 3}


def _sorted_actions(actions: dict[tuple[int, str], dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = sorted(actions, key=lambda sk: (sk[0], _KIND_ORDER.get(sk[1], 9), sk[1]))
    return {f"{stage}{kind}": actions[(stage, kind)] for stage, kind in keys}


def _action_ranges(events: list[dict]) -> list[tuple[float, float, Action]]:
    """The executor's per-action ranges on the host (``user_annotation`` events named ``"interleaf <action>"``;
    their copies on the GPU timeline, ``gpu_user_annotation``, are not host ranges), sorted by start."""
    ranges = []
    for e in events:
        name = e.get("name", "")
        if e.get("cat") != "user_annotation" or not name.startswith(ACTION_ANNOTATION_PREFIX):
            continue
        try:
            action = Action.parse(name[len(ACTION_ANNOTATION_PREFIX):])
        except ValueError:  # someone else's range that happens to share the prefix
            continue
        ranges.append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), action))
    ranges.sort(key=lambda r: r[0])
    return ranges


class _ActionOwner:
    """Which action range a device event's launch lies in (ranges do not overlap: one action at a time)."""

    def __init__(self, ranges: list[tuple[float, float, Action]], launch_at: dict[Any, float]) -> None:
        self._starts = [r[0] for r in ranges]
        self._ranges = ranges
        self._launch_at = launch_at

    def index(self, event: dict) -> int | None:
        launched = self._launch_at.get(event.get("args", {}).get("correlation"))
        if launched is None or not self._ranges:
            return None
        i = bisect.bisect_right(self._starts, launched) - 1
        if i >= 0 and launched <= self._ranges[i][1]:
            return i
        return None


def _is_nccl(event: dict) -> bool:
    return "nccl" in event["name"].lower()


def _by_thread(ops) -> dict[Any, list[dict]]:
    threads: dict[Any, list[dict]] = defaultdict(list)
    for op in ops:
        threads[(op.get("pid"), op.get("tid"))].append(op)
    for tid_ops in threads.values():
        tid_ops.sort(key=lambda op: (op["ts"], -op.get("dur", 0)))
    return threads


def format_gaps(summary: dict[str, Any], label: str = "") -> str:
    """One line plus the host ops behind host-bound gaps (and, when measured, the step's host issue time and
    span, and the per-action table), for logs."""
    head = (f"{label}{summary['kernels']} kernels, {summary['kernel_ms']:.2f} ms of kernels "
            f"(+ {summary.get('nccl_ms', 0.0):.2f} ms in NCCL kernels), device busy "
            f"{summary['busy_ms']:.2f} of {summary['extent_ms']:.2f} ms (gaps {summary['gap_ms']:.2f} ms, "
            f"{summary['host_bound_gap_ms']:.2f} ms waiting for the host)")
    if summary.get("step_ms") is not None:
        head += (f"; step {summary['step_ms']:.2f} ms, host issued it in {summary['host_issue_ms']:.2f} ms "
                 "(under the profiler)")
    ops = "; ".join(f"{name[:60]} {ms:.2f} ms" for name, ms in summary["host_ops"])
    lines = [head] + ([f"    host ops at late launches: {ops}"] if ops else [])
    actions = summary.get("actions")
    if actions:
        lines.append("    per (stage, kind), summed over the step's actions: count, host ms (issuing), kernel ms, "
                     "span ms (first to last kernel), device idle before / inside the actions ms")
        for key, a in actions.items():
            lines.append(f"      {key:>5} {int(a['count']):3d}x  host {a['host_ms']:8.2f}  "
                         f"kernels {a['kernel_ms']:8.2f}"
                         f"  span {a['span_ms']:8.2f}  idle before {a['gap_before_ms']:7.2f}  inside "
                         f"{a['gap_inside_ms']:7.2f}" + (f"  nccl {a['nccl_ms']:.2f}" if a["nccl_ms"] else ""))
        per_kind: dict[str, float] = defaultdict(float)
        for key, a in actions.items():
            per_kind[key.lstrip("0123456789")] += a["kernel_ms"]
        lines.append("      kernel ms per kind: " + ", ".join(f"{k} {v:.2f}" for k, v in per_kind.items())
                     + f"; outside the actions {summary['outside_actions_kernel_ms']:.2f}")
    return "\n".join(lines)


def profile_step(step: Callable[[], Any], device: Any, *, label: str, trace_path: str | None = None,
                 annotate: Iterable[Any] = ()) -> list[dict[str, Any]]:
    """Run ``step()`` once under torch.profiler (CPU, plus CUDA on a GPU) on every rank of the default process
    group, and return every rank's :func:`device_gaps` summary (without ``by_kernel``), printed on rank 0 as
    ``"{label} rank {r}: ..."``. The summary adds ``host_issue_ms`` (host time until ``step`` returned) and
    ``step_ms`` (until the device finished as well). ``annotate``: objects with an ``annotate_actions``
    attribute (interleaf's executors) turned on for this step only. ``trace_path``: keep the chrome trace there.
    Collective: every rank calls it. Not for timed steps: the profiler slows the host."""
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    cuda = getattr(device, "type", str(device)) == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    targets = list(annotate)
    saved = [t.annotate_actions for t in targets]
    for t in targets:
        t.annotate_actions = True
    try:
        if cuda:
            torch.cuda.synchronize(device)
        dist.barrier()  # the ranks start together, as before each timed step
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            step()
            issued = time.perf_counter()
            if cuda:
                torch.cuda.synchronize(device)
            done = time.perf_counter()
    finally:
        for t, value in zip(targets, saved):
            t.annotate_actions = value
    summary = device_gaps(prof, trace_path=trace_path)
    summary.pop("by_kernel")
    summary.update(host_issue_ms=(issued - t0) * 1e3, step_ms=(done - t0) * 1e3)
    summaries: list = [None] * dist.get_world_size()
    dist.all_gather_object(summaries, summary)
    if dist.get_rank() == 0:
        for r, s in enumerate(summaries):
            print(format_gaps(s, f"{label} rank {r}: "), flush=True)
    return summaries
