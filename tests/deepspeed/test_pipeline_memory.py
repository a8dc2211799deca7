"""Peak memory per pipeline rank: interleaf vs DeepSpeed's own 1F1B, measured the way benchmarks/pipeline.py does.

The GPU benchmark builds its rows one after the other in one process and reads ``max_memory_allocated``, so
anything a finished row leaves allocated counts under every later row's peak. DeepSpeed's pipeline engine is not
collectable on its last stage after a step (its outputs and loss keep the autograd hook ``DeepSpeedEngine.forward``
registers, a closure over the engine): until ``benchmarks.pipeline.release_engine`` dropped those references, the
DeepSpeed 1F1B row's whole engine stayed allocated on the last rank and every later row looked heavier there (2x
H100, pp=2: interleaf 1f1b 16.6 GiB vs DeepSpeed's 11.7 on rank 1, ~6.8 GiB of it DeepSpeed's leftover engine:
8 bytes per parameter - bf16 weights, fp32 master weights, bf16 gradient sums - plus its two logits buffers).

Here the same rows run on 2 gloo ranks with a scaled-down GPT, bf16 with DeepSpeed's BF16_Optimizer, under the
CPU allocator's profiled total (``_memory_harness``). Before the fix these numbers were, per rank (MiB): DeepSpeed
1F1B 49.5 / 50.3, interleaf 1f1b 42.4 / 71.3, zb-v 48.3 / 65.5, with 29.3 MiB of DeepSpeed's engine alive on rank
1 after its row; after it: 1f1b 42.4 / 42.0, zb-v 48.3 / 36.2, nothing left behind.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from _memory_harness import ROWS, run_rows  # noqa: E402

TARGET = 1.1
"""Issue 3's memory target: peak <= 1.1x DeepSpeed 1F1B's peak (measured here: 0.84-0.96x)."""
KEPT_BYTES = 4096
"""What a row may leave allocated after it is released, or a step may keep beyond what it started with (a few
scalars: the step's losses, the gradient norm); everything else a step allocates must be freed."""


@pytest.fixture(scope="module")
def rows():
    return run_rows()


@pytest.mark.timeout(240)
def test_every_row_is_freed_after_release(rows):
    """The benchmark's teardown frees each row's engine on every rank (DeepSpeed's last stage included), so no
    row's peak carries an earlier row's state."""
    for rank, per_row in enumerate(rows):
        for name in ROWS:
            row = per_row[name]
            assert row["engines_alive"] == 0, f"rank {rank}: a PipelineEngine survived the {name} row's release"
            left = row["end"] - row["start"]
            assert left <= KEPT_BYTES, f"rank {rank}: the {name} row left {left / 2**20:.2f} MiB allocated"


@pytest.mark.timeout(240)
def test_interleaf_steps_keep_nothing(rows):
    """An interleaf step frees what it allocates (outputs, losses' graphs, received activations) before it
    returns, and no bf16 gradient is left on a parameter when the optimizer step comes: each micro-batch's went
    into BF16_Optimizer's gradient-sum buffers and was dropped right after its I/B action (kept instead, they
    would cost 2 bytes per parameter from the first backward to the step: ~1.6 GiB on the benchmark's rank)."""
    for rank, per_row in enumerate(rows):
        for name in ROWS:
            if name == "deepspeed-1f1b":
                continue
            row = per_row[name]
            kept = row["step_end"] - row["step_start"]
            assert kept <= KEPT_BYTES, f"rank {rank}: an interleaf {name} step kept {kept / 2**20:.2f} MiB"
            assert row["grads_left"] == 0, f"rank {rank}: {name} left {row['grads_left']} bf16 .grad tensors"


@pytest.mark.timeout(240)
def test_peak_vs_deepspeed_1f1b(rows):
    """interleaf 1f1b (same layers per rank as DeepSpeed) within the target on every rank, the last one included;
    zb-v (V placement: other layers per rank) within it on its heaviest rank against DeepSpeed's heaviest."""
    ds = [per_row["deepspeed-1f1b"]["peak"] for per_row in rows]
    for rank, per_row in enumerate(rows):
        ratio = per_row["1f1b"]["peak"] / ds[rank]
        assert ratio <= TARGET, (f"rank {rank}: interleaf 1f1b peaks at {ratio:.2f}x DeepSpeed 1F1B "
                                 f"({per_row['1f1b']['peak'] / 2**20:.1f} vs {ds[rank] / 2**20:.1f} MiB)")
    zbv = max(per_row["zb-v"]["peak"] for per_row in rows)
    assert zbv <= TARGET * max(ds), f"zb-v peaks at {zbv / max(ds):.2f}x DeepSpeed 1F1B"
