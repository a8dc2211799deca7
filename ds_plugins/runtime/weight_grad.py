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

A cheaper form on the host (the executor's default, ``split_mode="autograd"``): during a forward whose backward
will be split, :func:`recording_linears` is active and switched linears run plain ``F.linear`` (autograd's own
C++ nodes, no Python ``Function``) and record ``(weight, input, gradient edge of the output)``.
:func:`backward_input` then runs I as one ``torch.autograd.grad`` towards the stage's input leaves, its other
parameters and those edges: autograd computes every input gradient and skips the weight GEMMs of the recorded
linears (their weights are not asked for), and hands back each linear's output gradient, from which the W
closure computes ``dy^T x``. Same GEMMs, no Python per linear in forward or backward. A weight used elsewhere in
the stage's graph too (found by one walk of the graph per stage, :func:`check_recorded_graph`) is left to
autograd, and its linears go back to the ``Function`` form; a stage whose graph holds a reentrant checkpoint
(which refuses ``torch.autograd.grad``) stops recording and runs the ``Function`` form throughout.

Adapters with their own linear layers (Megatron's ``LinearWithGradAccumulationAndAsyncCommunication``) put
closures into the same queue through :func:`active_deferral` / :meth:`WeightGradQueue.put`.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

__all__ = [
    "GradAccumulator",
    "GradsAccumulator",
    "LinearRecord",
    "WeightGradQueue",
    "WeightGradTarget",
    "accumulate_all_into_grad",
    "accumulate_into_grad",
    "active_deferral",
    "backward_input",
    "check_recorded_graph",
    "disable_weight_grad_split",
    "enable_weight_grad_split",
    "recording_linears",
    "split_linear",
]

logger = logging.getLogger(__name__)

GradAccumulator = Callable[[torch.nn.Parameter, torch.Tensor], None]
"""``accumulate(param, grad)``: add a weight gradient computed by a W pass to wherever the trainer keeps it."""


GradsAccumulator = Callable[[Sequence[torch.nn.Parameter], Sequence["torch.Tensor | None"]], None]
"""``accumulate(params, grads)``: add the gradients an input-gradient pass computed for a stage's parameters other
than the split linears' weights (``split_mode="autograd"``; None: the parameter got none)."""


def accumulate_into_grad(param: torch.nn.Parameter, grad: torch.Tensor) -> None:
    """Default accumulation, the same as autograd's: ``param.grad = grad`` if unset, else ``param.grad += grad``."""
    if param.grad is None:
        param.grad = grad.to(param.dtype) if grad.dtype != param.dtype else grad
    else:
        param.grad.add_(grad)


def accumulate_all_into_grad(params: Sequence[torch.nn.Parameter], grads: Sequence[torch.Tensor | None]) -> None:
    """Default :data:`GradsAccumulator`, what :func:`accumulate_into_grad` does for each gradient: a parameter
    without ``.grad`` takes the gradient (contiguous and not a view, as autograd's own accumulation leaves it),
    the others get one foreach add for all of them."""
    sums, adds = [], []
    for param, grad in zip(params, grads):
        if grad is None:
            continue
        current = param.grad
        if current is None:
            if grad._base is not None or not grad.is_contiguous():
                grad = grad.clone(memory_format=torch.contiguous_format)
            accumulate_into_grad(param, grad)
        else:
            sums.append(current)
            adds.append(grad)
    if sums:
        torch._foreach_add_(sums, adds)


class WeightGradQueue:
    """Deferred weight-gradient work, keyed by ``(stage, microbatch)``.

    ``put`` queues a closure (it computes a weight gradient and accumulates it); ``run(stage, mb)`` is the W
    action and runs that key's closures in the order they were queued; ``drain()`` runs everything left (call it
    before gradient reduction, clipping or the optimizer step). Closures run under ``torch.no_grad()``: a weight
    gradient is a value, not part of a graph (under grad mode the GEMM on the saved input, which requires grad,
    would record an autograd node and a gradient holding the micro-batch's activations alive).
    ``accumulate_grad`` is where the built-in split linear puts its gradients (default: ``param.grad``;
    Megatron's ``main_grad`` or DeepSpeed's bf16 buffers pass their own); ``accumulate_grads`` is where
    :func:`backward_input` puts the gradients of the stage's other parameters (default: ``param.grad``; DeepSpeed's
    bf16 buffers take them with one foreach add).
    """

    def __init__(self, *, accumulate_grad: GradAccumulator = accumulate_into_grad,
                 accumulate_grads: GradsAccumulator = accumulate_all_into_grad) -> None:
        self.accumulate_grad = accumulate_grad
        self.accumulate_grads = accumulate_grads
        self._pending: "OrderedDict[tuple[int, int], list[Callable[[], None]]]" = OrderedDict()

    def put(self, stage: int, microbatch: int, closure: Callable[[], None]) -> None:
        """Queue ``closure`` as part of W of ``stage`` for ``microbatch``."""
        self._pending.setdefault((stage, microbatch), []).append(closure)

    def run(self, stage: int, microbatch: int) -> int:
        """Run (and forget) the closures queued for ``(stage, microbatch)``; returns how many ran."""
        closures = self._pending.pop((stage, microbatch), ())
        if closures:
            with torch.no_grad():
                for closure in closures:
                    closure()
        return len(closures)

    def drain(self) -> int:
        """Run every queued closure, oldest key first; returns how many ran."""
        count = 0
        with torch.no_grad():
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
        return tuple(k for k, v in self._pending.items() if v)

    def __len__(self) -> int:
        return sum(len(c) for c in self._pending.values())

    def deferring(self, stage: int, microbatch: int) -> "_Deferring":
        """A context manager: while active, split linears queue their weight-gradient GEMMs here under
        ``(stage, microbatch)``; it yields the :class:`WeightGradTarget` they go to.

        The target is process-global (not thread-local) on purpose: on CUDA the autograd engine runs backward
        functions on a device thread, not the thread that called ``torch.autograd.backward``.
        """
        return _Deferring(self, stage, microbatch)


class _Deferring:
    """:meth:`WeightGradQueue.deferring` (a plain class: entered once per I action, cheaper than a generator)."""

    __slots__ = ("queue", "key", "closures", "previous")

    def __init__(self, queue: WeightGradQueue, stage: int, microbatch: int) -> None:
        self.queue = queue
        self.key = (stage, microbatch)

    def __enter__(self) -> "WeightGradTarget":
        global _ACTIVE
        pending = self.queue._pending
        closures = pending.get(self.key)
        if closures is None:
            closures = pending[self.key] = []
        self.closures = closures
        target = WeightGradTarget(self.queue, self.key[0], self.key[1], closures)
        self.previous = _ACTIVE
        _ACTIVE = target
        return target

    def __exit__(self, *exc_info: object) -> None:
        global _ACTIVE
        _ACTIVE = self.previous
        pending = self.queue._pending
        if not self.closures and pending.get(self.key) is self.closures:
            del pending[self.key]  # nothing was deferred: leave no empty key behind


@dataclass(frozen=True, slots=True)
class WeightGradTarget:
    """Where deferred weight-gradient work goes right now."""

    queue: WeightGradQueue
    stage: int
    microbatch: int
    closures: list = field(default_factory=list, repr=False, compare=False)
    """The queue's list for ``(stage, microbatch)`` (appending to it is :meth:`put`)."""

    def put(self, closure: Callable[[], None]) -> None:
        if self.queue._pending.get((self.stage, self.microbatch)) is self.closures:
            self.closures.append(closure)
        else:  # the key was run or cleared while this target was active
            self.queue.put(self.stage, self.microbatch, closure)


_ACTIVE: WeightGradTarget | None = None


def active_deferral() -> WeightGradTarget | None:
    """The current deferral target, or ``None`` when weight gradients must be computed immediately."""
    return _ACTIVE


def _weight_grad(grad_output: torch.Tensor, saved_input: torch.Tensor) -> torch.Tensor:
    """``dA = dy^T x`` over all leading dimensions (one GEMM, the one autograd runs for ``nn.Linear``)."""
    return grad_output.reshape(-1, grad_output.shape[-1]).t().mm(saved_input.reshape(-1, saved_input.shape[-1]))


class _DeferredWeightGrad:
    """One queued W GEMM: ``accumulate(param, dy^T x)`` (a plain object: cheaper than a closure with defaults,
    and it keeps exactly the two tensors the GEMM reads). ``version``: the input's version counter when the
    forward read it (recorded linears; None when autograd's saved tensors already check it)."""

    __slots__ = ("param", "grad_output", "saved_input", "accumulate", "version")

    def __init__(self, param, grad_output, saved_input, accumulate, version=None) -> None:
        self.param = param
        self.grad_output = grad_output
        self.saved_input = saved_input
        self.accumulate = accumulate
        self.version = version

    def __call__(self) -> None:
        grad_output, saved_input = self.grad_output, self.saved_input
        self.grad_output = self.saved_input = None  # release the activations once their GEMM is enqueued
        if self.version is not None and saved_input._version != self.version:
            raise RuntimeError(
                f"the input of a linear layer (weight {tuple(self.param.shape)}) was modified in place after the "
                "forward read it, so its deferred weight gradient cannot be computed (autograd raises the same "
                "for an undivided backward): make that in-place op out of place"
            )
        self.accumulate(self.param, _weight_grad(grad_output, saved_input))


class _SplitLinearFunction(torch.autograd.Function):
    """``F.linear`` whose weight-gradient GEMM can be deferred into a :class:`WeightGradQueue`.

    Hot path (once per linear per micro-batch, on the host): no context managers, no module attribute
    look-ups; the backward runs the same kernels autograd runs for ``nn.Linear`` (``dy @ A``, ``dy^T x``,
    bias ``sum``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):  # type: ignore[override]
        ctx.compute_dtype = None
        ctx.has_bias = bias is not None
        ctx.param = weight  # the parameter itself (saved tensors may come back as other objects, e.g. checkpointed)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # what F.linear does under autocast, made explicit so backward sees the same (cast) operands; the
            # weight is saved uncast (it is a parameter: no extra memory) and cast again in backward. With every
            # operand already in the autocast dtype, autocast's own cast in F.linear below is a no-op.
            dtype = torch.get_autocast_dtype(device_type)
            if x.is_floating_point() and x.dtype != dtype:
                x = x.to(dtype)
            ctx.save_for_backward(x, weight)
            if weight.dtype != dtype:
                ctx.compute_dtype = dtype
                weight = weight.to(dtype)
            if bias is not None and bias.dtype != dtype:
                bias = bias.to(dtype)
        else:
            ctx.save_for_backward(x, weight)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad
        grad_input = grad_weight = grad_bias = None
        if needs_input:
            compute_weight = weight if ctx.compute_dtype is None else weight.to(ctx.compute_dtype)
            grad_input = grad_output.matmul(compute_weight)
        if needs_bias and ctx.has_bias:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
        if needs_weight:
            target = _ACTIVE
            if target is None:
                grad_weight = _weight_grad(grad_output, x)
            else:
                target.put(_DeferredWeightGrad(ctx.param, grad_output, x, target.queue.accumulate_grad))
        return grad_input, grad_weight, grad_bias


def split_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Apply ``layer`` to ``x`` with a deferrable weight gradient."""
    return _SplitLinearFunction.apply(x, layer.weight, layer.bias)


class LinearRecord:
    """A switched linear's call recorded during a forward (:func:`recording_linears`): what :func:`backward_input`
    and the W closure need, and no activation the autograd graph does not hold anyway."""

    __slots__ = ("module", "weight", "x", "edge", "version")

    def __init__(self, module: nn.Module, weight: torch.Tensor, x: torch.Tensor, edge: GradientEdge) -> None:
        self.module = module
        self.weight = weight
        self.x = x
        self.edge = edge
        self.version = x._version


_RECORDING: list[LinearRecord] | None = None


class recording_linears:
    """While active, switched linears run plain ``F.linear`` and append a :class:`LinearRecord` to the list the
    context yields (outside autocast; a linear marked as sharing its weight keeps the ``Function`` form). Enter
    it around the forward of a micro-batch whose backward :func:`backward_input` will split."""

    __slots__ = ("records", "previous")

    def __enter__(self) -> list[LinearRecord]:
        global _RECORDING
        self.previous = _RECORDING
        self.records = _RECORDING = []
        return self.records

    def __exit__(self, *exc_info: object) -> None:
        global _RECORDING
        _RECORDING = self.previous


class _SplitLinearMixin:
    """Forward of an ``nn.Linear`` switched to the split-backward function (state_dict unchanged)."""

    _interleaf_recordable = True
    """False once :func:`backward_input` found this layer's weight used elsewhere in the graph too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        weight = self.weight
        if not (weight.requires_grad and torch.is_grad_enabled()):  # no weight gradient to defer: plain linear
            return torch.nn.functional.linear(x, weight, self.bias)
        records = _RECORDING
        if records is not None and self._interleaf_recordable and not torch.is_autocast_enabled(x.device.type):
            out = torch.nn.functional.linear(x, weight, self.bias)
            records.append(LinearRecord(self, weight, x, get_gradient_edge(out)))
            return out
        return _SplitLinearFunction.apply(x, weight, self.bias)


def check_recorded_graph(roots: Sequence[torch.Tensor], records: Sequence[LinearRecord]) -> set[int] | None:
    """One walk of the graph of ``roots`` (public ``next_functions``) before the first :func:`backward_input` of a
    stage. Returns the ids of recorded weights that something other than their recorded linears uses too (a tied
    embedding, a functional use: more edges into the weight's gradient accumulator than records of it; each
    ``F.linear`` call adds exactly one), or None when the graph holds a reentrant checkpoint
    (``CheckpointFunction``: DeepSpeed's and torch's ``use_reentrant=True`` refuse ``torch.autograd.grad``), so
    the stage cannot be split by edges at all."""
    expected: dict[int, int] = {}
    for r in records:
        expected[id(r.weight)] = expected.get(id(r.weight), 0) + 1
    found: dict[int, int] = dict.fromkeys(expected, 0)
    seen: set = set()
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if "Checkpoint" in type(node).__name__:
            return None
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            variable = getattr(nxt, "variable", None)
            if variable is not None:  # AccumulateGrad: a leaf
                if id(variable) in found:
                    found[id(variable)] += 1
            elif nxt not in seen:
                stack.append(nxt)
    return {k for k, n in expected.items() if found[k] != n}


def _unaliased(got: Sequence[torch.Tensor | None], start: int, count: int,
               grad_outputs: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """``got[start:start + count]`` (parameter gradients from one ``torch.autograd.grad``) with every gradient
    that is also returned for another input, or is one of the ``grad_outputs`` passed in, cloned. Autograd hands
    one tensor to several inputs (an add passes its gradient to both sides: ``linear(x) + b`` gives ``b`` and the
    linear's output the same tensor, ``out = p + f(x)`` gives ``p`` the output's gradient itself); a parameter's
    ``.grad`` made of it and accumulated in place at the next micro-batch would change a ``dy`` still waiting for
    its W, or an input gradient not yet used. (AccumulateGrad avoids the same by its reference count.)"""
    others: set[int] = set()
    for i, t in enumerate((*got, *grad_outputs)):
        if t is not None and not start <= i < start + count:
            others.add(id(t))
            if t._base is not None:
                others.add(id(t._base))
    out = list(got[start:start + count])
    for i, g in enumerate(out):
        if g is None:
            continue
        key = id(g if g._base is None else g._base)
        if key in others or id(g) in others:
            out[i] = g.clone()
        else:
            others.add(key)
            others.add(id(g))
    return out


def backward_input(
    roots: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    leaves: Sequence[torch.Tensor],
    records: Sequence[LinearRecord],
    params: Sequence[torch.nn.Parameter],
    queue: WeightGradQueue,
    stage: int,
    microbatch: int,
    *,
    shared: set[int] = frozenset(),  # type: ignore[assignment]
) -> list[torch.Tensor | None]:
    """The I pass of a forward run under :func:`recording_linears`; returns the gradients of ``leaves``.

    ``params``: the stage's parameters that need a gradient. Every one but the recorded linears' weights gets
    its gradient now, through ``queue.accumulate_grads`` (default: into ``param.grad`` as autograd would; hooks
    on parameters do not run here); each
    recorded linear gets a W closure under ``(stage, microbatch)`` in ``queue``. ``Function``-form linears met
    on the way (autocast, recomputation inside the pass) defer through ``queue.deferring`` as usual.
    ``shared``: ids of recorded weights used elsewhere too (:func:`check_recorded_graph`): computed whole now,
    and their layers stop recording.
    """
    if shared:
        names = sorted({f"{type(r.module).__name__}{tuple(r.weight.shape)}" for r in records if id(r.weight) in shared})
        logger.info("weight-gradient split: %d linear weight(s) of stage %d are used elsewhere in its graph too "
                    "(%s); their gradients come whole from the input-gradient pass", len(shared), stage,
                    ", ".join(names))
        for r in records:
            if id(r.weight) in shared:
                r.module._interleaf_recordable = False
        records = [r for r in records if id(r.weight) not in shared]
    deferred = {id(r.weight) for r in records}
    now = [p for p in params if id(p) not in deferred]
    n_leaves, n_now = len(leaves), len(now)
    with queue.deferring(stage, microbatch):
        got = torch.autograd.grad(roots, [*leaves, *now, *(r.edge for r in records)], grads, allow_unused=True)
    queue.accumulate_grads(now, _unaliased(got, n_leaves, n_now, grads))
    accumulate = queue.accumulate_grad
    outs = got[n_leaves + n_now:]
    for i in range(len(records) - 1, -1, -1):  # backward order, as autograd would have run them
        dy = outs[i]
        if dy is not None:
            r = records[i]
            queue.put(stage, microbatch, _DeferredWeightGrad(r.weight, dy, r.x, accumulate, r.version))
    return list(got[:n_leaves])


_SPLIT_CLASSES: dict[type, type] = {}


def _split_class_for(cls: type) -> type:
    split_cls = _SPLIT_CLASSES.get(cls)
    if split_cls is None:
        split_cls = type(f"WeightGradSplit{cls.__name__}", (_SplitLinearMixin, cls), {"_original_class": cls})
        _SPLIT_CLASSES[cls] = split_cls
    return split_cls


def enable_weight_grad_split(module: nn.Module) -> int:
    """Make every ``nn.Linear`` inside ``module`` (exact class, not subclasses with their own forward) defer its
    weight-gradient GEMM while a :meth:`WeightGradQueue.deferring` context is active, or record itself for
    :func:`backward_input` while :func:`recording_linears` is. Idempotent; parameters, buffers, hooks and
    ``state_dict`` stay as they are. Returns the number of layers switched."""
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
            sub.__dict__.pop("_interleaf_recordable", None)
            restored += 1
    return restored
