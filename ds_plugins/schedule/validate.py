"""Check that a schedule is complete, ordered, executable and fits a memory cap.

:func:`validate` raises :class:`ScheduleError` (a ``ValueError``) on the first problem it finds. The message
says what is wrong and what to change, followed by the schedule as a step x rank grid (one column per rank,
one row per program step) with the offending cell bracketed and its row marked ``<-- ERROR HERE``, the way
torch.distributed.pipelining reports schedule errors.

Checks, in order:

1. every action names a stage and micro-batch in range, on the rank that holds the stage under the placement;
2. every (stage, micro-batch) has exactly one F and either one B or one I and one W;
3. per stage and micro-batch, F comes before I (or B), and I before W, in the rank's program;
4. the compute actions can all run (cross-stage dependencies, no deadlock), using :func:`simulate`;
5. for a lowered schedule (one with SEND/RECV actions): every cross-rank dependency has exactly one SEND on the
   producer's rank and one RECV on the consumer's rank, placed after the producer and before the consumer;
   and the programs run to their end over an ordered transport: messages between a pair of ranks arrive in
   the order they were sent (NCCL p2p pairs the k-th send with the k-th receive), so a RECV completes only once
   its sender has issued that message and all earlier ones to the same rank; sends never block. With
   ``strict_recv_order`` the RECV actions must also appear in the sender's order;
6. the peak activation memory of every rank (the simulator's accounting) stays within ``memory_limit``.
"""
from __future__ import annotations

from dataclasses import dataclass

from .costs import CostModel
from .ir import Action, ActionKind, Schedule
from .simulate import DeadlockError, dependencies, simulate

__all__ = ["ScheduleError", "validate", "format_grid"]

_F, _B, _I, _W = ActionKind.FORWARD, ActionKind.BACKWARD, ActionKind.BACKWARD_INPUT, ActionKind.BACKWARD_WEIGHT
_SEND_F, _RECV_F, _SEND_B, _RECV_B = ActionKind.SEND_F, ActionKind.RECV_F, ActionKind.SEND_B, ActionKind.RECV_B

_KIND_WORDS = {_F: "forward", _B: "backward", _I: "input-gradient backward", _W: "weight-gradient backward"}
# Rows of grid printed on each side of a marked row when the schedule is long.
_GRID_CONTEXT = 6
# Schedules with at most this many steps are printed whole.
_GRID_FULL_STEPS = 40
# Relative slack on the memory cap, for stage memory that vp division made inexact.
_MEMORY_RTOL = 1e-9


class ScheduleError(ValueError):
    """A schedule is invalid. ``marks`` lists the (rank, step) cells at fault; ``str()`` includes the grid."""

    def __init__(self, problem: str, schedule: Schedule, marks: tuple[tuple[int, int], ...] = ()) -> None:
        self.problem = problem
        """What is wrong and what to change, in one line."""
        self.schedule = schedule
        self.marks = marks
        self.grid = format_grid(schedule, marks)
        """The step x rank grid with the marked cells."""
        super().__init__(f"schedule {schedule.name!r}: {problem}\n{self.grid}")


def format_grid(schedule: Schedule, marks: tuple[tuple[int, int], ...] = ()) -> str:
    """The schedule as a step x rank grid; cells in ``marks`` are bracketed and their rows end in ``<-- ERROR HERE``.

    Long schedules print only the rows near the marks.
    """
    programs = schedule.actions
    num_steps = max((len(p) for p in programs), default=0)
    marked = set(marks)
    marked_steps = sorted({step for _, step in marks})
    cells = [
        [
            (f"[{programs[r][t]}]" if (r, t) in marked else f" {programs[r][t]} ") if t < len(programs[r]) else ""
            for r in range(len(programs))
        ]
        for t in range(num_steps)
    ]
    if num_steps <= _GRID_FULL_STEPS:
        shown_steps = list(range(num_steps))
    elif not marked_steps:
        shown_steps = list(range(_GRID_FULL_STEPS))
    else:
        keep: set[int] = set()
        for t in marked_steps:
            keep.update(range(max(0, t - _GRID_CONTEXT), min(num_steps, t + _GRID_CONTEXT + 1)))
        shown_steps = sorted(keep)
    digits = len(str(max(num_steps - 1, 0)))
    step_width = len("step ") + digits
    widths = [
        max([len(f"rank {r}")] + [len(cells[t][r]) for t in shown_steps]) for r in range(len(programs))
    ]
    lines = [" " * (step_width + 2) + " ".join(f"{f'rank {r}':<{w}}" for r, w in enumerate(widths))]
    previous = -1
    for t in shown_steps:
        if t != previous + 1:
            lines.append(f"{'...':<{step_width}}")
        row = f"step {t:>{digits}}: " + " ".join(f"{cells[t][r]:<{w}}" for r, w in enumerate(widths))
        if t in marked_steps:
            row += " <-- ERROR HERE"
        lines.append(row.rstrip() if t not in marked_steps else row)
        previous = t
    if shown_steps and shown_steps[-1] != num_steps - 1:
        lines.append(f"{'...':<{step_width}}  ({num_steps} steps in all)")
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class _Message:
    """One activation (``"F"``) or gradient (``"B"``) travelling from ``stage`` for ``microbatch``."""

    direction: str
    stage: int
    microbatch: int

    def __str__(self) -> str:
        what = "activation" if self.direction == "F" else "input gradient"
        return f"{what} of stage {self.stage}, micro-batch {self.microbatch}"


def validate(
    schedule: Schedule,
    costs: CostModel | None = None,
    memory_limit: float | None = None,
    *,
    strict_recv_order: bool = False,
) -> None:
    """Raise :class:`ScheduleError` if ``schedule`` is incomplete, misordered, cannot run, or exceeds
    ``memory_limit`` peak activation memory on some rank (memory per ``costs``; unit costs when ``None``).

    Lowered schedules are checked for an ordered (FIFO per pair of ranks) transport whose receives are matched
    in the sender's order, as :mod:`ds_plugins.runtime` posts them. ``strict_recv_order=True`` also requires
    every rank's RECV actions to appear in its peers' send order, for an executor that posts each receive
    exactly at its RECV action on an untagged ordered transport.
    """
    shape = schedule.shape
    if costs is None:
        costs = CostModel.uniform(shape)
    else:
        costs.for_shape(shape)
    if memory_limit is not None and not memory_limit >= 0:
        raise ValueError(f"memory_limit must be a non-negative number, got {memory_limit}")
    _check_placement(schedule)
    positions = _check_compute_complete(schedule)
    _check_stage_order(schedule, positions)
    try:
        result = simulate(schedule, costs)
    except DeadlockError as exc:
        raise _deadlock_error(schedule, exc, positions) from None
    if any(not a.kind.is_compute for prog in schedule.actions for a in prog):
        _check_communication(schedule, positions, strict_recv_order)
    if memory_limit is not None:
        _check_memory(schedule, costs, result.peak_activation_memory, memory_limit)


def _check_placement(schedule: Schedule) -> None:
    shape = schedule.shape
    last = shape.num_stages - 1
    for rank, prog in enumerate(schedule.actions):
        for step, a in enumerate(prog):
            if not 0 <= a.stage <= last:
                raise ScheduleError(
                    f"rank {rank} step {step}: {a} names stage {a.stage}, but the pipeline has stages 0..{last} "
                    f"(pp={shape.pp} x vp={shape.vp}); fix the stage index or the shape",
                    schedule,
                    ((rank, step),),
                )
            if not 0 <= a.microbatch < shape.microbatches:
                raise ScheduleError(
                    f"rank {rank} step {step}: {a} names micro-batch {a.microbatch}, but the step has micro-batches "
                    f"0..{shape.microbatches - 1}; fix the index or raise microbatches",
                    schedule,
                    ((rank, step),),
                )
            owner = shape.rank_of(a.stage)
            if owner != rank:
                raise ScheduleError(
                    f"rank {rank} step {step}: {a} acts on stage {a.stage}, which the {shape.placement!r} placement "
                    f"puts on rank {owner} (rank {rank} holds stages {list(shape.stages_of(rank))}); "
                    f"move it to rank {owner}'s program",
                    schedule,
                    ((rank, step),),
                )
            if a.kind.is_comm:
                peer_stage = a.stage + 1 if a.kind in (_SEND_F, _RECV_B) else a.stage - 1
                if not 0 <= peer_stage <= last:
                    raise ScheduleError(
                        f"rank {rank} step {step}: {a} has no peer: stage {a.stage} is the "
                        f"{'last' if peer_stage > last else 'first'} stage; remove it",
                        schedule,
                        ((rank, step),),
                    )
                if shape.rank_of(peer_stage) == rank:
                    raise ScheduleError(
                        f"rank {rank} step {step}: {a} crosses from stage {a.stage} to stage {peer_stage}, but both "
                        f"are on rank {rank}; the value stays on the rank, remove the {a.kind.value}",
                        schedule,
                        ((rank, step),),
                    )


def _check_compute_complete(schedule: Schedule) -> dict[Action, tuple[int, int]]:
    """Check one F and one B (or one I + one W) per (stage, micro-batch); return each action's (rank, step)."""
    shape = schedule.shape
    positions: dict[Action, tuple[int, int]] = {}
    for rank, prog in enumerate(schedule.actions):
        for step, a in enumerate(prog):
            if a in positions:
                first_rank, first_step = positions[a]
                raise ScheduleError(
                    f"{a} appears twice (rank {first_rank} step {first_step} and rank {rank} step {step}); "
                    "each action runs once per step, delete one",
                    schedule,
                    ((first_rank, first_step), (rank, step)),
                )
            positions[a] = (rank, step)
    for stage in range(shape.num_stages):
        rank = shape.rank_of(stage)
        for mb in range(shape.microbatches):
            f, b, i, w = (Action(stage, k, mb) for k in (_F, _B, _I, _W))
            if f not in positions:
                raise ScheduleError(
                    f"stage {stage} micro-batch {mb} has no forward: add {f} to rank {rank}'s program", schedule
                )
            if b in positions and (i in positions or w in positions):
                split = i if i in positions else w
                raise ScheduleError(
                    f"stage {stage} micro-batch {mb} has both a full backward {b} and a split {split}; "
                    f"use either {b} or {i} + {w}",
                    schedule,
                    (positions[b], positions[split]),
                )
            if b in positions:
                continue
            if i not in positions and w not in positions:
                raise ScheduleError(
                    f"stage {stage} micro-batch {mb} has no backward: add {b} (or {i} and {w}) to rank {rank}'s "
                    "program",
                    schedule,
                )
            if i not in positions:
                raise ScheduleError(
                    f"stage {stage} micro-batch {mb} has {w} but no input-gradient {i}: add {i} before it",
                    schedule,
                    (positions[w],),
                )
            if w not in positions:
                raise ScheduleError(
                    f"stage {stage} micro-batch {mb} has {i} but no weight-gradient {w}: add {w} after it "
                    f"(or replace {i} by {b})",
                    schedule,
                    (positions[i],),
                )
    return positions


def _check_stage_order(schedule: Schedule, positions: dict[Action, tuple[int, int]]) -> None:
    """F before I/B before W for each (stage, micro-batch), in the owning rank's program."""
    for stage in range(schedule.shape.num_stages):
        for mb in range(schedule.shape.microbatches):
            f, b, i, w = (Action(stage, k, mb) for k in (_F, _B, _I, _W))
            chain = [f, b] if b in positions else [f, i, w]
            for earlier, later in zip(chain, chain[1:]):
                (rank, t_early), (_, t_late) = positions[earlier], positions[later]
                if t_late < t_early:
                    raise ScheduleError(
                        f"rank {rank}: {later} (step {t_late}) runs before {earlier} (step {t_early}); "
                        f"the {_KIND_WORDS[later.kind]} of a micro-batch needs its {_KIND_WORDS[earlier.kind]} first: "
                        f"move {later} after {earlier}",
                        schedule,
                        ((rank, t_late), (rank, t_early)),
                    )


def _deadlock_error(
    schedule: Schedule, exc: DeadlockError, positions: dict[Action, tuple[int, int]]
) -> ScheduleError:
    waiting = exc.waiting
    head_step = {rank: positions[action][1] for rank, action in waiting.items()}
    split = schedule.splits_backward
    marks: list[tuple[int, int]] = []
    heads = []
    for rank, action in waiting.items():
        marks.append(positions[action])
        blockers = []
        for dep in dependencies(action, schedule.shape.num_stages, split):
            if dep not in positions:  # mixed B / I+W: the other kind produced it
                dep = Action(dep.stage, _B if dep.kind is _I else _I, dep.microbatch)
            dep_rank, dep_step = positions[dep]
            if dep_rank in head_step and dep_step >= head_step[dep_rank]:
                blockers.append(f"{dep} (rank {dep_rank} step {dep_step})")
                marks.append((dep_rank, dep_step))
        heads.append(f"rank {rank} waits at {action} for {' and '.join(blockers)}")
    return ScheduleError(
        f"deadlock: {'; '.join(heads)}; each awaited action sits behind its own rank's blocked one. Move the "
        "blocked actions after what they wait for, or the awaited ones earlier",
        schedule,
        tuple(dict.fromkeys(marks)),
    )


def _message_of(action: Action) -> _Message:
    """The message a SEND puts on the wire or a RECV takes off it."""
    if action.kind is _SEND_F:
        return _Message("F", action.stage, action.microbatch)
    if action.kind is _RECV_F:
        return _Message("F", action.stage - 1, action.microbatch)
    if action.kind is _SEND_B:
        return _Message("B", action.stage, action.microbatch)
    return _Message("B", action.stage + 1, action.microbatch)  # RECV_B


def _check_communication(
    schedule: Schedule, positions: dict[Action, tuple[int, int]], strict_recv_order: bool
) -> None:
    shape = schedule.shape
    last = shape.num_stages - 1

    def backward_of(stage: int, mb: int) -> Action:
        b = Action(stage, _B, mb)
        return b if b in positions else Action(stage, _I, mb)

    # 1. every cross-rank edge has its SEND after the producer and its RECV before the consumer.
    for stage in range(shape.num_stages):
        for mb in range(shape.microbatches):
            edges = []
            if stage < last and shape.rank_of(stage + 1) != shape.rank_of(stage):
                edges.append((Action(stage, _F, mb), Action(stage, _SEND_F, mb),
                              Action(stage + 1, _RECV_F, mb), Action(stage + 1, _F, mb)))
            if stage > 0 and shape.rank_of(stage - 1) != shape.rank_of(stage):
                edges.append((backward_of(stage, mb), Action(stage, _SEND_B, mb),
                              Action(stage - 1, _RECV_B, mb), backward_of(stage - 1, mb)))
            for producer, send, recv, consumer in edges:
                for comm, rank_of_comm in ((send, shape.rank_of(producer.stage)),
                                           (recv, shape.rank_of(consumer.stage))):
                    if comm not in positions:
                        raise ScheduleError(
                            f"{producer} on rank {shape.rank_of(producer.stage)} feeds {consumer} on rank "
                            f"{shape.rank_of(consumer.stage)}, but the lowered schedule has no {comm}: add it to "
                            f"rank {rank_of_comm}'s program (or lower with add_communication)",
                            schedule,
                            (positions[producer] if comm is send else positions[consumer],),
                        )
                send_rank, send_step = positions[send]
                if send_step < positions[producer][1]:
                    raise ScheduleError(
                        f"rank {send_rank}: {send} (step {send_step}) sends a value that {producer} "
                        f"(step {positions[producer][1]}) has not produced yet; move {send} after {producer}",
                        schedule,
                        ((send_rank, send_step), positions[producer]),
                    )
                recv_rank, recv_step = positions[recv]
                if recv_step > positions[consumer][1]:
                    raise ScheduleError(
                        f"rank {recv_rank}: {consumer} (step {positions[consumer][1]}) runs before {recv} "
                        f"(step {recv_step}) delivers its input; move {recv} before {consumer}",
                        schedule,
                        ((recv_rank, recv_step), positions[consumer]),
                    )

    # 2. per ordered pair of ranks, the messages in the sender's program order.
    sent: dict[tuple[int, int], list[tuple[_Message, int]]] = {}
    received: dict[tuple[int, int], list[tuple[_Message, int]]] = {}
    for rank, prog in enumerate(schedule.actions):
        for step, a in enumerate(prog):
            if a.kind in (_SEND_F, _SEND_B):
                peer = shape.rank_of(a.stage + 1 if a.kind is _SEND_F else a.stage - 1)
                sent.setdefault((rank, peer), []).append((_message_of(a), step))
            elif a.kind in (_RECV_F, _RECV_B):
                peer = shape.rank_of(a.stage - 1 if a.kind is _RECV_F else a.stage + 1)
                received.setdefault((peer, rank), []).append((_message_of(a), step))
    if strict_recv_order:
        for (src, dst), sends in sorted(sent.items()):
            recvs = received.get((src, dst), [])
            for k, ((sent_msg, send_step), (recv_msg, recv_step)) in enumerate(zip(sends, recvs)):
                if sent_msg != recv_msg:
                    raise ScheduleError(
                        f"messages from rank {src} to rank {dst} are received out of order: rank {src}'s send #{k} "
                        f"(step {send_step}) carries the {sent_msg}, but rank {dst}'s receive #{k} from rank {src} "
                        f"(step {recv_step}) expects the {recv_msg}; a transport that pairs the k-th send with the "
                        f"k-th receive (untagged NCCL p2p posted at the RECV actions) would swap them. Make rank "
                        f"{dst} receive in rank {src}'s send order, or rank {src} send in rank {dst}'s receive order",
                        schedule,
                        ((src, send_step), (dst, recv_step)),
                    )

    # 3. Every program runs to its end when sends never block and a RECV completes once its SEND was issued.
    # (A runtime on an ordered transport posts receives in the sender's order, buffering early arrivals; since a
    # rank issues its sends in program order, "this message was sent" implies "all earlier ones were".)
    send_position = {msg: (src, step) for (src, _), sends in sent.items() for msg, step in sends}
    issued: set[_Message] = set()
    heads = [0] * shape.pp
    programs = schedule.actions
    progressed = True
    while progressed:
        progressed = False
        for rank, prog in enumerate(programs):
            while heads[rank] < len(prog):
                a = prog[heads[rank]]
                if a.kind in (_RECV_F, _RECV_B) and _message_of(a) not in issued:
                    break
                if a.kind in (_SEND_F, _SEND_B):
                    issued.add(_message_of(a))
                heads[rank] += 1
                progressed = True
    stuck = [(r, heads[r]) for r in range(shape.pp) if heads[r] < len(programs[r])]
    if stuck:
        waits = []
        marks = list(stuck)
        for r, t in stuck:
            src, send_step = send_position[_message_of(programs[r][t])]
            waits.append(f"rank {r} waits at {programs[r][t]} for the send at rank {src} step {send_step}")
            marks.append((src, send_step))
        raise ScheduleError(
            f"communication deadlock: {'; '.join(waits)}, and each of those senders is itself stuck at an "
            "earlier receive. Post receives later (right before their consumer) or move the sends earlier",
            schedule,
            tuple(dict.fromkeys(marks)),
        )


def _check_memory(
    schedule: Schedule, costs: CostModel, peaks: tuple[float, ...], memory_limit: float
) -> None:
    slack = _MEMORY_RTOL * max(1.0, abs(memory_limit))
    for rank, peak in enumerate(peaks):
        if peak <= memory_limit + slack:
            continue
        # Locate the first step at which the rank goes over the cap (same accounting as simulate).
        held = 0.0
        over_step = 0
        for step, a in enumerate(schedule.actions[rank]):
            held += costs.memory_delta(a)
            if held > memory_limit + slack:
                over_step = step
                break
        in_flight = sum(1 for a in schedule.actions[rank][: over_step + 1] if a.kind is _F) - sum(
            1 for a in schedule.actions[rank][: over_step + 1] if a.kind in (_B, _I)
        )
        raise ScheduleError(
            f"rank {rank} holds {peak:g} activation memory at its peak (first over the cap at step {over_step}, "
            f"{in_flight} forward(s) awaiting backward), above memory_limit={memory_limit:g}; run fewer forwards "
            "ahead of their backwards on this rank, pick a schedule with a lower memory peak, or raise the limit",
            schedule,
            ((rank, over_step),),
        )
