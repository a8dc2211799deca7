"""V-Min (Qi et al., "Pipeline Parallelism with Controllable Memory", NeurIPS 2024, sec. 4.2 "V-Min").

V placement with the shortest activation lifespans of the paper's building blocks: on rank r of pp, micro-batch
0 runs F of chunk 0 at slot r, F of chunk 1 at 2pp-r-1, I of chunk 1 at 2pp+g+r and I of chunk 0 at 4pp+g-r-1,
with g = 2 when 3 divides pp (0 otherwise) so the passes never share a slot; micro-batch k adds 6k. Peak
activation memory is about a third of 1F1B's plus a constant (e.g. 3 of 8 micro-batches at pp=8), traded for
more bubble than V-Half.
"""
from __future__ import annotations

from ..costs import CostModel
from ..ir import PipelineShape, Schedule
from .building_block import schedule_from_block
from .zb_v import check_v_shape

__all__ = ["v_min", "v_min_block"]


def v_min_block(pp: int, rank: int) -> tuple[int, int, int, int]:
    """Slots of (F chunk 0, F chunk 1, I chunk 1, I chunk 0) of micro-batch 0 on ``rank``."""
    gap = 2 if pp % 3 == 0 else 0
    return (rank, 2 * pp - rank - 1, 2 * pp + gap + rank, 4 * pp + gap - rank - 1)


def v_min(shape: PipelineShape, costs: CostModel | None = None) -> Schedule:
    """V-Min: V placement, about a third of 1F1B's peak activation memory. The order does not depend on costs."""
    check_v_shape("v-min", shape)
    if costs is not None:
        costs.for_shape(shape)
    return schedule_from_block("v-min", shape, v_min_block)
