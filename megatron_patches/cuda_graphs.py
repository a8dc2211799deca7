"""CUDA graphs of a rank's megatron model chunks, one per action of interleaf's schedule (opt-in).

On hosts that issue megatron's layers about as fast as the GPU runs them, a pipeline step is as long as the busiest
rank's host takes to launch its kernels (BENCHMARKS.md, megatron pp=4). With ``cuda_graphs`` on
(``--pipeline-cuda-graphs``, ``megatron_patches.apply(..., cuda_graphs=True)``) each rank captures, once its order
is final, the forward (F), the input-gradient pass (I) and the weight pass (W) — or the full backward (B) where the
order runs one — of every (stage, micro-batch) of its schedule as its own CUDA graph, in the order the schedule runs
them and into one memory pool, and every later training step replays them:

- the chunk's ``forward`` (what the user's ``forward_step_func`` calls) copies its tensor arguments and the input
  activation megatron's ``forward_step`` set into the captured ones, replays F and returns the captured output;
- that output's backward copies the incoming gradient in and replays I, queueing W's replay as the action's
  weight-gradient work (the executor runs it at the W action), or replays B;
- the data pipeline, the loss function, megatron's ``forward_step`` and the p2p between ranks stay eager.

The replayed kernels are the eager ones, so gradients are the same (the GPU tests compare them with megatron's own
schedules). Each parameter's gradient goes into ``main_grad`` inside the captured backward, as megatron DDP's hook
would add it (the hook itself, run from autograd's gradient accumulator, cannot run in a capture).

Limits (each a ``ValueError`` naming what to change): dropout 0 (a capture may not fork megatron's CUDA RNG
tracker; nothing draws from it at dropout 0), tensor and context parallel 1, a dense model, DDP without
``overlap_grad_reduce`` and ``overlap_param_gather`` (their hooks cannot run in a capture or a replay), no activation
recompute, autocast or activation offloading, micro-batches of one shape, and model arguments that are tensors,
``None`` or plain scalars. Forward hooks on the chunks' submodules do not run in a replay. Parameters and
``main_grad`` must stay where they were captured (megatron's optimizers update them in place); if one moves, the
next step captures again. Forward-only steps (evaluation) run eagerly.

Memory: the pool keeps what the captured step held at its peak (the activations of the micro-batches in flight,
the temporaries) plus every (stage, micro-batch)'s output and input gradient; each also keeps its captured
arguments, input and output gradient outside the pool. ``torch.cuda.memory_reserved`` shows the pool, not
``memory_allocated``.
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ds_plugins.schedule.ir import ActionKind

logger = logging.getLogger(__name__)

__all__ = ["ChunkGraphs", "check_graphable", "grad_accumulators_made_here", "add_to_main_grads",
           "backward_to_main_grads", "no_rng_fork"]

Capture = Callable[[Callable[[], None], Any, Any], Callable[[], None]]
"""``capture(fn, pool, stream) -> replay``: records ``fn``'s kernels (the default makes a CUDA graph)."""

_LIVE: "weakref.WeakSet[ChunkGraphs]" = weakref.WeakSet()

capture_override: Optional[Capture] = None
"""Tests only: a stand-in for :func:`cuda_graph_capture`. The CPU has no CUDA graphs: the CPU tests pass one whose
replay runs ``fn`` again, which checks the wiring (static inputs, pass order, the W queue, the gradients added to
``main_grad``) but not the capture (nothing runs at capture time; each replay makes new tensors); the GPU tests
wrap the real capture to count replays. Also lets the adapter run on CPU."""


def uninstall_all() -> None:
    """:meth:`ChunkGraphs.uninstall` for every live set (``megatron_patches.apply`` / ``remove`` call it: after them
    the model chunks have their own ``forward``; between interleaf's steps the wrappers stay and run the chunk's
    own forward outside a replaying step)."""
    for graphs in list(_LIVE):
        graphs.uninstall()


def cuda_graph_capture(fn: Callable[[], None], pool: Any, stream: Any) -> Callable[[], None]:
    """``fn``'s kernels as a CUDA graph in ``pool``, captured on ``stream``; returns its replay. ``thread_local``
    capture: NCCL's watchdog thread keeps querying its events meanwhile, which a global capture would refuse."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
        fn()
    return graph.replay


def check_graphable(config: Any, chunks: List[torch.nn.Module]) -> None:
    """Raise ``ValueError`` naming the setting to change when ``chunks`` (megatron DDP-wrapped model chunks with
    their ``TransformerConfig`` ``config``) cannot be captured per action."""
    problems = []
    if config.hidden_dropout or config.attention_dropout:
        problems.append(f"dropout 0 (hidden_dropout {config.hidden_dropout}, attention_dropout "
                        f"{config.attention_dropout}: a capture may not fork megatron's CUDA RNG tracker)")
    if config.tensor_model_parallel_size != 1:
        problems.append(f"--tensor-model-parallel-size 1 (got {config.tensor_model_parallel_size})")
    if getattr(config, "context_parallel_size", 1) != 1:
        problems.append(f"--context-parallel-size 1 (got {config.context_parallel_size})")
    if getattr(config, "recompute_granularity", None) is not None:
        problems.append(f"no activation recompute (got --recompute-granularity {config.recompute_granularity})")
    if getattr(config, "enable_autocast", False):
        problems.append("no --enable-autocast (megatron's forward_step autocasts around the model call, which the "
                        "capture of the chunk's forward would not see)")
    if getattr(config, "cpu_offloading", False):
        problems.append("no activation CPU offloading")
    if getattr(config, "num_moe_experts", None):
        problems.append("a dense model (MoE layers route tokens by value)")
    for chunk in chunks:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is None or not hasattr(chunk, "grad_accs"):
            problems.append("model chunks wrapped in megatron's DistributedDataParallel")
            break
        if ddp_config.overlap_grad_reduce:
            problems.append("DDP without --overlap-grad-reduce (its per-parameter hook cannot run in a capture)")
            break
        if getattr(ddp_config, "overlap_param_gather", False) or getattr(chunk, "use_forward_hook", False):
            problems.append("no --overlap-param-gather (its forward hooks on the submodules do not run in a replay)")
            break
        if getattr(ddp_config, "delay_wgrad_compute", False):
            problems.append("DDP without delay_wgrad_compute")
            break
    if problems:
        raise ValueError("--pipeline-cuda-graphs needs " + "; ".join(problems) + ", or drop --pipeline-cuda-graphs")


@contextlib.contextmanager
def grad_accumulators_made_here(chunks: List[torch.nn.Module], device: torch.device):
    """Inside: megatron DDP's gradient accumulators of ``chunks`` are let go, so autograd makes each parameter's anew
    on the current stream when a forward uses it; afterwards DDP's are made again on the default stream, with its
    hook, as DDP's constructor makes them. The autograd engine hands a parameter's gradient to its accumulator on
    the stream the accumulator was made on: DDP made them on the default stream, which a capture on another stream
    may not make wait. Inside, DDP's hook does not run: a captured backward adds to ``main_grad`` itself
    (:func:`add_to_main_grads`)."""
    ddps = [w for w in chunks if hasattr(w, "grad_accs")]
    for w in ddps:
        w.grad_accs.clear()
    try:
        yield
    finally:
        default = torch.cuda.stream(torch.cuda.default_stream(device)) if device.type == "cuda" else None
        with default if default is not None else contextlib.nullcontext():
            for w in ddps:
                for p in w.module.parameters():
                    if p.requires_grad:
                        accumulator = p.expand_as(p).grad_fn.next_functions[0][0]
                        accumulator.register_hook(w._make_backward_post_hook(p))
                        w.grad_accs.append(accumulator)


def add_to_main_grads(params: List[torch.nn.Parameter], grads: Tuple[Optional[torch.Tensor], ...]) -> None:
    """What megatron DDP's hook does with each parameter's gradient (``overlap_grad_reduce`` off): add it to
    ``main_grad``, except where the linear's backward already wrote ``main_grad`` (or queued the W that will)."""
    for p, g in zip(params, grads):
        if g is not None and not getattr(p, "grad_added_to_main_grad", False):
            p.main_grad.add_(g)


def backward_to_main_grads(out: torch.Tensor, grad_out: Optional[torch.Tensor], leaf: Optional[torch.Tensor],
                           params: List[torch.nn.Parameter]) -> Optional[torch.Tensor]:
    """A chunk's backward as a capture can hold it: ``out``'s gradients with respect to its input ``leaf`` (None on
    the first stage) and ``params``, the parameters' added to ``main_grad`` (:func:`add_to_main_grads`) instead of
    through autograd's accumulators and DDP's hook. Returns the input's gradient (None without ``leaf``)."""
    leaves = ([] if leaf is None else [leaf]) + params
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    add_to_main_grads(params, grads[len(leaves) - len(params):])
    return grads[0] if leaf is not None else None


@contextlib.contextmanager
def no_rng_fork():
    """megatron forks its CUDA RNG tracker around attention dropout, which a capture may not do; with dropout 0
    nothing draws from it, so inside the fork does nothing."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    tracker.fork = lambda *args, **kwargs: contextlib.nullcontext()
    try:
        yield
    finally:
        del tracker.fork


def _describe(value: Any) -> Any:
    """A model argument's capture signature: tensors by shape/dtype/device, ``None`` and scalars by value."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    if value is None or isinstance(value, (bool, int, float, str)):
        return ("value", value)
    raise ValueError(f"--pipeline-cuda-graphs: a model argument of type {type(value).__name__} cannot be captured "
                     "(tensors, None and plain scalars can); drop --pipeline-cuda-graphs")


class _Signature:
    """How a stage's chunk was called in an eager step: what a capture allocates and every replay must match."""

    def __init__(self, args: tuple, kwargs: dict, input_tensor: Optional[torch.Tensor], output: Any) -> None:
        self.args = tuple(_describe(a) for a in args)
        self.kwargs = {k: _describe(v) for k, v in kwargs.items()}
        self.input = None if input_tensor is None else _describe(input_tensor)
        if not isinstance(output, torch.Tensor):
            raise ValueError("--pipeline-cuda-graphs needs model chunks that return one tensor; drop the flag")
        self.output = _describe(output)

    def matches(self, args: tuple, kwargs: dict, input_tensor: Optional[torch.Tensor]) -> bool:
        return (tuple(_describe(a) for a in args) == self.args and {k: _describe(v) for k, v in kwargs.items()}
                == self.kwargs and (None if input_tensor is None else _describe(input_tensor)) == self.input)


def _static(description: Any) -> Any:
    if description[0] == "value":
        return description[1]
    _, shape, dtype, device = description
    return torch.zeros(shape, dtype=dtype, device=device)


class _Entry:
    """One (stage, micro-batch): its captured inputs, output and gradients, and the replays of its passes."""

    __slots__ = ("args", "kwargs", "input", "grad_out", "out", "leaf", "grad_in", "replays")

    def __init__(self, signature: _Signature) -> None:
        self.args = tuple(_static(d) for d in signature.args)
        self.kwargs = {k: _static(d) for k, d in signature.kwargs.items()}
        self.input = None if signature.input is None else _static(signature.input)
        self.grad_out = _static(signature.output)
        self.out: Optional[torch.Tensor] = None
        self.leaf: Optional[torch.Tensor] = None  # the input F ran on (I differentiates with respect to it)
        self.grad_in: Optional[torch.Tensor] = None
        self.replays: Dict[str, Callable[[], None]] = {}

    def load(self, args: tuple, kwargs: dict, input_tensor: Optional[torch.Tensor]) -> None:
        with torch.no_grad():
            for static, value in zip(self.args, args):
                if isinstance(static, torch.Tensor):
                    static.copy_(value)
            for k, static in self.kwargs.items():
                if isinstance(static, torch.Tensor):
                    static.copy_(kwargs[k])
            if self.input is not None:
                self.input.copy_(input_tensor)


class _Replay(torch.autograd.Function):
    """F's replay in the autograd graph: its backward replays I (queueing W's replay) or B."""

    @staticmethod
    def forward(ctx, entry: _Entry, anchor: torch.Tensor, input_tensor: Optional[torch.Tensor]):
        entry.replays["F"]()
        ctx.entry = entry
        ctx.has_input = input_tensor is not None
        return entry.out.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        from ds_plugins.runtime import active_deferral

        entry: _Entry = ctx.entry
        entry.grad_out.copy_(grad)
        target = active_deferral()
        if target is not None:
            if "I" not in entry.replays:
                raise RuntimeError("interleaf CUDA graphs: an I action for a micro-batch captured with a full "
                                   "backward (the schedule changed after the capture)")
            entry.replays["I"]()
            target.put(entry.replays["W"])
        else:
            if "B" not in entry.replays:
                raise RuntimeError("interleaf CUDA graphs: a full backward for a micro-batch captured as I + W (the "
                                   "schedule changed after the capture)")
            entry.replays["B"]()
        grad_in = entry.grad_in.detach() if ctx.has_input and entry.grad_in is not None else None
        return None, None, grad_in


class ChunkGraphs:
    """The CUDA graphs of one pipeline rank's model chunks (see the module docstring).

    ``stages[c]`` is chunk ``c``'s pipeline stage; ``microbatch_of(stage)`` the micro-batch whose forward is
    running on ``stage`` (the megatron adapter counts them). While installed, each chunk's ``forward`` records its
    call signature in eager steps and replays the captured F once :meth:`capture` has run. ``capture``: the CPU
    tests pass a stand-in (see ``Capture``)."""

    def __init__(self, chunks: List[torch.nn.Module], stages: List[int], microbatch_of: Callable[[int], int],
                 device: torch.device, *, capture: Optional[Capture] = None) -> None:
        self.chunks, self.stages, self.device = chunks, stages, device
        self._microbatch_of = microbatch_of
        self._capture_fn = capture or cuda_graph_capture
        self.signatures: Dict[int, _Signature] = {}
        self.entries: Dict[Tuple[int, int], _Entry] = {}
        self.captured_for: Any = None
        """The schedule the graphs were captured for (None before a capture)."""
        self.replaying = False
        """Whether the chunks' forwards replay (set by the adapter for its backward steps after a capture)."""
        self._anchor = torch.zeros(0, device=device, requires_grad=True)  # gives F's replay a node on stage 0
        self._pool: Any = None
        self._addresses: List[int] = []
        self._installed = False
        _LIVE.add(self)
        self.install()

    def ready(self) -> bool:
        """Whether an eager step has shown every stage's call (what a capture allocates)."""
        return all(s in self.signatures for s in self.stages)

    def pool_bytes(self) -> int:
        """Bytes the graphs' memory pool holds on the device (0 before a capture, or on CPU)."""
        if self._pool is None or self.device.type != "cuda":
            return 0
        pool = tuple(self._pool)
        return sum(segment["total_size"] for segment in torch.cuda.memory_snapshot()
                   if tuple(segment.get("segment_pool_id", ())) == pool)

    def install(self) -> None:
        """Wrap the chunks' ``forward`` (the adapter calls it before each of its steps)."""
        if self._installed:
            return
        for chunk, stage in zip(self.chunks, self.stages):
            if "forward" in chunk.__dict__:
                raise RuntimeError("interleaf CUDA graphs: a model chunk's forward is already replaced on the "
                                   "instance; graphs wrap the class's forward")
            chunk.forward = self._wrapped(chunk, stage, type(chunk).forward.__get__(chunk))
        self._installed = True

    def uninstall(self) -> None:
        """Give the chunks back their own ``forward``; the captured graphs stay (they replay again once
        :meth:`install` wraps the chunks again: the parameters, ``main_grad`` buffers and pool do not move)."""
        if not self._installed:
            return
        for chunk in self.chunks:
            chunk.__dict__.pop("forward", None)
        self._installed = False

    def release(self) -> None:
        """:meth:`uninstall` and drop the graphs and their memory pool."""
        self.uninstall()
        self.entries.clear()
        self.captured_for = None
        self._pool = None
        _LIVE.discard(self)

    @staticmethod
    def _decoder(chunk: torch.nn.Module) -> torch.nn.Module:
        from megatron.core.utils import get_attr_wrapped_model

        return get_attr_wrapped_model(chunk, "decoder")

    def _wrapped(self, chunk: torch.nn.Module, stage: int, inner: Callable[..., Any]) -> Callable[..., Any]:
        decoder = self._decoder(chunk)

        def forward(*args, **kwargs):
            input_tensor = getattr(decoder, "input_tensor", None)
            if not self.replaying or not torch.is_grad_enabled():
                output = inner(*args, **kwargs)
                if torch.is_grad_enabled() and stage not in self.signatures:
                    self.signatures[stage] = _Signature(args, kwargs, input_tensor, output)
                return output
            mb = self._microbatch_of(stage)
            entry = self.entries[(stage, mb)]
            if not self.signatures[stage].matches(args, kwargs, input_tensor):
                raise ValueError(f"--pipeline-cuda-graphs: stage {stage} micro-batch {mb} was called with other "
                                 "shapes, dtypes or values than when captured; every micro-batch must have one "
                                 "shape (drop --pipeline-cuda-graphs for variable-length batches)")
            entry.load(args, kwargs, input_tensor)
            return _Replay.apply(entry, self._anchor, input_tensor)

        return forward

    def capture(self, schedule: Any, rank: int, queue: Any) -> None:
        """Capture every compute action of ``rank`` in ``schedule``'s order (F, I and W, or B, of each stage and
        micro-batch this rank runs), replacing earlier graphs. Runs no step (the captured kernels do not execute,
        ``main_grad`` is untouched), but leaves ``grad_added_to_main_grad`` set on the linear weights (the next
        ``zero_grad_buffer`` resets it) and DDP's gradient accumulators made anew. ``queue`` is the executor's
        ``WeightGradQueue`` (I's weight GEMMs go through it into W's capture). On an error nothing captured stays."""

        missing = [s for s in self.stages if s not in self.signatures]
        if missing:
            raise RuntimeError(f"interleaf CUDA graphs: no eager forward of stage(s) {missing} seen before capture")
        try:
            self._capture(schedule, rank, queue)
        except BaseException:
            # leave nothing half-made: no replays, no I closures without their W, a fresh pool next time
            self.entries.clear()
            self.captured_for = None
            self._pool = None
            queue.clear()
            raise
        self._addresses = self._current_addresses()
        logger.info("interleaf: captured %d CUDA graphs (F, I, W or B of %d micro-batches of stages %s)",
                    sum(len(e.replays) for e in self.entries.values()), len(self.entries), self.stages)

    def _current_addresses(self) -> List[int]:
        return [t.data_ptr() for chunk in self.chunks for p in chunk.parameters()
                for t in ((p, p.main_grad) if getattr(p, "main_grad", None) is not None else (p,))]

    def moved(self) -> bool:
        """Whether a parameter or ``main_grad`` buffer is no longer where the graphs were captured."""
        return self.captured_for is not None and self._current_addresses() != self._addresses

    def _capture(self, schedule: Any, rank: int, queue: Any) -> None:
        from megatron.core.utils import get_attr_wrapped_model

        self.entries.clear()
        self._pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        chunk_of = dict(zip(self.stages, self.chunks))
        params = {s: [p for p in chunk_of[s].parameters() if p.requires_grad] for s in self.stages}
        passes = []
        for action in schedule.compute_actions(rank):
            key = (action.stage, action.microbatch)
            if action.kind is ActionKind.FORWARD:
                self.entries[key] = _Entry(self.signatures[action.stage])
            passes.append((action.kind, key))
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        with no_rng_fork(), grad_accumulators_made_here(self.chunks, self.device), (
                torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()):
            for kind, (stage, mb) in passes:
                entry = self.entries[(stage, mb)]
                chunk = chunk_of[stage]
                if kind is ActionKind.FORWARD:
                    fn = self._forward_pass(entry, chunk, get_attr_wrapped_model(chunk, "set_input_tensor"),
                                            type(chunk).forward.__get__(chunk))
                    name = "F"
                elif kind is ActionKind.BACKWARD_WEIGHT:
                    fn, name = (lambda s=stage, m=mb: queue.run(s, m)), "W"
                else:
                    split = kind is ActionKind.BACKWARD_INPUT
                    fn = self._backward_pass(entry, params[stage], queue if split else None, stage, mb)
                    name = "I" if split else "B"
                entry.replays[name] = self._capture_fn(fn, self._pool, stream)
        if stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(stream)
        self.captured_for = schedule

    @staticmethod
    def _forward_pass(entry: _Entry, chunk, set_input_tensor, inner) -> Callable[[], None]:
        def run() -> None:  # (grad mode on: a stand-in capture replays it inside _Replay.forward)
            with torch.enable_grad():
                entry.leaf = None if entry.input is None else entry.input.detach().requires_grad_()
                entry.grad_in = None
                set_input_tensor(entry.leaf)
                entry.out = inner(*entry.args, **entry.kwargs)
                set_input_tensor(None)

        return run

    @staticmethod
    def _backward_pass(entry: _Entry, params: List[torch.nn.Parameter], queue: Any, stage: int,
                       mb: int) -> Callable[[], None]:
        def run() -> None:
            out = entry.out
            with queue.deferring(stage, mb) if queue is not None else contextlib.nullcontext():
                entry.grad_in = backward_to_main_grads(out, entry.grad_out, entry.leaf, params)
            # drop F's autograd graph: it holds the gradient accumulators made during the capture, which DDP's
            # must not be (grad_accumulators_made_here makes them anew once nothing holds these)
            entry.out, entry.leaf = out.detach(), None

        return run
