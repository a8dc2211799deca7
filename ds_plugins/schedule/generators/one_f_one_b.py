"""1F1B (PipeDream-Flush; Narayanan et al., "Memory-Efficient Pipeline-Parallel DNN Training", ICML 2021, sec. 3;
Megatron-LM's non-interleaved schedule, Narayanan et al. SC 2021 sec. 2.2.1).

Rank r runs ``pp - 1 - r`` warm-up forwards, then alternates one forward and one full backward, then drains the
remaining backwards. At most ``pp - r`` micro-batches are in flight on rank r, so rank 0 holds ``pp``
micro-batches' activations. With F and B costs per rank the bubble is ``(pp-1)(F+B)``, i.e. a bubble fraction of
``(pp-1)/(m+pp-1)``.
"""
from __future__ import annotations

from ..costs import CostModel
from ..ir import Action, ActionKind, PipelineShape, Schedule

__all__ = ["one_f_one_b"]


def one_f_one_b(shape: PipelineShape, costs: CostModel | None = None) -> Schedule:
    """The 1F1B schedule with full backward (B) actions. ``costs`` is accepted for a uniform signature; the
    order does not depend on it."""
    if shape.vp != 1:
        raise ValueError(f"1f1b runs one chunk per rank: set vp=1 (got vp={shape.vp}); use interleaved-1f1b for vp>1")
    if costs is not None:
        costs.for_shape(shape)
    pp, m = shape.pp, shape.microbatches
    programs = []
    for rank in range(pp):
        warmup = min(pp - 1 - rank, m)
        prog = [Action(rank, ActionKind.FORWARD, i) for i in range(warmup)]
        for k in range(m - warmup):
            prog.append(Action(rank, ActionKind.FORWARD, warmup + k))
            prog.append(Action(rank, ActionKind.BACKWARD, k))
        prog.extend(Action(rank, ActionKind.BACKWARD, i) for i in range(m - warmup, m))
        programs.append(tuple(prog))
    return Schedule("1f1b", shape, tuple(programs))
