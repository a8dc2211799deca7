"""Event-driven simulation of a schedule under a cost model: makespan, busy/idle time, bubble, peak memory.

Each rank runs its compute actions in program order; an action starts when its rank is free and its
dependencies are done (plus ``comm`` when the dependency ran on another rank):

- F of stage s, micro-batch i: F of stage s-1, micro-batch i.
- I or B of stage s: F of stage s (same rank) and I/B of stage s+1 (the output gradient).
- W of stage s: I of stage s.

SEND/RECV actions of a lowered schedule take no rank time here; the transfer is the ``comm`` edge.
A schedule whose ranks wait on each other in a cycle raises :class:`DeadlockError` with the stuck heads.

Optionally (``host=``) each rank also has a host lane: the rank's host issues its actions one after another, each
taking its host time, and never waits for inputs (NCCL transfers are queued on streams: a host issues kernels that
wait for data on the GPU). An action then starts no earlier than its host starts issuing it and ends no earlier
than its host finishes: ``end = max(start + gpu time, host done)``. A host slower than its GPU delays the GPU; a
host that ran ahead while its GPU waited for data does not. Used to diagnose runs (megatron's local-spec GPT,
whose host issues a forward about as fast as the GPU runs it); the planners do not use it.

:func:`lower_bound` gives, for a shape and a cost model, a makespan that no schedule of that shape can beat
under these rules, whatever its order.
"""
from __future__ import annotations

from dataclasses import dataclass

from .costs import CostModel
from .ir import Action, ActionKind, PipelineShape, Schedule

__all__ = ["DeadlockError", "LowerBound", "TimedAction", "SimulationResult", "simulate", "dependencies", "lower_bound"]

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


def simulate(schedule: Schedule, costs: CostModel, *, host: CostModel | None = None) -> SimulationResult:
    """Run ``schedule`` against ``costs``; raises :class:`DeadlockError` if it cannot finish.

    ``host``: each action's time for its rank's host to issue it (its ``forward`` / ``backward_input`` /
    ``backward_weight`` per stage; its memory figures are not used), simulated as a host lane per rank (module
    docstring). None: hosts are never late. With a host lane an action's start-to-end (its timeline entry, the
    rank's ``busy`` time and so the bubble) includes time its GPU waited for its host inside it."""
    shape = schedule.shape
    costs.for_shape(shape)
    if host is not None:
        host.for_shape(shape)
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
    host_time = [0.0] * shape.pp  # per rank: when its host has issued every action so far
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
                duration = costs.duration(action)
                if host is None:
                    end = ready + duration
                else:  # no earlier than its host starts issuing it, no end before its host has issued it
                    issued = host_time[rank] + host.duration(action)
                    ready = max(ready, host_time[rank])
                    end = max(ready + duration, issued)
                    host_time[rank] = issued
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


@dataclass(frozen=True, slots=True)
class LowerBound:
    """What :func:`lower_bound` proves: no schedule of :attr:`shape` runs faster than :attr:`makespan`."""

    makespan: float
    """The bound: ``max(per_rank + (critical_path,))``."""
    rank: int | None
    """The rank whose own work binds (the lowest such rank on a tie), or None when :attr:`critical_path` is
    longer than every rank's bound."""
    start: float
    """The binding rank's earliest possible first action: the forwards of the stages before its first stage, one
    ``comm`` per rank change along that chain. 0 when :attr:`rank` is None."""
    work: float
    """The binding rank's compute over all micro-batches (F + I + W of its stages, times ``microbatches``); when
    :attr:`rank` is None, the critical path itself."""
    drain: float
    """Time that must follow the binding rank's last backward beyond its own work (see :func:`lower_bound`);
    ``makespan == start + work + drain`` when :attr:`rank` is not None, 0 otherwise."""
    critical_path: float
    """One micro-batch's chain: every F, every I (or B), W of stage 0, and ``comm`` per rank change both ways."""
    per_rank: tuple[float, ...]
    """Each rank's bound: start + work + drain."""
    split_backward: bool
    """True: a bound on every order (backward split into I and W or not); False: on orders with a full backward B
    only (a higher bound where W cannot fill bubbles)."""
    shape: PipelineShape

    def describe(self, *, scale: float = 1.0, unit: str = "") -> str:
        """One line for logs, times multiplied by ``scale`` and suffixed by ``unit`` (e.g. ``1e3, " ms"`` for a
        cost model in seconds)."""
        shape = self.shape

        def t(x: float) -> str:
            return _num(x * scale) + unit

        orders = f"no {shape.placement} order (pp={shape.pp}, vp={shape.vp}, m={shape.microbatches}"
        orders += ")" if self.split_backward else ", full backward B)"
        if self.rank is None:
            return f"{orders} can beat {t(self.makespan)} (one micro-batch's critical path binds)"
        why = f"rank {self.rank}: starts at {t(self.start)}, works {t(self.work)}"
        if self.drain > 0:
            why += f", then at least {t(self.drain)} beyond its own work after its last backward"
        return f"{orders} can beat {t(self.makespan)} ({why})"

    def __str__(self) -> str:
        return self.describe()

    def as_dict(self) -> dict:
        """JSON-friendly fields (the shape as placement and vp)."""
        return {
            "makespan": self.makespan,
            "rank": self.rank,
            "start": self.start,
            "work": self.work,
            "drain": self.drain,
            "critical_path": self.critical_path,
            "per_rank": list(self.per_rank),
            "split_backward": self.split_backward,
            "placement": self.shape.placement,
            "vp": self.shape.vp,
        }


def lower_bound(shape: PipelineShape, costs: CostModel, *, split_backward: bool = True) -> LowerBound:
    """A makespan no schedule of ``shape`` can beat under ``costs`` and :func:`simulate`'s rules, whatever its order
    (and whatever memory cap it keeps: a cap only removes orders).

    The first action of any schedule is an F of stage 0 at time 0 (nothing else can run first), so the makespan
    is the last action's end. The bound is the largest of:

    - per rank r, ``start + work + drain``. ``start``: every action of r waits (through its own stage's F) for
      F of r's first stage s0, which waits for F of stages 0..s0-1, plus ``comm`` per rank change along that chain.
      ``work``: r runs its actions one at a time, F + I + W of each of its stages per micro-batch (B = I + W).
      ``drain``: let T be the end of r's last I (or B). Every F, I and B of r ran before T (an F precedes its own
      I/B on r), with the W's r ran before T; after T come r's remaining W's, and, in parallel, the rest of
      that micro-batch's backward: I (or B) of every stage below, W of stage 0, ``comm`` per rank change. So
      makespan >= start + work + max(0, tail - W's of r over all micro-batches), tail the shortest such chain
      over r's stages (the last I may be of any of them). With ``split_backward=False`` r has no W actions and
      the drain is the whole tail (B of every stage below): for 1F1B at uniform costs and comm 0 this is its
      makespan.
    - the critical path of one micro-batch: F of every stage, then I (B) of every stage back, then W of stage 0,
      plus ``comm`` per rank change forward and backward.

    Left out, because no proof covers them here: any interaction between ranks beyond these chains (a rank that
    must idle while another works, e.g. a middle rank's gaps when W cannot fill them), memory caps (they only make
    the bound looser, never wrong), and everything :func:`simulate` does not model (overlap of transfers with
    compute, contention) or models only on request (host issue time, ``host=``: it only lengthens a step, so the
    bound holds under it too).

    ``split_backward=True`` bounds every order, split or not; ``False`` bounds orders with a full backward B only,
    which is higher where W would have filled the start or the drain.
    """
    costs.for_shape(shape)
    n, m = shape.num_stages, shape.microbatches
    fwd, inp, wgt, comm = costs.forward, costs.backward_input, costs.backward_weight, costs.comm
    head = [0.0] * n  # earliest start of F(s): forwards of stages < s and their transfers
    tail = [0.0] * n  # what must follow the end of I/B(s): backward of stages < s, W(0) when split, transfers
    forward_sum = backward_sum = 0.0
    hops = 0
    for s in range(1, n):
        forward_sum += fwd[s - 1]
        backward_sum += inp[s - 1] + (0.0 if split_backward else wgt[s - 1])
        hops += shape.rank_of(s) != shape.rank_of(s - 1)
        head[s] = forward_sum + comm * hops
        tail[s] = backward_sum + comm * hops
    if split_backward:
        tail = [t + wgt[0] for t in tail]  # W(0) waits for I(0); it is the last action of that micro-batch
    critical_path = sum(fwd) + sum(inp) + (wgt[0] if split_backward else sum(wgt)) + 2 * comm * hops

    per_rank, parts = [], []
    for r in range(shape.pp):
        stages = shape.stages_of(r)
        start = min(head[s] for s in stages)
        work = costs.rank_compute_time(shape, r)
        after_last_backward = min(tail[s] for s in stages)
        if split_backward:  # the rank's W's can run after its last I, alongside that chain
            drain = max(0.0, after_last_backward - m * sum(wgt[s] for s in stages))
        else:
            drain = after_last_backward
        per_rank.append(start + work + drain)
        parts.append((start, work, drain))
    best = max(range(shape.pp), key=lambda r: (per_rank[r], -r))
    if critical_path > per_rank[best] * (1 + 1e-12):
        return LowerBound(critical_path, None, 0.0, critical_path, 0.0, critical_path, tuple(per_rank),
                          split_backward, shape)
    start, work, drain = parts[best]
    return LowerBound(per_rank[best], best, start, work, drain, critical_path, tuple(per_rank), split_backward,
                      shape)


def _num(x: float) -> str:
    """A time for a log line: 4 significant digits, no exponent below 10^4."""
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.0f}"
