"""Greedy list scheduler shared by the zero-bubble, V-shape and auto generators.

The zero-bubble family is, in the reference implementation of Qi et al. ("Zero Bubble Pipeline Parallelism",
ICLR 2024, sec. 3 and its appendix heuristic), a *greedy* schedule under a per-rank memory limit: I (input
gradient) goes first because it is on the critical path, F fills the pipeline as far as memory allows, and W
(weight gradient) fills the time a rank would otherwise sit idle. This module is that idea as one
event-driven list scheduler with a few explicit knobs (:class:`GreedyPolicy`); each handcrafted generator picks
the knobs and the memory budget of its paper, and ``auto`` searches over them.

How it works: simulated time advances from event to event (an action ending, or its result arriving on another
rank after ``comm``). A rank that is free picks, among the actions whose inputs are there, the best by the
policy; if it can see a more important action arriving before a filler action would end, it may wait for it
instead (``fill_only_if_fits``). Every rank's picks, in order, are its program. Because each action then starts
as soon as its rank is free and its inputs are there, :func:`~ds_plugins.schedule.simulate.simulate` replays
the program to exactly the times computed here.

Memory (deadlock avoidance in the style of the banker's algorithm): F of the first of a rank's chunks *admits* a
micro-batch on that rank. An action is only taken if, afterwards, the admitted micro-batches could still finish
one after another, oldest first, within the limit: for each admitted micro-batch j, the memory held now, minus
what the older ones hold (they free it when they finish), plus what j's remaining forwards on this rank will
allocate, fits. Micro-batches are admitted in the same order on every rank, so the oldest one can always move
on every rank, and the scheduler cannot deadlock whenever the limit holds one micro-batch. The accounting is
:meth:`CostModel.memory_delta`, so the peak the simulator reports never exceeds the limit.
"""
from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, replace
from typing import Callable, Literal

from ..costs import CostModel
from ..ir import Action, ActionKind, PipelineShape, Schedule
from ..simulate import simulate

__all__ = ["GreedyPolicy", "MICROBATCHES_PER_RANK", "ZERO_BUBBLE_POLICY", "list_schedule", "memory_cap",
           "policy_variants", "rank_footprint", "zero_bubble_schedule"]

_F, _I, _W = ActionKind.FORWARD, ActionKind.BACKWARD_INPUT, ActionKind.BACKWARD_WEIGHT
_EPS = 1e-9


@dataclass(frozen=True, slots=True, kw_only=True)
class GreedyPolicy:
    """Knobs of the greedy list scheduler."""

    memory_limit: tuple[float, ...] | None = None
    """Per-rank activation-memory cap in the cost model's units; None for no cap."""
    max_in_flight: tuple[int, ...] | None = None
    """Per-rank cap on admitted micro-batches whose input gradients are not all done (warm-up depth); None: no cap."""
    backward_first: bool = True
    """Prefer a ready I over a ready F (critical path first). False prefers F (deeper warm-up)."""
    weight: Literal["lazy", "eager"] = "lazy"
    """"lazy": W only when nothing else can run (zero bubble); "eager": W right after its I (1F1B-like)."""
    fill_only_if_fits: bool = False
    """When True, a lower-priority action is not started if a higher-priority one is known to arrive before
    it would end; the rank waits instead."""
    forward_deepest_first: bool = True
    """Among ready forwards on one rank, prefer the later stage (push micro-batches towards the loss) when True,
    the earlier stage (admit new micro-batches) when False."""

    def __post_init__(self) -> None:
        if self.weight not in ("lazy", "eager"):
            raise ValueError(f"GreedyPolicy.weight must be 'lazy' or 'eager', got {self.weight!r}")
        if self.max_in_flight is not None and min(self.max_in_flight) < 1:
            raise ValueError(f"GreedyPolicy.max_in_flight must be >= 1 per rank, got {self.max_in_flight}")


def rank_footprint(shape: PipelineShape, costs: CostModel, rank: int) -> float:
    """Activation memory one micro-batch holds on ``rank`` after all its forwards there."""
    return sum(costs.activation_memory[s] for s in shape.stages_of(rank))


def list_schedule(name: str, shape: PipelineShape, costs: CostModel, policy: GreedyPolicy) -> Schedule:
    """Build a split-backward (F/I/W) schedule for ``shape`` greedily under ``policy``.

    Raises ``ValueError`` when the memory limit cannot hold a single micro-batch on some rank.
    """
    costs.for_shape(shape)
    pp, m, n = shape.pp, shape.microbatches, shape.num_stages
    limits = policy.memory_limit
    if limits is not None:
        if len(limits) != pp:
            raise ValueError(f"memory_limit has {len(limits)} entries for pp={pp}; give one per rank")
        for r in range(pp):
            need = rank_footprint(shape, costs, r)
            if limits[r] + _EPS < need:
                raise ValueError(
                    f"{name}: memory limit {limits[r]:g} on rank {r} cannot hold one micro-batch ({need:g}); "
                    f"raise memory_limit to at least {need:g}"
                )
    in_flight_cap = policy.max_in_flight or (m,) * pp
    stages_of = [shape.stages_of(r) for r in range(pp)]
    first_stage = [st[0] for st in stages_of]
    footprint = [rank_footprint(shape, costs, r) for r in range(pp)]
    comm = costs.comm

    # Per stage: next micro-batch to run F / I on (both in micro-batch order); per rank: FIFO of W to run.
    next_f = [0] * n
    next_i = [0] * n
    pending_w: list[list[Action]] = [[] for _ in range(pp)]
    # Arrival time of each action's inputs on its own rank, known once every dependency is committed.
    f_arrival: dict[tuple[int, int], float] = {}
    i_arrival_parts: dict[tuple[int, int], list[float]] = {}  # (stage, mb) -> known dependency arrivals
    end_of: dict[tuple[ActionKind, int, int], float] = {}

    mem = [0.0] * pp  # current memory in program order
    # Per rank, per admitted micro-batch still holding memory or with forwards to run: [held, still to allocate].
    live: list[dict[int, list[float]]] = [{} for _ in range(pp)]
    backward_done = [[0] * m for _ in range(pp)]  # per rank, per micro-batch: I's done
    in_flight = [0] * pp
    free_at = [0.0] * pp
    programs: list[list[Action]] = [[] for _ in range(pp)]
    remaining = 3 * n * m

    for mb in range(m):
        f_arrival[(0, mb)] = 0.0

    def i_ready_time(stage: int, mb: int) -> float | None:
        parts = i_arrival_parts.get((stage, mb))
        need = 2 if stage + 1 < n else 1
        if parts is None or len(parts) < need:
            return None
        return max(parts)

    def commit(rank: int, action: Action, start: float) -> float:
        nonlocal remaining
        end = start + costs.duration(action)
        s, k, mb = action.stage, action.kind, action.microbatch
        end_of[(k, s, mb)] = end
        programs[rank].append(action)
        free_at[rank] = end
        remaining -= 1
        delta = costs.memory_delta(action)
        mem[rank] += delta
        if k is _F and s == first_stage[rank]:
            in_flight[rank] += 1
            live[rank][mb] = [0.0, footprint[rank]]
        entry = live[rank].setdefault(mb, [0.0, 0.0])
        entry[0] += delta
        if k is _F:
            entry[1] -= costs.activation_memory[s]
        if entry[0] <= _EPS and entry[1] <= _EPS:
            del live[rank][mb]
        if k is _F:
            next_f[s] += 1
            if s + 1 < n:
                nr = shape.rank_of(s + 1)
                f_arrival[(s + 1, mb)] = end + (comm if nr != rank else 0.0)
            i_arrival_parts.setdefault((s, mb), []).append(end)
        elif k is _I:
            next_i[s] += 1
            backward_done[rank][mb] += 1
            if backward_done[rank][mb] == len(stages_of[rank]):
                in_flight[rank] -= 1
            if s > 0:
                pr = shape.rank_of(s - 1)
                i_arrival_parts.setdefault((s - 1, mb), []).append(end + (comm if pr != rank else 0.0))
            pending_w[rank].append(Action(s, _W, mb))
        else:
            pending_w[rank].pop(0)
        return end

    def safe_forward(rank: int, stage: int, mb: int) -> bool:
        """Would running F(stage, mb) on ``rank`` keep every admitted micro-batch able to finish in order?"""
        a = costs.activation_memory[stage]
        after = mem[rank] + a
        older_held = 0.0
        entries = sorted(live[rank].items())
        if mb not in live[rank]:
            entries.append((mb, [0.0, footprint[rank]]))
        for j, (held, to_allocate) in entries:
            if j == mb:
                held, to_allocate = held + a, to_allocate - a
            if after - older_held + to_allocate > limits[rank] + _EPS:
                return False
            older_held += held
        return True

    def candidates(rank: int) -> list[tuple[int, float, tuple, Action]]:
        """(category, ready time, tie-break key, action); category 0 is the most important."""
        out = []
        f_cat, i_cat = (1, 0) if policy.backward_first else (0, 1)
        for s in stages_of[rank]:
            mb = next_f[s]
            if mb < m:
                ready = f_arrival.get((s, mb))
                if ready is not None:
                    ok = True
                    if s == first_stage[rank] and in_flight[rank] >= in_flight_cap[rank]:
                        ok = False
                    elif limits is not None and not safe_forward(rank, s, mb):
                        ok = False
                    if ok:
                        key = (-s if policy.forward_deepest_first else s, mb)
                        out.append((f_cat, ready, key, Action(s, _F, mb)))
            mb = next_i[s]
            if mb < m and next_f[s] > mb:
                ready = i_ready_time(s, mb)
                if ready is not None:
                    out.append((i_cat, ready, (mb, -s), Action(s, _I, mb)))
        if pending_w[rank]:
            w = pending_w[rank][0]
            ready = end_of[(_I, w.stage, w.microbatch)]
            cat = -1 if policy.weight == "eager" else 2
            out.append((cat, ready, (0,), w))
        return out

    # Event loop over "rank r may decide at time t".
    events: list[tuple[float, int]] = [(0.0, r) for r in range(pp)]
    heapq.heapify(events)
    waiting = [False] * pp  # rank has nothing visible; woken by the next commit anywhere
    while remaining:
        if not events:
            stuck = [r for r in range(pp) if waiting[r]]
            raise RuntimeError(f"{name}: list scheduler stalled with ranks {stuck} waiting (internal error)")
        t, rank = heapq.heappop(events)
        if t + _EPS < free_at[rank]:
            continue  # stale: the rank is busy until later
        waiting[rank] = False
        cands = candidates(rank)
        if not cands:
            waiting[rank] = True
            continue
        now = max(t, free_at[rank])
        ready_now = [c for c in cands if c[1] <= now + _EPS]
        if not ready_now:
            # Nothing to do yet; wake up when the earliest known input arrives (or earlier if another commit
            # makes something visible).
            waiting[rank] = True
            heapq.heappush(events, (min(c[1] for c in cands), rank))
            continue
        best = min(ready_now, key=lambda c: (c[0], c[2]))
        if policy.fill_only_if_fits:
            sooner = [c for c in cands if c[0] < best[0] and c[1] > now + _EPS]
            if sooner:
                arrival = min(c[1] for c in sooner)
                if now + costs.duration(best[3]) > arrival + _EPS:
                    waiting[rank] = True
                    heapq.heappush(events, (arrival, rank))
                    continue
        end = commit(rank, best[3], now)
        heapq.heappush(events, (end, rank))
        # A commit can make actions visible to ranks that were waiting on nothing known.
        for r in range(pp):
            if waiting[r] and r != rank:
                waiting[r] = False
                heapq.heappush(events, (max(now, free_at[r]), r))
    return Schedule(name, shape, tuple(tuple(p) for p in programs))


def memory_cap(shape: PipelineShape, costs: CostModel, microbatches_per_rank: float) -> tuple[float, ...]:
    """Per-rank memory cap worth ``microbatches_per_rank`` micro-batches' activations on that rank, never below
    one micro-batch (the least any schedule needs). A fractional count is rounded down to whole chunk activations
    of the rank's heaviest chunk; a whole count is taken as it is: rounding ``pp`` micro-batches down to multiples
    of the heaviest chunk took a quarter of zb-v's budget from a rank whose two chunks differ 3:1 (8 -> 6 units),
    which starved the rebuild from measured memory."""
    caps = []
    for r in range(shape.pp):
        stages = shape.stages_of(r)
        per_chunk = max(costs.activation_memory[s] for s in stages)
        footprint = rank_footprint(shape, costs, r)
        budget = microbatches_per_rank * footprint
        if per_chunk > 0 and not float(microbatches_per_rank).is_integer():
            budget = math.floor(budget / per_chunk + _EPS) * per_chunk
        caps.append(max(budget, footprint))
    return tuple(caps)


ZERO_BUBBLE_POLICY = GreedyPolicy(backward_first=True, weight="lazy", fill_only_if_fits=True, forward_deepest_first=True)
"""Main knobs of the handcrafted zero-bubble family (ZB-H1/H2, ZB-V): I first, forwards as memory allows, W only
into gaps it fits."""


def policy_variants(shape: PipelineShape, memory_limit: tuple[float, ...]) -> list[GreedyPolicy]:
    """Every combination of the list scheduler's knobs under ``memory_limit`` (per rank): I or F first, lazy or
    eager W, waiting for the critical path or filling, deepest or newest forward first, 1F1B's warm-up depth or
    a free one (32 policies; what ``auto`` and :func:`zero_bubble_schedule`'s ``search`` try)."""
    pp = shape.pp
    depths = (None, tuple(pp - r for r in range(pp)))
    return [
        GreedyPolicy(memory_limit=memory_limit, max_in_flight=depth, backward_first=backward_first, weight=weight,
                     fill_only_if_fits=fit, forward_deepest_first=deepest)
        for backward_first, weight, fit, deepest, depth in itertools.product(
            (True, False), ("lazy", "eager"), (True, False), (True, False), depths)
    ]


MICROBATCHES_PER_RANK: dict[str, Callable[[int], int]] = {
    "zb-h1": lambda pp: pp,  # 1F1B's peak
    "zb-h2": lambda pp: 2 * pp - 1,
    "zb-v": lambda pp: pp,  # 1F1B's peak, in 2pp chunk activations
}
"""Memory budget of each handcrafted zero-bubble schedule, in micro-batches' activations per rank, given pp."""


def zero_bubble_schedule(
    name: str, shape: PipelineShape, costs: CostModel, microbatches_per_rank: float, *, search: bool = False
) -> Schedule:
    """Best of a few greedy variants under a budget of ``microbatches_per_rank`` micro-batches per rank.

    Like the reference implementation's initial solution (Zero Bubble PP, sec. 3.2), which tries several
    greedy variants and keeps the shortest: :data:`ZERO_BUBBLE_POLICY`, the same with W's filled greedily, and
    with W right after its I (which wins when pending W's hold so much memory that they starve the forwards).
    ``search``: try every knob combination (:func:`policy_variants`) under the same budget - what a rebuild from
    measured costs uses (``registry.retune``): with costs far from F = I = W (megatron's GPT with unfused
    attention on 2x H200: W a quarter of I) the three variants above left ZB-V's order 5% slower in simulation
    than the best of the 32 (554 vs 529 ms).
    """
    cap = memory_cap(shape, costs, microbatches_per_rank)
    best: tuple[tuple[float, float], Schedule] | None = None
    if search:
        policies = policy_variants(shape, cap)
    else:
        policies = [replace(ZERO_BUBBLE_POLICY, memory_limit=cap, weight=weight, fill_only_if_fits=fit)
                    for weight, fit in (("lazy", True), ("lazy", False), ("eager", True))]
    for policy in policies:
        schedule = list_schedule(name, shape, costs, policy)
        result = simulate(schedule, costs)
        key = (result.makespan, max(result.peak_activation_memory))
        if best is None or key < best[0]:
            best = (key, schedule)
    return best[1]  # type: ignore[index]
