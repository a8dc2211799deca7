"""The one executor of lowered pipeline schedules (used by the DeepSpeed and the Megatron adapters).

:class:`PipelineExecutor` walks one rank's program of a schedule lowered by
:func:`ds_plugins.schedule.lowering.add_communication` and runs, per action:

- ``F``  (stage s, micro-batch i): the stage module on its input (stage 0: the caller's input; else the
  activation received from stage s-1 or handed over on this rank); the last stage also applies ``loss_fn``.
- ``I``  the input-gradient half of backward from the stage's outputs with the received output gradient; split
  linears queue their weight GEMMs (``split_mode``: autograd edges recorded in F, or the ``Function`` form).
- ``W``  the queued weight-gradient work of (s, i).
- ``B``  a full backward (same call, no deferral).
- ``SEND_*``/``RECV_*``: :class:`~ds_plugins.runtime.p2p.P2PCommunicator` messages. Receives are posted early
  (gloo: as soon as their shapes are known, up to ``recv_lookahead`` compute actions ahead; NCCL: at the posting
  point right before their consumer, batched with the sends of the previous compute action, and in the order
  the peer sends them, so untagged NCCL messages never cross). Sends are asynchronous and completed at step end.

Each stage's autograd graph is cut at its input: a received (or on-rank handed over) activation becomes a fresh
leaf, so the backward of stage s stops at its input and the gradient there is what travels to stage s-1.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import torch
from torch import nn

from .._stats import trimmed_mean
from ..schedule.costs import UNIFORM_WEIGHT_GRAD_SHARE, CostModel
from ..schedule.ir import Action, ActionKind, PipelineShape, Schedule
from ..schedule.lowering import add_communication, serialize
from .p2p import MessageKey, MessageSpec, P2PCommunicator, PendingRecv, TensorSpec
from .weight_grad import WeightGradQueue, backward_input, check_recorded_graph, recording_linears

__all__ = ["ACTION_ANNOTATION_PREFIX", "PipelineExecutor", "SplitMode", "StepResult", "costs_from_ranks", "measured_costs",
           "Timing"]

logger = logging.getLogger(__name__)

_F, _B, _I, _W = ActionKind.FORWARD, ActionKind.BACKWARD, ActionKind.BACKWARD_INPUT, ActionKind.BACKWARD_WEIGHT
_SEND_F, _RECV_F, _SEND_B, _RECV_B = ActionKind.SEND_F, ActionKind.RECV_F, ActionKind.SEND_B, ActionKind.RECV_B

_NOTHING_RECEIVED: Mapping = {}  # read-only: what a compute action without receives gets
_NO_CONTEXT = contextlib.nullcontext()  # reusable: nullcontext keeps no state

ACTION_ANNOTATION_PREFIX = "interleaf "
"""Name prefix of the profiler range around each compute action when ``annotate_actions`` is on; the rest of the
name is the action (``str(Action)``, e.g. ``"interleaf 0F3"``)."""

SplitMode = Literal["autograd", "function"]
"""How I defers the weight GEMMs of switched ``nn.Linear`` layers (:mod:`ds_plugins.runtime.weight_grad`):
``"autograd"`` (default) records each linear's output edge during F and asks autograd for every gradient but
those weights' in one call, no Python per linear; ``"function"`` runs the layers as a Python
``autograd.Function`` that queues its GEMM from its backward (the older form, more host time per layer)."""

Timing = Literal["none", "action", "sync"]
"""How the executor times compute: ``"none"`` (wall time only), ``"action"`` (every compute action; CUDA events
resolved only when a timing is read, so no sync in the hot path) or ``"sync"`` (synchronize the device around
every action: exact host-side times, for profiling only)."""


def _typical(per_action: Mapping[tuple[ActionKind, int], list[float]]) -> dict[tuple[str, int], float]:
    """``(kind letter, stage) ->`` the trimmed mean of that action's samples (see :meth:`StepResult.typical_seconds`)."""
    return {(k.value, s): trimmed_mean(v) for (k, s), v in per_action.items() if v}


class StepResult:
    """What one :meth:`PipelineExecutor.run` did on this rank.

    Timing fields are in seconds. On CUDA with ``timing="action"`` they come from CUDA events and are resolved
    (one event synchronize) the first time one is read.
    """

    def __init__(
        self,
        *,
        rank: int,
        stages: tuple[int, ...],
        losses: tuple[torch.Tensor, ...],
        outputs: tuple[Any, ...],
        wait_s: float,
        host_wall_s: float,
        samples: list[tuple[ActionKind, int, Any]],
        step_events: tuple[Any, Any] | None,
        memory: dict[tuple[ActionKind, int], list[int]],
        host_samples: list[tuple[ActionKind, int, float]] | None = None,
    ) -> None:
        self.rank = rank
        """Pipeline rank that produced this result."""
        self.stages = stages
        """Stages on this rank."""
        self.losses = losses
        """Per micro-batch loss (unscaled, detached), on the rank that holds the last stage; else empty."""
        self.outputs = outputs
        """Per micro-batch last-stage outputs when ``run(..., return_outputs=True)``; else empty."""
        self.wait_s = wait_s
        """Host time spent blocked in p2p waits."""
        self._host_wall_s = host_wall_s
        self._samples = samples  # (kind, stage, seconds | (start_event, end_event))
        self._step_events = step_events
        self._memory = memory
        self._host_samples = host_samples or []
        self._resolved: dict[tuple[ActionKind, int], list[float]] | None = None
        self._wall: float | None = None

    def _resolve(self) -> None:
        if self._resolved is not None:
            return
        resolved: dict[tuple[ActionKind, int], list[float]] = defaultdict(list)
        synced = False
        for kind, stage, sample in self._samples:
            if isinstance(sample, tuple):
                if not synced:
                    sample[1].synchronize()
                    if self._step_events is not None:
                        self._step_events[1].synchronize()
                    synced = True
                resolved[(kind, stage)].append(sample[0].elapsed_time(sample[1]) / 1000.0)
            else:
                resolved[(kind, stage)].append(float(sample))
        self._resolved = dict(resolved)
        if self._step_events is not None:
            self._step_events[1].synchronize()
            self._wall = self._step_events[0].elapsed_time(self._step_events[1]) / 1000.0
        else:
            self._wall = self._host_wall_s

    @property
    def action_seconds(self) -> dict[tuple[ActionKind, int], list[float]]:
        """Every timed compute action: ``(kind, stage) -> [seconds, ...]`` in execution order."""
        self._resolve()
        assert self._resolved is not None
        return self._resolved

    @property
    def wall_s(self) -> float:
        """Time from the start of the step to its end (device time on CUDA with events)."""
        self._resolve()
        assert self._wall is not None
        return self._wall

    @property
    def host_wall_s(self) -> float:
        """Host time from the start of :meth:`PipelineExecutor.run` until its last action was issued. On CUDA,
        close to :attr:`wall_s` means the GPU waited for the host to enqueue work (host-bound); much smaller
        means the host ran ahead of the GPU."""
        return self._host_wall_s

    @property
    def busy_s(self) -> float:
        """Time this rank spent computing (sum of its F/I/W/B actions); 0 when timing is off."""
        return sum(sum(v) for v in self.action_seconds.values())

    @property
    def idle_s(self) -> float:
        """``wall_s - busy_s``: time the rank was waiting (the bubble plus communication not hidden)."""
        return max(0.0, self.wall_s - self.busy_s)

    @property
    def bubble_fraction(self) -> float:
        """``idle_s / wall_s`` of this rank."""
        wall = self.wall_s
        return self.idle_s / wall if wall > 0 else 0.0

    def mean_seconds(self) -> dict[tuple[str, int], float]:
        """Mean seconds per ``(kind letter, stage)``, e.g. ``("F", 3)``: the per-kind timings for a cost model."""
        return {(k.value, s): sum(v) / len(v) for (k, s), v in self.action_seconds.items() if v}

    @property
    def host_action_seconds(self) -> dict[tuple[ActionKind, int], list[float]]:
        """On CUDA with ``timing="action"``: the host's time to issue every timed compute action, ``(kind, stage) ->
        [seconds, ...]`` (from before its start event to after its end event; an I includes the autograd engine's
        pass, which the host waits for). Close to :attr:`action_seconds` means that action's GPU work waited for its
        host (host-bound); well below, the host ran ahead. A host blocked by a full launch queue counts that wait
        too. Empty otherwise (with host timing :attr:`action_seconds` are host times already)."""
        out: dict[tuple[ActionKind, int], list[float]] = defaultdict(list)
        for kind, stage, seconds in self._host_samples:
            out[(kind, stage)].append(seconds)
        return dict(out)

    def typical_host_seconds(self) -> dict[tuple[str, int], float]:
        """:meth:`typical_seconds` of :attr:`host_action_seconds`."""
        return _typical(self.host_action_seconds)

    def typical_seconds(self) -> dict[tuple[str, int], float]:
        """Seconds per ``(kind letter, stage)`` over the step's micro-batches as a cost model takes them: the mean
        without the slowest and fastest eighth (:func:`~ds_plugins._stats.trimmed_mean`). One action stretched by
        a stall moves a plain mean far from what the action costs (4x H200, pp=4, m=16: a stage's mean F read
        10.1 ms against ~2 ms elsewhere - stalls or a slow rank, the log cannot tell - and ``auto`` planned a
        37%-bubble order from it); a median would instead hide a cost paid by every other action."""
        return _typical(self.action_seconds)

    def mean_memory_bytes(self) -> dict[tuple[str, int], float]:
        """Mean change of allocated device memory per ``(kind letter, stage)`` (CUDA only; empty on CPU)."""
        return {(k.value, s): sum(v) / len(v) for (k, s), v in self._memory.items() if v}

    def __repr__(self) -> str:
        return (
            f"StepResult(rank={self.rank}, stages={self.stages}, wall_s={self.wall_s:.4f}, busy_s={self.busy_s:.4f}, "
            f"wait_s={self.wait_s:.4f}, bubble={100 * self.bubble_fraction:.1f}%)"
        )


def measured_costs(
    results: Iterable[StepResult | Mapping[tuple[str, int], float]],
    shape: PipelineShape,
    *,
    comm: float = 0.0,
    memory: Iterable[Mapping[tuple[str, int], float]] | None = None,
) -> CostModel:
    """A :class:`CostModel` from measured step timings, to feed the ``auto`` scheduler.

    ``results`` must cover every stage: gather them from all pipeline ranks first (e.g.
    ``dist.all_gather_object`` of ``result.typical_seconds()``; plain per-step dicts of seconds are accepted,
    and a :class:`StepResult` contributes its :meth:`~StepResult.typical_seconds`). Each stage and kind gets the
    trimmed mean of its per-step figures (a plain mean of one or two steps; from three on the slowest and the
    fastest are dropped; both adapters measure two warm-up steps by default). Stages measured only with a full
    backward ``B`` get ``I = W = B/2`` (logged); run a split-backward schedule (e.g. ``zb-h1``) during warm-up for
    real I/W figures. Activation memory comes from ``memory`` (``mean_memory_bytes()`` dicts) when given, else 1
    per stage with W keeping :data:`~ds_plugins.schedule.costs.UNIFORM_WEIGHT_GRAD_SHARE` of it.
    """
    sums: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in results:
        per_step = r.typical_seconds() if isinstance(r, StepResult) else r
        for key, value in per_step.items():
            sums[(str(key[0]), int(key[1]))].append(float(value))
    typical = {k: trimmed_mean(v) for k, v in sums.items()}
    forward, backward_input, backward_weight = [], [], []
    for s in range(shape.num_stages):
        f = typical.get(("F", s))
        if f is None:
            raise ValueError(
                f"measured_costs: no forward timing for stage {s}; gather StepResult.typical_seconds() from every "
                "pipeline rank (dist.all_gather_object) and run with timing='action' or 'sync'"
            )
        i, w, b = typical.get(("I", s)), typical.get(("W", s)), typical.get(("B", s))
        if i is None:
            if b is None:
                raise ValueError(f"measured_costs: no backward timing for stage {s}")
            logger.info("stage %d was measured with full backward only: assuming I = W = B/2", s)
            i, w = b / 2, b / 2
        elif w is None:
            w = 0.0
        forward.append(f)
        backward_input.append(i)
        backward_weight.append(w)
    n = shape.num_stages
    activation = [1.0] * n
    kept: list[float | None] = [None] * n
    if memory is not None:
        mem: dict[tuple[str, int], list[float]] = defaultdict(list)
        for m in memory:
            for key, value in m.items():
                mem[(str(key[0]), int(key[1]))].append(float(value))
        for s in range(n):
            fwd = mem.get(("F", s))
            inp = mem.get(("I", s))
            if fwd:
                activation[s] = max(0.0, sum(fwd) / len(fwd))
            if inp and fwd:
                kept[s] = min(activation[s], max(0.0, activation[s] + sum(inp) / len(inp)))
    # not measured (no memory figures, or the stage ran full backwards only): W keeps what a flash-attention
    # transformer layer's weight GEMMs need
    kept_final = [k if k is not None else UNIFORM_WEIGHT_GRAD_SHARE * a for k, a in zip(kept, activation)]
    return CostModel(
        forward=tuple(forward),
        backward_input=tuple(backward_input),
        backward_weight=tuple(backward_weight),
        comm=comm,
        activation_memory=tuple(activation),
        weight_grad_memory=tuple(kept_final),
    )


def costs_from_ranks(gathered: Sequence[tuple[Sequence[Mapping], Sequence[Mapping]]],
                     shape: PipelineShape) -> tuple[CostModel, bool]:
    """The cost model from every rank's warm-up measurements, as the adapters gather them (one
    ``(typical_seconds() dicts, mean_memory_bytes() dicts)`` pair per rank, e.g. ``dist.all_gather_object``), and
    whether any device memory was measured (CPU runs measure none: activation memory then defaults)."""
    samples = [s for per_rank, _ in gathered for s in per_rank]
    memory = [m for _, per_rank in gathered for m in per_rank if m]
    return measured_costs(samples, shape, memory=memory or None), bool(memory)


@dataclass(slots=True)
class _Forwarded:
    """What a forward keeps for its backward."""

    input_leaves: list[torch.Tensor]
    """Input tensors made leaves that need a gradient (sent back to the previous stage, in order)."""
    roots: list[torch.Tensor]
    """Output tensors that need a gradient (for the last stage: the scaled loss)."""
    records: list | None = None
    """Split linears recorded during the forward (``split_mode="autograd"`` and an I action follows)."""


@dataclass(slots=True)
class _Plan:
    """The rank's program cut at compute actions."""

    compute: list[Action] = field(default_factory=list)
    recvs_before: list[list[MessageKey]] = field(default_factory=list)
    sends_after: list[list[MessageKey]] = field(default_factory=list)
    peer_order: dict[int, list[MessageKey]] = field(default_factory=dict)
    """For each peer pipeline rank: the messages it sends to this rank, in its posting order."""
    split: set[tuple[int, int]] = field(default_factory=set)
    """(stage, micro-batch) pairs whose backward is an I action (their forward records split linears)."""


class PipelineExecutor:
    """Runs one rank's share of a pipeline schedule.

    Args:
        schedule: any schedule (compute-only or lowered; it is lowered here).
        rank: this rank's index in the pipeline (0..pp-1), not its global rank.
        stage_modules: ``stage -> module`` for every stage this rank holds. A stage module is called as
            ``module(*value)`` when the value coming in is a tuple/list, else ``module(value)``; it returns a
            tensor or a flat tuple of tensors and non-tensor values (non-tensors pass through to the next stage).
        p2p: the communicator of this rank's pipeline group (may be None when pp == 1).
        loss_fn: ``loss_fn(last_stage_output, target) -> scalar tensor`` per micro-batch.
        device: where inputs are moved and timings are taken.
        weight_grad_queue: the queue deferred weight gradients go to (default: a new one); pass the adapter's
            queue to choose how weight gradients are accumulated (``main_grad``, bf16 buffers).
        timing: see :data:`Timing`.
        recv_lookahead: how many compute actions ahead receives are posted once their shapes are known (None:
            tagged gloo = all; NCCL = 0, i.e. only right before the consumer, batched with the previous compute
            action's sends; the environment variable ``INTERLEAF_RECV_LOOKAHEAD`` overrides the default).
        log_every: log wall/busy/bubble (and tokens/s) every this many steps (0: never).
        backward_context: called before every I, W and B action; the context manager it returns is entered
            around that action (DeepSpeed's ``_running_engine_backward`` flag, profiler ranges, ...).
        serialize_first: run the first training step and the first evaluation step of this executor in the
            order of :func:`~ds_plugins.schedule.lowering.serialize` (one micro-batch at a time through the whole
            pipeline), completing every transfer on the host before the next compute action. Default: on for
            CUDA with a communicator. Why: CUDA loads a kernel's module lazily at its first launch
            (``CUDA_MODULE_LOADING=LAZY``, the default), and that load waits until the GPU has finished all queued
            work, including NCCL sends/receives still waiting for their peer; if that peer is itself stuck
            loading a kernel, both ranks hang for good (seen on 4x H100: every rank blocked launching a
            first-time kernel). The serialized step launches every kernel the schedule needs once with no
            transfer in flight; gradients are the same sums. It costs about one step run without pipelining.
        track_memory: record the change of allocated CUDA memory over every compute action
            (:meth:`StepResult.mean_memory_bytes`, what ``auto`` builds its memory model from). Off by default:
            ``torch.cuda.memory_allocated`` builds the allocator's whole statistics dict on the host, twice per
            action, time the host then does not spend launching kernels.
        after_backward: called with the stage after the autograd pass of every I and B action, once that
            micro-batch's gradients (all of them for B; all but the deferred weight gradients for I) are on the
            parameters (DeepSpeed's bf16 optimizer moves them into its gradient-accumulation buffers there).
        annotate_actions: run every compute action inside ``torch.profiler.record_function("interleaf <action>")``
            (e.g. ``"interleaf 0F3"``: stage 0, forward, micro-batch 3), so a profiler trace shows which stage,
            micro-batch and kind each kernel belongs to (``benchmarks/device_gaps.py`` sums kernel time per kind
            and stage from these ranges). Also an attribute: a benchmark turns it on for its profiled step only.
            Off by default because ``record_function`` is not free without a profiler: it enters and leaves a
            dispatcher op per call (~11 us per action on this repo's CI host, against ~0.1 us for the flag check),
            host time taken from kernel launches in exactly the host-bound steps one profiles.
        split_mode: see :data:`SplitMode` (the environment variable ``INTERLEAF_SPLIT_MODE`` overrides the
            default). With ``"autograd"`` the I action adds the gradients of a stage's parameters other than the
            split linears' weights to ``param.grad`` itself: hooks registered on parameters do not run for them.
    """

    def __init__(
        self,
        schedule: Schedule,
        rank: int,
        stage_modules: Mapping[int, nn.Module],
        *,
        p2p: P2PCommunicator | None,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        device: torch.device | str,
        weight_grad_queue: WeightGradQueue | None = None,
        timing: Timing = "action",
        recv_lookahead: int | None = None,
        log_every: int = 0,
        backward_context: Callable[[], contextlib.AbstractContextManager] | None = None,
        serialize_first: bool | None = None,
        track_memory: bool = False,
        after_backward: Callable[[int], None] | None = None,
        annotate_actions: bool = False,
        split_mode: SplitMode | None = None,
    ) -> None:
        shape = schedule.shape
        if not 0 <= rank < shape.pp:
            raise ValueError(f"rank must be a pipeline rank in 0..{shape.pp - 1}, got {rank}")
        expected = set(shape.stages_of(rank))
        if set(stage_modules) != expected:
            raise ValueError(
                f"rank {rank} of schedule {schedule.name!r} ({shape}) holds stages {sorted(expected)}; "
                f"stage_modules has {sorted(stage_modules)}: build them with build_stage_modules(layers, shape, rank)"
            )
        if timing not in ("none", "action", "sync"):
            raise ValueError(f"timing must be 'none', 'action' or 'sync', got {timing!r}")
        if shape.pp > 1 and p2p is None:
            raise ValueError("pp > 1 needs a P2PCommunicator (P2PCommunicator.for_shape(shape, pipeline_ranks))")
        if split_mode is None:
            split_mode = os.environ.get("INTERLEAF_SPLIT_MODE", "autograd")  # type: ignore[assignment]
        if split_mode not in ("autograd", "function"):
            raise ValueError(f"split_mode must be 'autograd' or 'function', got {split_mode!r}"
                             " (INTERLEAF_SPLIT_MODE, if set, gives the default)")
        if recv_lookahead is not None and recv_lookahead < 0:
            raise ValueError(f"recv_lookahead must be >= 0 or None, got {recv_lookahead}")
        self.schedule = add_communication(schedule)
        self.shape = shape
        self.rank = rank
        self.stage_modules = dict(stage_modules)
        self.p2p = p2p
        self.loss_fn = loss_fn
        self.device = torch.device(device)
        self.queue = weight_grad_queue if weight_grad_queue is not None else WeightGradQueue()
        self.timing = timing
        self.log_every = log_every
        self.backward_context = backward_context
        self.after_backward = after_backward
        self.annotate_actions = bool(annotate_actions)
        self.track_memory = bool(track_memory)
        self.split_mode: SplitMode = split_mode
        self._split_checked: set[int] = set()  # stages whose graph was walked (check_recorded_graph)
        self._no_record: set[int] = set()  # stages found holding a reentrant checkpoint: Function form
        self._record: Any = ()  # (stage, micro-batch) pairs whose forward records split linears, this step
        self.last_stage = shape.num_stages - 1
        self._rank_of = tuple(shape.rank_of(s) for s in range(shape.num_stages))  # per action: no range checks
        ordered = p2p is not None and p2p.ordered
        if recv_lookahead is None and os.environ.get("INTERLEAF_RECV_LOOKAHEAD"):
            recv_lookahead = int(os.environ["INTERLEAF_RECV_LOOKAHEAD"])  # debugging knob (docs/runtime.md)
        if recv_lookahead is None:
            if not ordered:
                recv_lookahead = 1 << 30  # tagged (gloo): any order is safe
            else:
                # Untagged (NCCL): each receive at the point right before its consumer. On one stream an early
                # receive would hold back this rank's sends; with direction groups a lookahead of 4 left the GPUs
                # of 4x H100 stuck after a few steps (2026-11-26, cause not isolated: docs/runtime.md), while 0
                # ran every schedule of benchmarks/pipeline.py.
                recv_lookahead = 0
        self.recv_lookahead = recv_lookahead
        self._ordered_recvs = ordered
        self._plans = {fo: self._make_plan(self.schedule, fo) for fo in (False, True)}
        if serialize_first is None:
            serialize_first = self.device.type == "cuda" and p2p is not None
        self.serialize_first = bool(serialize_first)
        self._first_plans: dict[bool, _Plan] = {}
        if self.serialize_first:
            serialized = add_communication(serialize(schedule))
            self._first_plans = {fo: self._make_plan(serialized, fo) for fo in (False, True)}
        self._first_done = {False: False, True: False}
        self.sync_transfers = os.environ.get("INTERLEAF_SYNC_TRANSFERS", "0") == "1"
        """Debugging knob (docs/runtime.md): complete every transfer on the host before each compute action,
        every step (the serialized first step always does)."""
        self._steps = 0
        self._reset_state()

    # ------------------------------------------------------------------ planning
    @staticmethod
    def _program(schedule: Schedule, rank: int, forward_only: bool) -> list[Action]:
        prog = list(schedule.actions[rank])
        if forward_only:
            prog = [a for a in prog if a.kind in (_F, _SEND_F, _RECV_F)]
        return prog

    def _make_plan(self, schedule: Schedule, forward_only: bool) -> _Plan:
        plan = _Plan(peer_order=self._sender_orders(schedule, forward_only))
        pending_recvs: list[MessageKey] = []
        for a in self._program(schedule, self.rank, forward_only):
            if a.kind.is_compute:
                plan.compute.append(a)
                if a.kind is _I:
                    plan.split.add((a.stage, a.microbatch))
                plan.recvs_before.append(pending_recvs)
                plan.sends_after.append([])
                pending_recvs = []
            elif a.kind is _RECV_F:
                pending_recvs.append(MessageKey(a.stage - 1, "F", a.microbatch))
            elif a.kind is _RECV_B:
                pending_recvs.append(MessageKey(a.stage + 1, "B", a.microbatch))
            elif a.kind is _SEND_F:
                plan.sends_after[-1].append(MessageKey(a.stage, "F", a.microbatch))
            elif a.kind is _SEND_B:
                plan.sends_after[-1].append(MessageKey(a.stage, "B", a.microbatch))
        if pending_recvs:
            raise ValueError(f"rank {self.rank}: schedule ends with receives {pending_recvs} that nothing consumes")
        return plan

    def _sender_orders(self, schedule: Schedule, forward_only: bool) -> dict[int, list[MessageKey]]:
        """For each peer pipeline rank: the messages it sends to this rank, in its posting order."""
        orders: dict[int, list[MessageKey]] = defaultdict(list)
        for peer in range(self.shape.pp):
            if peer == self.rank:
                continue
            for a in self._program(schedule, peer, forward_only):
                if a.kind is _SEND_F and self.shape.rank_of(a.stage + 1) == self.rank:
                    orders[peer].append(MessageKey(a.stage, "F", a.microbatch))
                elif a.kind is _SEND_B and self.shape.rank_of(a.stage - 1) == self.rank:
                    orders[peer].append(MessageKey(a.stage, "B", a.microbatch))
        return dict(orders)

    def _reset_state(self) -> None:
        self._forwarded: dict[tuple[int, int], _Forwarded] = {}
        self._local_acts: dict[tuple[int, int], Any] = {}
        self._local_grads: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._posted: dict[MessageKey, PendingRecv] = {}
        self._peer_next: dict[int, int] = defaultdict(int)
        self._losses: dict[int, torch.Tensor] = {}
        self._outputs: dict[int, Any] = {}
        # outgoing values live only between a compute action and its SEND
        self._outgoing_acts: dict[tuple[int, int], Any] = {}
        self._outgoing_grads: dict[tuple[int, int], list[torch.Tensor]] = {}

    # ------------------------------------------------------------------ public
    def run(
        self,
        inputs: Sequence[Any] | None,
        targets: Sequence[Any] | None,
        *,
        loss_scale: float = 1.0,
        forward_only: bool = False,
        return_outputs: bool = False,
        tokens: int | None = None,
    ) -> StepResult:
        """Run this rank's actions for one step and return what it measured.

        ``inputs``: per-micro-batch inputs of stage 0 (only needed on the rank holding stage 0).
        ``targets``: per-micro-batch targets for ``loss_fn`` (only needed on the rank holding the last stage;
        with ``forward_only`` they may be None: then no loss is computed). The backward starts from
        ``loss_fn(...) * loss_scale`` of every micro-batch (use ``1/microbatches`` to average, or a fp16 loss
        scale); reported losses are unscaled. Gradients accumulate into ``param.grad`` (deferred weight
        gradients through the queue's ``accumulate_grad``); every deferred W is drained before returning.
        ``forward_only`` runs the F actions only, under ``torch.no_grad()`` (evaluation).
        """
        shape = self.shape
        m = shape.microbatches
        if 0 in self.stage_modules and (inputs is None or len(inputs) != m):
            raise ValueError(
                f"rank {self.rank} holds stage 0: pass inputs for all {m} micro-batches "
                f"(got {None if inputs is None else len(inputs)})"
            )
        needs_targets = not forward_only
        if self.last_stage in self.stage_modules and needs_targets and (targets is None or len(targets) != m):
            raise ValueError(
                f"rank {self.rank} holds the last stage: pass targets for all {m} micro-batches "
                f"(got {None if targets is None else len(targets)})"
            )
        if targets is not None and len(targets) != m and self.last_stage in self.stage_modules:
            raise ValueError(f"targets must have {m} entries, got {len(targets)}")
        # First run of each kind in this process on CUDA: serialized, every transfer completed on the host
        # before the next compute action (see serialize_first in the class docstring).
        first = self.serialize_first and not self._first_done[forward_only]
        plan = (self._first_plans if first else self._plans)[forward_only]
        lookahead = 0 if first else self.recv_lookahead
        self._inputs = inputs
        self._targets = targets
        self._loss_scale = float(loss_scale)
        self._return_outputs = return_outputs
        self._forward_only = forward_only
        self._record = () if forward_only or self.split_mode != "autograd" else plan.split
        cuda_events = self.timing == "action" and self.device.type == "cuda"
        host_timing = self.timing != "none" and not cuda_events
        sync_timing = self.timing == "sync"
        samples: list[tuple[ActionKind, int, Any]] = []
        host_samples: list[tuple[ActionKind, int, float]] = []
        memory: dict[tuple[ActionKind, int], list[int]] = defaultdict(list)
        track_memory = self.track_memory and self.device.type == "cuda"
        wait_s = 0.0
        step_events = None
        stream = None
        if cuda_events:
            # the step's stream, looked up once (Event.record() without one builds a Stream object every call)
            stream = torch.cuda.current_stream(self.device)
            step_events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            step_events[0].record(stream)
        if sync_timing:
            self._sync()
        p2p = self.p2p
        quiesce = p2p is not None and (first or self.sync_transfers)
        recvs_before, sends_after = plan.recvs_before, plan.sends_after
        compute = self._compute
        t_start = time.perf_counter()
        grad_mode = torch.no_grad() if forward_only else torch.enable_grad()
        try:
            with grad_mode:
                n = len(plan.compute)
                for j, action in enumerate(plan.compute):
                    if p2p is not None:
                        if recvs_before[j] or lookahead:
                            wait_s += self._post_recvs(plan, j, forward_only, lookahead)
                            inputs_ready, waited = self._collect_inputs(plan, j)
                            wait_s += waited
                        else:  # nothing to receive: issue the previous action's batched sends
                            if p2p.batched:
                                p2p.flush()
                            inputs_ready = _NOTHING_RECEIVED
                        if quiesce:
                            wait_s += self._quiesce()
                    else:
                        inputs_ready = _NOTHING_RECEIVED
                    mem_before = torch.cuda.memory_allocated(self.device) if track_memory else 0
                    if cuda_events:
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        t0 = time.perf_counter()
                        start.record(stream)
                        compute(action, inputs_ready)
                        end.record(stream)
                        host_samples.append((action.kind, action.stage, time.perf_counter() - t0))
                        samples.append((action.kind, action.stage, (start, end)))
                    elif host_timing:
                        if sync_timing:
                            self._sync()
                        t0 = time.perf_counter()
                        compute(action, inputs_ready)
                        if sync_timing:
                            self._sync()
                        samples.append((action.kind, action.stage, time.perf_counter() - t0))
                    else:
                        compute(action, inputs_ready)
                    if track_memory:
                        memory[(action.kind, action.stage)].append(
                            torch.cuda.memory_allocated(self.device) - mem_before
                        )
                    if p2p is not None:
                        for key in sends_after[j]:
                            self._send(key)
                        if j + 1 < n:
                            p2p.reap_sends()
                with (self.backward_context() if self.backward_context is not None else contextlib.nullcontext()):
                    leftover = self.queue.drain()
                if leftover:
                    logger.debug("rank %d: drained %d deferred weight-gradient closures at step end", self.rank, leftover)
                if self.p2p is not None:
                    t0 = time.perf_counter()
                    self.p2p.wait_sends()
                    wait_s += time.perf_counter() - t0
                self._check_finished()
                self._first_done[forward_only] = True
        except BaseException:
            self.queue.clear()
            if self.p2p is not None:
                self.p2p.abort()
            self._reset_state()
            raise
        if sync_timing:
            self._sync()
        host_wall = time.perf_counter() - t_start
        if step_events is not None:
            step_events[1].record(stream)
        losses = tuple(self._losses[i] for i in sorted(self._losses))
        outputs = tuple(self._outputs[i] for i in sorted(self._outputs))
        self._reset_state()
        self._inputs = self._targets = None
        self._steps += 1
        result = StepResult(
            rank=self.rank,
            stages=tuple(shape.stages_of(self.rank)),
            losses=losses,
            outputs=outputs,
            wait_s=wait_s,
            host_wall_s=host_wall,
            samples=samples,
            step_events=step_events,
            memory=dict(memory),
            host_samples=host_samples,
        )
        if self.log_every and self._steps % self.log_every == 0 and logger.isEnabledFor(logging.INFO):
            rate = f", {tokens / result.wall_s:.0f} tokens/s" if tokens and result.wall_s > 0 else ""
            logger.info(
                "pipeline %s rank %d step %d: wall %.4f s, busy %.4f s, p2p wait %.4f s, bubble %.1f%%%s",
                self.schedule.name, self.rank, self._steps, result.wall_s, result.busy_s, result.wait_s,
                100 * result.bubble_fraction, rate,
            )
        return result

    # ------------------------------------------------------------------ communication
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _quiesce(self) -> float:
        """Complete every posted send and receive on the host (no NCCL kernel left running)."""
        assert self.p2p is not None
        t0 = time.perf_counter()
        self.p2p.wait_sends()
        self._sync()
        return time.perf_counter() - t0

    def _post_recvs(self, plan: _Plan, j: int, forward_only: bool, lookahead: int) -> float:
        """Post the receives compute action ``j`` needs, plus those up to ``recv_lookahead`` actions ahead whose
        shapes are known. Returns host seconds spent blocked (first-step metadata only)."""
        assert self.p2p is not None
        t0 = time.perf_counter()
        for key in plan.recvs_before[j]:
            self._ensure_posted(key, plan)
        last = min(len(plan.compute), j + 1 + lookahead)
        for jj in range(j + 1, last):
            for key in plan.recvs_before[jj]:
                if key not in self._posted and self._postable_early(key, plan):
                    self._ensure_posted(key, plan)
        if self.p2p.batched:
            self.p2p.flush()
        return time.perf_counter() - t0

    def _postable_early(self, key: MessageKey, plan: _Plan) -> bool:
        assert self.p2p is not None
        if not self.p2p.has_spec(key):
            return False
        if not self._ordered_recvs:
            return True
        peer = self._rank_of[key.src_stage]
        order = plan.peer_order[peer]
        start = self._peer_next[peer]
        idx = order.index(key, start)
        return all(self.p2p.has_spec(k) for k in order[start:idx])

    def _ensure_posted(self, key: MessageKey, plan: _Plan) -> None:
        assert self.p2p is not None
        if key in self._posted:
            return
        if not self._ordered_recvs:
            self._posted[key] = self.p2p.post_recv(key)
            return
        # NCCL ignores tags: post every earlier message from this peer first, in the peer's send order.
        peer = self._rank_of[key.src_stage]
        order = plan.peer_order[peer]
        while True:
            idx = self._peer_next[peer]
            if idx >= len(order):
                raise RuntimeError(f"rank {self.rank}: {key} is not among the messages rank {peer} sends")
            k = order[idx]
            self._peer_next[peer] = idx + 1
            self._posted[k] = self.p2p.post_recv(k)
            if k == key:
                return

    def _collect_inputs(self, plan: _Plan, j: int) -> tuple[Mapping[MessageKey, tuple[PendingRecv, list[torch.Tensor]]], float]:
        keys = plan.recvs_before[j]
        if not keys:
            return _NOTHING_RECEIVED, 0.0
        assert self.p2p is not None
        t0 = time.perf_counter()
        received = {}
        for key in keys:
            pending = self._posted.pop(key)
            received[key] = (pending, self.p2p.wait(pending))
        return received, time.perf_counter() - t0

    def _send(self, key: MessageKey) -> None:
        assert self.p2p is not None
        if key.direction == "F":
            value = self._outgoing_acts.pop((key.src_stage, key.microbatch))
            self.p2p.send(key, value)
        else:
            grads = self._outgoing_grads.pop((key.src_stage, key.microbatch))
            self.p2p.send(key, grads)

    # ------------------------------------------------------------------ compute
    def _compute(self, action: Action, received: Mapping) -> None:
        if self.annotate_actions:
            with torch.profiler.record_function(f"{ACTION_ANNOTATION_PREFIX}{action}"):
                self._run_action(action, received)
        else:
            self._run_action(action, received)

    def _run_action(self, action: Action, received: Mapping) -> None:
        kind = action.kind
        if kind is _F:
            self._forward(action.stage, action.microbatch, received)
            return
        if kind is not _I and kind is not _B and kind is not _W:  # pragma: no cover - plans only hold compute actions
            raise RuntimeError(f"not a compute action: {action}")
        context = self.backward_context
        with context() if context is not None else _NO_CONTEXT:
            if kind is _W:
                self.queue.run(action.stage, action.microbatch)
            else:
                self._backward(action.stage, action.microbatch, received, defer_weight=kind is _I)

    def _stage_input(self, stage: int, mb: int, received: Mapping) -> tuple[Any, list[torch.Tensor]]:
        """The value fed to ``stage`` for ``mb`` and the input leaves whose gradient goes back."""
        if stage == 0:
            value = self._inputs[mb]  # type: ignore[index]
            return _to_device(value, self.device), []
        if self._rank_of[stage - 1] == self.rank:
            value, leaves = self._local_acts.pop((stage - 1, mb))
            return value, leaves
        key = MessageKey(stage - 1, "F", mb)
        pending, buffers = received[key]
        spec: MessageSpec = pending.spec
        items = []
        leaves = []
        it = iter(buffers)
        for entry in spec.entries:
            if isinstance(entry, TensorSpec):
                t = next(it)
                if entry.requires_grad and not self._forward_only:
                    t.requires_grad_(True)
                    leaves.append(t)
                items.append(t)
            else:
                items.append(entry)
        value = tuple(items) if spec.is_tuple else items[0]
        return value, leaves

    def _forward(self, stage: int, mb: int, received: Mapping) -> None:
        value, leaves = self._stage_input(stage, mb, received)
        module = self.stage_modules[stage]
        record = (stage, mb) in self._record and stage not in self._no_record
        with recording_linears() if record else _NO_CONTEXT as records:  # records: None without recording
            output = module(*value) if isinstance(value, (tuple, list)) else module(value)
        if stage == self.last_stage:
            if self._return_outputs:
                self._outputs[mb] = _detach(output)
            if self._targets is None:
                return
            loss = self.loss_fn(output, self._targets[mb])
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError("loss_fn must return a scalar tensor per micro-batch")
            self._losses[mb] = loss.detach()
            if not self._forward_only:
                self._forwarded[(stage, mb)] = _Forwarded(
                    leaves, [loss * self._loss_scale] if loss.requires_grad else [], records or None)
            return
        items = output if isinstance(output, (tuple, list)) else (output,)
        roots = [t for t in items if isinstance(t, torch.Tensor) and t.requires_grad]
        if not self._forward_only:
            self._forwarded[(stage, mb)] = _Forwarded(leaves, roots, records or None)
        if self._rank_of[stage + 1] == self.rank:
            self._local_acts[(stage, mb)] = _hand_over(output, self._forward_only)
        else:
            self._outgoing_acts[(stage, mb)] = output

    def _backward(self, stage: int, mb: int, received: Mapping, *, defer_weight: bool) -> None:
        saved = self._forwarded.pop((stage, mb))
        if stage == self.last_stage:
            roots, grads = saved.roots, [None] * len(saved.roots)
        else:
            if self._rank_of[stage + 1] == self.rank:
                grads = self._local_grads.pop((stage, mb))
            else:
                _, grads = received[MessageKey(stage + 1, "B", mb)]
            roots = saved.roots
            if len(grads) != len(roots):
                raise RuntimeError(
                    f"stage {stage} micro-batch {mb}: {len(roots)} outputs need a gradient but {len(grads)} came back"
                )
        leaf_grads = None
        if roots:
            # (micro-batches forwarded before the stage's first I was checked may hold records of a stage found
            # unsplittable by edges: they take the Function path too, with their recorded linears' GEMMs now)
            records = saved.records if defer_weight and stage not in self._no_record else None
            shared: set[int] | None = set()
            if records and stage not in self._split_checked:
                self._split_checked.add(stage)
                shared = check_recorded_graph(roots, records)
                if shared is None:
                    logger.info("rank %d stage %d: its graph holds a reentrant checkpoint, which refuses "
                                "torch.autograd.grad: split_mode 'function' for this stage", self.rank, stage)
                    self._no_record.add(stage)
                    records = None  # this micro-batch's recorded linears compute their weight gradient now
            if records:
                leaf_grads = backward_input(
                    roots, grads, saved.input_leaves, records,
                    [p for p in self.stage_modules[stage].parameters() if p.requires_grad], self.queue, stage, mb,
                    shared=shared)
            else:
                with self.queue.deferring(stage, mb) if defer_weight else _NO_CONTEXT:
                    torch.autograd.backward(roots, grads)
        if self.after_backward is not None:
            self.after_backward(stage)
        if stage == 0:
            return
        if leaf_grads is None:
            leaf_grads = [leaf.grad for leaf in saved.input_leaves]
        input_grads = [g if g is not None else torch.zeros_like(leaf) for g, leaf in zip(leaf_grads, saved.input_leaves)]
        if self._rank_of[stage - 1] == self.rank:
            self._local_grads[(stage - 1, mb)] = input_grads
        else:
            self._outgoing_grads[(stage, mb)] = input_grads

    def _check_finished(self) -> None:
        if self._forwarded:
            raise RuntimeError(
                f"rank {self.rank}: schedule {self.schedule.name!r} ran forward without backward for "
                f"(stage, micro-batch) {sorted(self._forwarded)}"
            )
        if self._posted or self._local_acts or self._local_grads:
            raise RuntimeError(f"rank {self.rank}: schedule {self.schedule.name!r} left unconsumed messages")


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device) if value.device != device else value
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    return value


def _hand_over(output: Any, forward_only: bool) -> tuple[Any, list[torch.Tensor]]:
    """An output passed to the next stage on the same rank: tensors become fresh leaves (views are cloned so
    the next stage cannot alias a tensor this stage's backward still needs)."""
    is_tuple = isinstance(output, (tuple, list))
    items = output if is_tuple else (output,)
    new_items = []
    leaves = []
    for t in items:
        if isinstance(t, torch.Tensor):
            needs_grad = t.requires_grad and not forward_only
            d = t.detach()
            if t._base is not None:
                d = d.clone()
            if needs_grad:
                d.requires_grad_(True)
                leaves.append(d)
            new_items.append(d)
        else:
            new_items.append(t)
    return (tuple(new_items) if is_tuple else new_items[0]), leaves
