"""Per-rank bodies of the multi-process runtime tests (spawned by runtime_harness.run_ranks)."""
from __future__ import annotations

import functools
import time
from typing import Any

import torch
import torch.distributed as dist

from ds_plugins.runtime import (
    P2PCommunicator,
    PipelineExecutor,
    build_stage_modules,
    measured_costs,
    partition_layers,
)
from ds_plugins.schedule.lowering import serialize
from ds_plugins.schedule.registry import SCHEDULE_NAMES, build_schedule

from runtime_harness import (
    max_grad_diff,
    mlp_batches,
    mlp_layers,
    mse,
    reference_grads,
    tuple_batches,
    tuple_layers,
)

STEPS = 2  # two steps: the first exchanges shapes, the second posts receives early from cached shapes
_REFERENCES: dict[tuple, Any] = {}  # the single-process reference depends only on model, layers and data


@functools.lru_cache(maxsize=None)
def _schedule(name: str, pp: int, microbatches: int):
    return build_schedule(name, pp=pp, microbatches=microbatches)


def _check_schedule(
    name: str,
    rank: int,
    pp: int,
    microbatches: int,
    *,
    p2p_kwargs: dict[str, Any],
    model: str = "mlp",
    pipeline_ranks: list[int] | None = None,
    group: Any = None,
    data_seed: int = 1,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run schedule ``name`` for STEPS steps on this rank and compare against the single-process reference."""
    schedule = _schedule(name, pp, microbatches)
    shape = schedule.shape
    num_layers = 2 * shape.num_stages
    make_layers = mlp_layers if model == "mlp" else tuple_layers
    layers = [layer.to(device) for layer in make_layers(num_layers)]
    stage_modules = build_stage_modules(layers, shape, rank)
    inputs, targets = (mlp_batches if model == "mlp" else tuple_batches)(microbatches, seed=data_seed)
    inputs, targets = _to(inputs, device), _to(targets, device)
    pipeline_ranks = pipeline_ranks if pipeline_ranks is not None else list(range(pp))
    p2p = P2PCommunicator.for_shape(shape, pipeline_ranks, group=group, timeout_s=30, device=device, **p2p_kwargs)
    # NCCL-like transport on CPU: also run the serialized first step that CUDA runs by default
    serialize_first = p2p.ordered if device == "cpu" else None
    executor = PipelineExecutor(
        schedule, rank, stage_modules, p2p=p2p, loss_fn=mse, device=device, serialize_first=serialize_first
    )
    w_closures = [0]
    run_w = executor.queue.run

    def counted_run(stage: int, mb: int) -> int:
        n = run_w(stage, mb)
        w_closures[0] += n
        return n

    executor.queue.run = counted_run
    holds_first = 0 in stage_modules
    holds_last = shape.num_stages - 1 in stage_modules
    loss_scale = 1.0 / microbatches
    results = []
    for _ in range(STEPS):
        results.append(
            executor.run(inputs if holds_first else None, targets if holds_last else None, loss_scale=loss_scale)
        )
    # what ran: step 1 in serialize() order when the executor serializes its first step, the schedule's after
    def order(sched):
        return [(a.kind, a.stage) for a in sched.compute_actions(rank)]

    executed = [[(kind, stage) for kind, stage, _ in r._samples] for r in results]
    first_expected = order(serialize(schedule)) if executor.serialize_first else order(schedule)
    step_orders_ok = executed[0] == first_expected and all(e == order(schedule) for e in executed[1:])
    # evaluation after training (on NCCL-like transports its first run is serialized too): same losses, no grads
    grads_before = [p.grad.clone() for layer in layers for p in layer.parameters() if p.grad is not None]
    evaluation = executor.run(inputs if holds_first else None, targets if holds_last else None, forward_only=True)
    grads_after = [p.grad for layer in layers for p in layer.parameters() if p.grad is not None]
    eval_grads_untouched = len(grads_before) == len(grads_after) and all(
        torch.equal(a, b) for a, b in zip(grads_before, grads_after)
    )
    ref_key = (model, num_layers, microbatches, data_seed, device)
    if ref_key not in _REFERENCES:
        reference_layers = [layer.to(device) for layer in make_layers(num_layers)]
        _REFERENCES[ref_key] = reference_grads(reference_layers, inputs, targets, loss_scale=loss_scale, steps=STEPS)
    ref_grads, ref_losses = _REFERENCES[ref_key]
    bounds = partition_layers(num_layers, shape.num_stages)
    layer_ids = [i for s in stage_modules for i in bounds[s]]
    grad_diff, compared = max_grad_diff(layers, ref_grads, layer_ids)
    loss_diff = eval_loss_diff = 0.0
    if holds_last:
        got = torch.stack(list(results[-1].losses))
        loss_diff = (got - torch.stack(ref_losses)).abs().max().item()
        eval_loss_diff = (torch.stack(list(evaluation.losses)) - torch.stack(ref_losses)).abs().max().item()
    return {
        "grad_diff": grad_diff,
        "params_compared": compared,
        "loss_diff": loss_diff,
        "eval_loss_diff": eval_loss_diff,
        "serialized_first": executor.serialize_first,
        "step_orders_ok": step_orders_ok,
        "eval_grads_untouched": eval_grads_untouched,
        "losses_reported": len(results[-1].losses),
        "holds_last": holds_last,
        "splits_backward": schedule.splits_backward,
        "w_closures": w_closures[0],
        "placement": shape.placement,
        "vp": shape.vp,
        "busy_s": results[-1].busy_s,
        "wall_s": results[-1].wall_s,
        "mean_seconds": results[-1].mean_seconds(),
    }


def _to(values: list[Any], device: str) -> list[Any]:
    out = []
    for v in values:
        if isinstance(v, tuple):
            out.append(tuple(x.to(device) for x in v))
        else:
            out.append(v.to(device))
    return out


def all_schedules(
    rank: int, world: int, microbatches: int, modes: dict[str, dict[str, Any]], device: str = "cpu"
) -> dict:
    """Every registry schedule on a pp=world pipeline, in each p2p mode."""
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    out: dict[tuple[str, str], dict] = {}
    for mode, kwargs in modes.items():
        for name in SCHEDULE_NAMES:
            out[(mode, name)] = _check_schedule(name, rank, world, microbatches, p2p_kwargs=kwargs, device=device)
            dist.barrier()
    # the tuple/view/non-tensor model, V and looped placement (pp=2: previous and next peer are the same rank)
    for name in ("zb-v", "interleaved-1f1b", "1f1b"):
        out[("tuple-model", name)] = _check_schedule(
            name, rank, world, microbatches, p2p_kwargs={}, model="tuple", device=device
        )
        dist.barrier()
    # measured timings of a split schedule -> a cost model -> the auto scheduler
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, out[(next(iter(modes)), "zb-h1")]["mean_seconds"])
    schedule = _schedule("zb-h1", world, microbatches)
    costs = measured_costs(gathered, schedule.shape)
    auto = build_schedule("auto", pp=world, microbatches=microbatches, vp=1, costs=costs)
    out[("measured", "auto")] = {"stages": costs.num_stages, "auto_ranks": len(auto.actions),
                                  "forward": costs.forward, "backward_weight": costs.backward_weight}
    if world == 4:
        for name, r in data_parallel_pipelines(rank, world, 4, device).items():
            out[("dp2xpp2", name)] = r
    return out


def data_parallel_pipelines(rank: int, world: int, microbatches: int, device: str = "cpu") -> dict:
    """dp=2 x pp=2 on 4 ranks: pipeline groups {0,1} and {2,3}, each with its own data."""
    pp = 2
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_index, pipe_rank = divmod(rank, pp)
    ranks = [dp_index * pp + r for r in range(pp)]
    out = {}
    nccl_like = {"batched": True, "use_tags": False, "direction_groups": True}  # edges of both pipelines
    for name in ("zb-v", "interleaved-1f1b", "zb-h2"):
        out[name] = _check_schedule(
            name, pipe_rank, pp, microbatches, p2p_kwargs=nccl_like if name == "zb-v" else {},
            pipeline_ranks=ranks, group=groups[dp_index], data_seed=10 + dp_index, device=device,
        )
        dist.barrier()
    return out


def dead_peer(rank: int, world: int, mode: str, timeout_s: float) -> dict:
    """Rank 1 dies ("exit") or stays silent ("silent"); rank 0 must raise within its timeout."""
    schedule = _schedule("1f1b", 2, 2)
    layers = mlp_layers(4)
    stage_modules = build_stage_modules(layers, schedule.shape, rank)
    # "exit" runs with NCCL's settings (batched, untagged, direction groups), "silent" with tagged gloo
    kwargs = {"batched": True, "use_tags": False, "direction_groups": True} if mode == "exit" else {}
    p2p = P2PCommunicator.for_shape(schedule.shape, [0, 1], timeout_s=timeout_s, **kwargs)
    executor = PipelineExecutor(schedule, rank, stage_modules, p2p=p2p, loss_fn=mse, device="cpu")
    inputs, targets = mlp_batches(2)
    dist.barrier()
    if rank == 1:
        if mode == "exit":
            import os

            os._exit(0)
        time.sleep(timeout_s + 2)  # alive but never runs its part
        return {"slept": True}
    t0 = time.monotonic()
    try:
        executor.run(inputs, None)
    except RuntimeError as exc:
        return {"error": str(exc), "elapsed": time.monotonic() - t0}
    return {"error": None, "elapsed": time.monotonic() - t0}


class _CountedWork:
    """A send's work that counts its completion queries."""

    queries = 0

    def __init__(self, done: bool) -> None:
        self.done = done

    def is_completed(self) -> bool:
        _CountedWork.queries += 1
        return self.done

    def wait(self, timeout=None) -> bool:
        return True


def reap_queries(rank: int, world: int, in_flight: int) -> dict:
    """``in_flight`` sends to each of two peers: how many completion queries reap_sends makes while the oldest send
    to peer 1 runs and every send to peer 2 has completed, and which sends it forgets."""
    from ds_plugins.runtime.p2p import MessageKey, _PendingSend

    p2p = P2PCommunicator({0: 0, 1: 1, 2: 2}, timeout_s=5)
    works = {1: [], 2: []}
    for mb in range(in_flight):
        for peer in (1, 2):
            work = _CountedWork(done=peer == 2 or mb > 0)  # to peer 1 the oldest runs, the later ones are done
            works[peer].append(work)
            p2p._add_send(_PendingSend(MessageKey(0, "F", mb), peer, [], [work]))
    _CountedWork.queries = 0
    p2p.reap_sends()
    first = {"queries": _CountedWork.queries, "kept": {peer: len(q) for peer, q in p2p._sends.items()}}
    works[1][0].done = True
    _CountedWork.queries = 0
    p2p.reap_sends()
    second = {"queries": _CountedWork.queries, "kept": {peer: len(q) for peer, q in p2p._sends.items()}}
    p2p.wait_sends()
    return {"first": first, "second": second, "left": sum(len(q) for q in p2p._sends.values())}
