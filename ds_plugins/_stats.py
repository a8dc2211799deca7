"""Small statistics shared by the measuring code (torch-free)."""
from __future__ import annotations

from typing import Iterable

__all__ = ["trimmed_mean"]


def trimmed_mean(values: Iterable[float], trim: float = 0.125) -> float:
    """Mean of ``values`` without the ``trim`` share of the smallest and of the largest ones (at least one of each
    from three values on). One stalled sample (a collection pause, an allocator call, a host-starved issue gap
    inside a CUDA-event span) neither makes nor hides a cost, and unlike a median of a bimodal series (fast and slow
    samples alternating) the result still reflects the average cost, which is what a schedule or a plan pays."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("trimmed_mean of no values")
    if len(ordered) >= 3:
        k = max(1, int(trim * len(ordered)))
        ordered = ordered[k:len(ordered) - k]
    return sum(ordered) / len(ordered)
