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


# ---------------------------------------------------------------------------------------------------------------
# Host work slows forward + backward (interference). Two benchmarks/offload.py runs on 1x H100 (16 CPUs), GPT 1.34B,
# bf16, no clipping (updates start during backward), GPU-resident 0.175 s/iter, 2026-11-26. The numbers below are
# the runs' own log lines ("interleaf offload plan at step N ... measured: iteration ..."); iterations that made no
# log line (no re-plan) are taken from the same run's per-iteration times (offload.json) with a host busy time
# between the logged ones.

def _h100_context_of(probe):
    return PlanningContext(numels=tuple(gpt_1_3b_numels()), byte_model=BF16_GRADS, early_host_start=True), probe


H100_15_THREADS_PROBE = rates(cpu=5.50e9, gpu=98.3e9, h2d=54.9e9, d2h=55.0e9, duplex=95.0e9)
H100_8_THREADS_PROBE = rates(cpu=4.18e9, gpu=97.4e9, h2d=54.4e9, d2h=54.7e9, duplex=96.7e9)
# 15 host threads: step 2 plans from iteration 1 (everything on the GPU, window 156.6 ms) 45.2% on the GPU, i.e.
# 737.0 M parameters updated on the host; then (iteration ms, host busy ms), the first one the settling iteration:
H100_15_THREADS_FIRST = (170.3, 0.452)
H100_15_THREADS_AFTER = [(240.1, 170.0), (232.6, 163.6), (228.6, 178.7), (275.8, 180.0), (238.7, 180.0),
                         (327.0, 200.0), (278.3, 205.8), (222.7, 170.0), (226.1, 164.4), (225.2, 159.4)]
# 8 host threads: iteration 1 at 168.8 ms (window 155.0), then plans 57.7% / 65.1% / 75.1% on the GPU, each
# followed by the logged (iteration ms, host M params, busy ms) under it:
H100_8_THREADS_FIRST = 168.8
H100_8_THREADS_AFTER = [(0.577, [(171.6, 569.1, 162.8)]), (0.651, [(222.2, 468.4, 205.1)]),
                        (0.751, [(224.0, 334.1, 99.6), (226.5, 334.1, 98.9), (170.8, 334.1, 98.8)])]


def _host_numel(plan):
    return sum(n for n, p in zip(plan.numels, plan.placements) if p is Placement.CPU)


def _measure_reference(replanner, period_ms):
    """The all-GPU iterations before the first plan with host work: the runs logged one (they planned from it);
    the re-planner now waits for `2 * history - 1` of them, so the logged one is fed that many times."""
    for _ in range(2 * replanner.history - 2):
        assert replanner.observe(IterationObservation(period_s=period_ms / 1e3)) is None
    request = replanner.observe(IterationObservation(period_s=period_ms / 1e3))
    assert request is not None and "window measured" in request.reason
    return request


def test_a_slow_first_iteration_does_not_become_the_reference():
    """1x H100, third run of 2026-11-26: the first all-GPU iteration took 240.0 ms (window 225.9 ms) against ~176
    ms steady; planned from it alone, the stretch host work later caused stayed under the 15% margin of that
    reference and was never charged (auto 1.29x GPU-resident). 1x H100, 2026-11-26 (session 6): the first three
    all-GPU iterations after start-up had a median window of 191.7 ms against ~160 ms steady, and the 37% stretch
    host work caused stayed near the 15% margin of it for 12 iterations (auto 1.30x). The reference is the lowest
    median of `history` consecutive ones among `2 * history - 1` iterations without host work, and the first plan
    with host work waits for them."""
    ctx, probe = _h100_context_of(H100_8_THREADS_PROBE)
    replanner = Replanner(ctx, replan_interval=50)
    replanner.planned(plan_for(ctx, probe, 0.0, gpu_fraction=1.0), probe, 0.0, settle=False)
    periods = (240.0, 208.0, 176.2, 175.8, 176.0)  # two slow iterations after start-up: a median of 3 says 208
    requests = [replanner.observe(IterationObservation(period_s=p / 1e3)) for p in periods]
    assert requests[:4] == [None] * 4
    assert requests[4] is not None
    assert "lowest median of 3 consecutive among 5 iterations without host work" in requests[4].reason
    steady = replanner.reference_window_s
    assert steady == pytest.approx(requests[4].window_s) and steady < 0.176  # the steady window, not 225.9 ms
    # with host work from the first plan on (a fixed gpu_fraction) the first window is taken at once
    fixed = Replanner(ctx, replan_interval=50)
    half = plan_for(ctx, probe, 0.0, gpu_fraction=0.5)
    fixed.planned(half, probe, 0.0, settle=False)
    first = fixed.observe(IterationObservation(period_s=0.44, host_numel=_host_numel(half), host_busy_s=0.195))
    assert first is not None and "window measured" in first.reason


def test_a_short_replan_interval_still_waits_for_the_reference():
    """replan_interval 1 or 2 (< history) would otherwise ask for a plan after the slow first iteration and make it
    the reference; the periodic re-plan resumes once the reference is measured."""
    ctx, probe = _h100_context_of(H100_8_THREADS_PROBE)
    for interval in (1, 2):
        replanner = Replanner(ctx, replan_interval=interval)
        replanner.planned(plan_for(ctx, probe, 0.0, gpu_fraction=1.0), probe, 0.0, settle=False)
        periods = (240.0, 208.0, 176.2, 175.8, 176.0)
        requests = [replanner.observe(IterationObservation(period_s=p / 1e3)) for p in periods]
        assert requests[:4] == [None] * 4, interval
        assert requests[4] is not None and "among 5 iterations without host work" in requests[4].reason
        assert requests[4].window_s < 0.176
        all_gpu = plan_for(ctx, probe, requests[4].window_s, gpu_fraction=1.0)
        replanner.planned(all_gpu, probe, requests[4].window_s, settle=False)
        later = [replanner.observe(IterationObservation(period_s=0.176)) for _ in range(interval)]
        assert later[-1] is not None and f"{interval} iterations since the last plan" in later[-1].reason

def test_the_reference_follows_the_steady_all_gpu_window_down():
    """1x H100, final run of 2026-11-26: the first three all-GPU iterations' median window was 195.3 ms against
    ~161 ms steady; quiet iterations later (everything but 5% back on the GPU) bring the reference down to the
    lowest median of three consecutive ones, never back up with a slow one."""
    ctx, probe = _h100_context_of(H100_8_THREADS_PROBE)
    replanner = Replanner(ctx, replan_interval=50)
    replanner.planned(plan_for(ctx, probe, 0.0, gpu_fraction=1.0), probe, 0.0, settle=False)
    for period in (0.240, 0.209, 0.200):
        replanner.observe(IterationObservation(period_s=period))
    early = replanner.reference_window_s
    offset = early - 0.209  # a window is its period less the same GPU step time in every iteration
    for period in (0.176, 0.175, 0.176, 0.230, 0.240, 0.235):  # steady, then a slow stretch (still quiet)
        replanner.observe(IterationObservation(period_s=period))
    steady = replanner.reference_window_s
    assert steady < early - 0.02
    assert steady == pytest.approx(0.176 + offset, abs=2e-4)  # a median of the recent five would say 0.230


def _replay_holding(ctx, probe, first_period_ms, stretches):
    """Feed logged observations to a re-planner while the logged placements hold (the runs kept them), as the
    optimizer does; returns the requests (None where none was asked for) and the re-planner."""
    replanner = Replanner(ctx, replan_interval=50)
    replanner.planned(plan_for(ctx, probe, 0.0, gpu_fraction=1.0), probe, 0.0, settle=False)
    first = _measure_reference(replanner, first_period_ms)
    requests, last = [], first
    for fraction, settle, observations in stretches:
        plan = plan_for(ctx, last.rates, last.window_s, gpu_fraction=fraction)
        replanner.planned(plan, last.rates, last.window_s, settle=settle,
                          interference_s_per_param=last.interference_s_per_param)
        for period_ms, host_numel, busy_ms in observations:
            request = replanner.observe(IterationObservation(period_s=period_ms / 1e3, host_numel=host_numel,
                                                             host_busy_s=busy_ms / 1e3))
            requests.append(request)
    return first, requests, replanner


def _planned_from(ctx, request):
    return plan_for(ctx, request.rates, request.window_s, min_gpu_numel=request.min_gpu_numel,
                    host_interference_s_per_param=request.interference_s_per_param)


def test_h100_15_threads_host_work_stretching_the_window_moves_state_back_to_the_gpu():
    """The positive feedback of the 15-thread run: 55% of the state on the host stretched the window 156.6 ->
    220-280 ms with no stall, and the re-planner read the longer window as more room for host work (1.41x
    GPU-resident). Now the window is never credited beyond the one measured without host work, the stretch is
    charged to host work, and the next plan puts everything back on the GPU."""
    ctx, probe = _h100_context_of(H100_15_THREADS_PROBE)
    period, fraction = H100_15_THREADS_FIRST
    first = plan_for(ctx, probe, 0.1566)
    assert first.gpu_fraction == pytest.approx(fraction, abs=0.005)  # the run's own step-2 plan is reproduced
    host = _host_numel(first)
    assert host == pytest.approx(737.0 * M, rel=0.001)
    _, requests, replanner = _replay_holding(
        ctx, probe, period, [(fraction, True, [(p, host, b) for p, b in H100_15_THREADS_AFTER])])
    assert replanner.reference_window_s == pytest.approx(0.1566, abs=2e-4)
    assert requests[0] is None  # the settling iteration
    charged = [r for r in requests if r is not None and r.interference_s_per_param > 0]
    assert charged, [r.reason for r in requests if r is not None]
    # nothing is charged before `history` (3) samples: one slow iteration is no evidence
    first_charged = requests.index(charged[0])
    assert first_charged == 3
    request = charged[0]
    assert "without host work: host work costs" in request.reason and "interference rail" in request.reason
    assert 0.07e-9 < request.interference_s_per_param < 0.12e-9  # (226 - 156.6) ms / 737 M
    assert request.min_gpu_numel > replanner.gpu_numel()  # the rail: strictly more on the GPU
    for r in requests:  # never more room than measured without host work (the old loop planned with 266.8 ms)
        assert r is None or r.window_s <= replanner.reference_window_s + 1e-12
    moved = _planned_from(ctx, request)
    assert moved.gpu_fraction > 0.95  # a host-updated parameter costs ~10x its GPU update here
    # the old placement, judged with the interference, costs at least what the run measured (~76 ms over the
    # reference; the model adds a predicted stall, as it gives the host half only the reference window to hide in)
    running = ctx.estimate(replanner.plan, request.rates, request.window_s,
                           host_interference_s_per_param=request.interference_s_per_param)
    assert running.interference_s == pytest.approx(0.07, abs=0.015)
    assert running.overhead_s > 0.07
    assert replanner.worth_moving(running, moved.estimate, request.window_s, forced=True)
    assert running.overhead_s - moved.estimate.overhead_s > replanner.min_gain_fraction * request.window_s


def test_h100_15_threads_without_interference_accounting_keeps_the_host_share():
    """The same replay with the interference never charged (margin infinite) and the window credited as measured:
    the failure as it ran - the plans keep (or grow) the host share."""
    ctx, probe = _h100_context_of(H100_15_THREADS_PROBE)
    period, fraction = H100_15_THREADS_FIRST
    host = _host_numel(plan_for(ctx, probe, 0.1566))
    replanner = Replanner(ctx, replan_interval=50, interference_margin=float("inf"))
    replanner.planned(plan_for(ctx, probe, 0.0, gpu_fraction=1.0), probe, 0.0, settle=False)
    last = _measure_reference(replanner, period)
    replanner.planned(plan_for(ctx, probe, last.window_s, gpu_fraction=fraction), probe, last.window_s, settle=True)
    for p, b in H100_15_THREADS_AFTER:
        request = replanner.observe(IterationObservation(period_s=p / 1e3, host_numel=host, host_busy_s=b / 1e3))
        assert request is None or request.interference_s_per_param == 0.0
        if request is not None:
            assert "host work costs" not in request.reason
            # the window is still capped at the reference: the plan follows the host rate only
            assert request.window_s <= replanner.reference_window_s + 1e-12
            assert _planned_from(ctx, request).gpu_fraction < 0.75


def test_h100_8_threads_intermittent_stretch_is_charged_too():
    """8 host threads: 25% of the state on the host, iterations alternated between ~172 ms (as fast as all on the
    GPU) and 215-240 ms; auto ran 1.06x GPU-resident. The logged windows exceed the reference by 37-39%: charged,
    and the plan goes back to the GPU."""
    ctx, probe = _h100_context_of(H100_8_THREADS_PROBE)
    stretches = []
    for fraction, observations in H100_8_THREADS_AFTER:
        plan = plan_for(ctx, probe, 0.155, gpu_fraction=fraction)
        assert _host_numel(plan) == pytest.approx(observations[0][1] * M, rel=0.001)
        stretches.append((fraction, False, [(p, _host_numel(plan), b) for p, _, b in observations]))
    first, requests, replanner = _replay_holding(ctx, probe, H100_8_THREADS_FIRST, stretches)
    assert first.window_s == pytest.approx(0.155, abs=2e-4)
    assert all(r is None or r.interference_s_per_param == 0 for r in requests[:2])  # fewer than 3 samples
    request = requests[2]
    assert request is not None and "host work costs" in request.reason and "interference rail" in request.reason
    assert _planned_from(ctx, request).gpu_fraction > 0.95


def _closed_loop(window_of, iterations=40, **replanner_kwargs):
    """The optimizer's loop (first plan at the start-up probe with the window unknown -> everything on the GPU,
    then re-plans from measurements) on a machine that runs the model at the H100 training rate with the window
    ``window_of(iteration, host_numel)``; returns (moves, gpu fraction per iteration, requests, re-planner)."""
    ctx = h100_context()
    r = with_host_rate(rates(**H100_PROBE), H100_TRAINING_HOST_RATE)
    replanner = Replanner(ctx, replan_interval=50, **replanner_kwargs)
    plan = plan_for(ctx, r, 0.0)
    assert plan.gpu_fraction == 1.0
    replanner.planned(plan, r, 0.0, settle=False)
    moves, fractions, requests = [], [], []
    for i in range(iterations):
        host = _host_numel(plan)
        window = window_of(i, host)
        est = ctx.estimate(plan, r, window)
        request = replanner.observe(IterationObservation(
            period_s=window + est.overhead_s, host_numel=host, host_busy_s=host / r.cpu_update_params_per_s,
            stall_s=est.forward_stall_s))
        fractions.append(plan.gpu_fraction)
        if request is None:
            continue
        requests.append(request)
        candidate = _planned_from(ctx, request)
        running = ctx.estimate(plan, request.rates, request.window_s,
                               host_interference_s_per_param=request.interference_s_per_param)
        forced = request.min_gpu_numel > replanner.gpu_numel()
        move = candidate.placements != plan.placements and (
            replanner.window_s <= 0 or replanner.worth_moving(running, candidate.estimate, request.window_s,
                                                              forced=forced))
        if move:
            moves.append(i)
            plan = candidate
        replanner.planned(plan, request.rates, request.window_s, settle=move,
                          interference_s_per_param=request.interference_s_per_param)
    return moves, fractions, requests, replanner


def _jitter(i):
    return 1.15 if i % 4 < 2 else 0.87  # +-15% between iterations, as measured on that host


def test_window_jitter_alone_is_not_charged_to_host_work():
    """Window jitter of +-15% around the window without host work, whatever the host does: no interference is
    charged, and the placements are exactly those of the loop without interference accounting (which settles
    after at most two moves, see test_window_noise_does_not_move_state_back_and_forth)."""
    def window(i, host):
        return H100_WINDOW if host == 0 else H100_WINDOW * _jitter(i)

    moves, fractions, requests, replanner = _closed_loop(window)
    assert all(r.interference_s_per_param == 0 and "host work costs" not in r.reason for r in requests)
    assert replanner.reference_window_s == pytest.approx(H100_WINDOW)
    unaccounted = _closed_loop(window, interference_margin=float("inf"))
    assert (moves, fractions) == unaccounted[:2]
    assert moves[0] == 4 and len(moves) <= 2 and max(moves) < 14, moves  # first move after 5 reference iterations
    assert 0.45 < fractions[-1] < 0.75  # still offloading about half the state


def test_interference_moves_once_and_stays():
    """A machine whose forward + backward grow 0.1 ns per host-updated parameter (the 15-thread run's), with the
    +-15% jitter on top: one move out (the first plan), one move back once three samples show it, then nothing -
    after the move there is no host work left to measure it by, and the cost stays charged."""
    def window(i, host):
        return H100_WINDOW + 0.1e-9 * host * _jitter(i)

    moves, fractions, requests, replanner = _closed_loop(window, iterations=120)
    assert len(moves) == 2 and moves[0] == 4 and moves[1] <= 10, moves  # out after 5 reference iterations
    assert fractions[-1] == 1.0
    assert replanner.interference_s_per_param == pytest.approx(0.1e-9, rel=0.2)
    assert all(r.interference_s_per_param > 0 for r in requests[1:])


def test_interference_dropped_only_when_samples_could_have_shown_it():
    ctx = h100_context()
    r = with_host_rate(rates(**H100_PROBE), H100_TRAINING_HOST_RATE)
    total = sum(ctx.numels)
    half = plan_for(ctx, r, H100_WINDOW, gpu_fraction=0.5)
    host = _host_numel(half)
    replanner = Replanner(ctx, replan_interval=1000)
    replanner.planned(plan_for(ctx, r, 0.0, gpu_fraction=1.0), r, 0.0, settle=False)
    step = ctx.estimate(replanner.plan, r, 0.0).gpu_step_s
    replanner.observe(IterationObservation(period_s=H100_WINDOW + step))
    replanner.planned(half, r, H100_WINDOW, settle=False)

    def observe(window, numel):
        est = ctx.estimate(replanner.plan, r, H100_WINDOW)
        return replanner.observe(IterationObservation(period_s=window + est.gpu_step_s + est.backward_tail_s,
                                                      host_numel=numel, host_busy_s=numel / 4e9))

    for _ in range(3):
        request = observe(H100_WINDOW + 0.1e-9 * host, host)
    assert request.interference_s_per_param == pytest.approx(0.1e-9, rel=1e-3)
    replanner.planned(half, request.rates, request.window_s, settle=False,
                      interference_s_per_param=request.interference_s_per_param)
    # 8% of the state on the host: 0.1 ns would add ~11 ms (7%), below the margin - the samples cannot show it
    small = int(0.08 * total)
    for _ in range(5):
        request = observe(H100_WINDOW, small)
        assert request is None or request.interference_s_per_param == pytest.approx(0.1e-9, rel=1e-3)
    # the half on the host again and no stretch: 0.1 ns would add 67 ms, the samples show none -> dropped
    dropped = None
    for _ in range(5):
        request = observe(H100_WINDOW, host)
        if request is not None and request.interference_s_per_param == 0:
            dropped = request
    assert dropped is not None and "no longer charged" in dropped.reason
