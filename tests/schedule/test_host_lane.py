"""simulate(..., host=): a host lane per rank (an action starts no earlier than its host starts issuing it and
ends no earlier than its host has issued it; the host never waits for inputs)."""
from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given

from ds_plugins.schedule import CostModel, simulate
from ds_plugins.schedule.registry import build_schedule
from tests.schedule.test_properties import _SETTINGS, shapes_and_costs


def _times(f, i, w, n):
    return CostModel(forward=(f,) * n, backward_input=(i,) * n, backward_weight=(w,) * n,
                     activation_memory=(1.0,) * n, weight_grad_memory=(0.5,) * n)


@_SETTINGS
@given(shapes_and_costs())
def test_host_lane_never_shortens_a_step_and_free_hosts_change_nothing(case):
    shape, costs = case
    schedule = build_schedule("zb-h1" if shape.vp == 1 else "zb-v", pp=shape.pp, microbatches=shape.microbatches)
    if schedule.shape.num_stages != costs.num_stages:
        return
    plain = simulate(schedule, costs)
    free = simulate(schedule, costs, host=replace(costs, forward=(0.0,) * costs.num_stages,
                                                   backward_input=(0.0,) * costs.num_stages,
                                                   backward_weight=(0.0,) * costs.num_stages))
    assert free.makespan == pytest.approx(plain.makespan) and free.timeline == plain.timeline
    late = simulate(schedule, costs, host=costs)  # hosts as slow as their GPUs
    assert late.makespan >= plain.makespan - 1e-9
    # no rank ends before its host has issued all its work
    for rank, timeline in enumerate(late.timeline):
        assert timeline[-1].end >= sum(costs.duration(t.action) for t in timeline) - 1e-9


def test_a_host_slower_than_its_gpu_sets_the_pace_and_one_that_ran_ahead_does_not():
    """pp=2 1F1B, m=2, 1 ms per action on the GPU (6 ms in all). With 2 ms of host per action every rank is
    host-bound: the step is at least a rank's host time (4 actions x 2 ms), and rank 0's first forward ends when
    its host has issued it. With hosts as fast as their GPUs the step is unchanged: rank 1's host issues its
    actions while its GPU waits for data, so it is never late."""
    schedule = build_schedule("1f1b", pp=2, microbatches=2)
    gpu = _times(1.0, 1.0, 0.0, 2)
    plain = simulate(schedule, gpu)
    assert plain.makespan == pytest.approx(6.0)
    slow = simulate(schedule, gpu, host=_times(2.0, 2.0, 0.0, 2))
    assert slow.makespan >= 8.0 - 1e-9
    first = {(t.rank, t.action.kind.name, t.action.microbatch): t for tl in slow.timeline for t in tl}
    assert first[(0, "FORWARD", 0)].end == pytest.approx(2.0)  # the host took 2 ms to issue a 1 ms forward
    same = simulate(schedule, gpu, host=_times(1.0, 1.0, 0.0, 2))
    assert same.makespan == pytest.approx(plain.makespan)


def test_host_lane_reproduces_a_logged_megatron_row():
    """benchmarks/megatron.py --timed-actions, 2x H200, session 12 (zb-v's second row, pp=2, m=8): the rebuilt
    order simulates 473.4 ms under the timed steps' GPU costs and 477.5 ms with the host lane under the hosts'
    issue times; the step took 483.9 ms. (Figures in BENCHMARKS.md.)"""
    from ds_plugins.schedule import retune

    def model(fiw):
        return CostModel(forward=tuple(f for f, _, _ in fiw), backward_input=tuple(i for _, i, _ in fiw),
                         backward_weight=tuple(w for _, _, w in fiw), activation_memory=(4.01, 4.00, 3.99, 4.24),
                         weight_grad_memory=(0.99, 1.00, 1.00, 1.13))

    warm = model([(10.28, 14.10, 3.76), (9.58, 13.60, 3.74), (9.58, 13.60, 3.73), (10.93, 14.30, 4.35)])
    timed = model([(11.40, 14.12, 3.76), (9.61, 13.63, 3.74), (9.62, 13.63, 3.74), (11.08, 14.44, 4.37)])
    host = model([(12.32, 14.29, 1.51), (12.37, 11.77, 2.28), (11.56, 12.19, 1.99), (12.20, 14.67, 1.60)])
    result = retune(build_schedule("zb-v", pp=2, microbatches=8), warm)
    assert result.after.makespan == pytest.approx(461.7, abs=0.1)  # the warm-up's log line
    assert simulate(result.schedule, timed).makespan == pytest.approx(473.4, abs=0.2)
    assert simulate(result.schedule, timed, host=host).makespan == pytest.approx(477.5, abs=0.2)
