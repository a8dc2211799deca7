"""benchmarks/megatron.py --alternate: the variants' timed steps taken in turns, every layout resident at once
(tiny GPT, 2 gloo ranks). The rows keep the row-by-row mode's first-step loss and gradient norm (the same model and
data: preparing a variant next to another layout changes nothing), every variant gets --steps timed steps, and a
layout megatron's looped and V chunks cannot share is refused."""
from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
pytest.importorskip("megatron.core")
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from benchmarks import megatron as bench  # noqa: E402
from megatron_workers import alternate_trace_worker, benchmark_rows, run_ranks  # noqa: E402

VARIANTS = ("--variants", "megatron-interleaved", "zb-v", "ideal-v-split")
COMMON = ("--tiny", "--microbatches", "4", "--warmup", "1", "--steps", "3")


@pytest.mark.timeout(300)
def test_alternate_rows_match_row_by_row_first_steps_and_time_every_variant():
    alternating = run_ranks(benchmark_rows, 2, COMMON + ("--alternate",) + VARIANTS)[0]
    row_by_row = run_ranks(benchmark_rows, 2, COMMON + VARIANTS)[0]
    assert [r["variant"] for r in alternating] == ["megatron-interleaved", "zb-v", "ideal-v-split"]
    for alt, row in zip(alternating, row_by_row):
        assert alt["alternate"] and "alternate" not in row
        assert len(alt["step_ms"]) == 3 and all(t > 0 for t in alt["step_ms"])
        assert alt["first_loss"] == row["first_loss"] and alt["first_grad_norm"] == row["first_grad_norm"]
    assert bench.check_first_step(alternating, [4], rtol=1e-4) == []
    assert alternating[1]["schedule"].startswith("zb-v")  # interleaf's runner ran (and planned) in this mode too


@pytest.mark.timeout(300)
def test_alternate_takes_steps_in_turns_with_each_variants_patch_state():
    """The timed steps run in :func:`_round_order`'s turns, interleaf's with its patches applied and megatron's own
    and the ideal rows' without them (ideal-v-split installs its own linear patch inside its step)."""
    variants = ["megatron-interleaved", "zb-v", "auto", "ideal-v-split"]
    out = run_ranks(alternate_trace_worker, 2, COMMON + ("--alternate", "--steps", "4", "--variants", *variants))
    for result in out:
        expected = [variants[i] for r in range(4) for i in bench._round_order(len(variants), r)]
        assert [t[0] for t in result["trace"]] == expected
        for variant, applied, installed, p2p in result["trace"]:
            ours = variant in ("zb-v", "auto")
            assert applied == ours and installed == ours, (variant, applied, installed)
            assert p2p == (False, False)  # gloo: megatron's interleaved schedule unbatched, not overlapped
    assert [r["variant"] for r in out[0]["rows"]] == variants


def test_round_order_rotates_and_reverses():
    n = 5
    orders = [bench._round_order(n, r) for r in range(2 * n)]
    assert all(sorted(o) == list(range(n)) for o in orders)
    assert sorted(o[0] for o in orders) == sorted(list(range(n)) * 2)  # each starts a round twice in 2n rounds
    follows = {(o[k - 1], o[k]) for o in orders for k in range(1, n)}
    assert (0, 1) in follows and (1, 0) in follows  # either neighbour goes first in some round


def test_p2p_mode_sets_and_restores_even_on_error():
    config = SimpleNamespace(batch_p2p_comm=True, overlap_p2p_comm=False)
    with bench._p2p_mode(config, (False, True)):
        assert (config.batch_p2p_comm, config.overlap_p2p_comm) == (False, True)
    assert (config.batch_p2p_comm, config.overlap_p2p_comm) == (True, False)
    with pytest.raises(RuntimeError):
        with bench._p2p_mode(config, (False, True)):
            raise RuntimeError("step failed")
    assert (config.batch_p2p_comm, config.overlap_p2p_comm) == (True, False)
    with bench._p2p_mode(config, None):
        assert (config.batch_p2p_comm, config.overlap_p2p_comm) == (True, False)


def test_alternate_refuses_vp1_variants_and_per_action_timing():
    with pytest.raises(SystemExit):
        bench.parse_args(["--alternate", "--variants", "megatron-1f1b", "zb-v"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--alternate", "--timed-actions", "--variants", "megatron-interleaved", "zb-v"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--alternate", "--profile", "--variants", "megatron-interleaved", "zb-v"])
    assert bench.parse_args(["--alternate", "--variants", "megatron-interleaved", "zb-v", "auto-loop"]).alternate
