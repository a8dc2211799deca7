"""V-Half (Qi et al., "Pipeline Parallelism with Controllable Memory", NeurIPS 2024, sec. 4.2 "V-Half").

V placement (rank r holds stages r and 2pp-1-r). The building block staggers each rank's passes so that a
micro-batch's activations live about half as long as in 1F1B: on rank r of pp, micro-batch 0 runs F of chunk 0 at
slot 2r, F of chunk 1 at 3pp-r-2, I of chunk 1 at 3pp+g+2r-1 and I of chunk 0 at 6pp+g-r-2, with g = 3 for even
pp (0 for odd) so the four passes never share a slot; micro-batch k adds 6k. Peak activation memory is about half
of 1F1B's plus one chunk pair (e.g. 3 of 4 micro-batches at pp=4, 5 of 8 at pp=8), for a bubble close to 1F1B's at
F = I = W (see docs/schedules.md for simulated figures).
"""
from __future__ import annotations

from ..costs import CostModel
from ..ir import PipelineShape, Schedule
from .building_block import schedule_from_block
from .zb_v import check_v_shape

__all__ = ["v_half", "v_half_block"]


def v_half_block(pp: int, rank: int) -> tuple[int, int, int, int]:
    """Slots of (F chunk 0, F chunk 1, I chunk 1, I chunk 0) of micro-batch 0 on ``rank``."""
    gap = 3 if pp % 2 == 0 else 0
    return (2 * rank, 3 * pp - rank - 2, 3 * pp + gap + 2 * rank - 1, 6 * pp + gap - rank - 2)


def v_half(shape: PipelineShape, costs: CostModel | None = None) -> Schedule:
    """V-Half: V placement, about half of 1F1B's peak activation memory. The order does not depend on costs."""
    check_v_shape("v-half", shape)
    if costs is not None:
        costs.for_shape(shape)
    return schedule_from_block("v-half", shape, v_half_block)
