"""Lowering passes over a :class:`~ds_plugins.schedule.ir.Schedule`.

- :func:`add_communication` inserts SEND/RECV actions wherever a dependency crosses ranks under the schedule's
  placement: ``RECV_F`` right before the F that consumes an activation, ``SEND_F`` right after the F that
  produces one; ``RECV_B`` before the I/B that consumes an output gradient, ``SEND_B`` after the I/B that
  produces an input gradient. The runtime posts receives early; the order here is the order of use.
- :func:`merge_backward` turns an I immediately followed by the W of the same stage and micro-batch into B.
- :func:`strip_communication` drops SEND/RECV actions (the inverse of :func:`add_communication`).
- :func:`serialize` reorders a schedule into one micro-batch at a time through every stage (the order the
  runtime uses for its kernel-loading first step on CUDA, see :mod:`ds_plugins.runtime.executor`).
"""
from __future__ import annotations

from .ir import Action, ActionKind, Schedule

__all__ = ["add_communication", "merge_backward", "serialize", "strip_communication"]

_F, _B, _I, _W = ActionKind.FORWARD, ActionKind.BACKWARD, ActionKind.BACKWARD_INPUT, ActionKind.BACKWARD_WEIGHT


def add_communication(schedule: Schedule) -> Schedule:
    """Return ``schedule`` with the SEND/RECV pairs its placement needs (idempotent)."""
    shape = schedule.shape
    last = shape.num_stages - 1
    lowered = []
    for rank, prog in enumerate(schedule.actions):
        out: list[Action] = []
        for a in prog:
            if not a.kind.is_compute:
                continue
            s, i = a.stage, a.microbatch
            if a.kind is _F:
                if s > 0 and shape.rank_of(s - 1) != rank:
                    out.append(Action(s, ActionKind.RECV_F, i))
                out.append(a)
                if s < last and shape.rank_of(s + 1) != rank:
                    out.append(Action(s, ActionKind.SEND_F, i))
            elif a.kind in (_I, _B):
                if s < last and shape.rank_of(s + 1) != rank:
                    out.append(Action(s, ActionKind.RECV_B, i))
                out.append(a)
                if s > 0 and shape.rank_of(s - 1) != rank:
                    out.append(Action(s, ActionKind.SEND_B, i))
            else:
                out.append(a)
        lowered.append(tuple(out))
    return Schedule(schedule.name, shape, tuple(lowered))


def strip_communication(schedule: Schedule) -> Schedule:
    """Return ``schedule`` with only its compute actions."""
    return Schedule(
        schedule.name, schedule.shape, tuple(tuple(a for a in prog if a.kind.is_compute) for prog in schedule.actions)
    )


def merge_backward(schedule: Schedule) -> Schedule:
    """Merge each I directly followed (among compute actions) by its own W into one B."""
    merged = []
    for prog in schedule.actions:
        out: list[Action] = []
        compute_positions: list[int] = []  # indexes in out of compute actions
        for a in prog:
            if a.kind is _W and compute_positions:
                prev = out[compute_positions[-1]]
                if prev.kind is _I and prev.stage == a.stage and prev.microbatch == a.microbatch:
                    out[compute_positions[-1]] = Action(a.stage, _B, a.microbatch)
                    continue
            if a.kind.is_compute:
                compute_positions.append(len(out))
            out.append(a)
        merged.append(tuple(out))
    return Schedule(schedule.name, schedule.shape, tuple(merged))


def serialize(schedule: Schedule) -> Schedule:
    """The same work as ``schedule`` run strictly one step at a time across the whole pipeline.

    For micro-batch 0, 1, ...: the forward of every stage in stage order, then the backward of every stage in
    reverse order, each (stage, micro-batch) keeping the backward kinds ``schedule`` gives it (``B``, or ``I``
    followed at once by its ``W``). Every rank's program is its share of that single global sequence, so each
    message is consumed by the action right after the one that produced it (W of the sender aside): a runtime
    that completes every transfer on the host before its next compute action cannot deadlock on it. Holds at
    most one micro-batch's activations per stage. Compute-only (lower it with :func:`add_communication`).
    """
    shape = schedule.shape
    split: set[tuple[int, int]] = set()
    for prog in schedule.actions:
        for a in prog:
            if a.kind is _I:
                split.add((a.stage, a.microbatch))
    programs: list[list[Action]] = [[] for _ in range(shape.pp)]
    for i in range(shape.microbatches):
        for s in range(shape.num_stages):
            programs[shape.rank_of(s)].append(Action(s, _F, i))
        for s in reversed(range(shape.num_stages)):
            prog = programs[shape.rank_of(s)]
            if (s, i) in split:
                prog += [Action(s, _I, i), Action(s, _W, i)]
            else:
                prog.append(Action(s, _B, i))
    return Schedule(f"{schedule.name}-serialized", shape, tuple(tuple(p) for p in programs))
