"""The NCCL posting discipline, checked on CPU: run the real executor of every rank with a recording
communicator (batched, untagged), then replay the recorded batches under NCCL's rules:

- messages between two ranks match in posting order (no tags): the k-th send A->B must be the k-th receive
  B<-A, for the same (stage, direction, micro-batch);
- each rank's batches run one after another on one stream; a send/recv pair completes only while both of
  their batches are running, a batch ends when all its operations completed.

A schedule whose batches cannot all complete would hang on GPUs; the replay reports it as a deadlock.
"""
from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from ds_plugins.runtime import PipelineExecutor, build_stage_modules
from ds_plugins.runtime.p2p import MessageSpec, PendingRecv, TensorSpec
from ds_plugins.schedule.registry import SCHEDULE_NAMES, build_schedule

from runtime_harness import HIDDEN, ROWS, mlp_batches, mlp_layers, mse


class RecordingP2P:
    """Stands in for P2PCommunicator in batched (NCCL) mode; records what is posted, in batches."""

    batched = True
    ordered = True

    def __init__(self, uses_direction_groups: bool = True) -> None:
        self.uses_direction_groups = uses_direction_groups
        self.batches: list[list[tuple[str, object]]] = [[]]

    def has_spec(self, key) -> bool:
        return True

    def post_recv(self, key) -> PendingRecv:
        self.batches[-1].append(("recv", key))
        spec = MessageSpec((TensorSpec((ROWS, HIDDEN), torch.float64, True),), False)
        buf = torch.zeros(ROWS, HIDDEN, dtype=torch.float64)
        return PendingRecv(key, -1, [buf], [], spec if key.direction == "F" else None)

    def send(self, key, value) -> None:
        self.batches[-1].append(("send", key))

    def flush(self) -> None:
        if self.batches[-1]:
            self.batches.append([])

    def wait(self, pending: PendingRecv):
        return pending.buffers

    def wait_sends(self) -> None:
        self.flush()

    def reap_sends(self) -> None:
        pass

    def abort(self) -> None:
        pass


def _record(
    name: str, pp: int, microbatches: int, *, direction_groups: bool = True, lookahead: int | None = None
) -> tuple[object, list[list[list[tuple[str, object]]]]]:
    schedule = build_schedule(name, pp=pp, microbatches=microbatches)
    shape = schedule.shape
    per_rank = []
    for rank in range(pp):
        layers = mlp_layers(shape.num_stages + 1)  # first stage has the input projection + 1 block
        modules = build_stage_modules(layers, shape, rank)
        p2p = RecordingP2P(direction_groups)
        ex = PipelineExecutor(schedule, rank, modules, p2p=p2p, loss_fn=mse, device="cpu", timing="none",
                              recv_lookahead=lookahead)
        inputs, targets = mlp_batches(microbatches)
        ex.run(inputs if 0 in modules else None, targets if shape.num_stages - 1 in modules else None)
        per_rank.append([b for b in p2p.batches if b])
    return shape, per_rank


def _replay(shape, per_rank, streams: str = "direction") -> None:
    pp = shape.pp
    # 1) order-matching without tags
    sends: dict[tuple[int, int], list] = defaultdict(list)
    recvs: dict[tuple[int, int], list] = defaultdict(list)
    ops = []  # (rank, batch index, op id)
    op_of = {}
    for rank, batches in enumerate(per_rank):
        for b, batch in enumerate(batches):
            for kind, key in batch:
                if kind == "send":
                    peer = shape.rank_of(key.dst_stage)
                    sends[(rank, peer)].append((rank, b, key))
                else:
                    peer = shape.rank_of(key.src_stage)
                    recvs[(peer, rank)].append((rank, b, key))
    match = {}
    for pair in set(sends) | set(recvs):
        s, r = sends.get(pair, []), recvs.get(pair, [])
        assert len(s) == len(r), f"ranks {pair}: {len(s)} sends but {len(r)} receives"
        for (sr, sb, sk), (rr, rb, rk) in zip(s, r):
            assert sk == rk, f"ranks {pair}: send of {sk} would match the receive of {rk} (untagged NCCL)"
            match[(sr, sb, "send", sk)] = (rr, rb, "recv", rk)
            match[(rr, rb, "recv", rk)] = (sr, sb, "send", sk)
    # 2) stream replay. streams="rank": one stream per rank (one communicator); streams="direction": one per
    # rank and directed rank pair (the communicator's direction groups). A stream's head batch is running; an
    # op completes when its partner's batch is the head of the partner's stream too.
    def stream_of(rank, kind, key):
        if streams == "rank":
            return (rank,)
        if kind == "send":
            return (rank, rank, shape.rank_of(key.dst_stage))
        return (rank, shape.rank_of(key.src_stage), rank)

    queues: dict[tuple, list[tuple[int, set]]] = defaultdict(list)  # stream -> [(batch index, ops)]
    for rank, batches in enumerate(per_rank):
        for b, batch in enumerate(batches):
            for kind, key in batch:
                q = queues[stream_of(rank, kind, key)]
                if not q or q[-1][0] != b:
                    q.append((b, set()))
                q[-1][1].add((rank, b, kind, key))
    stream_by_op = {op: st for st, q in queues.items() for _, ops in q for op in ops}
    while True:
        progressed = False
        for st, q in queues.items():
            if not q:
                continue
            for op in list(q[0][1]):
                partner = match[op]
                pq = queues[stream_by_op[partner]]
                if pq and pq[0][0] == partner[1] and partner in pq[0][1]:
                    q[0][1].discard(op)
                    pq[0][1].discard(partner)
                    progressed = True
        for q in queues.values():
            while q and not q[0][1]:
                q.pop(0)
                progressed = True
        if all(not q for q in queues.values()):
            return
        if not progressed:
            stuck = {st: sorted(f"{op[3]}:{op[2]}" for op in q[0][1]) for st, q in queues.items() if q}
            raise AssertionError(f"NCCL batches deadlock; stuck head batches per stream: {stuck}")


@pytest.mark.parametrize("pp,microbatches", [(2, 4), (4, 8), (4, 4)])
@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_batched_untagged_posting_matches_and_never_deadlocks(name, pp, microbatches):
    shape, per_rank = _record(name, pp, microbatches)  # direction groups, lookahead 4
    _replay(shape, per_rank)
    shape, per_rank = _record(name, pp, microbatches, lookahead=0)
    _replay(shape, per_rank)
    shape, per_rank = _record(name, pp, microbatches, lookahead=1 << 30)  # every receive at step start
    _replay(shape, per_rank)


# On one stream per rank, a send blocks every later transfer of that rank until its receive runs: interleaved
# 1F1B, and zb-v / auto (V placement, with W keeping memory so W's interleave with I's), close a cycle of such sends.
ONE_STREAM_DEADLOCKS = ("interleaved-1f1b", "zb-v", "auto")


@pytest.mark.parametrize("name", [n for n in SCHEDULE_NAMES if n not in ONE_STREAM_DEADLOCKS])
def test_single_group_posting_without_lookahead_also_completes(name):
    """direction_groups=False (one NCCL group) keeps lookahead 0; these schedules complete there too."""
    shape, per_rank = _record(name, 4, 8, direction_groups=False)
    _replay(shape, per_rank, streams="rank")


@pytest.mark.parametrize("name", ONE_STREAM_DEADLOCKS)
def test_single_group_deadlocks_these_schedules(name):
    """Why direction groups are the NCCL default: with one group these schedules' sends wait in a cycle."""
    shape, per_rank = _record(name, 4, 8, direction_groups=False)
    with pytest.raises(AssertionError, match="deadlock"):
        _replay(shape, per_rank, streams="rank")


def test_replay_catches_a_wrong_order():
    """The checker itself can fail: swap two receives from the same peer on one rank."""
    shape, per_rank = _record("zb-v", 2, 4)
    batches = per_rank[1]
    recv_positions = [(b, i) for b, batch in enumerate(batches) for i, (kind, _) in enumerate(batch) if kind == "recv"]
    (b1, i1), (b2, i2) = recv_positions[0], recv_positions[1]
    batches[b1][i1], batches[b2][i2] = batches[b2][i2], batches[b1][i1]
    with pytest.raises(AssertionError, match="would match|deadlock"):
        _replay(shape, per_rank)
