"""benchmarks/megatron.py --alternate: the variants' timed steps taken in turns, every layout resident at once
(tiny GPT, 2 gloo ranks). The rows keep the row-by-row mode's first-step loss and gradient norm (the same model and
data: preparing a variant next to another layout changes nothing), every variant gets --steps timed steps, and a
layout megatron's looped and V chunks cannot share is refused."""
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


def test_alternate_refuses_vp1_variants_and_per_action_timing():
    with pytest.raises(SystemExit):
        bench.parse_args(["--alternate", "--variants", "megatron-1f1b", "zb-v"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--alternate", "--timed-actions", "--variants", "megatron-interleaved", "zb-v"])
    assert bench.parse_args(["--alternate", "--variants", "megatron-interleaved", "zb-v", "auto-loop"]).alternate
