"""ZB-H2 (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024, sec. 3.1, "Zero bubble schedule").

With a larger memory budget than 1F1B, the first rank runs ``2pp - 1`` forwards before its first backward,
which fills the warm-up bubble; W's are moved to fill the tail. The result is a parallelogram: every rank
computes without a gap from its first to its last action (zero bubble per rank at F = I = W and m >= 2pp, also
when W keeps 32/34 of the activations until it runs; pp=4, m=8: 11.1% step-level bubble); what remains in a
single step is the skew between ranks' start times, which the paper removes across steps by optimizer
post-validation (sec. 4).

Built with the shared greedy list scheduler under a per-rank budget of ``2pp - 1`` micro-batches' activations.
"""
from __future__ import annotations

from ..costs import CostModel
from ..ir import PipelineShape, Schedule
from .list_scheduler import MICROBATCHES_PER_RANK, zero_bubble_schedule

__all__ = ["zb_h2"]


def zb_h2(shape: PipelineShape, costs: CostModel, *, search: bool = False) -> Schedule:
    """ZB-H2: split backward, at most ``2pp - 1`` micro-batches' activations per rank."""
    if shape.vp != 1:
        raise ValueError(f"zb-h2 runs one chunk per rank: set vp=1 (got vp={shape.vp}); zb-v is the 2-chunk variant")
    costs.for_shape(shape)
    return zero_bubble_schedule("zb-h2", shape, costs, MICROBATCHES_PER_RANK["zb-h2"](shape.pp), search=search)
