"""benchmarks/megatron.py --timed-actions: the timed steps of an interleaf row are timed per action too, and the
row says what the simulator gives its running order under those times (tiny GPT, 2 gloo ranks)."""
from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
pytest.importorskip("megatron.core")
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from benchmarks import megatron as bench  # noqa: E402
from megatron_workers import benchmark_rows, run_ranks  # noqa: E402

ARGS = ("--tiny", "--microbatches", "4", "--warmup", "1", "--steps", "2", "--timed-actions",
        "--variants", "megatron-interleaved", "zb-v")


@pytest.mark.timeout(180)
def test_timed_actions_give_the_running_orders_simulation_under_the_timed_steps():
    rows = run_ranks(benchmark_rows, 2, ARGS)
    for ranks_rows in rows:
        by_variant = {r["variant"]: r for r in ranks_rows}
        assert "timed_step_costs" not in by_variant["megatron-interleaved"]  # megatron's own schedule: no actions
        timed = by_variant["zb-v"]["timed_step_costs"]
        assert sorted(timed["fiw_ms_per_stage"]) == [0, 1, 2, 3]  # V placement, pp=2: four stages
        assert all(f > 0 and i > 0 and w > 0 for f, i, w in timed["fiw_ms_per_stage"].values())
        assert timed["simulated_ms"] > 0 and timed["simulated_warmup_ms"] > 0
        assert "host_fiw_ms_per_stage" not in timed  # host issue times come with CUDA events only
        assert "simulated_host_ms" not in timed  # and so does the host-lane simulation
        # the slowest rank's mean step, the same figure as the row's
        assert timed["step_ms"] == pytest.approx(1e3 * by_variant["zb-v"]["step_s"])
        # the ceiling under the timed steps' costs: no order beats the busiest rank's compute, auto's plan included
        rank_work = {r: 4 * sum(sum(timed["fiw_ms_per_stage"][s]) for s in stages)
                     for r, stages in {0: (0, 3), 1: (1, 2)}.items()}
        assert timed["busiest_rank_ms"] == pytest.approx(max(rank_work.values()))
        assert timed["replanned_auto_ms"] >= timed["busiest_rank_ms"] - 1e-6
        line = bench._format_timed_step_costs(timed)
        assert line.startswith("timed steps' F/I/W ms per stage [") and "under the costs it was planned from" in line
        assert "the busiest rank computes" in line and "auto planned from them simulates" in line
    assert rows[0][1]["timed_step_costs"] == rows[1][1]["timed_step_costs"]  # gathered: the same on every rank
