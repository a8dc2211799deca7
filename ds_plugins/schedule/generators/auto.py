"""``auto``: the shortest schedule we can find for measured costs under a per-rank activation-memory cap.

A heuristic search in the spirit of the Zero Bubble paper's automatic scheduler (Qi et al., ICLR 2024, sec. 3.2:
greedy initial solutions under a memory limit, several variants, keep the best): the shared greedy list
scheduler runs with every combination of its knobs (I-first or F-first, lazy or eager W, waiting for the
critical path or not, depth- or breadth-first forwards, 1F1B-like or free warm-up depth), over both placements
when there are 2 chunks per rank, all under the cap. Every handcrafted schedule for the same number of chunks
whose simulated peak memory fits the cap is evaluated too, and the candidate with the shortest simulated
makespan wins (ties: lower peak memory). So ``auto`` is never slower in the simulator than a handcrafted
schedule that fits the same cap.

The result's ``shape.placement`` says which placement won ("loop" or "v"); a runtime must partition the model
by it.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable

from ..costs import CostModel
from ..ir import PipelineShape, Schedule
from ..simulate import SimulationResult, simulate
from .interleaved_1f1b import interleaved_1f1b
from .list_scheduler import GreedyPolicy, list_schedule, policy_variants, rank_footprint
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
    if limit + _EPS < need:
        raise ValueError(
            f"auto: memory_limit {limit:g} cannot hold one micro-batch's activations ({need:g} on the fullest "
            f"rank); raise memory_limit to at least {need:g}"
        )
    best: tuple[tuple[float, float], Schedule, str] | None = None
    best_handcrafted: tuple[float, str] | None = None

    def consider(schedule: Schedule, result: SimulationResult, origin: str) -> None:
        nonlocal best, best_handcrafted
        peak = max(result.peak_activation_memory)
        if peak > limit + _EPS:
            return
        key = (result.makespan, peak)
        if best is None or key < best[0]:
            best = (key, schedule, origin)
        if not origin.startswith("greedy") and (best_handcrafted is None or result.makespan < best_handcrafted[0]):
            best_handcrafted = (result.makespan, origin)

    for hshape, generator in handcrafted_candidates(shape):
        if hshape.placement not in placements:
            continue
        try:
            schedule = generator(hshape, costs)
        except ValueError as err:  # e.g. a budget that cannot hold one micro-batch
            logger.debug("auto: skipping %s: %s", generator.__name__, err)
            continue
        consider(schedule, simulate(schedule, costs), schedule.name)

    for placement in placements:
        if limit + _EPS < footprint[placement]:  # this placement cannot hold one micro-batch on some rank
            continue
        pshape = replace(shape, placement=placement)
        for policy in policy_variants(pshape, (limit,) * pshape.pp):
            schedule = list_schedule("auto", pshape, costs, policy)
            consider(schedule, simulate(schedule, costs), f"greedy {placement} ({_describe(policy)})")

    if best is None:  # cannot happen: the greedy candidates respect the limit checked above
        raise RuntimeError(f"auto found no schedule within memory_limit {limit:g} (internal error)")
    (makespan, peak), schedule, origin = best
    logger.info("auto: picked %s, simulated makespan %g, peak activation memory %g (cap %g); best handcrafted "
                "schedule under the cap: %s", origin, makespan, peak, limit,
                "none" if best_handcrafted is None else f"{best_handcrafted[1]} {best_handcrafted[0]:g}")
    return Schedule("auto", schedule.shape, schedule.actions)
