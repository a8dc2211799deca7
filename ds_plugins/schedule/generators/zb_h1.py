"""ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024, sec. 3.1, "Memory efficient schedule").

Backward is split into I (input gradient, on the critical path) and W (weight gradient, free to move). ZB-H1
keeps 1F1B's memory: every rank may hold at most as many micro-batches' activations as 1F1B's first rank, ``pp``.
Inputs gradients go first, forwards fill the pipeline within that budget, and W's fill the time a rank would
otherwise wait. At F = I = W, with W's memory counted as free (the paper's accounting), the idle time per rank
drops from 1F1B's ``(pp-1)(F+I+W)`` to ``(pp-1)(F+I-W)``, one third (pp=4, m=8: bubble 27.3% -> 11.1%).

With :meth:`CostModel.uniform`'s default accounting, where W keeps 32/34 of a micro-batch's activations until it
runs (flash/SDPA attention, sec. 3.1's ``M_W = 32bsh``), a rank at the ``pp`` budget must run pending W's before
its next F, so fewer W's can wait for the cool-down: at pp=4, m=8 the bubble is 17.2% (5/9 of 1F1B's idle time),
at 1F1B's peak memory, which then holds whatever m is. Treating W as free instead lets W's wait for the
cool-down, and real activation memory grows with m (4x H100: ~1 GiB per micro-batch, docs/schedules.md).

Built with the shared greedy list scheduler (the reference implementation also builds its ZB schedules with a
greedy heuristic under a memory limit, sec. 3 / appendix).
"""
from __future__ import annotations

from ..costs import CostModel
from ..ir import PipelineShape, Schedule
from .list_scheduler import MICROBATCHES_PER_RANK, zero_bubble_schedule

__all__ = ["zb_h1"]


def zb_h1(shape: PipelineShape, costs: CostModel, *, search: bool = False) -> Schedule:
    """ZB-H1: split backward, at most ``pp`` micro-batches' activations per rank (1F1B's peak)."""
    if shape.vp != 1:
        raise ValueError(f"zb-h1 runs one chunk per rank: set vp=1 (got vp={shape.vp}); zb-v is the 2-chunk variant")
    costs.for_shape(shape)
    return zero_bubble_schedule("zb-h1", shape, costs, MICROBATCHES_PER_RANK["zb-h1"](shape.pp), search=search)
