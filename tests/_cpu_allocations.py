"""The CPU allocator's profiled history: what the memory tests read instead of ``torch.cuda.memory_allocated``."""
from __future__ import annotations

from typing import Any


def allocations_and_ranges(prof: Any, prefix: str) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, str]]]:
    """From a ``torch.profiler.profile(profile_memory=True)`` run: every CPU allocation (bytes > 0) and free
    (< 0) as ``(time ns, total allocated bytes after it, bytes)`` in time order, and every ``record_function``
    range whose name starts with ``prefix`` as ``(start ns, end ns, name without the prefix)`` in time order."""
    from torch._C._profiler import _EventType

    allocs: list[tuple[int, int, int]] = []
    ranges: list[tuple[int, int, str]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation:
            fields = node.extra_fields
            if fields.device.type == "cpu":
                allocs.append((node.start_time_ns, fields.total_allocated, fields.alloc_size))
        elif node.name.startswith(prefix):
            ranges.append((node.start_time_ns, node.end_time_ns, node.name[len(prefix):]))
    allocs.sort()
    ranges.sort()
    return allocs, ranges
