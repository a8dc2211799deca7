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
the format ``prof.export_chrome_trace`` writes. Used by ``benchmarks/pipeline.py --profile`` and
``tests/runtime/probe_executor_gpu.py --actions``.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from typing import Any

__all__ = ["device_gaps", "format_gaps", "gaps_from_file", "gaps_from_trace"]

GAP_US = 20.0
"""Idle time between two kernels below this is launch latency, not a gap."""
_DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


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
    time they account for). All zeros when the trace holds no kernel (CPU runs)."""
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
                               "by_kernel": {k: list(v) for k, v in by_kernel.items()}, "host_ops": []}
    if not kernels:
        return summary
    launch_at = {e["args"]["correlation"]: e["ts"] for e in events
                 if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    # outermost CPU ops per thread: the ones not inside another op of the same thread
    outer: list[dict] = []
    for tid_ops in _by_thread(e for e in events if e.get("cat") == "cpu_op").values():
        end = float("-inf")
        for op in tid_ops:
            if op["ts"] >= end:
                outer.append(op)
                end = op["ts"] + op.get("dur", 0)
    busy = host_bound = 0.0
    end = kernels[0]["ts"]
    late: dict[str, float] = defaultdict(float)
    for k in kernels:
        start, stop = k["ts"], k["ts"] + k["dur"]
        gap = start - end
        if gap > GAP_US:
            launched = launch_at.get(k.get("args", {}).get("correlation"))
            if launched is not None and launched > end:  # the GPU sat idle until the host enqueued this kernel
                host_bound += gap
                owners = [op["name"] for op in outer if op["ts"] <= launched <= op["ts"] + op.get("dur", 0)]
                late[owners[0] if owners else "(no op)"] += gap
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    summary.update(busy_ms=busy / 1e3, extent_ms=(end - kernels[0]["ts"]) / 1e3, host_bound_gap_ms=host_bound / 1e3)
    summary["gap_ms"] = summary["extent_ms"] - summary["busy_ms"]
    summary["host_ops"] = [[name, ms / 1e3] for name, ms in sorted(late.items(), key=lambda kv: -kv[1])[:top]]
    return summary


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
    """One line plus the host ops behind host-bound gaps, for logs."""
    head = (f"{label}{summary['kernels']} kernels, {summary['kernel_ms']:.2f} ms of kernels "
            f"(+ {summary.get('nccl_ms', 0.0):.2f} ms in NCCL kernels), device busy "
            f"{summary['busy_ms']:.2f} of {summary['extent_ms']:.2f} ms (gaps {summary['gap_ms']:.2f} ms, "
            f"{summary['host_bound_gap_ms']:.2f} ms waiting for the host)")
    ops = "; ".join(f"{name[:60]} {ms:.2f} ms" for name, ms in summary["host_ops"])
    return head + (f"\n    host ops at late launches: {ops}" if ops else "")
