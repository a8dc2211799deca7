"""ScheduleRunner's input copies: detached device copies, host-to-GPU through pinned memory without blocking."""
from __future__ import annotations

import pytest
import torch


def _runner_module():
    pytest.importorskip("deepspeed")
    from ds_plugins.deepspeed import _runner

    return _runner


def test_device_copy_on_the_same_device_is_a_detached_copy_or_the_tensor():
    _runner = _runner_module()
    src = torch.arange(6.0, requires_grad=True)
    out = _runner._device_copy(src, "cpu")
    assert torch.equal(out, src.detach()) and not out.requires_grad and out.data_ptr() != src.data_ptr()
    same = _runner._device_copy(src, torch.device("cpu"), copy=False)
    assert same.data_ptr() == src.data_ptr() and not same.requires_grad
    ids = torch.arange(4)
    pair = _runner._to_device((ids, ids + 1), "cpu")  # targets: moved, not copied, structure kept
    assert isinstance(pair, tuple) and pair[0].data_ptr() == ids.data_ptr() and torch.equal(pair[1], ids + 1)
    assert _runner._to_device_input(torch.ones(2), "cpu", reentrant=True).requires_grad
    assert not _runner._to_device_input(ids, "cpu", reentrant=True).requires_grad


@pytest.mark.gpu
def test_host_to_gpu_copy_is_exact_and_does_not_wait_for_queued_work():
    _runner = _runner_module()
    src = torch.randint(0, 32000, (1, 2048))
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)  # keep the GPU busy: a blocking copy would wait for this
    start = torch.cuda.Event(enable_timing=True)
    start.record()
    out = _runner._device_copy(src, torch.device("cuda", torch.cuda.current_device()))
    assert not start.query()  # the host got here while the GPU still sleeps
    assert torch.equal(out.cpu(), src)
