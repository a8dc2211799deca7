"""GPU variants (skipped without CUDA): split backward with CUDA's autograd device thread, CUDA-event timing,
and every schedule over NCCL on 2 GPUs (batched p2p, untagged: receives posted in each peer's send order).

Run on the device machine:  python -m pytest -q tests/runtime/test_runtime_gpu.py
"""
from __future__ import annotations

import pytest
import torch

from ds_plugins.runtime import PipelineExecutor, WeightGradQueue, build_stage_modules, enable_weight_grad_split
from ds_plugins.schedule.registry import SCHEDULE_NAMES, build_schedule

from runtime_harness import max_grad_diff, mlp_batches, mlp_layers, mse, reference_grads, run_ranks
from runtime_workers import all_schedules

pytestmark = pytest.mark.gpu
TOL = 1e-12


def _cuda(values):
    return [v.cuda() for v in values]


@pytest.mark.timeout(120)
def test_split_backward_on_cuda_matches_full_backward():
    ref = [layer.cuda() for layer in mlp_layers(4)]
    split = [layer.cuda() for layer in mlp_layers(4)]
    for layer in split:
        enable_weight_grad_split(layer)
    xs, ys = mlp_batches(3)
    xs, ys = _cuda(xs), _cuda(ys)
    queue = WeightGradQueue()
    for mb, (x, y) in enumerate(zip(xs, ys)):
        with queue.deferring(0, mb):  # backward runs on the CUDA autograd thread: the target must be global
            value = x
            for layer in split:
                value = layer(value)
            mse(value, y).backward()
    assert len(queue) > 0
    for mb in reversed(range(3)):
        queue.run(0, mb)
    ref_grads, _ = reference_grads(ref, xs, ys, loss_scale=1.0)
    diff, count = max_grad_diff(split, ref_grads, range(4))
    assert count > 0 and diff <= TOL


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["zb-v", "zb-h1", "interleaved-1f1b"])
def test_single_gpu_executor_with_cuda_event_timing(name):
    schedule = build_schedule(name, pp=1, microbatches=4)
    layers = [layer.cuda() for layer in mlp_layers(2 * schedule.shape.num_stages)]
    modules = build_stage_modules(layers, schedule.shape, 0)
    xs, ys = mlp_batches(4)
    xs, ys = _cuda(xs), _cuda(ys)
    ex = PipelineExecutor(schedule, 0, modules, p2p=None, loss_fn=mse, device="cuda", track_memory=True)
    r = ex.run(xs, ys, loss_scale=0.25)
    ref_grads, _ = reference_grads([layer.cuda() for layer in mlp_layers(len(layers))], xs, ys, loss_scale=0.25)
    diff, _ = max_grad_diff(layers, ref_grads, range(len(layers)))
    assert diff <= TOL
    assert 0 < r.busy_s <= r.wall_s * 1.01  # CUDA-event times
    assert r.mean_memory_bytes()  # allocated-memory deltas per action kind
    # the host's time to issue each timed action, one sample per action like the CUDA-event times
    host = r.host_action_seconds
    assert {k: len(v) for k, v in host.items()} == {k: len(v) for k, v in r.action_seconds.items()}
    assert all(t > 0 for v in host.values() for t in v) and r.typical_host_seconds()


@pytest.mark.timeout(300)
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for NCCL between ranks")
def test_nccl_two_ranks_every_schedule(tmp_path):
    modes = {"nccl": {}}
    results = run_ranks(all_schedules, 2, 4, modes, "cuda", tmp_path=tmp_path, timeout_s=280, backend="nccl")
    for key in [("nccl", n) for n in SCHEDULE_NAMES] + [("tuple-model", n) for n in ("zb-v", "interleaved-1f1b")]:
        holders = 0
        for rank, per_rank in enumerate(results):
            r = per_rank[key]
            assert r["params_compared"] > 0
            assert r["grad_diff"] <= TOL, f"{key} rank {rank}: grad diff {r['grad_diff']:.3g}"
            if r["holds_last"]:
                holders += 1
                assert r["loss_diff"] <= TOL
        assert holders == 1
