"""ZB-V (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024, sec. 6 / appendix "ZB-V schedule").

Two chunks per rank in V placement: rank r holds stages r and 2pp-1-r, so a micro-batch goes down the ranks
and back up, and the loss and the first layer are both on rank 0. With split backward and W's filling gaps,
the schedule holds 1F1B's peak memory (``pp`` micro-batches' activations, i.e. 2pp chunk activations, per rank)
and, at F = I = W and m >= 2pp, its step-level bubble meets the start-skew lower bound (pp=4, m=8: 5.9%). With W's
memory counted as free (the paper's accounting) it is also zero bubble per rank; with
:meth:`CostModel.uniform`'s default (W keeps 32/34 of the activations until it runs) it is not, but the
step-level bubble is the same.

Built with the shared greedy list scheduler under that budget.
"""
from __future__ import annotations

from ..costs import CostModel
from ..ir import PipelineShape, Schedule
from .list_scheduler import MICROBATCHES_PER_RANK, zero_bubble_schedule

__all__ = ["zb_v", "check_v_shape"]


def check_v_shape(name: str, shape: PipelineShape) -> None:
    if shape.vp != 2 or shape.placement != "v":
        raise ValueError(
            f"{name} needs V placement with 2 chunks per rank: use PipelineShape(vp=2, placement='v') "
            f"(got vp={shape.vp}, placement={shape.placement!r})"
        )


def zb_v(shape: PipelineShape, costs: CostModel, *, search: bool = False) -> Schedule:
    """ZB-V: V placement, split backward, 1F1B's peak memory."""
    check_v_shape("zb-v", shape)
    costs.for_shape(shape)
    return zero_bubble_schedule("zb-v", shape, costs, MICROBATCHES_PER_RANK["zb-v"](shape.pp), search=search)
