"""Weight-gradient deferral inside megatron's ``LinearWithGradAccumulationAndAsyncCommunication``.

Zero-bubble schedules split a backward into I (input gradient, on the critical path) and W (weight gradient,
scheduled into bubbles; Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024, sec. 2). Every megatron
``ColumnParallelLinear`` / ``RowParallelLinear`` (QKV, attention projection, MLP fc1/fc2, LM head) runs its
backward through this one autograd function, so patching its ``backward`` covers all weight GEMMs.

While a :class:`~ds_plugins.runtime.WeightGradQueue` is collecting (during an I action), the patched backward
computes only the input gradient (with megatron's tensor-parallel all-reduce / sequence-parallel
reduce-scatter, unchanged) and queues the weight-gradient GEMM; bias grads and everything else (norms,
embeddings) stay in I. When no queue is collecting (megatron's own schedules, full-B actions, forward-only),
megatron's original backward runs, except for DDP-managed weights without gradient-accumulation fusion while the
patch is applied: their weight gradient is then written to ``main_grad`` at once (a full B may follow an I of
the same step, after which DDP's hook would skip a gradient handed to autograd).

A queued W accumulates exactly where megatron would have:

- gradient-accumulation fusion (``config.gradient_accumulation_fusion``) or a DDP-managed weight (megatron's
  ``DistributedDataParallel`` gives it ``main_grad`` and ``grad_added_to_main_grad``): into ``weight.main_grad``
  (apex's fused kernel when installed, else one ``addmm_``), so no apex is needed;
- otherwise: into ``weight.grad``.

For DDP-managed weights the I pass hands autograd the same dummy gradient megatron's fusion path does and sets
``grad_added_to_main_grad``, so DDP's per-parameter hook runs on the main thread and adds nothing; the DP
reduction itself is started by :mod:`megatron_patches.forward_backward` only after the last W.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

logger = logging.getLogger(__name__)

__all__ = ["install", "uninstall", "is_installed"]

_original_backward = None
deferred_count = 0
"""How many weight-gradient GEMMs were queued since import (tests check that deferral really happens)."""
_collecting: Optional[Callable[[], Optional[Callable[[Callable[[], None]], None]]]] = None


def install(collecting: Callable[[], Optional[Callable[[Callable[[], None]], None]]]) -> None:
    """Patch megatron's linear backward. ``collecting()`` returns a ``put(fn)`` that queues a weight-gradient
    closure while an I action runs, else ``None`` (then megatron's own backward runs)."""
    global _original_backward, _collecting
    from megatron.core.tensor_parallel import layers

    _collecting = collecting
    cls = layers.LinearWithGradAccumulationAndAsyncCommunication
    if _original_backward is None:
        _original_backward = cls.__dict__["backward"]
        cls.backward = staticmethod(layers.custom_bwd(_backward))


def uninstall() -> None:
    global _original_backward, _collecting
    if _original_backward is None:
        return
    from megatron.core.tensor_parallel import layers

    layers.LinearWithGradAccumulationAndAsyncCommunication.backward = _original_backward
    _original_backward = None
    _collecting = None


def is_installed() -> bool:
    return _original_backward is not None


def _call_original(ctx, grad_output):
    # _original_backward is the staticmethod object from the class dict; its __func__ is the custom_bwd wrapper.
    # Our own custom_bwd wrapper already set up autocast, so call the undecorated function.
    fn = _original_backward.__func__
    return getattr(fn, "__wrapped__", fn)(ctx, grad_output)


def _backward(ctx, grad_output):
    put = _collecting() if _collecting is not None else None
    if ctx.grad_output_buffer is not None:
        # megatron's own embedding-wgrad deferral owns this layer.
        return _call_original(ctx, grad_output)
    input, weight = ctx.saved_tensors
    ddp_managed = hasattr(weight, "grad_added_to_main_grad")
    if put is None and (not ddp_managed or ctx.gradient_accumulation_fusion):
        # Not inside an I action: megatron's own backward. (A DDP-managed weight without fusion takes the path
        # below even here: once an I of this step has set grad_added_to_main_grad, DDP's hook would drop a
        # full-B weight gradient handed to autograd, so B writes main_grad directly too.)
        return _call_original(ctx, grad_output)

    from megatron.core.tensor_parallel import layers

    tp_group = ctx.tp_group
    main_grad = ctx.main_grad
    if ctx.gradient_accumulation_fusion:
        weight.main_grad = main_grad

    grad_input = grad_output.matmul(weight)
    handle = None
    if ctx.allreduce_dgrad:
        handle = torch.distributed.all_reduce(grad_input, group=tp_group, async_op=True)
    if ctx.sequence_parallel:
        sub_grad_input = torch.empty(list(input.size()), dtype=input.dtype, device=input.device)
        handle = layers.dist_reduce_scatter_func(sub_grad_input, grad_input, group=tp_group, async_op=True)
        grad_input = sub_grad_input

    to_main_grad = (ctx.gradient_accumulation_fusion and main_grad is not None) or ddp_managed
    weight_grad = _weight_grad_closure(ctx, input, weight, grad_output, to_main_grad)
    if put is None:
        weight_grad()
    else:
        global deferred_count
        deferred_count += 1
        put(weight_grad)

    if ddp_managed:
        # Same dummy megatron's fusion path returns: DDP's hook then skips its add (W writes main_grad).
        zero = getattr(weight, "zero_out_wgrad", False)
        factory = torch.zeros if zero else torch.empty
        grad_weight = factory(weight.shape, dtype=input.dtype, device=input.device)
        weight.grad_added_to_main_grad = True
    else:
        grad_weight = None
    grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(dim=0) if ctx.use_bias else None
    if handle is not None:
        handle.wait()
    return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def _weight_grad_closure(ctx, input, weight, grad_output, to_main_grad: bool) -> Callable[[], None]:
    sequence_parallel = ctx.sequence_parallel
    tp_group = ctx.tp_group
    input, grad_output = input.detach(), grad_output.detach()
    from megatron.core.tensor_parallel import layers
    from megatron.core.utils import prepare_input_tensors_for_wgrad_compute

    # No torch.no_grad() wrapper per closure (one is built per linear and micro-batch, on the host's critical
    # path): both callers already run without grad, the autograd engine's backward and WeightGradQueue.run/drain.
    def weight_grad() -> None:
        if sequence_parallel:
            size = list(input.size())
            size[0] *= tp_group.size()
            total_input = torch.empty(size, dtype=input.dtype, device=input.device)
            layers.dist_all_gather_func(total_input, input, group=tp_group)
        else:
            total_input = input
        go, ti = prepare_input_tensors_for_wgrad_compute(grad_output, total_input)
        if to_main_grad:
            target = weight.main_grad
            if layers._grad_accum_fusion_available and go.is_cuda and target.dtype == torch.float32:
                layers.fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(ti, go, target)
            elif layers._grad_accum_fusion_available and go.is_cuda and target.dtype in (
                torch.float16,
                torch.bfloat16,
            ):
                layers.fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp16(ti, go, target)
            elif go.dtype == target.dtype:
                target.addmm_(go.t(), ti)
            else:
                target.add_(go.t().matmul(ti))
        else:
            grad = go.t().matmul(ti)
            if weight.grad is None:
                weight.grad = grad
            else:
                weight.grad.add_(grad)

    return weight_grad
