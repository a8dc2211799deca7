"""The executor in one process (pp=1: every hand-over is on-rank, including the V turn), its checks and its
timings; stage partitioning; measured costs."""
from __future__ import annotations

import pytest
import torch

from ds_plugins.runtime import PipelineExecutor, StepResult, build_stage_modules, measured_costs, partition_layers
from ds_plugins.schedule.ir import Action, ActionKind, PipelineShape, Schedule
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

TOL = 1e-12


def _run(name: str, model: str = "mlp", microbatches: int = 4, steps: int = 2, split_mode: str = "autograd"):
    schedule = build_schedule(name, pp=1, microbatches=microbatches)
    shape = schedule.shape
    n_layers = 2 * shape.num_stages
    make = mlp_layers if model == "mlp" else tuple_layers
    layers = make(n_layers)
    modules = build_stage_modules(layers, shape, 0)
    inputs, targets = (mlp_batches if model == "mlp" else tuple_batches)(microbatches)
    executor = PipelineExecutor(schedule, 0, modules, p2p=None, loss_fn=mse, device="cpu", split_mode=split_mode)
    results = [executor.run(inputs, targets, loss_scale=0.5) for _ in range(steps)]
    ref_grads, ref_losses = reference_grads(make(n_layers), inputs, targets, loss_scale=0.5, steps=steps)
    diff, count = max_grad_diff(layers, ref_grads, range(n_layers))
    assert count > 0
    return results, diff, (torch.stack(list(results[-1].losses)) - torch.stack(ref_losses)).abs().max().item()


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_single_rank_schedule_matches_reference(name):
    results, grad_diff, loss_diff = _run(name)
    assert grad_diff <= TOL and loss_diff <= TOL
    r = results[-1]
    assert len(r.losses) == 4
    assert 0 < r.busy_s <= r.wall_s + 1e-9 and 0 <= r.bubble_fraction < 1
    kinds = {k for k, _ in r.mean_seconds()}
    assert "F" in kinds and ("B" in kinds or {"I", "W"} <= kinds)


@pytest.mark.parametrize("name", ["zb-v", "interleaved-1f1b", "zb-h1"])
def test_single_rank_tuple_model_views_and_non_tensors(name):
    _, grad_diff, loss_diff = _run(name, model="tuple")
    assert grad_diff <= TOL and loss_diff <= TOL


@pytest.mark.parametrize("name", ["zb-v", "zb-h1"])
@pytest.mark.parametrize("model", ["mlp", "tuple"])
def test_single_rank_function_split_mode_matches_reference(name, model):
    _, grad_diff, loss_diff = _run(name, model=model, split_mode="function")
    assert grad_diff <= TOL and loss_diff <= TOL


def test_forward_only_returns_outputs_and_leaves_grads_alone():
    schedule = build_schedule("zb-v", pp=1, microbatches=3)
    layers = mlp_layers(4)
    modules = build_stage_modules(layers, schedule.shape, 0)
    inputs, targets = mlp_batches(3)
    executor = PipelineExecutor(schedule, 0, modules, p2p=None, loss_fn=mse, device="cpu", timing="none")
    r = executor.run(inputs, targets, forward_only=True, return_outputs=True)
    assert all(p.grad is None for layer in layers for p in layer.parameters())
    for x, y, out, loss in zip(inputs, targets, r.outputs, r.losses):
        value = x
        for layer in layers:
            value = layer(value)
        assert torch.allclose(out, value.detach(), rtol=0, atol=TOL)
        assert abs(loss.item() - mse(value, y).item()) <= TOL
    assert r.busy_s == 0.0 and r.wall_s > 0
    r = executor.run(inputs, None, forward_only=True)  # no targets: no loss
    assert r.losses == ()
    executor.run(inputs, targets)  # a training step after evaluation still works
    assert all(p.grad is not None for layer in layers for p in layer.parameters())


class _Checkpointed(torch.nn.Module):
    """A layer run under a reentrant checkpoint (refuses torch.autograd.grad: the executor falls back)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=True)


def test_reentrant_checkpoint_in_a_stage_falls_back_and_matches_reference(caplog):
    # both forwards (recorded) before the first I, which finds the checkpoint: the second I must not split either
    shape = PipelineShape(pp=1, microbatches=2)
    schedule = Schedule("hand", shape, (tuple(Action.parse(t) for t in "0F0 0F1 0I0 0I1 0W1 0W0".split()),))
    make = lambda: [_Checkpointed(m) if i == 1 else m for i, m in enumerate(mlp_layers(2))]  # noqa: E731
    layers = make()
    ex = PipelineExecutor(schedule, 0, build_stage_modules(layers, shape, 0), p2p=None, loss_fn=mse, device="cpu")
    inputs, targets = mlp_batches(2)
    with caplog.at_level("INFO", logger="ds_plugins.runtime.executor"):
        for _ in range(2):
            ex.run(inputs, targets)
    assert "reentrant checkpoint" in caplog.text and ex._no_record == {0}
    ref, _ = reference_grads(make(), inputs, targets, loss_scale=1.0, steps=2)
    diff, count = max_grad_diff(layers, ref, range(2))
    assert count > 0 and diff <= TOL


def test_bad_arguments_raise_value_error():
    schedule = build_schedule("zb-v", pp=2, microbatches=4)
    layers = mlp_layers(8)
    with pytest.raises(ValueError, match="holds stages"):
        PipelineExecutor(schedule, 0, build_stage_modules(layers, schedule.shape, 1), p2p=None, loss_fn=mse,
                         device="cpu")
    with pytest.raises(ValueError, match="P2PCommunicator"):
        PipelineExecutor(schedule, 0, build_stage_modules(layers, schedule.shape, 0), p2p=None, loss_fn=mse,
                         device="cpu")
    single = build_schedule("1f1b", pp=1, microbatches=4)
    ex = PipelineExecutor(single, 0, build_stage_modules(mlp_layers(2), single.shape, 0), p2p=None, loss_fn=mse,
                          device="cpu")
    inputs, targets = mlp_batches(4)
    with pytest.raises(ValueError, match="inputs for all 4"):
        ex.run(inputs[:3], targets)
    with pytest.raises(ValueError, match="targets for all 4"):
        ex.run(inputs, None)
    with pytest.raises(ValueError, match="timing"):
        PipelineExecutor(single, 0, build_stage_modules(mlp_layers(2), single.shape, 0), p2p=None, loss_fn=mse,
                         device="cpu", timing="sometimes")
    with pytest.raises(ValueError, match="split_mode"):
        PipelineExecutor(single, 0, build_stage_modules(mlp_layers(2), single.shape, 0), p2p=None, loss_fn=mse,
                         device="cpu", split_mode="hooks")


def test_schedule_without_backward_is_reported_and_state_resets():
    shape = PipelineShape(pp=1, microbatches=2)
    a = lambda t: Action.parse(t)  # noqa: E731
    broken = Schedule("broken", shape, ((a("0F0"), a("0F1"), a("0B0")),))
    layers = mlp_layers(2)
    ex = PipelineExecutor(broken, 0, build_stage_modules(layers, shape, 0), p2p=None, loss_fn=mse, device="cpu")
    inputs, targets = mlp_batches(2)
    with pytest.raises(RuntimeError, match="forward without backward"):
        ex.run(inputs, targets)
    assert len(ex.queue) == 0


def test_hand_built_split_schedule_defers_w_across_microbatches():
    # I of both micro-batches before any W, W in reverse order
    shape = PipelineShape(pp=1, microbatches=2)
    prog = tuple(Action.parse(t) for t in "0F0 0F1 0I0 0I1 0W1 0W0".split())
    layers = mlp_layers(3)
    ex = PipelineExecutor(Schedule("hand", shape, (prog,)), 0, build_stage_modules(layers, shape, 0), p2p=None,
                          loss_fn=mse, device="cpu")
    ran = []
    run_w = ex.queue.run
    ex.queue.run = lambda stage, mb: ran.append(run_w(stage, mb)) or ran[-1]
    inputs, targets = mlp_batches(2)
    r = ex.run(inputs, targets)
    assert len(ran) == 2 and all(n > 0 for n in ran), ran  # both W actions ran deferred weight-gradient GEMMs
    ref, _ = reference_grads(mlp_layers(3), inputs, targets, loss_scale=1.0)
    diff, _ = max_grad_diff(layers, ref, range(3))
    assert diff <= TOL
    assert set(r.mean_seconds()) == {("F", 0), ("I", 0), ("W", 0)}


def test_partition_layers():
    assert partition_layers(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert partition_layers(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    with pytest.raises(ValueError, match="equal stages"):
        partition_layers(7, 3, even=True)
    with pytest.raises(ValueError, match="cannot cut"):
        partition_layers(3, 4)


def test_build_stage_modules_follows_placement():
    layers = mlp_layers(8)
    v = PipelineShape(pp=2, microbatches=4, vp=2, placement="v")
    mods = build_stage_modules(layers, v, 0)
    assert sorted(mods) == [0, 3]
    assert list(mods[3]) == layers[6:8]
    loop = PipelineShape(pp=2, microbatches=4, vp=2, placement="loop")
    mods = build_stage_modules(layers, loop, 1)
    assert sorted(mods) == [1, 3] and list(mods[1]) == layers[2:4]


def test_measured_costs_from_timings():
    shape = PipelineShape(pp=2, microbatches=4)
    costs = measured_costs([{("F", 0): 1.0, ("I", 0): 2.0, ("W", 0): 0.5}, {("F", 1): 3.0, ("B", 1): 4.0}], shape)
    assert costs.forward == (1.0, 3.0)
    assert costs.backward_input == (2.0, 2.0) and costs.backward_weight == (0.5, 2.0)
    with pytest.raises(ValueError, match="every\\s+pipeline rank|stage 1"):
        measured_costs([{("F", 0): 1.0, ("B", 0): 1.0}], shape)
    mem = measured_costs(
        [{("F", 0): 1.0, ("B", 0): 1.0, ("F", 1): 1.0, ("B", 1): 1.0}], shape,
        memory=[{("F", 0): 100.0, ("I", 0): -70.0, ("F", 1): 50.0}],
    )
    # stage 1 ran full backwards only: what its W would keep is not measured -> the default share
    assert mem.activation_memory == (100.0, 50.0)
    assert mem.weight_grad_memory == pytest.approx((30.0, 50.0 * 32 / 34))
    assert costs.weight_grad_memory == pytest.approx((32 / 34, 32 / 34))  # no memory figures at all


def _timed_step(samples: list[tuple[ActionKind, int, float]]) -> StepResult:
    return StepResult(rank=0, stages=(0,), losses=(), outputs=(), wait_s=0.0, host_wall_s=sum(t for *_, t in samples),
                      samples=samples, step_events=None, memory={})


def test_measured_costs_ignore_stalled_actions_and_steps():
    # a cost model is built from what an action typically takes: one F stretched 5x by a stall (an allocator call,
    # a host-starved issue gap inside its CUDA-event span) or one slow warm-up step must not move it
    F, I, W = ActionKind.FORWARD, ActionKind.BACKWARD_INPUT, ActionKind.BACKWARD_WEIGHT
    samples = [(F, 0, 0.002)] * 7 + [(F, 0, 0.010)] + [(I, 0, 0.003)] * 8 + [(W, 0, 0.0015)] * 8
    step = _timed_step(samples)
    assert step.typical_seconds()[("F", 0)] == pytest.approx(0.002)
    assert step.mean_seconds()[("F", 0)] == pytest.approx(0.003)  # what the mean made of it
    # a cost every other action pays is kept (a median would report the fast half)
    alternating = _timed_step([(F, 0, 0.002), (F, 0, 0.004)] * 4)
    assert alternating.typical_seconds()[("F", 0)] == pytest.approx(0.003)
    shape = PipelineShape(pp=1, microbatches=8)
    slow_step = {("F", 0): 0.008, ("I", 0): 0.009, ("W", 0): 0.004}
    costs = measured_costs([step, step, slow_step], shape)
    assert costs.forward == pytest.approx((0.002,))
    assert costs.backward_input == pytest.approx((0.003,)) and costs.backward_weight == pytest.approx((0.0015,))


def test_host_issue_times_are_kept_next_to_the_action_times():
    F, I = ActionKind.FORWARD, ActionKind.BACKWARD_INPUT
    step = StepResult(rank=0, stages=(0,), losses=(), outputs=(), wait_s=0.0, host_wall_s=0.1,
                      samples=[(F, 0, 0.004)] * 8, step_events=None, memory={},
                      host_samples=[(F, 0, 0.001)] * 7 + [(F, 0, 0.009)] + [(I, 0, 0.002)] * 8)
    assert step.host_action_seconds[(F, 0)] == [0.001] * 7 + [0.009]
    assert step.typical_host_seconds() == pytest.approx({("F", 0): 0.001, ("I", 0): 0.002})  # one stall trimmed
    assert _timed_step([(F, 0, 0.004)]).host_action_seconds == {}  # host timing (CPU): the samples are host times


def test_backward_context_wraps_every_backward_action():
    import contextlib

    schedule = build_schedule("zb-h1", pp=1, microbatches=3)
    entered = []

    @contextlib.contextmanager
    def flag():
        entered.append(1)
        yield

    ex = PipelineExecutor(schedule, 0, build_stage_modules(mlp_layers(2), schedule.shape, 0), p2p=None,
                          loss_fn=mse, device="cpu", backward_context=flag)
    ex.run(*mlp_batches(3))
    assert len(entered) == 3 * 2 + 1  # I and W of each micro-batch, plus the final drain


def test_log_every_logs_bubble_and_tokens_per_second(caplog):
    import logging

    schedule = build_schedule("1f1b", pp=1, microbatches=2)
    ex = PipelineExecutor(schedule, 0, build_stage_modules(mlp_layers(2), schedule.shape, 0), p2p=None,
                          loss_fn=mse, device="cpu", log_every=2)
    with caplog.at_level(logging.INFO, logger="ds_plugins.runtime.executor"):
        ex.run(*mlp_batches(2), tokens=6)
        assert not caplog.records  # every 2nd step only
        ex.run(*mlp_batches(2), tokens=6)
    (record,) = caplog.records
    assert "bubble" in record.getMessage() and "tokens/s" in record.getMessage()
