"""``auto``: the shortest schedule we can find for measured costs under a per-rank activation-memory cap.

A heuristic search in the spirit of the Zero Bubble paper's automatic scheduler (Qi et al., ICLR 2024, sec. 3.2:
greedy initial solutions under a memory limit, several variants, keep the best). Candidates:

- every handcrafted schedule for the same number of chunks whose simulated peak memory fits the cap;
- the shared greedy list scheduler with every combination of its knobs (I-first or F-first, lazy or eager W,
  waiting for the critical path or not, depth- or breadth-first forwards, 1F1B-like or free warm-up depth), over
  both placements when there are 2 chunks per rank, each under a ladder of memory *budgets* at or below the cap.

The candidate with the shortest simulated makespan wins (ties: lower peak memory among the candidates run; a
placement whose search stops at the lower bound may hold an equally fast order with a lower peak). So ``auto`` is
never slower in the simulator than a handcrafted schedule that fits the same cap.

Why budgets below the cap: the greedy scheduler spends its budget on early forwards, and a looser budget can
make a greedier start that ends worse (measured Megatron costs, pp=4, vp=2, m=8, looped: a cap of 22 GiB gave
277.5 ms, 26 GiB 287.1 ms). An order that fits a cap also fits every larger one, so the search must not get
slower when the cap grows. The budgets are a fixed grid per placement: the multiples of one micro-batch's
footprint on the fullest rank divided by :data:`BUDGET_STEPS_PER_MICROBATCH`, from that footprint (the least
that holds one micro-batch) up. Under a cap X the greedy candidates are the runs under every grid budget
<= X, plus the run under X itself where it is one of those (a run reports the range of budgets that give the
same run, :class:`~.list_scheduler.GreedyRun`; that range holds a grid point). That set only grows with X, so
``auto``'s makespan never increases when the cap does. What it can miss: a run whose range of budgets lies
between two grid points (memory needs that differ by less than a 16th of a micro-batch).

Cost: the descent is :func:`~.list_scheduler.budget_descent` (shared with the zero-bubble generators' rebuild
from measured costs): each knob combination descends from the cap, and after each run jumps to the grid point
below the run's range (the budgets in between give the same run); a run gives up as soon as it cannot beat the
best schedule found so far (some rank's free time plus its work still to place), and a placement is dropped once
the best reaches its :func:`~ds_plugins.schedule.simulate.lower_bound`. Neither changes the makespan found.

The result's ``shape.placement`` says which placement won ("loop" or "v"); a runtime must partition the model
by it.
"""
from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Callable

from ..costs import CostModel
from ..ir import PipelineShape, Schedule
from ..simulate import SimulationResult, lower_bound, simulate
from .interleaved_1f1b import interleaved_1f1b
from .list_scheduler import (BUDGET_STEPS_PER_MICROBATCH, GreedyPolicy, budget_descent, grid_point_at_or_above,
                             memory_tolerance, rank_footprint)
from .one_f_one_b import one_f_one_b
from .v_half import v_half
from .v_min import v_min
from .zb_h1 import zb_h1
from .zb_h2 import zb_h2
from .zb_v import zb_v

__all__ = ["auto", "default_memory_limit", "handcrafted_candidates"]

logger = logging.getLogger(__name__)

_EPS = 1e-9

def default_memory_limit(shape: PipelineShape, costs: CostModel) -> float:
    """1F1B's peak: ``pp`` micro-batches' activations on the rank that holds the most per micro-batch."""
    return max(shape.pp * rank_footprint(shape, costs, r) for r in range(shape.pp))


def handcrafted_candidates(shape: PipelineShape) -> list[tuple[PipelineShape, Callable[..., Schedule]]]:
    """The handcrafted generators that run on ``shape.vp`` chunks per rank, each with the shape it needs."""
    if shape.vp == 1:
        return [(shape, one_f_one_b), (shape, zb_h1), (shape, zb_h2)]
    loop = replace(shape, placement="loop")
    out: list[tuple[PipelineShape, Callable[..., Schedule]]] = []
    if shape.microbatches >= shape.pp:
        out.append((loop, interleaved_1f1b))
    if shape.vp == 2:
        v = replace(shape, placement="v")
        out += [(v, zb_v), (v, v_half), (v, v_min)]
    return out


def _describe(policy: GreedyPolicy) -> str:
    return ", ".join((
        "I first" if policy.backward_first else "F first",
        f"{policy.weight} W",
        "wait for the critical path" if policy.fill_only_if_fits else "fill",
        "deepest F first" if policy.forward_deepest_first else "new micro-batches first",
        "1F1B warm-up depth" if policy.max_in_flight else "free warm-up depth",
    ))


def auto(shape: PipelineShape, costs: CostModel, memory_limit: float | None = None, *,
         fixed_placement: bool = False) -> Schedule:
    """Search for the shortest schedule under ``memory_limit`` (per rank; default: 1F1B's peak).

    ``fixed_placement``: search ``shape.placement`` only (a runtime whose model is already partitioned: with 2
    chunks per rank the search otherwise covers both placements, and a winner in the other one cannot run)."""
    costs.for_shape(shape)
    limit = default_memory_limit(shape, costs) if memory_limit is None else float(memory_limit)
    placements = [shape.placement] if shape.vp != 2 or fixed_placement else ["v", "loop"]
    footprint = {  # one micro-batch's activations on the fullest rank, per placement
        p: max(rank_footprint(replace(shape, placement=p), costs, r) for r in range(shape.pp)) for p in placements
    }
    need = min(footprint.values())
    mtol = memory_tolerance(max(limit, need))
    if limit + mtol < need:
        raise ValueError(
            f"auto: memory_limit {limit:g} cannot hold one micro-batch's activations ({need:g} on the fullest "
            f"rank); raise memory_limit to at least {need:g}"
        )
    best: tuple[tuple[float, float], Schedule, str] | None = None
    best_handcrafted: tuple[float, str] | None = None

    def consider(schedule: Schedule, makespan: float, peak: float, origin: str) -> None:
        nonlocal best, best_handcrafted
        if peak > limit + mtol:
            return
        key = (makespan, peak)
        if best is None or key < best[0]:
            best = (key, schedule, origin)
        if not origin.startswith("greedy") and (best_handcrafted is None or makespan < best_handcrafted[0]):
            best_handcrafted = (makespan, origin)

    for hshape, generator in handcrafted_candidates(shape):
        if hshape.placement not in placements:
            continue
        try:
            schedule = generator(hshape, costs)
        except ValueError as err:  # e.g. a budget that cannot hold one micro-batch
            logger.debug("auto: skipping %s: %s", generator.__name__, err)
            continue
        result = simulate(schedule, costs)
        consider(schedule, result.makespan, max(result.peak_activation_memory), schedule.name)

    runs = given_up = 0
    bounds = {p: lower_bound(replace(shape, placement=p), costs).makespan for p in placements}
    for placement in sorted(placements, key=lambda p: bounds[p]):  # the placement that may be faster first
        if limit + mtol < footprint[placement]:  # this placement cannot hold one micro-batch on some rank
            continue
        pshape = replace(shape, placement=placement)
        bound = bounds[placement]
        step = footprint[placement] / BUDGET_STEPS_PER_MICROBATCH
        for policy, budget, run in budget_descent(
            "auto", pshape, costs, (limit,) * pshape.pp,
            give_up_at=lambda: math.inf if best is None else best[0][0],
            stop=lambda: best is not None and best[0][0] <= bound + _EPS,  # else nothing here is faster
        ):
            runs += 1
            if run.schedule is None:
                given_up += 1
            # The run under the cap itself counts only where it is the run under some budget of the grid (its
            # range of budgets holds one): see the module docstring.
            elif budget < limit or grid_point_at_or_above(run.low, step) < run.high:
                origin = f"greedy {placement} ({_describe(policy)})"
                if budget < limit:
                    origin += f" under budget {budget:g}, tighter than the cap"
                consider(run.schedule, run.makespan, max(run.peak_activation_memory), origin)

    if best is None:  # cannot happen: the greedy candidates respect the limit checked above
        raise RuntimeError(f"auto found no schedule within memory_limit {limit:g} (internal error)")
    (makespan, peak), schedule, origin = best
    logger.info("auto: picked %s, simulated makespan %g, peak activation memory %g (cap %g; %d greedy runs, %d of "
                "them given up as slower); best handcrafted schedule under the cap: %s", origin, makespan, peak, limit,
                runs, given_up,
                "none" if best_handcrafted is None else f"{best_handcrafted[1]} {best_handcrafted[0]:g}")
    return Schedule("auto", schedule.shape, schedule.actions)
