"""Split backward on public autograd APIs: input gradient now (I), weight-gradient GEMMs later (W).

Zero Bubble Pipeline Parallelism (Qi et al., 2024), sec. 2: the backward of a linear layer ``y = x A^T + b`` is
two independent GEMMs, ``dx = dy A`` (needed by the previous stage: on the critical path) and ``dA = dy^T x``
(needed only by the optimizer step). A schedule runs the first in I and moves the second into a bubble as W.

Mechanism (no private torch API):

- :func:`enable_weight_grad_split` makes every ``nn.Linear`` of a module run through
  :class:`_SplitLinearFunction`, a ``torch.autograd.Function`` whose backward always returns ``dx`` and the bias
  gradient, and computes ``dA``:

  - immediately (returned to autograd like ``nn.Linear`` would) when no deferral is active — a plain backward
    or a full ``B`` action is unchanged;
  - later, when the executor runs the input-gradient pass inside :meth:`WeightGradQueue.deferring`: the GEMM is
    wrapped in a closure and queued under the current ``(stage, microbatch)``; :meth:`WeightGradQueue.run` (the
    ``W`` action) runs it and accumulates ``dA`` into the weight.

- Everything else (norms, embeddings, biases, any non-Linear parameter) gets its gradient from the normal
  autograd pass in I. The math and the per-micro-batch accumulation are the same as an undivided backward.

Adapters with their own linear layers (Megatron's ``LinearWithGradAccumulationAndAsyncCommunication``) put
closures into the same queue through :func:`active_deferral` / :meth:`WeightGradQueue.put`.
"""
from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

__all__ = [
    "GradAccumulator",
    "WeightGradQueue",
    "WeightGradTarget",
    "accumulate_into_grad",
    "active_deferral",
    "disable_weight_grad_split",
    "enable_weight_grad_split",
    "split_linear",
]

logger = logging.getLogger(__name__)

GradAccumulator = Callable[[torch.nn.Parameter, torch.Tensor], None]
"""``accumulate(param, grad)``: add a weight gradient computed by a W pass to wherever the trainer keeps it."""


def accumulate_into_grad(param: torch.nn.Parameter, grad: torch.Tensor) -> None:
    """Default accumulation, the same as autograd's: ``param.grad = grad`` if unset, else ``param.grad += grad``."""
    if param.grad is None:
        param.grad = grad.to(param.dtype) if grad.dtype != param.dtype else grad
    else:
        param.grad.add_(grad)


class WeightGradQueue:
    """Deferred weight-gradient work, keyed by ``(stage, microbatch)``.

    ``put`` queues a closure (it computes a weight gradient and accumulates it); ``run(stage, mb)`` is the W
    action and runs that key's closures in the order they were queued; ``drain()`` runs everything left (call it
    before gradient reduction, clipping or the optimizer step). ``accumulate_grad`` is where the built-in split
    linear puts its gradients (default: ``param.grad``; Megatron's ``main_grad`` or DeepSpeed's bf16 buffers
    pass their own).
    """

    def __init__(self, *, accumulate_grad: GradAccumulator = accumulate_into_grad) -> None:
        self.accumulate_grad = accumulate_grad
        self._pending: "OrderedDict[tuple[int, int], list[Callable[[], None]]]" = OrderedDict()

    def put(self, stage: int, microbatch: int, closure: Callable[[], None]) -> None:
        """Queue ``closure`` as part of W of ``stage`` for ``microbatch``."""
        self._pending.setdefault((stage, microbatch), []).append(closure)

    def run(self, stage: int, microbatch: int) -> int:
        """Run (and forget) the closures queued for ``(stage, microbatch)``; returns how many ran."""
        closures = self._pending.pop((stage, microbatch), ())
        for closure in closures:
            closure()
        return len(closures)

    def drain(self) -> int:
        """Run every queued closure, oldest key first; returns how many ran."""
        count = 0
        while self._pending:
            _, closures = self._pending.popitem(last=False)
            for closure in closures:
                closure()
            count += len(closures)
        return count

    def clear(self) -> None:
        """Drop queued work without running it (after an aborted step)."""
        self._pending.clear()

    def pending_keys(self) -> tuple[tuple[int, int], ...]:
        """Keys ``(stage, microbatch)`` with queued work, oldest first."""
        return tuple(self._pending)

    def __len__(self) -> int:
        return sum(len(c) for c in self._pending.values())

    @contextlib.contextmanager
    def deferring(self, stage: int, microbatch: int) -> Iterator["WeightGradTarget"]:
        """While active, split linears queue their weight-gradient GEMMs here under ``(stage, microbatch)``.

        The target is process-global (not thread-local) on purpose: on CUDA the autograd engine runs backward
        functions on a device thread, not the thread that called ``torch.autograd.backward``.
        """
        global _ACTIVE
        previous = _ACTIVE
        target = WeightGradTarget(self, stage, microbatch)
        _ACTIVE = target
        try:
            yield target
        finally:
            _ACTIVE = previous


@dataclass(frozen=True, slots=True)
class WeightGradTarget:
    """Where deferred weight-gradient work goes right now."""

    queue: WeightGradQueue
    stage: int
    microbatch: int

    def put(self, closure: Callable[[], None]) -> None:
        self.queue.put(self.stage, self.microbatch, closure)


_ACTIVE: WeightGradTarget | None = None


def active_deferral() -> WeightGradTarget | None:
    """The current deferral target, or ``None`` when weight gradients must be computed immediately."""
    return _ACTIVE


def _weight_grad(grad_output: torch.Tensor, saved_input: torch.Tensor) -> torch.Tensor:
    """``dA = dy^T x`` over all leading dimensions (one GEMM)."""
    dy = grad_output.reshape(-1, grad_output.shape[-1])
    x = saved_input.reshape(-1, saved_input.shape[-1])
    return dy.t().mm(x)


class _SplitLinearFunction(torch.autograd.Function):
    """``F.linear`` whose weight-gradient GEMM can be deferred into a :class:`WeightGradQueue`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: nn.Module):
        device_type = x.device.type
        ctx.compute_dtype = None
        saved_weight = weight
        if torch.is_autocast_enabled(device_type):
            # what F.linear does under autocast, made explicit so backward sees the same (cast) operands; the
            # weight is saved uncast (it is a parameter: no extra memory) and cast again in backward
            dtype = torch.get_autocast_dtype(device_type)
            if x.is_floating_point() and x.dtype != dtype:
                x = x.to(dtype)
            if weight.dtype != dtype:
                ctx.compute_dtype = dtype
                weight = weight.to(dtype)
            bias = bias.to(dtype) if bias is not None and bias.dtype != dtype else bias
        ctx.save_for_backward(x, saved_weight)
        ctx.has_bias = bias is not None
        ctx.layer = layer
        with torch.autocast(device_type, enabled=False):
            return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x, weight = ctx.saved_tensors
        if ctx.compute_dtype is not None:
            weight = weight.to(ctx.compute_dtype)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_output.matmul(weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
        if ctx.needs_input_grad[1]:
            target = _ACTIVE
            if target is None:
                grad_weight = _weight_grad(grad_output, x)
            else:
                param = ctx.layer.weight
                accumulate = target.queue.accumulate_grad

                def compute_weight_grad(dy=grad_output, saved=x, param=param, accumulate=accumulate) -> None:
                    accumulate(param, _weight_grad(dy, saved))

                target.put(compute_weight_grad)
        return grad_input, grad_weight, grad_bias, None


def split_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Apply ``layer`` to ``x`` with a deferrable weight gradient."""
    return _SplitLinearFunction.apply(x, layer.weight, layer.bias, layer)


class _SplitLinearMixin:
    """Forward of an ``nn.Linear`` switched to the split-backward function (state_dict unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if not self.weight.requires_grad:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        return split_linear(self, x)


_SPLIT_CLASSES: dict[type, type] = {}


def _split_class_for(cls: type) -> type:
    split_cls = _SPLIT_CLASSES.get(cls)
    if split_cls is None:
        split_cls = type(f"WeightGradSplit{cls.__name__}", (_SplitLinearMixin, cls), {"_original_class": cls})
        _SPLIT_CLASSES[cls] = split_cls
    return split_cls


def enable_weight_grad_split(module: nn.Module) -> int:
    """Make every ``nn.Linear`` inside ``module`` (exact class, not subclasses with their own forward) defer its
    weight-gradient GEMM while a :meth:`WeightGradQueue.deferring` context is active. Idempotent; parameters,
    buffers, hooks and ``state_dict`` stay as they are. Returns the number of layers switched."""
    switched = 0
    for sub in module.modules():
        if type(sub) is nn.Linear:
            sub.__class__ = _split_class_for(nn.Linear)
            switched += 1
    if switched == 0:
        logger.debug("enable_weight_grad_split: no nn.Linear in %s; W passes of it will be empty", type(module).__name__)
    return switched


def disable_weight_grad_split(module: nn.Module) -> int:
    """Undo :func:`enable_weight_grad_split`; returns the number of layers restored."""
    restored = 0
    for sub in module.modules():
        original = getattr(type(sub), "_original_class", None)
        if original is not None and isinstance(sub, _SplitLinearMixin):
            sub.__class__ = original
            restored += 1
    return restored
