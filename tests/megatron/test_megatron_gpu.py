"""The Megatron adapter on GPUs: megatron's GPTModel (local spec) on two GPUs over NCCL, with megatron's real CUDA
RNG tracker and CUDA kernels (the CPU tests run through a test-only shim instead). Marked ``gpu``; skipped without
two CUDA devices. Run on the device: ``python -m pytest -m gpu tests/megatron/test_megatron_gpu.py``.
"""
from __future__ import annotations

import functools
import os
import sys

import pytest
import torch

pytest.importorskip("megatron.core")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatron_workers import gpt_worker, run_ranks  # noqa: E402
from test_megatron_parity import _assert_same, _gpt_check, _merge  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]


@pytest.fixture(autouse=True)
def _exact_fp32_matmuls():
    """fp32 GEMMs without TF32 in the spawned ranks too (they inherit the environment, not this process's flags)."""
    old = os.environ.get("NVIDIA_TF32_OVERRIDE")
    os.environ["NVIDIA_TF32_OVERRIDE"] = "0"
    yield
    if old is None:
        del os.environ["NVIDIA_TF32_OVERRIDE"]
    else:
        os.environ["NVIDIA_TF32_OVERRIDE"] = old


@pytest.mark.timeout(600)
def test_gpt_nccl_every_schedule_matches_megatron_pp2():
    """Every interleaf schedule against megatron's own 1F1B / interleaved, same weights and data, all gradients and
    logged losses, with megatron DDP's overlap_grad_reduce and megatron's tied embedding / LM head."""
    cases = [
        ("loop", 1, ["megatron", "1f1b", "zb-h1", "zb-h2", "auto"]),
        ("loop", 2, ["megatron", "interleaved-1f1b"]),
        ("v", 2, ["zb-v", "v-half", "v-min", "zb-v+measured"]),
    ]
    worker = functools.partial(gpt_worker, overlap=True)
    merged = _merge(run_ranks(worker, 2, 1, 2, cases, 4, backend="nccl"), key=None)
    # auto picks from measured costs: on this tiny model it may pick a schedule without a W split, so its
    # deferred-W count may be 0 (the CPU tests expect > 0); its gradients and losses must match all the same.
    auto_grads, auto_losses, _ = merged.pop(("loop", 1, "auto"))
    _gpt_check(merged)
    base_grads, base_losses, _ = merged[("loop", 1, "megatron")]
    _assert_same(auto_grads, base_grads, "auto (loop, vp=1) vs megatron's own schedule")
    torch.testing.assert_close(torch.stack(auto_losses), torch.stack(base_losses), rtol=1e-6, atol=1e-7)


@pytest.mark.timeout(600)
def test_gpt_nccl_recompute_with_dropout_equals_no_recompute():
    """Dropout on (0.1), megatron's CUDA RNG tracker: full activation recompute recomputes each layer inside
    interleaf's I action from the RNG state saved at its forward, so every schedule's gradients with recompute equal
    its gradients without (the forward order, and so the dropout masks, are the schedule's own)."""
    cases = [("loop", 1, ["megatron", "zb-h2"]), ("loop", 2, ["megatron", "interleaved-1f1b"]),
             ("v", 2, ["zb-v", "v-min"])]
    plain = _merge(run_ranks(functools.partial(gpt_worker, dropout=0.1), 2, 1, 2, cases, 4, backend="nccl"),
                   key=None)
    recomputed = _merge(run_ranks(functools.partial(gpt_worker, dropout=0.1, recompute="full"), 2, 1, 2, cases, 4,
                                  backend="nccl"), key=None)
    assert plain.keys() == recomputed.keys()
    for case, (grads, losses, deferred) in plain.items():
        _assert_same(recomputed[case][0], grads, f"{case} with full recompute vs without")
        torch.testing.assert_close(torch.stack(recomputed[case][1]), torch.stack(losses), rtol=1e-6, atol=1e-7)
        assert (deferred > 0) == (recomputed[case][2] > 0), case
    # The masks are really random: megatron's own 1F1B and interleaved differ once dropout is on.
    a, b = plain[("loop", 1, "megatron")][0], plain[("loop", 2, "megatron")][0]
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-4


@pytest.mark.timeout(600)
def test_gpt_nccl_cuda_graphs_match_megatron_pp2():
    """--pipeline-cuda-graphs on GPUs: real CUDA graphs of every action (F, I + W, or B in ``zb-h1+B``), captured
    after an eager step and replayed in the checked step; gradients and logged losses equal megatron's own
    schedules'."""
    cases = [("loop", 1, ["megatron", "zb-h2+graphs", "zb-h1+B+graphs"]),
             ("loop", 2, ["megatron", "interleaved-1f1b+graphs"]),
             ("v", 2, ["zb-v+graphs", "zb-v+measured+graphs"])]
    _gpt_check(_merge(run_ranks(gpt_worker, 2, 1, 2, cases, 4, backend="nccl"), key=None))
