"""Event-driven simulation of a schedule under a cost model: makespan, busy/idle time, bubble, peak memory.

Each rank runs its compute actions in program order; an action starts when its rank is free and its
dependencies are done (plus ``comm`` when the dependency ran on another rank):

- F of stage s, micro-batch i: F of stage s-1, micro-batch i.
- I or B of stage s: F of stage s (same rank) and I/B of stage s+1 (the output gradient).
- W of stage s: I of stage s.

SEND/RECV actions of a lowered schedule take no rank time here; the transfer is the ``comm`` edge.
A schedule whose ranks wait on each other in a cycle raises :class:`DeadlockError` with the stuck heads.
"""
from __future__ import annotations

from dataclasses import dataclass

from .costs import CostModel
from .ir import Action, ActionKind, Schedule

__all__ = ["DeadlockError", "TimedAction", "SimulationResult", "simulate", "dependencies"]

_F, _B, _I, _W = ActionKind.FORWARD, ActionKind.BACKWARD, ActionKind.BACKWARD_INPUT, ActionKind.BACKWARD_WEIGHT


class DeadlockError(RuntimeError):
    """The schedule cannot make progress: every rank waits on an action that never runs before it.

    ``waiting`` maps each unfinished rank to the compute action it is stuck at.
    """

    def __init__(self, message: str, waiting: dict[int, Action] | None = None) -> None:
        super().__init__(message)
        self.waiting: dict[int, Action] = dict(waiting or {})


@dataclass(frozen=True, slots=True)
class TimedAction:
    rank: int
    action: Action
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class SimulationResult:
    makespan: float
    """Time from the first action's start to the last action's end."""
    busy: tuple[float, ...]
    """Per rank: time spent computing."""
    peak_activation_memory: tuple[float, ...]
    """Per rank: highest activation memory held (F allocates at its start; I, W, B free at their end)."""
    timeline: tuple[tuple[TimedAction, ...], ...]
    """Per rank: its compute actions with start and end times."""

    @property
    def idle(self) -> tuple[float, ...]:
        return tuple(self.makespan - b for b in self.busy)

    @property
    def bubble_fraction(self) -> float:
        """1 - (sum of busy time) / (ranks * makespan)."""
        if self.makespan <= 0:
            return 0.0
        return 1.0 - sum(self.busy) / (len(self.busy) * self.makespan)


def dependencies(action: Action, num_stages: int, split_backward: bool) -> tuple[Action, ...]:
    """Actions that must finish before ``action`` may start (compute actions only).

    ``split_backward`` says how stage s+1 produced its input gradient: by I (split) or by B (full backward).
    """
    s, k, i = action.stage, action.kind, action.microbatch
    if k is _F:
        return (Action(s - 1, _F, i),) if s > 0 else ()
    if k in (_I, _B):
        deps = [Action(s, _F, i)]
        if s + 1 < num_stages:
            deps.append(Action(s + 1, _I if split_backward else _B, i))
        return tuple(deps)
    if k is _W:
        return (Action(s, _I, i),)
    return ()


def simulate(schedule: Schedule, costs: CostModel) -> SimulationResult:
    """Run ``schedule`` against ``costs``; raises :class:`DeadlockError` if it cannot finish."""
    shape = schedule.shape
    costs.for_shape(shape)
    programs = [[a for a in prog if a.kind.is_compute] for prog in schedule.actions]
    # Which kind produced each stage's input gradient, per (stage, micro-batch): I when split, else B.
    grad_producer: dict[tuple[int, int], ActionKind] = {}
    for prog in programs:
        for a in prog:
            if a.kind in (_I, _B):
                grad_producer[(a.stage, a.microbatch)] = a.kind
    finished: dict[Action, tuple[int, float]] = {}  # action -> (rank, end time)
    heads = [0] * shape.pp
    rank_time = [0.0] * shape.pp
    timeline: list[list[TimedAction]] = [[] for _ in range(shape.pp)]
    remaining = sum(len(p) for p in programs)
    while remaining:
        progressed = False
        for rank, prog in enumerate(programs):
            while heads[rank] < len(prog):
                action = prog[heads[rank]]
                ready = rank_time[rank]
                blocked = False
                for dep in _deps(action, shape.num_stages, grad_producer):
                    done = finished.get(dep)
                    if done is None:
                        blocked = True
                        break
                    dep_rank, dep_end = done
                    ready = max(ready, dep_end + (costs.comm if dep_rank != rank else 0.0))
                if blocked:
                    break
                end = ready + costs.duration(action)
                finished[action] = (rank, end)
                timeline[rank].append(TimedAction(rank, action, ready, end))
                rank_time[rank] = end
                heads[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            waiting = {r: programs[r][heads[r]] for r in range(shape.pp) if heads[r] < len(programs[r])}
            stuck = ", ".join(f"rank {r} waits at {a}" for r, a in waiting.items())
            raise DeadlockError(f"schedule {schedule.name!r} deadlocks: {stuck}", waiting)
    starts = [t.start for tl in timeline for t in tl]
    makespan = (max(rank_time) - min(starts)) if starts else 0.0
    busy = tuple(sum(t.end - t.start for t in tl) for tl in timeline)
    peaks = []
    for prog in programs:
        mem = peak = 0.0
        for a in prog:
            mem += costs.memory_delta(a)
            peak = max(peak, mem)
        peaks.append(peak)
    return SimulationResult(
        makespan=makespan,
        busy=busy,
        peak_activation_memory=tuple(peaks),
        timeline=tuple(tuple(tl) for tl in timeline),
    )


def _deps(action: Action, num_stages: int, grad_producer: dict[tuple[int, int], ActionKind]) -> tuple[Action, ...]:
    s, k, i = action.stage, action.kind, action.microbatch
    if k in (_I, _B) and s + 1 < num_stages:
        producer = grad_producer.get((s + 1, i), _B)
        return (Action(s, _F, i), Action(s + 1, producer, i))
    return dependencies(action, num_stages, split_backward=False)
