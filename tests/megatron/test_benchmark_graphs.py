"""benchmarks/megatron.py's ``+graphs`` rows (interleaf's schedules with --pipeline-cuda-graphs), on CPU through the
test stand-in capture (its replay runs the recorded pass again): the timed steps replay, their gradient norm is
checked against the row's first (eager) step, and the graphs are released with the rows (tiny GPT, 2 gloo ranks)."""
from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")

from benchmarks import megatron as bench  # noqa: E402  (the paths: tests/megatron/conftest.py)
from megatron_workers import graphed_benchmark_rows, run_ranks  # noqa: E402


@pytest.mark.timeout(240)
@pytest.mark.parametrize("alternate", [False, True])
def test_graphs_rows_replay_and_keep_the_first_steps_gradients(alternate):
    argv = ["--tiny", "--microbatches", "4", "--warmup", "2", "--steps", "2",
            "--variants", "megatron-interleaved", "zb-v", "zb-v+graphs"] + (["--alternate"] if alternate else [])
    out = run_ranks(graphed_benchmark_rows, 2, argv)
    rows = out[0]["rows"]
    assert [r["variant"] for r in rows] == ["megatron-interleaved", "zb-v", "zb-v+graphs"]
    graphed = rows[2]
    assert len(graphed["last_grad_norms"]) == (2 if alternate else 1)
    assert all(g == pytest.approx(graphed["first_grad_norm"], rel=1e-6) for g in graphed["last_grad_norms"])
    assert bench.check_first_step(rows, [4], rtol=1e-4) == []
    assert all(r["check"] == "ok" for r in rows)
    assert "last_grad_norms" not in rows[1]
    for rank in range(2):
        assert out[rank]["replays"] > 0
        assert out[rank]["live"] == 0  # released with the rows: no chunk keeps a wrapped forward


def test_graphs_suffix_only_on_interleaf_schedules():
    assert bench._layout("zb-v+graphs") == "v" and bench._layout("auto@22+graphs") == "v"
    assert bench._schedule_of("auto@22+graphs") == ("auto", 22.0)
    for bad in ("megatron-interleaved+graphs", "ideal+graphs", "ideal-v-split+graphs"):
        assert bench._layout(bad) is None
    row = {"variant": "zb-v+graphs", "microbatches": 4, "first_loss": 1.0, "first_grad_norm": 2.0,
           "last_grad_norms": [2.0, 2.5]}
    ref = dict(row, variant="megatron-1f1b", last_grad_norms=None)
    failures = bench.check_first_step([ref, row], [4], rtol=1e-4)
    assert failures and "replayed step's grad norm 2.5" in row["check"]
