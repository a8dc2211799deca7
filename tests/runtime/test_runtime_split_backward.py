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
from ds_plugins.runtime.weight_grad import backward_input, check_recorded_graph, recording_linears

TOL = 1e-12


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 8, bias=False), nn.GELU(), nn.Linear(8, 4)
    ).double()


def _batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(n)]


def _assert_grads_match(split: nn.Module, ref: nn.Module) -> None:
    for (name, p), (_, q) in zip(split.named_parameters(), ref.named_parameters()):
        assert (p.grad - q.grad).abs().max() <= TOL, name


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
    _assert_grads_match(split, ref)


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
    _assert_grads_match(split, ref)


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


def test_weight_pass_builds_no_graph_under_grad_mode():
    """The executor runs W inside ``torch.enable_grad()``; the deferred GEMM reads the saved input, which requires
    grad, so without ``no_grad`` it would record an autograd node and leave ``param.grad`` holding the
    micro-batch's activations through ``grad_fn``."""
    split = _model()
    enable_weight_grad_split(split)
    queue = WeightGradQueue()
    xs = _batches(2)
    for mb, x in enumerate(xs):
        with queue.deferring(0, mb):
            split(x).sum().backward()
    modes = []
    queue.put(0, 0, lambda: modes.append(torch.is_grad_enabled()))
    with torch.enable_grad():
        assert queue.run(0, 0) == 4
        assert queue.drain() == 3
    assert modes == [False]
    for name, p in split.named_parameters():
        assert p.grad is not None and p.grad.grad_fn is None and not p.grad.requires_grad, name


def test_deferred_accumulator_gets_the_parameter_itself_also_when_checkpointed():
    """Custom accumulators look parameters up by identity (DeepSpeed bf16: ``id(param)``); the tensors a
    checkpointed block saves come back as other objects, so the split linear must hand over the parameter."""
    split = _model()
    enable_weight_grad_split(split)
    params = {id(p) for p in split.parameters()}
    seen = []
    queue = WeightGradQueue(accumulate_grad=lambda p, g: seen.append(id(p)))
    (x,), (x2,) = _batches(1), _batches(1)
    with queue.deferring(0, 0):
        split(x).sum().backward()
    with queue.deferring(0, 1):
        checkpoint(split, x2, use_reentrant=False).sum().backward()
    with queue.deferring(0, 2):
        checkpoint(split, x2.detach().requires_grad_(True), use_reentrant=True).sum().backward()
    assert queue.drain() == 9
    assert len(seen) == 9 and set(seen) <= params


def test_deferral_without_linears_leaves_no_key():
    queue = WeightGradQueue()
    model = nn.Sequential(nn.LayerNorm(6)).double()
    (x,) = _batches(1)
    with queue.deferring(4, 0) as target:
        model(x).sum().backward()
        assert target.stage == 4 and target.microbatch == 0
    assert queue.pending_keys() == () and len(queue) == 0


def test_put_after_the_key_ran_still_queues():
    queue = WeightGradQueue()
    ran = []
    with queue.deferring(0, 0) as target:
        target.put(lambda: ran.append("a"))
        assert queue.run(0, 0) == 1
        target.put(lambda: ran.append("b"))  # the key was run while deferral was active: queue it again
    assert queue.pending_keys() == ((0, 0),)
    assert queue.run(0, 0) == 1 and ran == ["a", "b"]


@pytest.mark.parametrize("split_mode", ["B", "IW", "IW-recorded"])
def test_gpt_block_bf16_into_fp32_buffers_bit_identical(split_mode):
    """The benchmark's case: bf16 GPT blocks (benchmarks/gpt.py), gradients summed into fp32 buffers the way
    DeepSpeed's BF16_Optimizer does (autograd-made: hook ``hp += grad.to(fp32)``; deferred W: ``hp += grad``).
    Split backward (full or I then W, W after every micro-batch's I; the Function form or recorded edges) gives
    the very same bits as nn.Linear."""
    from benchmarks.gpt import GPTConfig, TransformerLayer

    cfg = GPTConfig(layers=2, hidden=32, heads=4, seq=8, vocab=64)

    def build(split: bool):
        model = nn.Sequential(*[TransformerLayer(cfg, 10 + i) for i in range(2)]).to(torch.bfloat16)
        if split:
            assert enable_weight_grad_split(model) == 8
        hp = {}
        for p in model.parameters():
            hp[id(p)] = buf = torch.zeros(p.shape, dtype=torch.float32)

            def hook(p, buf=buf):
                if p.grad is not None:
                    buf.add_(p.grad.to(torch.float32).view(buf.shape))
                    p.grad = None

            p.register_post_accumulate_grad_hook(hook)
        queue = WeightGradQueue(accumulate_grad=lambda p, g: hp[id(p)].add_(g.view(hp[id(p)].shape)))
        return model, hp, queue

    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(1, cfg.seq, cfg.hidden, generator=g).to(torch.bfloat16) for _ in range(3)]
    dys = [torch.randn(1, cfg.seq, cfg.hidden, generator=g).to(torch.bfloat16) for _ in range(3)]
    ref, ref_hp, _ = build(False)
    split, split_hp, queue = build(True)
    ref_dx, dx = [], []
    for x, dy in zip(xs, dys):
        leaf = x.clone().requires_grad_(True)
        torch.autograd.backward([ref(leaf)], [dy])
        ref_dx.append(leaf.grad)
    for mb, (x, dy) in enumerate(zip(xs, dys)):
        leaf = x.clone().requires_grad_(True)
        if split_mode == "IW-recorded":
            with recording_linears() as records:
                out = split(leaf)
            assert len(records) == 8
            (g,) = backward_input([out], [dy], [leaf], records, list(split.parameters()), queue, 0, mb)
            for p in split.parameters():  # what the executor's after_backward does for DeepSpeed (no hooks here)
                if p.grad is not None:
                    split_hp[id(p)].add_(p.grad.to(torch.float32).view(split_hp[id(p)].shape))
                    p.grad = None
            dx.append(g)
            continue
        out = split(leaf)
        if split_mode == "IW":
            with queue.deferring(0, mb):
                torch.autograd.backward([out], [dy])
        else:
            torch.autograd.backward([out], [dy])
        dx.append(leaf.grad)
    with torch.enable_grad():  # as in the executor; micro-batch order, as the reference sums them
        for mb in range(3):
            assert queue.run(0, mb) == (0 if split_mode == "B" else 8)
    assert all(torch.equal(a, b) for a, b in zip(dx, ref_dx))
    for (name, p), q in zip(split.named_parameters(), ref.parameters()):
        assert torch.equal(split_hp[id(p)], ref_hp[id(q)]), name


# ---------------------------------------------------------------- split_mode="autograd": recorded edges


def _recorded_i_then_w(model: nn.Module, xs, queue: WeightGradQueue, loss=lambda y: y.square().sum()):
    """Forward under recording_linears, then backward_input (I) of every micro-batch; returns leaf grads."""
    dx = []
    for mb, x in enumerate(xs):
        leaf = x.detach().clone().requires_grad_(True)
        with recording_linears() as records:
            out = loss(model(leaf))
        params = [p for p in model.parameters() if p.requires_grad]
        shared = check_recorded_graph([out], records) if mb == 0 else set()
        assert shared == set()
        (g,) = backward_input([out], [None], [leaf], records, params, queue, 0, mb, shared=shared)
        dx.append(g)
    return dx


def test_recorded_edges_input_then_deferred_weight_equals_full_backward():
    ref, split = _model(), _model()
    enable_weight_grad_split(split)
    xs_ref, xs = _batches(3), _batches(3)
    for x in xs_ref:
        ref(x).square().sum().backward()
    queue = WeightGradQueue()
    with recording_linears() as records:
        split(xs[0])
    assert [type(r.module).__name__ for r in records] == ["WeightGradSplitLinear"] * 3
    assert not any("SplitLinearFunction" in type(r.edge.node).__name__ for r in records)  # autograd's own nodes
    dx = _recorded_i_then_w(split, xs, queue)
    for g, xr in zip(dx, xs_ref):
        assert (g - xr.grad).abs().max() <= TOL
    grads = _grads(split)
    for name in ("0.weight", "3.weight", "5.weight"):  # recorded linears: their weight GEMMs wait for W
        assert grads[name] is None
    for name in ("0.bias", "1.weight", "1.bias", "5.bias"):
        assert (grads[name] - dict(ref.named_parameters())[name].grad).abs().max() <= TOL
    assert len(queue) == 9
    for mb in (1, 2, 0):
        assert queue.run(0, mb) == 3
    _assert_grads_match(split, ref)


class _Tied(nn.Module):
    """An embedding whose weight a switched linear also uses (LM head tied to the embedding)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.emb = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight
        self.mid = nn.Linear(6, 6)

    def forward(self, ids_and_x):
        ids, x = ids_and_x
        return self.head(torch.tanh(self.mid(self.emb(ids) + x)))


def test_weight_shared_with_an_embedding_is_found_and_left_to_autograd(caplog):
    ref, split = _Tied().double(), _Tied().double()
    enable_weight_grad_split(split)
    g = torch.Generator().manual_seed(2)
    ids = [torch.randint(0, 10, (2, 3), generator=g) for _ in range(2)]
    xs = [torch.randn(2, 3, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    for i, x in zip(ids, xs):
        ref((i, x)).square().sum().backward()
    queue = WeightGradQueue()
    with caplog.at_level("INFO", logger="ds_plugins.runtime.weight_grad"):
        for mb, (i, x) in enumerate(zip(ids, xs)):
            with recording_linears() as records:
                out = split((i, x)).square().sum()
            shared = check_recorded_graph([out], records) if mb == 0 else set()
            assert len(shared) == (1 if mb == 0 else 0)
            backward_input([out], [None], [], records, list(split.parameters()), queue, 0, mb, shared=shared)
            assert len(records) == (2 if mb == 0 else 1)  # the head stops recording after the first walk
            queue.run(0, mb)
    assert "used elsewhere" in caplog.text
    assert split.head._interleaf_recordable is False and split.mid._interleaf_recordable is True
    disable_weight_grad_split(split)
    assert "_interleaf_recordable" not in vars(split.head) and type(split.head) is nn.Linear
    _assert_grads_match(split, ref)


def test_recorded_input_modified_in_place_fails_at_w():
    split = _model()
    enable_weight_grad_split(split)
    (x,) = _batches(1)
    queue = WeightGradQueue()
    leaf = x.detach().clone().requires_grad_(True)
    with recording_linears() as records:
        h = split[0](leaf)
        y = split[5](split[4](split[3](split[2](split[1](h)))))
    backward_input([y.sum()], [None], [leaf], records, list(split.parameters()), queue, 0, 0)
    with torch.no_grad():
        leaf.add_(1.0)  # the first linear's input changes before its W
    with pytest.raises(RuntimeError, match="modified in place"):
        queue.run(0, 0)


def test_recording_under_autocast_uses_the_function_form_and_matches():
    ref, split = _model().float(), _model().float()
    enable_weight_grad_split(split)
    xs = [x.float() for x in _batches(2)]
    queue = WeightGradQueue()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for x in xs:
            ref(x.detach().clone()).float().square().sum().backward()
        for mb, x in enumerate(xs):
            leaf = x.detach().clone().requires_grad_(True)
            with recording_linears() as records:
                out = split(leaf).float().square().sum()
            assert records == []  # autocast: every linear took the Function form
            backward_input([out], [None], [leaf], records, list(split.parameters()), queue, 0, mb)
    assert len(queue) == 6
    queue.drain()
    for (name, p), (_, q) in zip(split.named_parameters(), ref.named_parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_recorded_linear_whose_output_is_unused_gets_no_gradient():
    split = _model()
    enable_weight_grad_split(split)
    (x,) = _batches(1)
    queue = WeightGradQueue()
    with recording_linears() as records:
        y = split(x)
        split[5](split[4](y.new_ones(2, 3, 8)))  # recorded, but not part of the loss
    backward_input([y.sum()], [None], [], records, list(split.parameters()), queue, 0, 0)
    assert len(records) == 4 and len(queue) == 3


def test_reentrant_checkpoint_in_the_graph_is_found():
    split = _model()
    enable_weight_grad_split(split)
    (x,) = _batches(1)
    with recording_linears() as records:
        h = split[2](split[1](split[0](x)))
        y = checkpoint(split[3], h, use_reentrant=True)
        out = split[5](split[4](y)).sum()
    assert [r.module for r in records] == [split[0], split[5]]  # the checkpointed linear ran under no_grad
    assert check_recorded_graph([out], records) is None


class _AddedParam(nn.Module):
    """``linear(x) + p`` with ``p`` of the output's shape: autograd hands the same tensor to ``p`` and to the
    linear's output edge."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.lin = nn.Linear(4, 4, bias=False)
        self.p = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return self.lin(x) + self.p


def test_gradient_shared_by_a_parameter_and_a_recorded_output_is_not_aliased():
    # p.grad made of the tensor that is also the linear's dy, then accumulated in place at micro-batch 1, would
    # change micro-batch 0's dy before its W runs
    ref, split = _AddedParam().double(), _AddedParam().double()
    enable_weight_grad_split(split)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    dys = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    for x, dy in zip(xs, dys):
        torch.autograd.backward([ref(x)], [dy])
    queue = WeightGradQueue()
    for mb, (x, dy) in enumerate(zip(xs, dys)):
        with recording_linears() as records:
            out = split(x)
        backward_input([out], [dy.clone()], [], records, list(split.parameters()), queue, 0, mb)
    queue.drain()  # both W after both I
    _assert_grads_match(split, ref)


class _ParamPlusTanh(nn.Module):
    """``p + tanh(linear(x))``: autograd gives ``p`` the output's gradient tensor itself."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.lin = nn.Linear(4, 4)
        self.p = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return self.p + torch.tanh(self.lin(x))


def test_parameter_gradient_that_is_the_output_gradient_passed_in_is_copied():
    # the output gradient came from the next stage on this rank, which may still hold it (its W's dy): p.grad must
    # not be that tensor, else accumulating p.grad in place at the next micro-batch changes it
    split = _ParamPlusTanh().double()
    enable_weight_grad_split(split)
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    dys = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    kept = [dy.clone() for dy in dys]
    queue = WeightGradQueue()
    for mb, (x, dy) in enumerate(zip(xs, dys)):
        with recording_linears() as records:
            out = split(x)
        backward_input([out], [dy], [], records, list(split.parameters()), queue, 0, mb)
    assert all(torch.equal(a, b) for a, b in zip(dys, kept))
    assert split.p.grad is not dys[0] and torch.equal(split.p.grad, dys[0] + dys[1])
