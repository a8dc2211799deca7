"""Re-planner: recalibration from measured iterations, drift, settling, the safety rail (torch-free)."""
import pytest

from ds_plugins.offload.planner import ByteModel, Placement, estimate, plan_offload, uniform_timings, with_host_rate
from ds_plugins.offload.replan import IterationObservation, PlanningContext, Replanner

from .test_planner import (
    BF16_GRADS,
    H100_PROBE,
    H100_TRAINING_HOST_RATE,
    H100_WINDOW,
    M,
    gpt_1_3b_numels,
    rates,
)


def h100_context():
    return PlanningContext(numels=tuple(gpt_1_3b_numels()), byte_model=BF16_GRADS, early_host_start=True)


def plan_for(ctx, r, window, **kwargs):
    return plan_offload(uniform_timings(ctx.numels, window), r, early_host_start=ctx.early_host_start,
                        byte_model=ctx.byte_model, per_layer_waits=ctx.per_layer_waits, **kwargs)


class Machine:
    """A stand-in for the device: what an iteration under a plan measures, from the model at the TRUE rates."""

    def __init__(self, ctx, true_rates, window):
        self.ctx, self.rates, self.window = ctx, true_rates, window

    def run(self, plan) -> IterationObservation:
        est = self.ctx.estimate(plan, self.rates, self.window)
        host = sum(n for n, p in zip(plan.numels, plan.placements) if p is Placement.CPU)
        return IterationObservation(
            period_s=self.window + est.overhead_s, host_numel=host,
            host_busy_s=host / self.rates.cpu_update_params_per_s, stall_s=est.forward_stall_s)


def test_h100_loop_moves_toward_the_gpu():
    """The H100 run: probe 7.68 G params/s -> 17% on the GPU; training measures 4.7 and a ~100 ms stall; the
    re-planner must recalibrate and land near 0.5 or above (0.5 measured 1.03x GPU-resident)."""
    ctx = h100_context()
    probe = rates(**H100_PROBE)
    machine = Machine(ctx, with_host_rate(probe, H100_TRAINING_HOST_RATE), H100_WINDOW)
    replanner = Replanner(ctx, replan_interval=50)
    first = plan_for(ctx, probe, H100_WINDOW, rate_margin=0.0)  # what the old planner did
    assert first.gpu_fraction == pytest.approx(0.174, abs=0.01)
    replanner.planned(first, probe, H100_WINDOW, settle=True)
    obs = machine.run(first)
    assert obs.stall_s > 0.07  # the model at the true rate reproduces the measured ~100 ms
    assert replanner.observe(obs) is None  # the iteration right after a move is skipped
    request = replanner.observe(obs)
    assert request is not None
    assert "safety rail" in request.reason and "host rate" in request.reason
    assert request.rates.cpu_update_params_per_s <= H100_TRAINING_HOST_RATE * 1.001
    assert request.window_s == pytest.approx(H100_WINDOW, rel=0.01)
    assert request.min_gpu_numel > replanner.gpu_numel()
    second = plan_for(ctx, request.rates, request.window_s, min_gpu_numel=request.min_gpu_numel)
    assert 0.45 <= second.gpu_fraction <= 0.75
    assert second.estimate.overhead_s < 0.015
    # the new plan holds on the machine: no further re-plan, no stall beyond the margin
    replanner.planned(second, request.rates, request.window_s, settle=True)
    for _ in range(10):
        obs = machine.run(second)
        assert obs.stall_s <= second.estimate.forward_stall_s + replanner.margin_s()
        assert replanner.observe(obs) is None


def test_quiet_while_the_prediction_holds_then_replans_at_the_interval():
    ctx = h100_context()
    r = with_host_rate(rates(**H100_PROBE), H100_TRAINING_HOST_RATE)
    machine = Machine(ctx, r, H100_WINDOW)
    plan = plan_for(ctx, r, H100_WINDOW)
    replanner = Replanner(ctx, replan_interval=5)
    replanner.planned(plan, r, H100_WINDOW, settle=False)
    requests = [replanner.observe(machine.run(plan)) for _ in range(5)]
    assert requests[:4] == [None] * 4
    assert requests[4] is not None and "iterations since the last plan" in requests[4].reason
    assert requests[4].min_gpu_numel == 0


def test_drift_in_window_or_host_rate_asks_for_a_plan():
    ctx = h100_context()
    r = with_host_rate(rates(**H100_PROBE), H100_TRAINING_HOST_RATE)
    plan = plan_for(ctx, r, H100_WINDOW)
    # the host got slower (another job on the host): rate drift beyond 10%
    replanner = Replanner(ctx, replan_interval=100)
    replanner.planned(plan, r, H100_WINDOW, settle=False)
    slow = Machine(ctx, with_host_rate(r, 0.8 * H100_TRAINING_HOST_RATE), H100_WINDOW)
    request = replanner.observe(slow.run(plan))
    assert request is not None and "host rate" in request.reason
    assert request.rates.cpu_update_params_per_s == pytest.approx(0.8 * H100_TRAINING_HOST_RATE, rel=1e-6)
    assert plan_for(ctx, request.rates, request.window_s).gpu_fraction > plan.gpu_fraction
    # a longer window (bigger micro-batch): more room to hide the host half
    replanner = Replanner(ctx, replan_interval=100)
    replanner.planned(plan, r, H100_WINDOW, settle=False)
    request = replanner.observe(Machine(ctx, r, 2 * H100_WINDOW).run(plan))
    assert request is not None and "window" in request.reason
    assert request.window_s == pytest.approx(2 * H100_WINDOW, rel=0.05)
    assert plan_for(ctx, request.rates, request.window_s).gpu_fraction < plan.gpu_fraction


def test_disturbed_and_settling_iterations_are_ignored():
    ctx = h100_context()
    r = rates(**H100_PROBE)
    plan = plan_for(ctx, r, H100_WINDOW)
    replanner = Replanner(ctx, replan_interval=100, settle_iterations=2)
    replanner.planned(plan, r, H100_WINDOW, settle=True)
    bad = IterationObservation(period_s=1.0, host_numel=10 * M, host_busy_s=1.0, stall_s=0.8)
    assert replanner.observe(bad) is None and replanner.observe(bad) is None  # settling
    assert replanner.observe(IterationObservation(period_s=1.0, host_numel=10 * M, host_busy_s=1.0, stall_s=0.8,
                                                  disturbed=True)) is None  # a checkpoint in between
    assert replanner.observe(bad) is not None


def test_safety_rail_floor_and_its_expiry():
    # a host predicted to hide completely stalls the forward by 20 ms: the rail asks for strictly more GPU share
    # than the failing plan (and the fitted rate reproduces the stall); the floor lasts replan_interval iterations
    numels = (10 * M,) * 10
    ctx = PlanningContext(numels=numels, byte_model=ByteModel())
    r = rates(cpu=1e12, h2d=float("inf"), d2h=float("inf"), duplex=float("inf"))  # everything hides
    window = 0.05
    plan = plan_for(ctx, r, window)
    assert plan.gpu_fraction == 0.0 and plan.estimate.forward_stall_s < 1e-3
    replanner = Replanner(ctx, replan_interval=3)
    replanner.planned(plan, r, window, settle=False)
    obs = IterationObservation(period_s=window + 0.02, host_numel=100 * M, host_busy_s=100 * M / 1e12,
                               stall_s=0.02)
    request = replanner.observe(obs)
    assert request is not None and "safety rail" in request.reason
    assert request.min_gpu_numel == 1
    assert request.rates.cpu_update_params_per_s < 1e12
    refit = estimate(plan.placements, uniform_timings(numels, request.window_s), request.rates, ctx.byte_model)
    assert refit.forward_stall_s == pytest.approx(0.02, rel=0.01)
    moved = plan_for(ctx, request.rates, request.window_s, min_gpu_numel=request.min_gpu_numel)
    assert moved.gpu_fraction >= 0.1
    assert moved.estimate.forward_stall_s < 0.02
    replanner.planned(moved, request.rates, request.window_s, settle=False)
    fine = IterationObservation(period_s=window + moved.estimate.overhead_s, host_numel=0, stall_s=0.0)
    assert replanner.observe(fine) is None
    assert replanner.observe(fine) is None
    request = replanner.observe(fine)  # interval reached: the floor (and the fitted rate) expired with it
    assert request is not None and request.min_gpu_numel == 0
    assert request.rates.cpu_update_params_per_s == pytest.approx(1e12)  # back to the measured busy-time rate


def test_recalibrated_estimate_matches_measured_iteration():
    """After one observation the model's iteration time (window + overhead) for the running plan matches what
    was measured, which is what 'honest' means for the printed prediction."""
    ctx = h100_context()
    probe = rates(**H100_PROBE)
    truth = with_host_rate(probe, H100_TRAINING_HOST_RATE)
    machine = Machine(ctx, truth, H100_WINDOW)
    plan = plan_for(ctx, probe, H100_WINDOW, gpu_fraction=0.174)
    replanner = Replanner(ctx, replan_interval=50)
    replanner.planned(plan, probe, H100_WINDOW, settle=False)
    obs = machine.run(plan)
    request = replanner.observe(obs)
    again = estimate(plan.placements, uniform_timings(ctx.numels, request.window_s), request.rates,
                     ctx.byte_model, early_host_start=True)
    assert request.window_s + again.overhead_s == pytest.approx(obs.period_s, rel=0.03)


def _noisy_loop(min_gain_fraction, iterations=40):
    """The optimizer's re-plan loop on a machine whose window jitters +-15% around the H100 window (as measured:
    155-201 ms between iterations); returns the iterations at which state moved after the first plan."""
    ctx = h100_context()
    r = with_host_rate(rates(**H100_PROBE), H100_TRAINING_HOST_RATE)
    replanner = Replanner(ctx, replan_interval=50, min_gain_fraction=min_gain_fraction)
    plan = plan_for(ctx, r, H100_WINDOW)
    replanner.planned(plan, r, H100_WINDOW, settle=False)
    moves = []
    for i in range(iterations):
        window = H100_WINDOW * (1.15 if i % 4 < 2 else 0.87)
        request = replanner.observe(Machine(ctx, r, window).run(plan))
        if request is None:
            continue
        candidate = plan_for(ctx, request.rates, request.window_s, min_gpu_numel=request.min_gpu_numel)
        timings = uniform_timings(ctx.numels, request.window_s)
        running = estimate(plan.placements, timings, request.rates, ctx.byte_model,
                           early_host_start=ctx.early_host_start, per_layer_waits=ctx.per_layer_waits)
        forced = request.min_gpu_numel > replanner.gpu_numel()
        move = candidate.placements != plan.placements and replanner.worth_moving(
            running, candidate.estimate, request.window_s, forced=forced)
        if move:
            moves.append(i)
            plan = candidate
        replanner.planned(plan, request.rates, request.window_s, settle=move)
    return moves


def test_window_noise_does_not_move_state_back_and_forth():
    """1x H100 run: plans 60% -> 58% -> 65% -> 58% on the GPU within 12 steps, driven by window noise, each move
    a 0.2 s iteration. A re-plan moves state only when it is needed (rail, stall) or saves > 2% of the window."""
    assert len(_noisy_loop(min_gain_fraction=0.0)) >= 15  # without the threshold: a move every other iteration
    moves = _noisy_loop(min_gain_fraction=0.02)
    assert len(moves) <= 2 and max(moves) < 10, moves  # settles on the placement the short windows need


def test_worth_moving():
    ctx = h100_context()
    r = with_host_rate(rates(**H100_PROBE), H100_TRAINING_HOST_RATE)
    replanner = Replanner(ctx, replan_interval=50)
    good = plan_for(ctx, r, H100_WINDOW).estimate
    stalled = plan_for(ctx, rates(**H100_PROBE), H100_WINDOW, rate_margin=0.0)  # planned at the probe's rate
    stalled_est = estimate(stalled.placements, uniform_timings(ctx.numels, H100_WINDOW), r, ctx.byte_model,
                           early_host_start=True)
    assert stalled_est.forward_stall_s > 0.05
    assert replanner.worth_moving(stalled_est, good, H100_WINDOW, forced=False)  # the running one stalls
    assert not replanner.worth_moving(good, good, H100_WINDOW, forced=False)  # nothing to gain
    assert replanner.worth_moving(good, good, H100_WINDOW, forced=True)  # the safety rail's floor
