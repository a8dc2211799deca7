"""Repeated building blocks for V-shaped schedules (Qi et al., "Pipeline Parallelism with Controllable Memory",
NeurIPS 2024, sec. 3-4).

A building block fixes, for one micro-batch and each rank, the time slot of its four chunk passes on that rank:
forward of chunk 0, forward of chunk 1, input-gradient of chunk 1, input-gradient of chunk 0. Micro-batch k
uses the block shifted by ``6k`` slots (each rank does 6 passes per micro-batch at F = I = W: two F, two I, two
W). A rank's peak activation memory follows from the lifespans in its block (time from a chunk's F to its I)
divided by the period: shorter lifespans, less memory. W's fill the free slots first come, first served.

The programs are the slots in time order; the simulator then runs every action as early as its inputs allow,
which removes the holes of warm-up and cool-down (the paper's "squeeze").
"""
from __future__ import annotations

from typing import Callable

from ..ir import Action, ActionKind, PipelineShape, Schedule

__all__ = ["BlockOffsets", "schedule_from_block"]

_F, _I, _W = ActionKind.FORWARD, ActionKind.BACKWARD_INPUT, ActionKind.BACKWARD_WEIGHT
PERIOD = 6

BlockOffsets = Callable[[int, int], tuple[int, int, int, int]]
"""(pp, rank) -> slots of (F chunk 0, F chunk 1, I chunk 1, I chunk 0) of micro-batch 0 on that rank."""


def schedule_from_block(name: str, shape: PipelineShape, offsets: BlockOffsets) -> Schedule:
    """Tile ``offsets`` over the micro-batches, fill W's into free slots, and order each rank by slot."""
    pp, m = shape.pp, shape.microbatches
    programs = []
    for rank in range(pp):
        first, second = shape.stages_of(rank)
        f0, f1, i1, i0 = offsets(pp, rank)
        slotted: dict[int, Action] = {}
        for k in range(m):
            shift = PERIOD * k
            for slot, action in (
                (f0, Action(first, _F, k)),
                (f1, Action(second, _F, k)),
                (i1, Action(second, _I, k)),
                (i0, Action(first, _I, k)),
            ):
                if slot + shift in slotted:
                    raise RuntimeError(f"{name}: building block puts two passes in slot {slot + shift} of rank {rank}")
                slotted[slot + shift] = action
        program: list[Action] = []
        pending_w: list[Action] = []
        last = max(slotted)
        for slot in range(last + 1):
            action = slotted.get(slot)
            if action is not None:
                program.append(action)
                if action.kind is _I:
                    pending_w.append(Action(action.stage, _W, action.microbatch))
            elif pending_w:
                program.append(pending_w.pop(0))
        program.extend(pending_w)
        programs.append(tuple(program))
    return Schedule(name, shape, tuple(programs))
