"""At gpu_fraction 1.0 (nothing on the host) interleaf adds no per-iteration device work over DeepSpeed's own ZeRO-2
without offload: the same kernels in forward and no forward pre-hooks, no more kernels in backward + step besides
the update, one device read in the step.

Counted with a TorchDispatchMode over one steady iteration on DeepSpeed's CPU accelerator, bf16 with
``check_grad_overflow: false`` (benchmarks/offload.py's configuration), on a model of many small tensors. On a GPU
each counted op is a kernel launch (a few microseconds of host time and at least ~2 us of device time however
small the tensor) and each ``_local_scalar_dense`` a host-device synchronization. Before this test, an unread
per-gradient overflow test ran 13 ops per gradient (~3,800 launches per backward of the 1.34B GPT, 293 tensors).

The all-GPU state reached again after a round trip (all-GPU -> part on the host, part streamed -> all-GPU, as auto
moved on 1x H100) runs the same ops per phase and holds the same live tensors as before the first move.
"""
from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import _harness as H

BLOCKS = 12
BF16 = {"bf16": {"enabled": True, "check_grad_overflow": False}}


def _many_tensor_model() -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Linear(H.IN, H.HIDDEN)]
    for _ in range(BLOCKS):
        layers += [torch.nn.LayerNorm(H.HIDDEN), torch.nn.Linear(H.HIDDEN, H.HIDDEN), torch.nn.GELU()]
    layers.append(torch.nn.Linear(H.HIDDEN, H.OUT))
    return torch.nn.Sequential(*layers).to(torch.bfloat16)



class _OpCount(TorchDispatchMode):
    """Counts the (non-view) ops run under it, and which tensors were read to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.read_ids: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[str(func)] += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            self.read_ids.append(id(args[0]))
        return func(*args, **(kwargs or {}))


def _counted_iteration(engine, x, y) -> dict:
    """One bf16 training iteration with the ops of its forward, backward and step counted separately."""
    counters = {phase: _OpCount() for phase in ("forward", "backward", "step")}
    with counters["forward"]:
        loss = H.loss_fn(engine(x.to(torch.bfloat16)), y)
    with counters["backward"]:
        engine.backward(loss)
    with counters["step"]:
        engine.step()
    return counters

def _count_ops(rank, world):
    import deepspeed

    out = {}
    for name, cfg in (("ds", H.ds_config(offload=False, **BF16)),
                      ("il", H.ds_config(interleaf={"gpu_fraction": 1.0}, **BF16)),
                      ("il_half", H.ds_config(interleaf={"gpu_fraction": 0.5}, **BF16))):
        # one bucket for all gradients, as benchmarks/offload.py's 5e7 is about one layer of its GPT: DeepSpeed's
        # offload path clones each gradient larger than a bucket (its own, interleaf or not)
        cfg["zero_optimization"]["reduce_bucket_size"] = 10**6
        model = _many_tensor_model()
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          optimizer=H.make_optimizer(model.parameters()), config=cfg)
        phases = {}
        for step, (x, y) in enumerate(H.batches(3)):
            phases = _counted_iteration(engine, x, y)  # the last (steady) iteration's
        opt = engine.optimizer
        host_counters = {id(state["step"]) for state in opt.optimizer.state.values()
                         if isinstance(state.get("step"), torch.Tensor)}
        out[name] = {
            "ops": {phase: dict(c.ops) for phase, c in phases.items()},
            "device_reads": sum(1 for i in phases["step"].read_ids if i not in host_counters),
            "tensors": sum(1 for _ in model.parameters()),
            "forward_pre_hooks": sum(len(m._forward_pre_hooks) for m in model.modules()),
            "placements": ([p.value for p in opt._executor.placements]
                           if getattr(opt, "_executor", None) is not None else None),
            "subgroups": len(opt._executor.subgroups) if getattr(opt, "_executor", None) is not None else None,
        }
    return out


@pytest.fixture(scope="module")

def counts(tmp_path_factory):
    return H.run_ranks(_count_ops, 1, tmp_path_factory.mktemp("all_gpu"))[0]


def _total(ops: dict) -> int:
    return sum(ops.values())


@pytest.mark.timeout(300)
def test_everything_is_on_the_gpu(counts):
    assert counts["il"]["placements"] and set(counts["il"]["placements"]) == {"gpu_resident"}


@pytest.mark.timeout(300)
def test_forward_runs_the_same_ops(counts):
    assert counts["il"]["ops"]["forward"] == counts["ds"]["ops"]["forward"]


@pytest.mark.timeout(300)
def test_forward_pre_hooks_only_while_something_is_updated_on_the_host(counts):
    """A module with a forward pre-hook leaves PyTorch's fast call path (host time per module call)."""
    ds = counts["ds"]["forward_pre_hooks"]  # DeepSpeed's engine has its own on the root module
    assert counts["il"]["forward_pre_hooks"] == ds
    assert counts["il_half"]["forward_pre_hooks"] >= ds + 2 * BLOCKS  # per-layer waits with host subgroups


@pytest.mark.timeout(300)
def test_backward_and_step_run_no_more_ops_than_deepspeed_without_offload(counts):
    """Everything but the AdamW update itself: DeepSpeed's is ~10 ops over the flat partition here (torch AdamW,
    for-loop), interleaf's one fused launch per subgroup (at most SUBGROUPS_PER_RANK, never one per tensor)."""
    ds, il = counts["ds"]["ops"], counts["il"]["ops"]
    update = il["step"].get("interleaf.adamw_step_.default", 0)
    assert 1 <= update <= counts["il"]["subgroups"]
    il_total = _total(il["backward"]) + _total(il["step"]) - update
    ds_total = _total(ds["backward"]) + _total(ds["step"])
    extra = collections.Counter(il["backward"]) + collections.Counter(il["step"])
    extra.subtract(collections.Counter(ds["backward"]) + collections.Counter(ds["step"]))
    assert il_total <= ds_total, (
        f"interleaf at 100% GPU ran {il_total} ops in backward + step besides its AdamW update, DeepSpeed ZeRO-2 "
        f"without offload {ds_total} in all ({counts['il']['tensors']} parameter tensors); ops interleaf ran more "
        f"often: { {k: v for k, v in extra.items() if v > 0} }")


@pytest.mark.timeout(300)
def test_no_overflow_test_when_step_does_not_read_it(counts):
    """check_grad_overflow false: the per-gradient inf/nan test (amax/amin/isfinite...) is not run at all."""
    backward = counts["il"]["ops"]["backward"]
    found = {k: v for k, v in backward.items() if any(s in k for s in ("amax", "amin", "isfinite", "logical_"))}
    assert not found, found


@pytest.mark.timeout(300)
def test_one_device_read_per_step(counts):
    """The global norm is read once (the re-planner's synchronization point); DeepSpeed's own step reads none
    here, the optimizer's host step counters are not device reads."""
    assert counts["il"]["device_reads"] <= 1, counts["il"]["device_reads"]


def _moves(rank, world):
    """auto, its plans forced: all on the GPU, then about half on the host (step 3), then all on the GPU again
    (step 7); no wait between steps (only the forward pre-hooks order a layer after its host update)."""
    import deepspeed

    import ds_plugins.deepspeed.offload_optimizer as offload_optimizer
    from ds_plugins.offload.replan import ReplanRequest

    planner = offload_optimizer.plan_offload
    forced = {"gpu_fraction": 1.0}

    def plan(*args, **kwargs):
        return planner(*args, **{**kwargs, "gpu_fraction": forced["gpu_fraction"]})

    offload_optimizer.plan_offload = plan
    steps = 12
    data = H.batches(steps)
    ref = H.train_engine(H.ds_config(offload=False), steps, data=data)
    model = H.make_model()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      optimizer=H.make_optimizer(model.parameters()),
                                      config=H.ds_config(interleaf={"gpu_fraction": "auto"}))
    opt = engine.optimizer
    log = []
    for step, (x, y) in enumerate(data):
        engine.backward(H.loss_fn(engine(x), y))
        engine.step()
        if step in (3, 7):
            forced["gpu_fraction"] = 0.5 if step == 3 else 1.0
            opt._replanner.worth_moving = lambda *args, **kwargs: True
            opt._plan(carry_grads=False, request=ReplanRequest(rates=opt._rates, window_s=0.01, min_gpu_numel=0,
                                                              reason="test", measured=""))
        log.append((opt.last_plan.gpu_fraction, sum(len(m._forward_pre_hooks) for m in model.modules())))
    opt.wait_for_updates()
    return {"log": log, "diff": H.max_rel_diff(H.snapshot(engine.module), ref["params"][-1])}


@pytest.mark.timeout(300)
def test_forward_waits_follow_the_placement(tmp_path):
    out = H.run_ranks(_moves, 1, tmp_path)[0]
    fractions = [f for f, _ in out["log"]]
    hooks = [n for _, n in out["log"]]
    assert fractions[0] == 1.0 and 0.0 < fractions[3] < 1.0 and fractions[7] == 1.0, out["log"]
    base = hooks[0]  # DeepSpeed's own
    assert hooks[3:7] == [hooks[3]] * 4 and hooks[3] > base, out["log"]
    assert all(n == base for n in hooks[:3] + hooks[7:]), out["log"]
    assert out["diff"] <= 1e-6


def _round_trip(rank, world):
    """bf16 as above, auto with its plans forced: all on the GPU, then about half on the host with part of the GPU
    share streamed (step 3: a budget that holds two subgroups' state), then all on the GPU again (step 7). Per
    phase ops of a steady iteration before the first move (step 2) and after the move back (step 11), what is left
    alive after each, and the fp32 masters at the end (DeepSpeed without offload, same data, as reference)."""
    import gc

    import deepspeed

    import ds_plugins.deepspeed.offload_optimizer as offload_optimizer
    from ds_plugins.offload.replan import ReplanRequest

    planner = offload_optimizer.plan_offload
    forced = {"gpu_fraction": 1.0}

    def plan(*args, **kwargs):
        return planner(*args, **{**kwargs, "gpu_fraction": forced["gpu_fraction"]})

    offload_optimizer.plan_offload = plan
    steps, before, after = 12, 2, 11
    data = H.batches(steps)
    out = {}
    for name in ("ds", "il"):
        cfg = (H.ds_config(offload=False, **BF16) if name == "ds"
               else H.ds_config(interleaf={"gpu_fraction": "auto"}, **BF16))
        cfg["zero_optimization"]["reduce_bucket_size"] = 10**6
        model = _many_tensor_model()
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          optimizer=H.make_optimizer(model.parameters()), config=cfg)
        opt = engine.optimizer
        record = {}
        for step, (x, y) in enumerate(data):
            counters = _counted_iteration(engine, x, y)
            if name == "ds":
                continue
            ex = opt._executor
            gc.collect()
            tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
            record[step] = {
                "ops": {phase: dict(c.ops) for phase, c in counters.items()},
                "tensors": len(tensors),
                "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors),
                "placements": collections.Counter(p.value for p in ex.placements),
                "device_state": sorted(ex._device_state), "device_grads": sorted(ex._device_grad),
                "gpu_state_bytes": ex.gpu_state_bytes(), "staging": len(ex._staging),
                "in_flight": (len(ex._pending), len(ex._upload_events), len(ex._previous_uploads),
                              len(ex._stream_stored), len(ex._stall_events), len(ex._early)),
                "forward_pre_hooks": sum(len(m._forward_pre_hooks) for m in model.modules()),
            }
            del tensors
            if step in (3, 7):
                forced["gpu_fraction"] = 0.5 if step == 3 else 1.0
                budget = 3 * 4 * 4000.0 if step == 3 else float("inf")
                opt._budget_bytes = lambda budget=budget: budget
                opt._replanner.worth_moving = lambda *args, **kwargs: True
                opt._plan(carry_grads=False, request=ReplanRequest(
                    rates=opt._rates, window_s=0.01, min_gpu_numel=0, reason="test", measured=""))
        if hasattr(opt, "wait_for_updates"):
            opt.wait_for_updates()
            opt.sync_optimizer_state()
        masters = [t.detach().double().numpy().copy() for t in opt.single_partition_of_fp32_groups]
        out[name] = {"masters": masters, "before": record.get(before), "middle": record.get(5),
                     "after": record.get(after)}
    return out


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    return H.run_ranks(_round_trip, 1, tmp_path_factory.mktemp("round_trip"))[0]


@pytest.mark.timeout(300)
def test_round_trip_really_moved(round_trip):
    before, middle, after = (round_trip["il"][k]["placements"] for k in ("before", "middle", "after"))
    assert middle["cpu"] > 0 and middle["gpu_streamed"] > 0, middle
    assert before == after == {"gpu_resident": sum(before.values())}, (before, after)


@pytest.mark.timeout(300)
def test_all_gpu_after_a_round_trip_runs_the_same_ops_as_before(round_trip):
    """All-GPU -> half on the host (part streamed) -> all-GPU: a steady iteration after the move back runs exactly
    the ops of one before the first move, phase by phase (no host-gradient routing, staging or hooks left on)."""
    before, after = round_trip["il"]["before"]["ops"], round_trip["il"]["after"]["ops"]
    for phase in ("forward", "backward", "step"):
        diff = collections.Counter(after[phase])
        diff.subtract(before[phase])
        assert after[phase] == before[phase], (phase, {k: v for k, v in diff.items() if v})


@pytest.mark.timeout(300)
def test_all_gpu_after_a_round_trip_holds_the_same_tensors(round_trip):
    """Nothing of the host phase is kept: the same live tensors (count and bytes: device state of subgroups that
    went to the host and came back is not held twice, staging buffers are gone), nothing in flight."""
    before, after = round_trip["il"]["before"], round_trip["il"]["after"]
    for key in ("tensors", "tensor_bytes", "device_state", "device_grads", "gpu_state_bytes", "staging",
                "in_flight", "forward_pre_hooks"):
        assert after[key] == before[key], (key, before[key], after[key])
    assert after["in_flight"] == (0, 0, 0, 0, 0, 0) and after["staging"] == 0


@pytest.mark.timeout(300)
def test_round_trip_exact_against_deepspeed_without_offload(round_trip):
    import numpy as np

    for mine, ref in zip(round_trip["il"]["masters"], round_trip["ds"]["masters"]):
        assert float(np.linalg.norm(mine - ref) / np.linalg.norm(ref)) <= 1e-6
