"""benchmarks/megatron.py's ``ideal`` rows (each rank's own forward + backward, no pipeline): the step really runs
every chunk's forward and backward, the split variant runs interleaf's I + W and lands the same gradients as
megatron's own backward, and the rows are estimates, not checked training steps (tiny GPT, 2 gloo ranks)."""
from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
pytest.importorskip("megatron.core")
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import torch  # noqa: E402

from benchmarks import megatron as bench  # noqa: E402
from megatron_workers import benchmark_rows, graphed_ideal_worker, ideal_worker, run_ranks  # noqa: E402


@pytest.mark.timeout(180)
def test_ideal_split_runs_i_then_w_and_matches_megatrons_backward():
    m = 2
    plain = run_ranks(ideal_worker, 2, "v", False, m)
    split = run_ranks(ideal_worker, 2, "v", True, m)
    for rank in range(2):
        assert plain[rank]["returned"] == [] and split[rank]["returned"] == []
        assert plain[rank]["deferred"] == 0 and not plain[rank]["installed_after"]
        # 4 linears per layer (qkv, proj, fc1, fc2) in every layer of both chunks, per micro-batch, plus the
        # LM head in the last chunk (rank 0 under V)
        layers = bench.TINY["layers"] // 2
        assert split[rank]["deferred"] == m * (4 * layers + (1 if rank == 0 else 0))
        assert not split[rank]["installed_after"]
        for chunk_plain, chunk_split in zip(plain[rank]["grads"], split[rank]["grads"]):
            for name, grad in chunk_plain.items():
                assert grad.abs().sum() > 0 or "bias" in name, f"rank {rank} {name}: no gradient: its backward did not run"
                torch.testing.assert_close(chunk_split[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.timeout(180)
def test_ideal_rows_are_estimates_without_a_check():
    argv = ("--tiny", "--microbatches", "4", "--warmup", "1", "--steps", "2",
            "--variants", "megatron-interleaved", "ideal", "ideal-v", "ideal-v-split")
    rows = run_ranks(benchmark_rows, 2, argv)[0]
    assert [r["variant"] for r in rows] == ["megatron-interleaved", "ideal", "ideal-v", "ideal-v-split"]
    ideal = rows[1:]
    assert all(r["tokens_per_s"] > 0 and r["first_loss"] is None and r["first_grad_norm"] is None for r in ideal)
    assert bench.check_first_step(rows, [4], rtol=1e-4) == []
    assert rows[0]["check"] == "ok" and all(r["check"].startswith("—") for r in ideal)
    assert bench._baseline_row(rows) is rows[0]
    text = bench.table(rows, [4])
    assert "| ideal-v-split |" in text and "| — | — | — (no pipeline: an estimate) |" in text


@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout,split", [("v", True), ("loop2", False)])
def test_graphed_ideal_replays_every_pass_on_each_calls_data(layout, split):
    """The ``-graphed`` rows' bookkeeping (static inputs, pass order, queued weight GEMMs), with a stand-in capture
    whose replay runs the pass again: the first call runs eagerly and records F, B/I (and W) of every micro-batch
    and chunk; the replays land the eager step's gradients, and on new data the new data's gradients."""
    m = 2
    out = run_ranks(graphed_ideal_worker, 2, layout, split, m)
    for rank in range(2):
        r = out[rank]
        passes = 3 if split else 2
        assert r["captured"] == r["recorded"] == m * 2 * passes  # 2 chunks per rank, recorded once
        assert not r["installed_after"]
        layers = bench.TINY["layers"] // 2
        linears = 4 * layers + (1 if (rank == 0 if layout == "v" else rank == 1) else 0)
        assert r["deferred"] == (3 * m * linears if split else 0)  # eager call, then two replays
        first, second, third = r["grads"]
        for c in range(2):
            for name, grad in first[c].items():
                assert grad.abs().sum() > 0 or "bias" in name, f"rank {rank} {name}: no gradient"
                torch.testing.assert_close(second[c][name], grad, rtol=0, atol=0, msg=name)
                torch.testing.assert_close(third[c][name], r["eager"][c][name], rtol=0, atol=0, msg=name)
            if r["uses_data"][c]:  # the tokens (first chunk) or labels (last): other chunks see fixed tensors
                assert any(not torch.equal(third[c][n], first[c][n]) for n in first[c]), "the replay ignored new data"
    assert sum(sum(out[rank]["uses_data"]) for rank in range(2)) == 2


def test_graphed_ideal_rows_need_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU refusal")
    with pytest.raises(SystemExit):
        bench.parse_args(["--tiny", "--variants", "megatron-interleaved", "ideal-v-split-graphed"])
