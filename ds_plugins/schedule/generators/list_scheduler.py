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

For a search over memory limits (``auto``), :func:`greedy_run` also reports the run's makespan and peak (what
the simulator reports for its schedule), the range of limits that give the same run (the limit only enters
through "need <= limit" tests), and can give up once the schedule cannot end by a given time.
"""
from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Literal

from ..costs import CostModel
from ..ir import Action, ActionKind, PipelineShape, Schedule

__all__ = ["BUDGET_STEPS_PER_MICROBATCH", "GreedyPolicy", "MICROBATCHES_PER_RANK", "ZERO_BUBBLE_POLICY",
           "GreedyRun", "budget_descent", "greedy_run", "list_schedule", "memory_cap", "memory_tolerance",
           "policy_variants", "rank_footprint", "zero_bubble_schedule"]

_F, _I, _W = ActionKind.FORWARD, ActionKind.BACKWARD_INPUT, ActionKind.BACKWARD_WEIGHT
_EPS = 1e-9


def memory_tolerance(scale: float) -> float:
    """Slack for comparing memory amounts of magnitude ``scale``: 1e-9 in small units (GiB, the uniform model's
    1 per micro-batch), relative in bytes, where a sum of chunk sizes in another order differs by a few ulps
    (~1e-7 at 1e9) and a budget of exactly one micro-batch's footprint then turned its first forward down."""
    return max(_EPS, 1e-12 * abs(scale))


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
    return greedy_run(name, shape, costs, policy).schedule


@dataclass(frozen=True, slots=True)
class GreedyRun:
    """One run of the list scheduler: its schedule, what :func:`~ds_plugins.schedule.simulate.simulate` reports for
    it (the run computes the same times and memory), and the memory limits that give the same run."""

    schedule: Schedule | None
    """None when the run gave up (``give_up_at``): it could no longer end by that time."""
    makespan: float
    """The last action's end (the first starts at 0): ``simulate(schedule, costs).makespan``; ``inf`` when the
    run gave up."""
    peak_activation_memory: tuple[float, ...]
    """Per rank, the highest memory in program order: ``simulate(...).peak_activation_memory``."""
    low: float
    high: float
    """The run sees its memory limit only through tests "this forward's need <= limit (+ a tolerance,
    :func:`memory_tolerance`)" (``safe_forward`` below). ``low`` is the largest need among the forwards it took,
    ``high`` the smallest among those it turned down (each minus the tolerance): with every rank's limit in
    ``[low, high)`` each test comes out the same, so the run, and the schedule, is the same. A limit below ``low``
    turns down a forward this run took (a different run, maybe a faster one: see ``auto``); at or above ``high`` it
    takes one this run turned down.
    ``low`` is at least one micro-batch's footprint on the fullest rank (the first F there); ``high`` is ``inf``
    when nothing was turned down for memory. Without a memory limit: ``low = 0``, ``high = inf``. When the run
    gave up, both describe the part it ran: every limit in ``[low, high)`` runs that same part, and gives up too."""


def greedy_run(
    name: str, shape: PipelineShape, costs: CostModel, policy: GreedyPolicy, *, give_up_at: float = math.inf
) -> GreedyRun:
    """:func:`list_schedule` with its makespan, peak memory and range of memory limits (:class:`GreedyRun`).

    ``give_up_at``: stop as soon as the schedule cannot end by this time (some rank's free time plus its work
    still to place passes it) and return a run without a schedule: a search that already holds a schedule this
    fast skips the rest of a run that cannot beat it."""
    costs.for_shape(shape)
    pp, m, n = shape.pp, shape.microbatches, shape.num_stages
    limits = policy.memory_limit
    footprint = [rank_footprint(shape, costs, r) for r in range(pp)]
    mtol = memory_tolerance(max(footprint, default=0.0))
    if limits is not None:
        if len(limits) != pp:
            raise ValueError(f"memory_limit has {len(limits)} entries for pp={pp}; give one per rank")
        for r in range(pp):
            need = footprint[r]
            if limits[r] + mtol < need:
                raise ValueError(
                    f"{name}: memory limit {limits[r]:g} on rank {r} cannot hold one micro-batch ({need:g}); "
                    f"raise memory_limit to at least {need:g}"
                )
    in_flight_cap = policy.max_in_flight or (m,) * pp
    stages_of = [shape.stages_of(r) for r in range(pp)]
    first_stage = [st[0] for st in stages_of]
    chunks = [len(st) for st in stages_of]
    rank_of = [shape.rank_of(s) for s in range(n)]
    comm = costs.comm
    # Per kind (0 = F, 1 = I, 2 = W), per stage: duration and change in the rank's memory (CostModel.duration
    # and CostModel.memory_delta, looked up once: auto runs the scheduler hundreds of times per call).
    act = costs.activation_memory
    duration = (costs.forward, costs.backward_input, costs.backward_weight)
    delta_of = (tuple(act), tuple(costs.memory_delta(Action(s, _I, 0)) for s in range(n)),
                tuple(-x for x in costs.weight_grad_memory))
    kinds = (_F, _I, _W)
    f_cat, i_cat = (1, 0) if policy.backward_first else (0, 1)
    w_cat = -1 if policy.weight == "eager" else 2
    deepest_first = policy.forward_deepest_first

    # Per stage: next micro-batch to run F / I on (both in micro-batch order); per rank: FIFO of (stage, mb, I's
    # end) of W's to run.
    next_f = [0] * n
    next_i = [0] * n
    pending_w: list[list[tuple[int, int, float]]] = [[] for _ in range(pp)]
    # Arrival time of each action's inputs on its own rank, known once every dependency is committed.
    f_arrival: dict[tuple[int, int], float] = {}
    i_parts: dict[tuple[int, int], list] = {}  # (stage, mb) -> [dependencies arrived, latest arrival]
    i_ready: dict[tuple[int, int], float] = {}  # (stage, mb) -> arrival of I's last input

    mem = [0.0] * pp  # current memory in program order
    peak = [0.0] * pp
    # Per rank, per admitted micro-batch still holding memory or with forwards to run: [held, still to allocate].
    live: list[dict[int, list[float]]] = [{} for _ in range(pp)]
    backward_done = [[0] * m for _ in range(pp)]  # per rank, per micro-batch: I's done
    in_flight = [0] * pp
    free_at = [0.0] * pp
    programs: list[list[Action]] = [[] for _ in range(pp)]
    remaining = 3 * n * m
    work_left = [costs.rank_compute_time(shape, r) for r in range(pp)]  # per rank: F + I + W still to place
    floor, ceiling = 0.0, math.inf  # largest need taken, smallest need turned down (see the docstring)

    for mb in range(m):
        f_arrival[(0, mb)] = 0.0

    def i_input(stage: int, mb: int, arrival: float) -> None:
        """One of I(stage, mb)'s inputs (its F; the input gradient from the stage above) arrives."""
        parts = i_parts.get((stage, mb))
        if parts is None:
            parts = i_parts[(stage, mb)] = [0, arrival]
        parts[0] += 1
        if arrival > parts[1]:
            parts[1] = arrival
        if parts[0] == (2 if stage + 1 < n else 1):
            i_ready[(stage, mb)] = parts[1]

    def commit(rank: int, kind: int, s: int, mb: int, start: float) -> float:
        nonlocal remaining
        end = start + duration[kind][s]
        work_left[rank] -= duration[kind][s]
        programs[rank].append(Action(s, kinds[kind], mb))
        free_at[rank] = end
        remaining -= 1
        delta = delta_of[kind][s]
        mem[rank] += delta
        if mem[rank] > peak[rank]:
            peak[rank] = mem[rank]
        if kind == 0 and s == first_stage[rank]:
            in_flight[rank] += 1
            live[rank][mb] = [0.0, footprint[rank]]
        entry = live[rank].setdefault(mb, [0.0, 0.0])
        entry[0] += delta
        if kind == 0:
            entry[1] -= act[s]
        if entry[0] <= mtol and entry[1] <= mtol:
            del live[rank][mb]
        if kind == 0:
            next_f[s] += 1
            if s + 1 < n:
                f_arrival[(s + 1, mb)] = end + (comm if rank_of[s + 1] != rank else 0.0)
            i_input(s, mb, end)
        elif kind == 1:
            next_i[s] += 1
            backward_done[rank][mb] += 1
            if backward_done[rank][mb] == chunks[rank]:
                in_flight[rank] -= 1
            if s > 0:
                i_input(s - 1, mb, end + (comm if rank_of[s - 1] != rank else 0.0))
            pending_w[rank].append((s, mb, end))
        else:
            pending_w[rank].pop(0)
        return end

    def safe_forward(rank: int, stage: int, mb: int) -> bool:
        """Would running F(stage, mb) on ``rank`` keep every admitted micro-batch able to finish in order?"""
        nonlocal floor, ceiling
        a = act[stage]
        after = mem[rank] + a
        older_held = 0.0
        entries = sorted(live[rank].items())
        if mb not in live[rank]:
            entries.append((mb, [0.0, footprint[rank]]))
        need = 0.0  # the least limit under which this forward is safe
        for j, (held, to_allocate) in entries:
            if j == mb:
                held, to_allocate = held + a, to_allocate - a
            need = max(need, after - older_held + to_allocate)
            older_held += held
        if need > limits[rank] + mtol:
            ceiling = min(ceiling, need)
            return False
        floor = max(floor, need)
        return True

    def candidates(rank: int) -> list[tuple[int, float, tuple, int, int, int]]:
        """(category, ready time, tie-break key, kind, stage, mb); category 0 is the most important."""
        out = []
        for s in stages_of[rank]:
            mb = next_f[s]
            if mb < m:
                ready = f_arrival.get((s, mb))
                capped = s == first_stage[rank] and in_flight[rank] >= in_flight_cap[rank]
                if ready is not None and not capped and (limits is None or safe_forward(rank, s, mb)):
                    out.append((f_cat, ready, (-s if deepest_first else s, mb), 0, s, mb))
            mb = next_i[s]
            if mb < m and next_f[s] > mb:
                ready = i_ready.get((s, mb))
                if ready is not None:
                    out.append((i_cat, ready, (mb, -s), 1, s, mb))
        if pending_w[rank]:
            s, mb, ready = pending_w[rank][0]
            out.append((w_cat, ready, (0,), 2, s, mb))
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
        best = None
        for c in cands:
            if c[1] <= now + _EPS and (best is None or (c[0], c[2]) < (best[0], best[2])):
                best = c
        if best is None:
            # Nothing to do yet; wake up when the earliest known input arrives (or earlier if another commit
            # makes something visible).
            waiting[rank] = True
            heapq.heappush(events, (min(c[1] for c in cands), rank))
            continue
        if policy.fill_only_if_fits:
            sooner = [c[1] for c in cands if c[0] < best[0] and c[1] > now + _EPS]
            if sooner:
                arrival = min(sooner)
                if now + duration[best[3]][best[4]] > arrival + _EPS:
                    waiting[rank] = True
                    heapq.heappush(events, (arrival, rank))
                    continue
        end = commit(rank, best[3], best[4], best[5], now)
        if give_up_at < math.inf and remaining and max(
            max(now, free_at[r]) + work_left[r] for r in range(pp)
        ) > give_up_at + _EPS:
            # No action starts before ``now`` (events come in time order), and a rank runs one at a time.
            return GreedyRun(None, math.inf, tuple(peak), floor - mtol, ceiling - mtol)
        heapq.heappush(events, (end, rank))
        # A commit can make actions visible to ranks that were waiting on nothing known.
        for r in range(pp):
            if waiting[r] and r != rank:
                waiting[r] = False
                heapq.heappush(events, (max(now, free_at[r]), r))
    schedule = Schedule(name, shape, tuple(tuple(p) for p in programs))
    if limits is None:
        floor, ceiling = mtol, math.inf
    return GreedyRun(schedule, max(free_at), tuple(peak), floor - mtol, ceiling - mtol)


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


BUDGET_STEPS_PER_MICROBATCH = 16
"""Budget searches (:func:`budget_descent`) step through multiples of one micro-batch's footprint on the fullest
rank divided by this. 16: at pp=4 with measured Megatron costs, 8 missed runs the search before budgets below
the cap found (``auto``: 297.8 instead of 294.6 ms under 18.24 GiB); the search's time grows with it."""


def grid_point_below(x: float, step: float) -> float:
    """The largest multiple of ``step`` strictly below ``x``."""
    k = math.ceil(x / step) - 1
    while k * step >= x:
        k -= 1
    while (k + 1) * step < x:
        k += 1
    return k * step


def grid_point_at_or_above(x: float, step: float) -> float:
    """The smallest multiple of ``step`` at or above ``x``."""
    k = round(grid_point_below(x, step) / step) + 1
    return k * step


def budget_descent(
    name: str, shape: PipelineShape, costs: CostModel, cap: tuple[float, ...], *,
    give_up_at: Callable[[], float] = lambda: math.inf, stop: Callable[[], bool] = lambda: False,
) -> Iterator[tuple[GreedyPolicy, float, GreedyRun]]:
    """Greedy runs of every knob combination (:func:`policy_variants`) under ``cap`` and under tighter budgets:
    yields ``(policy, budget, run)`` for runs under the per-rank limits ``min(cap[r], budget)``.

    Why budgets below the cap: the greedy scheduler spends its budget on early forwards, and a looser budget can
    make a greedier start that ends worse (measured Megatron costs, pp=4, vp=2, m=8: ``auto``'s looped orders
    under 22 GiB simulated 277.5 ms, under 26 GiB 287.1 ms; a zb-v rebuild at its own cap 305.3 ms, at a budget
    below it 278.7 ms). Each policy starts at ``max(cap)`` and descends through the grid of multiples of one
    micro-batch's footprint on the fullest rank / :data:`BUDGET_STEPS_PER_MICROBATCH`, the policies taking
    turns (the runs under the cap come first, and the best of them lets later runs give up early,
    ``give_up_at()``); after each run it jumps to the grid point below the run's range of budgets
    (:attr:`GreedyRun.low`: every budget in between gives the same run), down to the least budget that holds one
    micro-batch. ``stop()`` is asked before each round of the policies (e.g. once the best found reaches
    :func:`~ds_plugins.schedule.simulate.lower_bound`)."""
    footprint = max(rank_footprint(shape, costs, r) for r in range(shape.pp))
    mtol = memory_tolerance(max(max(cap), footprint))
    step = footprint / BUDGET_STEPS_PER_MICROBATCH
    descents = [[policy, max(cap)] for policy in policy_variants(shape, cap)]
    while descents and not stop():
        for descent in descents:
            policy, budget = descent
            limits = tuple(min(c, budget) for c in cap)
            run = greedy_run(name, shape, costs, replace(policy, memory_limit=limits), give_up_at=give_up_at())
            yield policy, budget, run
            # the budgets in between give this same run; strictly below this budget, so the descent ends
            descent[1] = min(grid_point_below(run.low, step), grid_point_below(budget, step))
        descents = [d for d in descents if d[1] + mtol >= footprint]


def zero_bubble_schedule(
    name: str, shape: PipelineShape, costs: CostModel, microbatches_per_rank: float, *, search: bool = False,
    cap: tuple[float, ...] | None = None,
) -> Schedule:
    """Best of a few greedy variants under a budget of ``microbatches_per_rank`` micro-batches per rank.

    Like the reference implementation's initial solution (Zero Bubble PP, sec. 3.2), which tries several
    greedy variants and keeps the shortest: :data:`ZERO_BUBBLE_POLICY`, the same with W's filled greedily, and
    with W right after its I (which wins when pending W's hold so much memory that they starve the forwards).
    ``search``: every knob combination (:func:`policy_variants`), under the budget and under tighter ones
    (:func:`budget_descent`) - what a rebuild from measured costs uses (``registry.retune``). With costs far from
    F = I = W (megatron's GPT with unfused attention on 2x H200: W a quarter of I) the three variants above left
    ZB-V's order 5% slower in simulation than the best of the 32 (554 vs 529 ms); at pp=4 (4x H200) the best of
    the 32 under the budget itself simulated 305.3 ms where a tighter budget gave 278.7 ms. ``cap``: per-rank
    memory limit to use instead of the budget's (``registry.retune`` lowers the budget to what the running order
    holds on its fullest rank, + 1%).
    """
    if cap is None:
        cap = memory_cap(shape, costs, microbatches_per_rank)
    best: tuple[tuple[float, float], Schedule] | None = None
    if search:
        runs = (run for _, _, run in budget_descent(
            name, shape, costs, cap, give_up_at=lambda: math.inf if best is None else best[0][0]))
    else:
        runs = (greedy_run(name, shape, costs, replace(ZERO_BUBBLE_POLICY, memory_limit=cap, weight=weight,
                                                       fill_only_if_fits=fit))
                for weight, fit in (("lazy", True), ("lazy", False), ("eager", True)))
    for run in runs:  # a run's makespan and peak are what simulate() reports
        if run.schedule is None:  # gave up: it could not beat the best
            continue
        key = (run.makespan, max(run.peak_activation_memory))
        if best is None or key < best[0]:
            best = (key, run.schedule)
    return best[1]  # type: ignore[index]
