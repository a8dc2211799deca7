"""Point-to-point transport of stage activations and gradients for one pipeline group.

Messages are named by :class:`MessageKey` ``(src_stage, direction, microbatch)``: direction ``"F"`` carries the
output of ``src_stage`` to ``src_stage + 1``; ``"B"`` carries the input gradient of ``src_stage`` to
``src_stage - 1``. One message is a flat tuple of values; tensors travel, non-tensor values ride in the metadata.

- **Metadata once.** The first ``"F"`` message of each stage pair is preceded by a small metadata message
  (structure, shapes, dtypes, requires_grad, the non-tensor values). Later messages reuse it; a change of
  structure or shape raises ``ValueError`` at the sender. ``"B"`` messages need no metadata: the receiver of
  a gradient knows the shapes from its own forward output.
- **Tags** (gloo): every tensor has a tag built from (micro-batch, source stage, direction, slot), so messages
  never match the wrong receive even when the previous and the next stage live on the same peer (pp=2 with V
  or looped placement). NCCL ignores tags; there the executor posts receives from each peer in exactly the
  order that peer posts its sends (see :mod:`ds_plugins.runtime.executor`), and ``batch_isend_irecv`` groups
  the operations of one posting point.
- **Direction groups** (NCCL default): one 2-rank process group per directed (sender, receiver) pair, so each
  NCCL stream carries one sender's messages to one receiver and a send never waits behind an unrelated one
  (see :func:`_direction_groups`).
- **Bounded waits.** On gloo (CPU) every wait has ``timeout_s``; a wait that runs out, or a peer that dies,
  raises ``RuntimeError`` naming the peer's global rank and the message. On NCCL, waits are stream waits (no
  host sync); a dead peer is caught by the process group's own timeout/watchdog, or set
  ``blocking_cuda_waits=True`` to make them host waits bounded by ``timeout_s`` (slower).
"""
from __future__ import annotations

import datetime
import logging
import os
import pickle
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import torch
import torch.distributed as dist

from ..schedule.ir import PipelineShape

__all__ = ["MessageKey", "P2PCommunicator", "PendingRecv", "TensorSpec", "MessageSpec"]

logger = logging.getLogger(__name__)

Direction = Literal["F", "B"]

_SLOTS = 64  # tensors per message
_KINDS = 3  # F, B, metadata
_KIND_INDEX = {"F": 0, "B": 1, "META": 2}


@dataclass(frozen=True, slots=True)
class MessageKey:
    """One logical message: ``direction`` ``"F"`` (activation to ``src_stage + 1``) or ``"B"`` (gradient to
    ``src_stage - 1``) of ``microbatch``."""

    src_stage: int
    direction: Direction
    microbatch: int

    @property
    def dst_stage(self) -> int:
        return self.src_stage + 1 if self.direction == "F" else self.src_stage - 1

    def __str__(self) -> str:
        what = "activation" if self.direction == "F" else "gradient"
        return f"{what} of stage {self.src_stage} -> stage {self.dst_stage}, micro-batch {self.microbatch}"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool


@dataclass(frozen=True, slots=True)
class MessageSpec:
    """Structure of one message: per position a :class:`TensorSpec` or a non-tensor constant."""

    entries: tuple[Any, ...]
    is_tuple: bool
    """Whether the stage produced a tuple/list (else a single value)."""

    @property
    def tensor_specs(self) -> tuple[TensorSpec, ...]:
        return tuple(e for e in self.entries if isinstance(e, TensorSpec))

    def grad_specs(self) -> tuple[TensorSpec, ...]:
        """Specs of the tensors whose gradient travels back (floating point and requiring grad)."""
        return tuple(e for e in self.tensor_specs if e.requires_grad)


def describe(value: Any) -> MessageSpec:
    """The :class:`MessageSpec` of a stage output (a tensor, or a flat tuple/list of tensors and constants)."""
    is_tuple = isinstance(value, (tuple, list))
    items = tuple(value) if is_tuple else (value,)
    entries = []
    for item in items:
        if isinstance(item, torch.Tensor):
            entries.append(TensorSpec(tuple(item.shape), item.dtype, bool(item.requires_grad)))
        elif isinstance(item, (tuple, list, dict)) and any(isinstance(x, torch.Tensor) for x in _flat(item)):
            raise ValueError(
                "pipeline stage outputs must be a tensor or a flat tuple of tensors and non-tensor values; "
                f"got a nested {type(item).__name__} holding tensors: flatten it into the stage's output tuple"
            )
        else:
            entries.append(item)
    if sum(isinstance(e, TensorSpec) for e in entries) > _SLOTS:
        raise ValueError(f"a stage output holds more than {_SLOTS} tensors; concatenate some of them")
    return MessageSpec(tuple(entries), is_tuple)


def _flat(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return [v for x in obj.values() for v in _flat(x)]
    if isinstance(obj, (tuple, list)):
        return [v for x in obj for v in _flat(x)]
    return [obj]


@dataclass(slots=True)
class PendingRecv:
    """A posted receive: ``buffers`` fill in when ``works`` complete; :meth:`P2PCommunicator.wait` returns them."""

    key: MessageKey
    peer: int
    buffers: list[torch.Tensor]
    works: list[Any] = field(default_factory=list)
    spec: MessageSpec | None = None


@dataclass(slots=True)
class _PendingSend:
    key: MessageKey
    peer: int
    tensors: list[torch.Tensor]
    works: list[Any]


class P2PCommunicator:
    """Activations and gradients between the stages of one pipeline group.

    ``stage_to_rank`` maps every stage to the **global** rank that holds it (use :meth:`for_shape`), so several
    pipeline groups (dp > 1) each get their own communicator. ``group`` is the process group those ranks share
    (default: the world group).

    Options: ``batched`` (default: on NCCL) posts through ``batch_isend_irecv``; ``use_tags`` (default: off on
    NCCL, which ignores tags) tags every message; ``direction_groups`` (default: on NCCL) sends over one process
    group per directed rank pair. With direction groups the constructor is a **collective over the default
    group** (every rank of the world constructs its communicator at the same point); otherwise, on NCCL, it
    runs a barrier on ``group`` so its communicator exists on all ranks before the first batched p2p.
    ``timeout_s`` bounds every host wait (gloo; NCCL only with ``blocking_cuda_waits``).
    """

    def __init__(
        self,
        stage_to_rank: Mapping[int, int],
        *,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str = "cpu",
        timeout_s: float = 300.0,
        batched: bool | None = None,
        use_tags: bool | None = None,
        direction_groups: bool | None = None,
        blocking_cuda_waits: bool = False,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("P2PCommunicator needs torch.distributed initialised: call dist.init_process_group first")
        self.stage_to_rank = dict(stage_to_rank)
        self.group = group
        self.device = torch.device(device)
        self.timeout_s = float(timeout_s)
        self.rank = dist.get_rank()
        self.backend = str(dist.get_backend(group)).lower()
        self.is_nccl = "nccl" in self.backend
        self.batched = self.is_nccl if batched is None else bool(batched)
        self.use_tags = (not self.is_nccl) if use_tags is None else bool(use_tags)
        self.ordered = self.batched or not self.use_tags
        """Whether receives must be posted in each peer's send order (untagged transport such as NCCL)."""
        self.blocking_cuda_waits = blocking_cuda_waits
        self._sent_specs: dict[tuple[int, bool], MessageSpec] = {}  # (src stage, grad enabled) -> spec
        self._recv_specs: dict[tuple[int, bool], MessageSpec] = {}
        self._grad_specs: dict[tuple[int, bool], tuple[TensorSpec, ...]] = {}  # sent_grad_specs, per receive
        self._sends: dict[int, deque[_PendingSend]] = {}  # peer -> sends in posting order
        self._batch: dict[tuple[int, int], list[list[Any]]] = {}  # edge -> [[P2POp, work]] until flush()
        self._edge_groups: dict[tuple[int, int], dist.ProcessGroup | None] = {}
        if direction_groups is None and os.environ.get("INTERLEAF_DIRECTION_GROUPS"):
            direction_groups = os.environ["INTERLEAF_DIRECTION_GROUPS"] == "1"  # debugging knob (docs/runtime.md)
        self.uses_direction_groups = self.is_nccl if direction_groups is None else bool(direction_groups)
        if self.uses_direction_groups:
            self._edge_groups = _direction_groups(self._pipeline_edges(), self.backend, self.device, self.timeout_s)
        elif self.is_nccl:
            # anchors.md: the first batched p2p on a group must involve all its ranks.
            dist.barrier(group=group)

    def _pipeline_edges(self) -> list[tuple[int, int]]:
        """Directed (sender, receiver) global-rank pairs that carry messages in this pipeline."""
        edges = set()
        for s in range(len(self.stage_to_rank) - 1):
            a, b = self.stage_to_rank[s], self.stage_to_rank[s + 1]
            if a != b:
                edges.update({(a, b), (b, a)})
        return sorted(edges)

    @classmethod
    def for_shape(
        cls,
        shape: PipelineShape,
        pipeline_ranks: Sequence[int],
        **kwargs: Any,
    ) -> "P2PCommunicator":
        """Communicator for ``shape`` where pipeline rank ``r`` is global rank ``pipeline_ranks[r]``."""
        if len(pipeline_ranks) != shape.pp:
            raise ValueError(f"pipeline_ranks lists {len(pipeline_ranks)} ranks for pp={shape.pp}")
        stage_to_rank = {s: int(pipeline_ranks[shape.rank_of(s)]) for s in range(shape.num_stages)}
        return cls(stage_to_rank, **kwargs)

    # ------------------------------------------------------------------ tags and peers
    def peer_of(self, key: MessageKey, *, sending: bool) -> int:
        return self.stage_to_rank[key.dst_stage if sending else key.src_stage]

    def _tag(self, key: MessageKey, kind: str, slot: int) -> int:
        if not self.use_tags:
            return 0
        num_stages = len(self.stage_to_rank)
        tag = slot + _SLOTS * (_KIND_INDEX[kind] + _KINDS * (key.src_stage + num_stages * key.microbatch))
        if tag >= 2**31:
            raise ValueError("too many micro-batches x stages for p2p tags; reduce micro-batches per step")
        return tag

    def has_spec(self, key: MessageKey) -> bool:
        """Whether a receive of ``key`` can be posted without first receiving metadata: ``"F"`` messages once
        their stage pair's metadata has arrived; ``"B"`` messages once this rank has sent the matching forward
        output (the gradient has its shapes)."""
        grad_mode = torch.is_grad_enabled()
        if key.direction == "F":
            return (key.src_stage, grad_mode) in self._recv_specs
        return (key.dst_stage, grad_mode) in self._sent_specs

    def sent_grad_specs(self, stage: int) -> tuple[TensorSpec, ...] | None:
        """Specs of the gradients ``stage`` receives back for what it sent forward (None before its first send)."""
        pair = (stage, torch.is_grad_enabled())
        specs = self._grad_specs.get(pair)
        if specs is None:
            spec = self._sent_specs.get(pair)
            if spec is None:
                return None
            specs = self._grad_specs[pair] = spec.grad_specs()  # a sent spec never changes (send() checks)
        return specs

    # ------------------------------------------------------------------ posting
    def _post(self, op: Any, tensor: torch.Tensor, peer: int, tag: int) -> Any:
        """Post one send/recv now (gloo) or add it to the current batch (NCCL); returns the work or None."""
        edge = (self.rank, peer) if op is dist.isend else (peer, self.rank)
        group = self._edge_groups[edge] if self.uses_direction_groups else self.group
        if self.batched:
            p2p_op = dist.P2POp(op, tensor, peer, group=group, tag=tag)
            entry: list[Any] = [p2p_op, None]
            self._batch.setdefault(edge, []).append(entry)
            return entry
        try:
            if op is dist.isend:
                return dist.isend(tensor, peer, group=group, tag=tag)
            return dist.irecv(tensor, peer, group=group, tag=tag)
        except Exception as exc:  # e.g. the connection to a dead peer is gone
            what = "send to" if op is dist.isend else "receive from"
            raise RuntimeError(
                f"pipeline p2p: rank {self.rank} could not {what} peer rank {peer} ({type(exc).__name__}: {exc}); "
                f"is rank {peer} alive?"
            ) from exc

    def flush(self) -> None:
        """Issue the operations collected since the last flush: one ``batch_isend_irecv`` per group (batched
        mode; with direction groups, one per directed rank pair)."""
        if not self._batch:
            return
        batches = self._batch
        self._batch = {}
        if not self.uses_direction_groups:  # one group: one batch
            batches = {(-1, -1): [e for entries in batches.values() for e in entries]}
        for entries in batches.values():
            try:
                works = dist.batch_isend_irecv([entry[0] for entry in entries])
            except Exception as exc:
                peers = sorted({entry[0].peer for entry in entries})
                raise RuntimeError(
                    f"pipeline p2p: rank {self.rank} could not post a batch of sends/receives with peer ranks "
                    f"{peers} ({type(exc).__name__}: {exc})"
                ) from exc
            if len(works) == len(entries):
                for entry, work in zip(entries, works):
                    entry[1] = work
            else:  # NCCL coalescing returns one work for the whole batch: every op waits on all of them
                shared = tuple(works)
                for entry in entries:
                    entry[1] = shared

    def send(self, key: MessageKey, value: Any) -> None:
        """Send ``value`` (a stage output for ``"F"``, a tuple of gradients for ``"B"``); returns at once."""
        peer = self.peer_of(key, sending=True)
        if key.direction == "F":
            spec = describe(value)
            pair = (key.src_stage, torch.is_grad_enabled())
            known = self._sent_specs.get(pair)
            if known is None:
                self._sent_specs[pair] = spec
                self._send_metadata(key, spec, peer)
            elif known != spec:
                raise ValueError(
                    f"stage {key.src_stage} output changed structure, shape, dtype or non-tensor value between "
                    f"micro-batches ({known} -> {spec}); the pipeline exchanges shapes once: keep stage outputs "
                    "the same for every micro-batch (pad sequences to one length)"
                )
            items = value if isinstance(value, (tuple, list)) else (value,)
            tensors = [t for t in items if isinstance(t, torch.Tensor)]
        else:
            tensors = list(value)
        payload = []
        works = []
        for slot, t in enumerate(tensors):
            t = t.detach()
            if not t.is_contiguous():
                t = t.contiguous()
            if t.device != self.device:
                t = t.to(self.device)
            payload.append(t)
            works.append(self._post(dist.isend, t, peer, self._tag(key, key.direction, slot)))
        self._add_send(_PendingSend(key, peer, payload, works))

    def _add_send(self, pending: _PendingSend) -> None:
        queue = self._sends.get(pending.peer)
        if queue is None:
            queue = self._sends[pending.peer] = deque()
        queue.append(pending)

    def _send_metadata(self, key: MessageKey, spec: MessageSpec, peer: int) -> None:
        data = pickle.dumps(_spec_to_plain(spec))
        length = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        works = [
            self._post(dist.isend, length, peer, self._tag(key, "META", 0)),
            self._post(dist.isend, payload, peer, self._tag(key, "META", 1)),
        ]
        self._add_send(_PendingSend(key, peer, [length, payload], works))

    def post_recv(self, key: MessageKey, *, grad_specs: Sequence[TensorSpec] | None = None) -> PendingRecv:
        """Post the receive of ``key``. For ``"F"`` messages seen for the first time this first receives the
        metadata (blocking, bounded by the timeout); ``"B"`` messages need ``grad_specs`` (the receiver's own
        output tensors that need a gradient, in order)."""
        peer = self.peer_of(key, sending=False)
        if key.direction == "F":
            pair = (key.src_stage, torch.is_grad_enabled())
            spec = self._recv_specs.get(pair)
            if spec is None:
                spec = self._recv_metadata(key, peer)
                self._recv_specs[pair] = spec
            specs = spec.tensor_specs
        else:
            if grad_specs is None:
                grad_specs = self.sent_grad_specs(key.dst_stage)
            if grad_specs is None:
                raise RuntimeError(f"cannot post the receive of {key} before stage {key.dst_stage} sent its output")
            spec = None
            specs = tuple(grad_specs)
        buffers = [torch.empty(s.shape, dtype=s.dtype, device=self.device) for s in specs]
        works = [
            self._post(dist.irecv, buf, peer, self._tag(key, key.direction, slot)) for slot, buf in enumerate(buffers)
        ]
        return PendingRecv(key, peer, buffers, works, spec)

    def _recv_metadata(self, key: MessageKey, peer: int) -> MessageSpec:
        length = torch.empty(1, dtype=torch.int64, device=self.device)
        work = self._post(dist.irecv, length, peer, self._tag(key, "META", 0))
        self.flush()
        self._wait_work(work, key, peer, "receive metadata of")
        data = torch.empty(int(length.item()), dtype=torch.uint8, device=self.device)
        work = self._post(dist.irecv, data, peer, self._tag(key, "META", 1))
        self.flush()
        self._wait_work(work, key, peer, "receive metadata of")
        return _spec_from_plain(pickle.loads(data.cpu().numpy().tobytes()))

    # ------------------------------------------------------------------ completion
    def _wait_work(self, work: Any, key: MessageKey, peer: int, action: str) -> None:
        if isinstance(work, list):  # batched entry: [op, work or tuple of works]
            if work[1] is None:
                self.flush()
            work = work[1]
        if isinstance(work, tuple):
            for w in work:
                self._wait_work(w, key, peer, action)
            return
        if work is None:
            return
        try:
            if self.is_nccl and not self.blocking_cuda_waits:
                work.wait()
                return
            ok = work.wait(datetime.timedelta(seconds=self.timeout_s))
        except Exception as exc:  # gloo raises on timeout and on a closed connection
            raise RuntimeError(
                f"pipeline p2p: rank {self.rank} failed to {action} {key} with peer rank {peer} within "
                f"{self.timeout_s:.0f} s ({type(exc).__name__}: {exc}); is rank {peer} alive and running the "
                "same schedule?"
            ) from exc
        if ok is False:
            raise RuntimeError(
                f"pipeline p2p: rank {self.rank} timed out after {self.timeout_s:.0f} s trying to {action} {key} "
                f"with peer rank {peer}"
            )

    def wait(self, pending: PendingRecv) -> list[torch.Tensor]:
        """Wait for a posted receive; returns its tensors."""
        for work in pending.works:
            self._wait_work(work, pending.key, pending.peer, "receive")
        pending.works = []
        return pending.buffers

    def wait_sends(self) -> None:
        """Wait for every send posted so far (call before reusing their buffers and at the end of a step)."""
        self.flush()
        sends, self._sends = self._sends, {}
        for queue in sends.values():
            for s in queue:
                for work in s.works:
                    self._wait_work(work, s.key, s.peer, "send")

    def reap_sends(self) -> None:
        """Forget completed sends (never blocks), oldest first per peer: each peer's sends are checked up to the
        first one still running. On NCCL sends to one peer complete in posting order (one stream per direction),
        so nothing completed is kept long (gloo reports a send completed only once it is waited for: there every
        send stays until the step-end wait, as before), and a call costs one check
        per peer plus one per send it forgets, not one per send in flight (the executor calls it after every
        compute action, and a V schedule has dozens of sends in flight when the host runs ahead of the GPU)."""
        for queue in self._sends.values():
            while queue and _completed(queue[0]):
                queue.popleft()

    def abort(self) -> None:
        """Forget all pending operations (after an error; the process group is unusable for this step)."""
        self._sends = {}
        self._batch = {}


def _completed(send: _PendingSend) -> bool:
    """Whether every operation of ``send`` has finished (False while a batched one is not issued yet)."""
    for w in send.works:
        work = w[1] if isinstance(w, list) else w
        if work is None:
            return False
        if isinstance(work, tuple):
            if not all(piece.is_completed() for piece in work):
                return False
        elif not work.is_completed():
            return False
    return True


_DIRECTION_GROUPS: dict[tuple, tuple[Any, dict[tuple[int, int], dist.ProcessGroup]]] = {}
"""(edges, backend) -> (the world group they were made in, this rank's groups); rebuilt after a re-init."""


def _direction_groups(
    my_edges: list[tuple[int, int]], backend: str, device: torch.device, timeout_s: float
) -> dict[tuple[int, int], dist.ProcessGroup]:
    """One process group per directed (sender, receiver) pair of every pipeline in the world; returns this rank's.

    A collective over the default group: every rank calls it (``all_gather_object`` of the pipelines' edges,
    then ``new_group`` for each edge in one global order). With one group per direction, each NCCL stream
    carries one sender's messages to one receiver in order, so a send waits only for its own receive: no
    cycle of sends across ranks or across the two directions of a pair can block the streams (on a single
    communicator, interleaved 1F1B's gradient sends wait on each other in a ring; see
    tests/runtime/test_runtime_nccl_discipline.py). Created once per process for a given set of edges, with
    ``timeout_s`` as the groups' timeout (``new_group`` does not inherit the default group's; on NCCL the watchdog
    then aborts a transfer stuck longer than that instead of torch's 10-minute default).
    """
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, my_edges)
    all_edges = tuple(sorted({tuple(e) for edges in gathered for e in edges}))
    cache_key = (all_edges, backend)
    world = dist.group.WORLD
    entry = _DIRECTION_GROUPS.get(cache_key)
    cached = entry[1] if entry is not None and entry[0] is world else None
    if cached is None:
        cached = {}
        me = dist.get_rank()
        mine = {e for e in my_edges if me in e}  # my pipeline's edges that this rank sends or receives on
        for edge in all_edges:
            # every rank, same order
            group = dist.new_group(list(edge), backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
            if edge in mine:
                cached[edge] = group
        # the first batched p2p on an NCCL group must involve all its ranks (anchors.md): initialise each group
        # with a barrier, in the global edge order (acyclic: the smallest unfinished edge always has both ends)
        if "nccl" in backend:
            for edge in sorted(cached):
                dist.barrier(group=cached[edge], device_ids=[device.index] if device.index is not None else None)
        _connect_direction_groups(cached, device)  # needed on NCCL; on gloo it keeps the path tested in CI
        _DIRECTION_GROUPS[cache_key] = (world, cached)
    return cached


def _connect_direction_groups(groups: dict[tuple[int, int], dist.ProcessGroup], device: torch.device) -> None:
    """Open each direction group's NCCL p2p connection with one tiny exchange, in the global edge order.

    NCCL connects a pair of ranks lazily, inside the first ``ncclGroupEnd`` that carries a send or receive
    between them, and that call blocks the host until the peer joins. A barrier does not open p2p channels. In
    the pipeline a rank may post a receive batch on one direction group while its peer is busy computing, or
    blocked posting on another group, so that first connect would deadlock (seen on 2x H100: rank 0 stuck in
    ``batch_isend_irecv`` of its receive batch, rank 1 waiting on the activation rank 0 had not sent yet).
    Exchanging once per edge here, smallest edge first, cannot deadlock: the smallest unconnected edge always
    has both of its ranks at it.
    """
    me = dist.get_rank()
    for sender, receiver in sorted(groups):
        probe = torch.zeros(1, device=device)
        if me == sender:
            op = dist.P2POp(dist.isend, probe, receiver, groups[(sender, receiver)])
        else:
            op = dist.P2POp(dist.irecv, probe, sender, groups[(sender, receiver)])
        for work in dist.batch_isend_irecv([op]):
            work.wait()
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def _spec_to_plain(spec: MessageSpec) -> tuple:
    entries = []
    for e in spec.entries:
        if isinstance(e, TensorSpec):
            entries.append(("T", e.shape, str(e.dtype).replace("torch.", ""), e.requires_grad))
        else:
            entries.append(("V", e))
    return (tuple(entries), spec.is_tuple)


def _spec_from_plain(plain: tuple) -> MessageSpec:
    entries, is_tuple = plain
    out = []
    for e in entries:
        if e[0] == "T":
            out.append(TensorSpec(tuple(e[1]), getattr(torch, e[2]), bool(e[3])))
        else:
            out.append(e[1])
    return MessageSpec(tuple(out), bool(is_tuple))
