"""Split backward alone (one process): I then W equals a full backward, with W deferred across micro-batches."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ds_plugins.runtime import (
    WeightGradQueue,
    active_deferral,
    disable_weight_grad_split,
    enable_weight_grad_split,
)

TOL = 1e-12


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 8, bias=False), nn.GELU(), nn.Linear(8, 4)
    ).double()


def _batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(n)]


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


def test_input_then_deferred_weight_equals_full_backward():
    ref, split = _model(), _model()
    assert enable_weight_grad_split(split) == 3
    xs_ref, xs = _batches(3), _batches(3)
    for x in xs_ref:
        ref(x).square().sum().backward()
    queue = WeightGradQueue()
    for mb, x in enumerate(xs):  # I of every micro-batch first
        with queue.deferring(stage=0, microbatch=mb):
            split(x).square().sum().backward()
        assert active_deferral() is None
    # after the I passes: input grads, norm and bias grads are complete, Linear weights have none yet
    for x, xr in zip(xs, xs_ref):
        assert (x.grad - xr.grad).abs().max() <= TOL
    grads = _grads(split)
    for name in ("0.weight", "3.weight", "5.weight"):
        assert grads[name] is None
    for name in ("0.bias", "1.weight", "1.bias", "5.bias"):
        assert (grads[name] - dict(ref.named_parameters())[name].grad).abs().max() <= TOL
    assert queue.pending_keys() == ((0, 0), (0, 1), (0, 2)) and len(queue) == 9
    for mb in (2, 0, 1):  # W out of order, after the other micro-batches' I
        assert queue.run(0, mb) == 3
    assert len(queue) == 0 and queue.run(0, 0) == 0
    for (name, p), (_, q) in zip(split.named_parameters(), ref.named_parameters()):
        assert (p.grad - q.grad).abs().max() <= TOL, name


def test_without_deferral_split_linear_is_plain_linear():
    ref, split = _model(), _model()
    enable_weight_grad_split(split)
    (x,), (xr,) = _batches(1), _batches(1)
    split(x).sum().backward()
    ref(xr).sum().backward()
    for (name, p), (_, q) in zip(split.named_parameters(), ref.named_parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-14), name
    assert torch.equal(split(x), ref(x))


def test_drain_and_custom_accumulator_into_main_grad():
    ref, split = _model(), _model()
    enable_weight_grad_split(split)
    for p in split.parameters():
        p.main_grad = torch.zeros_like(p)

    def into_main_grad(param, grad):
        param.main_grad.add_(grad)

    queue = WeightGradQueue(accumulate_grad=into_main_grad)
    xs, xs_ref = _batches(2), _batches(2)
    for mb, x in enumerate(xs):
        with queue.deferring(3, mb):
            split(x).sum().backward()
    for x in xs_ref:
        ref(x).sum().backward()
    assert queue.drain() == 6 and len(queue) == 0
    for (name, p), (_, q) in zip(split.named_parameters(), ref.named_parameters()):
        got = p.main_grad if name.endswith("weight") and p.dim() == 2 else p.grad
        assert (got - q.grad).abs().max() <= TOL, name
        if p.dim() == 2:
            assert p.grad is None


def test_frozen_weight_is_not_queued_and_clear_drops_work():
    split = _model()
    enable_weight_grad_split(split)
    split[0].weight.requires_grad_(False)
    queue = WeightGradQueue()
    (x,) = _batches(1)
    with queue.deferring(0, 0):
        split(x).sum().backward()
    assert len(queue) == 2  # layers 3 and 5 only
    assert split[0].weight.grad is None
    queue.clear()
    assert len(queue) == 0


def test_checkpointed_block_defers_weight_grads_exactly():
    ref, split = _model(), _model()
    enable_weight_grad_split(split)
    (x,), (xr,) = _batches(1), _batches(1)
    queue = WeightGradQueue()
    with queue.deferring(0, 0):
        checkpoint(split, x, use_reentrant=False).sum().backward()
    assert len(queue) == 3
    queue.run(0, 0)
    ref(xr).sum().backward()
    for (name, p), (_, q) in zip(split.named_parameters(), ref.named_parameters()):
        assert (p.grad - q.grad).abs().max() <= TOL, name


def test_enable_is_idempotent_keeps_state_and_disable_restores():
    m = _model()

    class MyLinear(nn.Linear):
        pass

    m.append(MyLinear(4, 4).double())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert enable_weight_grad_split(m) == 3
    assert enable_weight_grad_split(m) == 0  # already switched (exact nn.Linear class only)
    assert isinstance(m[0], nn.Linear) and type(m[6]) is MyLinear
    assert m.state_dict().keys() == before.keys()
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())
    assert disable_weight_grad_split(m) == 3
    assert type(m[0]) is nn.Linear


def test_nested_deferral_restores_previous_target():
    q1, q2 = WeightGradQueue(), WeightGradQueue()
    with q1.deferring(0, 0):
        with q2.deferring(1, 1):
            assert active_deferral().queue is q2
        assert active_deferral().queue is q1 and active_deferral().stage == 0
    assert active_deferral() is None
    with pytest.raises(KeyError):
        with q1.deferring(0, 0):
            raise KeyError("boom")
    assert active_deferral() is None


def test_autocast_bf16_matches_plain_linear_under_autocast():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 4))
    split = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 4))
    split.load_state_dict(ref.state_dict())
    enable_weight_grad_split(split)
    x = torch.randn(5, 6)
    queue = WeightGradQueue()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ref = ref(x)
        with queue.deferring(0, 0):
            out = split(x)
    assert out.dtype == out_ref.dtype == torch.bfloat16 and torch.equal(out, out_ref)
    out_ref.float().sum().backward()
    with queue.deferring(0, 0):
        out.float().sum().backward()
    queue.run(0, 0)
    for (name, p), (_, q) in zip(split.named_parameters(), ref.named_parameters()):
        assert p.grad.dtype == torch.float32
        assert torch.equal(p.grad, q.grad), name  # same bf16 GEMMs, same casts
