"""lower_bound: hand-computed values, never above the best order (exhaustive search on tiny shapes, every generator
on a grid of random costs), attained where it should be; the retune log line and the CLI carry it."""
from __future__ import annotations

import itertools
import json
import random

import pytest

from ds_plugins.cli import main
from ds_plugins.schedule import (
    Action,
    ActionKind,
    CostModel,
    DeadlockError,
    PipelineShape,
    Schedule,
    lower_bound,
    retune,
    simulate,
)
from ds_plugins.schedule.registry import SCHEDULE_NAMES, build_schedule, schedule_shape

# Megatron GPT, pp=4, 8 chunks of 4 layers, measured per chunk on 4x H200 (ms; session 6, zb-v warm-up, m=8).
MEGATRON_PP4 = CostModel(
    forward=(8.14, 4.85, 5.20, 4.81, 4.81, 5.34, 4.91, 7.25),
    backward_input=(7.50, 6.96, 6.99, 6.83, 6.83, 7.01, 6.98, 8.26),
    backward_weight=(1.91, 1.91, 1.92, 1.88, 1.88, 1.93, 1.92, 2.52),
    comm=0.0,
    activation_memory=(2.01, 2.00, 2.00, 2.00, 2.00, 2.00, 1.99, 2.24),
    weight_grad_memory=(0.49, 0.49, 0.49, 0.49, 0.50, 0.50, 0.50, 0.63),
)


def _random_costs(rng: random.Random, n: int, comm: bool = True) -> CostModel:
    activation = [rng.uniform(0.5, 2.0) for _ in range(n)]
    return CostModel(
        forward=tuple(rng.uniform(0.3, 2.0) for _ in range(n)),
        backward_input=tuple(rng.uniform(0.3, 3.0) for _ in range(n)),
        backward_weight=tuple(rng.uniform(0.0, 1.5) for _ in range(n)),
        comm=rng.uniform(0.0, 0.4) if comm else 0.0,
        activation_memory=tuple(activation),
        weight_grad_memory=tuple(a * rng.uniform(0.0, 1.0) for a in activation),
    )


# --- hand-computed values -------------------------------------------------------------------------------------


def test_loop_two_ranks_by_hand():
    """pp=2, m=2, F=(1,2), I=(2,3), W=(0.5,1), comm 0.25. Rank 1 starts after F0 + one hop = 1.25 and works
    2 x (2+3+1) = 12; after its last I, I0 + hop + W0 = 2.75 must run while it has at most 2 x W1 = 2 of W left:
    drain 0.75, bound 14. Rank 0: 2 x 3.5 = 7. Critical path: 3 + 5 + 0.5 + 2 x 0.25 = 9.
    Full backward: rank 1's drain is B0 + hop = 2.75, bound 16."""
    costs = CostModel(forward=(1, 2), backward_input=(2, 3), backward_weight=(0.5, 1), comm=0.25,
                      activation_memory=(1, 1), weight_grad_memory=(0, 0))
    shape = PipelineShape(pp=2, microbatches=2)
    bound = lower_bound(shape, costs)
    assert (bound.rank, bound.start, bound.work, bound.drain) == (1, 1.25, 12, 0.75)
    assert bound.makespan == 14 and bound.per_rank == (7, 14) and bound.critical_path == 9
    full = lower_bound(shape, costs, split_backward=False)
    assert (full.rank, full.drain, full.makespan, full.critical_path) == (1, 2.75, 16, 10)
    # both are attained: the exhaustive search below finds orders at exactly these makespans
    assert _optimum(shape, costs, split=True) == pytest.approx(14)
    assert _optimum(shape, costs, split=False) == pytest.approx(16)
    assert str(bound) == ("no loop order (pp=2, vp=1, m=2) can beat 14 "
                          "(rank 1: starts at 1.25, works 12, then at least 0.75 beyond its own work after its last backward)")


def test_v_critical_path_binds_with_one_microbatch():
    """V, pp=2, m=1, all times 1, comm 0.5: ranks change at 0->1 and 2->3 (stages 1 and 2 share rank 1), so the
    chain is 4 F + 4 I + W0 + 2 x 2 hops x 0.5 = 11, above rank 1's 1.5 + 6 + 0.5; zb-v reaches it."""
    costs = CostModel(forward=(1,) * 4, backward_input=(1,) * 4, backward_weight=(1,) * 4, comm=0.5,
                      activation_memory=(1,) * 4, weight_grad_memory=(0,) * 4)
    shape = PipelineShape(pp=2, microbatches=1, vp=2, placement="v")
    bound = lower_bound(shape, costs)
    assert bound.rank is None and bound.makespan == 11 and bound.critical_path == 11
    assert bound.per_rank == (6, 8)  # rank 1: start 1.5, work 6, drain (I0 + hop + W0) - 2 W = 0.5
    assert "critical path binds" in bound.describe()
    assert simulate(build_schedule("zb-v", pp=2, microbatches=1, costs=costs), costs).makespan == 11


def test_loop_start_counts_every_hop_and_v_start_skips_the_turn():
    """Loop vp=2 pp=3: rank 2's first stage is 2 (start F0 + F1 + 2 hops); V pp=3: rank 2 holds stages 2 and 3,
    rank 1 stages 1 and 4; the V turn (2 -> 3) is on one rank, so stage 4 is 3 hops from stage 0, not 4."""
    f = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    costs = CostModel(forward=f, backward_input=(1,) * 6, backward_weight=(1,) * 6, comm=0.5,
                      activation_memory=(1,) * 6, weight_grad_memory=(0,) * 6)
    m = 6
    loop = lower_bound(PipelineShape(pp=3, microbatches=m, vp=2), costs)
    # loop: rank r holds r and r + 3; starts 0, 1.5, 4; works m x (F+2) of its stages
    assert loop.per_rank == pytest.approx((0 + m * (1 + 4 + 4), 1.5 + m * (2 + 5 + 4), 4 + m * (3 + 6 + 4)))
    assert (loop.rank, loop.start, loop.work) == (2, 4, m * 13)
    v = lower_bound(PipelineShape(pp=3, microbatches=m, vp=2, placement="v"), costs)
    # V: rank 0 holds 0, 5; rank 1: 1, 4; rank 2: 2, 3
    assert v.per_rank == pytest.approx((m * (1 + 6 + 4), 1.5 + m * (2 + 5 + 4), 4 + m * (3 + 4 + 4)))
    assert (v.rank, v.start) == (2, 4)


def test_megatron_pp4_measured_costs():
    """The brief's numbers: V binds on rank 0 (stages 0 and 7: embedding and LM head), 8 x 35.58 = 284.64 ms;
    loop on rank 3 (stages 3 and 7), which starts after F0 + F1 + F2 = 18.19 and works 8 x 31.55 = 252.4 ms.
    zb-v rebuilt for these costs runs at exactly rank 0's work: no V order does better."""
    v = lower_bound(PipelineShape(pp=4, microbatches=8, vp=2, placement="v"), MEGATRON_PP4)
    assert v.rank == 0 and v.start == 0 and v.makespan == pytest.approx(284.64)
    loop = lower_bound(PipelineShape(pp=4, microbatches=8, vp=2), MEGATRON_PP4)
    assert loop.rank == 3 and loop.start == pytest.approx(18.19) and loop.work == pytest.approx(252.4)
    assert loop.makespan == pytest.approx(270.59) and loop.drain == 0
    assert loop.critical_path == pytest.approx(sum(MEGATRON_PP4.forward) + sum(MEGATRON_PP4.backward_input) + 1.91)
    retuned = retune(build_schedule("zb-v", pp=4, microbatches=8), MEGATRON_PP4)
    assert retuned.after.makespan == pytest.approx(v.makespan, abs=1e-9)
    for name in ("interleaved-1f1b",):
        schedule = build_schedule(name, pp=4, microbatches=8, vp=2, costs=MEGATRON_PP4)
        result = simulate(schedule, MEGATRON_PP4).makespan
        assert result >= lower_bound(schedule.shape, MEGATRON_PP4, split_backward=False).makespan - 1e-9


# --- attained -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pp", [2, 3, 4, 8])
@pytest.mark.parametrize("m_factor", [1, 2, 3])
@pytest.mark.parametrize("fiw", [(1, 1, 1), (1, 2, 1), (2, 1, 0.5)])
def test_1f1b_meets_the_full_backward_bound_at_uniform_costs(pp, m_factor, fiw):
    """Without comm, 1F1B's (pp-1)(F+B) + m(F+B) is the full-backward bound of its last rank: start (pp-1)F, work
    m(F+B), then B of every stage below."""
    schedule = build_schedule("1f1b", pp=pp, microbatches=m_factor * pp)
    costs = CostModel.uniform(schedule.shape, forward=fiw[0], backward_input=fiw[1], backward_weight=fiw[2])
    bound = lower_bound(schedule.shape, costs, split_backward=False)
    assert simulate(schedule, costs).makespan == pytest.approx(bound.makespan, abs=1e-9)
    assert bound.rank == pp - 1


@pytest.mark.parametrize("name", ["1f1b", "zb-h1", "interleaved-1f1b", "auto"])
def test_one_rank_is_attained(name):
    """pp=1: one rank, no idle time; the bound is its work."""
    shape = schedule_shape(name, pp=1, microbatches=4)
    costs = _random_costs(random.Random(7), shape.num_stages)
    schedule = build_schedule(name, pp=1, microbatches=4, costs=costs)
    bound = lower_bound(schedule.shape, costs)
    assert simulate(schedule, costs).makespan == pytest.approx(bound.makespan, abs=1e-9)
    assert bound.rank == 0 and bound.work == pytest.approx(bound.makespan)


# --- never above the best order -----------------------------------------------------------------------------------


def _interleavings(chains):
    chains = [c for c in chains if c]
    if not chains:
        yield ()
        return
    for k, chain in enumerate(chains):
        rest = chains[:k] + [chain[1:]] + chains[k + 1:]
        for tail in _interleavings(rest):
            yield (chain[0],) + tail


def _optimum(shape: PipelineShape, costs: CostModel, *, split: bool) -> float:
    """The shortest makespan over every order of every rank (all split, or all full backward)."""
    per_rank = []
    backward = ((ActionKind.BACKWARD_INPUT, ActionKind.BACKWARD_WEIGHT) if split else (ActionKind.BACKWARD,))
    for r in range(shape.pp):
        chains = [[Action(s, ActionKind.FORWARD, i)] + [Action(s, k, i) for k in backward]
                  for s in shape.stages_of(r) for i in range(shape.microbatches)]
        per_rank.append(list(_interleavings(chains)))
    best = float("inf")
    for programs in itertools.product(*per_rank):
        try:
            best = min(best, simulate(Schedule("any", shape, programs), costs).makespan)
        except DeadlockError:
            continue
    return best


_TINY = [
    PipelineShape(pp=2, microbatches=2),
    PipelineShape(pp=2, microbatches=3),
    PipelineShape(pp=3, microbatches=2),
    PipelineShape(pp=2, microbatches=1, vp=2),
    PipelineShape(pp=2, microbatches=1, vp=2, placement="v"),
]


@pytest.mark.parametrize("shape", _TINY, ids=lambda s: f"pp{s.pp}-m{s.microbatches}-vp{s.vp}-{s.placement}")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_order_beats_the_bound_exhaustive(shape, seed):
    """Every order of tiny shapes (20-1680 per rank): the best one is never under the bound. Split orders against
    the split bound, full-backward orders against the full-backward one (itself >= the split bound)."""
    costs = _random_costs(random.Random(seed), shape.num_stages)
    for split in (True, False):
        if split and shape.microbatches > 2:
            continue  # 1680 orders per rank squared: too many
        bound = lower_bound(shape, costs, split_backward=split)
        assert _optimum(shape, costs, split=split) >= bound.makespan - 1e-9
    assert lower_bound(shape, costs).makespan <= lower_bound(shape, costs, split_backward=False).makespan + 1e-12


def _grid():
    vps = {"1f1b": [1], "zb-h1": [1], "zb-h2": [1], "interleaved-1f1b": [2, 3], "zb-v": [2], "v-half": [2],
           "v-min": [2], "auto": [1, 2, "loop"]}
    assert set(vps) == set(SCHEDULE_NAMES)  # a new schedule must join the grid
    for name in SCHEDULE_NAMES:
        for pp in (2, 4):
            for m in (pp, 2 * pp, 3 * pp):
                for vp in vps[name]:
                    yield name, pp, m, vp


@pytest.mark.parametrize("name,pp,m,vp", list(_grid()))
def test_every_generator_is_at_or_above_the_bound(name, pp, m, vp):
    """Every registered schedule, built for and simulated under seeded random per-stage costs (with comm)."""
    placement = None
    if vp == "loop":
        vp, placement = 2, "loop"
    shape = schedule_shape(name, pp=pp, microbatches=m, vp=vp)
    for seed in range(3):
        costs = _random_costs(random.Random(1000 * pp + 10 * m + seed), shape.num_stages)
        schedule = build_schedule(name, pp=pp, microbatches=m, vp=vp, costs=costs, placement=placement)
        result = simulate(schedule, costs)
        bound = lower_bound(schedule.shape, costs)
        assert result.makespan >= bound.makespan - 1e-9, (name, seed, result.makespan, str(bound))
        if not schedule.splits_backward:
            full = lower_bound(schedule.shape, costs, split_backward=False)
            assert result.makespan >= full.makespan - 1e-9, (name, seed, result.makespan, str(full))


# --- where it is printed ------------------------------------------------------------------------------------------


def test_retune_log_line_ends_with_the_bound():
    seconds = CostModel(
        forward=tuple(x / 1e3 for x in MEGATRON_PP4.forward),
        backward_input=tuple(x / 1e3 for x in MEGATRON_PP4.backward_input),
        backward_weight=tuple(x / 1e3 for x in MEGATRON_PP4.backward_weight),
        activation_memory=MEGATRON_PP4.activation_memory,
        weight_grad_memory=MEGATRON_PP4.weight_grad_memory,
    )
    outcome = retune(build_schedule("zb-v", pp=4, microbatches=8), seconds)
    assert outcome.bound is not None and outcome.bound.makespan == pytest.approx(0.28464)
    assert outcome.summary().endswith(
        "; under the measured times no v order (pp=4, vp=2, m=8) can beat 284.6 ms (rank 0: starts at 0 ms, works 284.6 ms)")
    assert "rebuilt for the measured times" in outcome.summary()


def _cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_cli_simulate_prints_and_returns_the_bound(capsys):
    out = _cli(capsys, "simulate", "--schedule", "1f1b", "--pp", 4, "--microbatches", 8)
    assert ("lower bound: no loop order (pp=4, vp=1, m=8) can beat 27 (rank 3: starts at 3, works 24); "
            "makespan 22.2% above it") in out
    assert ("with a full backward B, as this schedule: no loop order (pp=4, vp=1, m=8, full backward B) "
            "can beat 33") in out
    data = json.loads(_cli(capsys, "simulate", "--schedule", "zb-v", "--pp", 4, "--microbatches", 8, "--json"))
    assert data["lower_bound"]["makespan"] == pytest.approx(25.5) and data["lower_bound"]["rank"] == 3
    assert data["lower_bound"]["split_backward"] is True and data["lower_bound"]["placement"] == "v"
    assert data["lower_bound_full_backward"]["split_backward"] is False
    assert data["makespan"] == pytest.approx(data["lower_bound"]["makespan"])  # zb-v meets it at unit cost


def test_cli_compare_has_a_bound_per_shape(capsys):
    out = _cli(capsys, "compare", "--pp", 4, "--microbatches", 8, "--costs", "1,2,1,0.1")
    footer = [line for line in out.splitlines() if line.startswith("lower bound: ")]
    assert [line.split("(")[1].split(")")[0] for line in footer] == [
        "pp=4, vp=1, m=8", "pp=4, vp=2, m=8", "pp=4, vp=2, m=8"]
    assert "no loop order" in footer[0] and "no loop order" in footer[1] and "no v order" in footer[2]
    rows = json.loads(_cli(capsys, "compare", "--pp", 4, "--microbatches", 8, "--costs", "1,2,1,0.1",
                           "--json"))["schedules"]
    for row in rows:
        costs = CostModel.uniform(PipelineShape(pp=4, microbatches=8, vp=row["vp"], placement=row["placement"]),
                                  forward=1, backward_input=2, backward_weight=1, comm=0.1)
        bound = lower_bound(PipelineShape(pp=4, microbatches=8, vp=row["vp"], placement=row["placement"]), costs)
        assert row["lower_bound"]["makespan"] == pytest.approx(bound.makespan)
        assert row["ratio_to_lower_bound"] == pytest.approx(row["makespan"] / bound.makespan)
        assert row["ratio_to_lower_bound"] >= 1 - 1e-9
