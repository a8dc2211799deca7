"""The hybrid AdamW step: host thread + GPU stream over subgroups of flat fp32 partitions (framework-free).

The DeepSpeed adapter (``ds_plugins.deepspeed.offload_optimizer``) owns gradients, norms, overflow and
checkpoints; this module owns where each subgroup's optimizer state lives and runs the update:

- the **canonical** state is the host copy: fp32 master weights, ``exp_avg`` and ``exp_avg_sq`` as flat tensors
  (the ones DeepSpeed checkpoints). GPU-*resident* subgroups keep the live copy on the device and write it back to
  the host on :meth:`HybridAdamExecutor.sync_state_to_host` (checkpoints, re-plans);
- :meth:`HybridAdamExecutor.step` runs only after the caller knows the global gradient norm and that there is no
  overflow, so no update is ever rolled back (:meth:`HybridAdamExecutor.submit_early` starts a host subgroup
  during backward when the caller knows the step can be neither skipped nor rescaled). GPU subgroups are
  updated on the current stream (streamed ones via two staging buffers, loads and stores on their own streams);
  CPU subgroups on a worker thread, most urgent first (lowest forward index among those it may start), each
  one's low-precision weights copied up on an upload stream followed by a CUDA event;
- :meth:`HybridAdamExecutor.wait_for` is what a layer's forward pre-hook calls: the host waits for that
  subgroup's host update only, and the current CUDA stream waits (on the GPU) for its upload event.

Update math: :func:`ds_plugins.ops.adamw_step_` (fused CPU/CUDA kernels with pure-torch twins).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from .planner import OffloadPlan, Placement

__all__ = ["Subgroup", "FlatGroupBuffers", "AdamHyper", "StepTimings", "HybridAdamExecutor", "measure_rates",
           "probe_numel_for", "PROBE_MAX_NUMEL"]

logger = logging.getLogger(__name__)


def _adamw_step_():
    from ds_plugins.ops import adamw_step_

    return adamw_step_


def _update(adamw_step_: Callable, master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
            exp_avg_sq: torch.Tensor, h: "AdamHyper", lowp: torch.Tensor) -> None:
    """One AdamW update of a slice; the model-weight copy is fused when it is 16-bit, a copy after otherwise
    (fp32 models)."""
    fused = lowp.dtype in (torch.bfloat16, torch.float16)
    adamw_step_(
        [master], [grad], [exp_avg], [exp_avg_sq], lr=h.lr, beta1=h.beta1, beta2=h.beta2, eps=h.eps,
        weight_decay=h.weight_decay, step=h.step, adamw_mode=h.adamw_mode, bias_correction=h.bias_correction,
        lowp_out=[lowp] if fused else None,
    )
    if not fused:
        lowp.copy_(master)


@dataclass(frozen=True, slots=True)
class Subgroup:
    """A contiguous range of one flat fp32 partition (whole parameters, except at partition edges)."""

    group: int
    """Index of the flat partition (DeepSpeed param group)."""
    start: int
    """First element in the flat partition."""
    numel: int


@dataclass(slots=True)
class FlatGroupBuffers:
    """The tensors of one flat partition the executor reads and writes."""

    master: torch.Tensor
    """Host fp32 master weights (canonical)."""
    exp_avg: torch.Tensor
    """Host fp32 first moment (canonical)."""
    exp_avg_sq: torch.Tensor
    """Host fp32 second moment (canonical)."""
    host_grad: torch.Tensor
    """Host fp32 gradient buffer CPU subgroups are updated from."""
    lowp_device: torch.Tensor
    """Flat low-precision model weights on the device (what forward reads)."""
    lowp_host: torch.Tensor
    """Host (pinned) staging buffer for low-precision weights of CPU subgroups."""
    host_grad_lowp: torch.Tensor | None = None
    """Optional host (pinned) 16-bit gradient buffer: 2 B/param down instead of 4, read as is by the kernel."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AdamHyper:
    """Hyper-parameters of one flat partition for one step (read from the optimizer's param group)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    step: int
    adamw_mode: bool = True
    bias_correction: bool = True
    grad_scale: float = 1.0
    """Gradients are multiplied by this first (1 / (loss scale * clip coefficient)); 1.0 skips the pass."""


@dataclass(slots=True)
class StepTimings:
    """What one step measured (for re-planning); complete once the next iteration has begun."""

    cpu_numel: int = 0
    cpu_busy_s: float = 0.0
    """Worker time spent updating host subgroups (their sum; the in-training host rate is numel / busy)."""
    early_numel: int = 0
    """Parameters whose host update started during backward (before ``step``)."""
    gpu_numel: int = 0
    gpu_step_s: float = 0.0
    host_wait_s: float = 0.0
    """Time the training thread blocked waiting for this step's host updates (forward pre-hooks, the next
    backward's first gradient, a global wait). On a GPU this over-states the exposed time by whatever work was
    still queued on the device; :meth:`HybridAdamExecutor.collect_stall_s` measures the device's idle time."""


class _DeviceEvents:
    """CUDA streams/events when the device is CUDA; plain synchronous no-ops otherwise (CPU CI)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def stream(self):
        return torch.cuda.Stream(device=self.device) if self.cuda else None

    def use(self, stream):
        return torch.cuda.stream(stream) if self.cuda and stream is not None else contextlib.nullcontext()

    def record(self, stream=None):
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(stream if stream is not None else torch.cuda.current_stream(self.device))
        return event

    def wait(self, event, stream=None) -> None:
        if event is None:
            return
        (stream if stream is not None else torch.cuda.current_stream(self.device)).wait_event(event)

    def current(self):
        return torch.cuda.current_stream(self.device) if self.cuda else None


def _pinned_empty(numel: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    t = torch.empty(numel, dtype=dtype)
    return t.pin_memory() if pin and torch.cuda.is_available() else t


class HybridAdamExecutor:
    """Holds the placement of every subgroup and runs AdamW steps split between host and device."""

    def __init__(
        self,
        subgroups: Sequence[Subgroup],
        groups: Sequence[FlatGroupBuffers],
        *,
        device: torch.device,
        pin_memory: bool = True,
        host_threads: int | None = None,
    ) -> None:
        self.subgroups = list(subgroups)
        self.groups = list(groups)
        self.device = torch.device(device)
        self.pin_memory = pin_memory
        self._events = _DeviceEvents(self.device)
        self._host_threads = host_threads or torch.get_num_threads()
        self.placements: list[Placement] = [Placement.CPU] * len(self.subgroups)
        self.plan: OffloadPlan | None = None
        # device-side tensors per subgroup: fp32 grad (all GPU subgroups), master/m/v (resident only)
        self._device_grad: dict[int, torch.Tensor] = {}
        self._device_state: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._staging: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._upload_stream = self._events.stream()  # bf16 weights of host-updated subgroups
        self._state_load_stream = self._events.stream()  # streamed subgroups' state, host to device
        self._download_stream = self._events.stream()  # streamed subgroups' state, device to host
        self._grad_stream = self._events.stream()
        self._grad_copy_event = None
        # host work of the step in flight
        self._pending: dict[int, threading.Event] = {}
        self._upload_events: dict[int, object] = {}
        self._previous_uploads: list = []
        self._stream_stored: list = []
        self._worker_error: BaseException | None = None
        # host jobs, one per subgroup, most urgent first: the lowest forward index among those whose gradients
        # are in (the next forward needs it first); items (forward index, sequence, job)
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._job_sequence = itertools.count()
        self._worker: threading.Thread | None = None
        self.timings = StepTimings()
        self.last_timings = StepTimings()
        """Timings of the last completed iteration."""
        self._iteration_open = False
        self._early: set[int] = set()
        # exposed time: CUDA timing-event pairs around every wait that blocked (device idle between them), or
        # the host's blocked time without CUDA (there the "device" is the host itself)
        self._stall_events: list[tuple[object, object]] = []
        self._host_stall_s = 0.0
        self.disturbed = False
        """Set when a full synchronization (checkpoint, re-plan, state reload) drained the step in flight; the
        caller resets it."""

    # ------------------------------------------------------------------ placement
    def numel(self, index: int) -> int:
        return self.subgroups[index].numel

    def _host_view(self, index: int, attr: str) -> torch.Tensor:
        sub = self.subgroups[index]
        return getattr(self.groups[sub.group], attr).view(-1).narrow(0, sub.start, sub.numel)

    def is_on_gpu(self, index: int) -> bool:
        return self.placements[index] is not Placement.CPU

    def device_grad(self, index: int) -> torch.Tensor:
        """fp32 gradient buffer on the device of a GPU-updated subgroup."""
        return self._device_grad[index]

    def apply_plan(self, plan: OffloadPlan) -> None:
        """Move state so every subgroup sits where ``plan`` says (exact copies; waits for the step in flight)."""
        if len(plan.placements) != len(self.subgroups):
            raise ValueError(f"plan has {len(plan.placements)} placements for {len(self.subgroups)} subgroups")
        self.sync_state_to_host()
        for index, new in enumerate(plan.placements):
            old = self.placements[index]
            if new is old:
                continue
            if old is Placement.GPU_RESIDENT:
                del self._device_state[index]
            if new is Placement.CPU:
                self._device_grad.pop(index, None)
            else:
                if index not in self._device_grad:
                    self._device_grad[index] = torch.zeros(self.numel(index), dtype=torch.float32, device=self.device)
                if new is Placement.GPU_RESIDENT:
                    self._device_state[index] = tuple(
                        self._host_view(index, name).to(self.device, copy=True)
                        for name in ("master", "exp_avg", "exp_avg_sq")
                    )
            self.placements[index] = new
        streamed = [self.numel(i) for i, p in enumerate(self.placements) if p is Placement.GPU_STREAMED]
        biggest = max(streamed, default=0)
        if biggest == 0:
            self._staging = []
        elif not self._staging or self._staging[0][0].numel() < biggest:
            self._staging = [
                tuple(torch.empty(biggest, dtype=torch.float32, device=self.device) for _ in range(3))
                for _ in range(2)
            ]
        self.plan = plan
        if self._events.cuda:
            torch.cuda.synchronize(self.device)

    def gpu_state_bytes(self) -> int:
        """Device memory this executor holds for optimizer state, gradients and staging."""
        total = sum(t.numel() * t.element_size() for t in self._device_grad.values())
        total += sum(t.numel() * t.element_size() for ts in self._device_state.values() for t in ts)
        total += sum(t.numel() * t.element_size() for ts in self._staging for t in ts)
        return total

    def host_state_fraction(self) -> float:
        total = sum(s.numel for s in self.subgroups)
        host = sum(s.numel for s, p in zip(self.subgroups, self.placements) if p is not Placement.GPU_RESIDENT)
        return host / total if total else 0.0

    # ------------------------------------------------------------------ gradients in backward
    def copy_grad(self, destination: torch.Tensor, source: torch.Tensor) -> None:
        """Copy (and cast) a gradient slice: into the device buffer of a GPU subgroup on the current stream, or to
        the host for a CPU subgroup off the compute stream (cast to a private fp32 copy on the device first, so
        ``source``'s buffer can be reused at once; the copy to the host runs on a side stream)."""
        stream = self._grad_stream
        if stream is not None and destination.device.type == "cpu":
            staged = source.to(destination.dtype, copy=True)
            stream.wait_stream(self._events.current())
            with self._events.use(stream):
                destination.copy_(staged, non_blocking=True)
            staged.record_stream(stream)
            self._grad_copy_event = self._events.record(stream)
        else:
            destination.copy_(source)

    def wait_grad_copies(self) -> None:
        """Host waits until every gradient copy issued so far has landed."""
        if self._grad_copy_event is not None:
            self._grad_copy_event.synchronize()
            self._grad_copy_event = None

    # ------------------------------------------------------------------ the step
    def begin_iteration(self) -> None:
        """Called at the first gradient of an iteration (and by :meth:`step`): the previous step's host work must
        be finished, since this iteration's gradients overwrite the buffers it reads. No-op once open."""
        if self._iteration_open:
            return
        self.wait_all()
        for event in self._previous_uploads:  # the low-precision staging buffer is rewritten this iteration
            event.synchronize()
        self._previous_uploads = []
        self.last_timings = self.timings
        self.timings = StepTimings()
        self._iteration_open = True

    def submit_early(self, index: int, hyper: Sequence[AdamHyper], *, lowp_grads: bool = False) -> None:
        """Start the host update of CPU subgroup ``index`` now, during backward: its gradients are all issued and
        the caller guarantees the step can neither be skipped nor rescaled (so no rollback is ever needed)."""
        self.begin_iteration()
        if self.placements[index] is not Placement.CPU or index in self._early:
            return
        done = threading.Event()
        self._pending[index] = done
        self._early.add(index)
        self.timings.early_numel += self.numel(index)
        self._ensure_worker()
        self._put_job(index, (index, list(hyper), done, self._grad_copy_event, lowp_grads))

    def step(self, hyper: Sequence[AdamHyper], *, lowp_grads: bool = False) -> None:
        """Update every subgroup with the hyper-parameters of its flat partition (``hyper[group]``).
        ``lowp_grads``: host subgroups' gradients are in ``host_grad_lowp`` (else in ``host_grad``).

        GPU subgroups are enqueued on the current stream before this returns; CPU subgroups not started early
        run on the worker thread. Call :meth:`wait_for` / :meth:`wait_all` before reading their weights.
        """
        if len(hyper) != len(self.groups):
            raise ValueError(f"{len(hyper)} hyper-parameter sets for {len(self.groups)} flat partitions")
        self.begin_iteration()
        self.wait_grad_copies()
        cpu_order = [i for i, p in enumerate(self.placements) if p is Placement.CPU]
        if self.plan is not None:
            cpu_order = [i for i in self.plan.cpu_update_order if self.placements[i] is Placement.CPU] + [
                i for i in cpu_order if i not in set(self.plan.cpu_update_order)
            ]
        cpu_order = [i for i in cpu_order if i not in self._early]
        if cpu_order:
            self._ensure_worker()
            for index in cpu_order:
                done = threading.Event()
                self._pending[index] = done
                self._put_job(index, (index, list(hyper), done, None, lowp_grads))
        self._gpu_step(hyper)
        self._early = set()
        self._iteration_open = False

    def _gpu_step(self, hyper: Sequence[AdamHyper]) -> None:
        adamw_step_ = _adamw_step_()
        gpu = [i for i, p in enumerate(self.placements) if p is not Placement.CPU]
        if not gpu:
            return
        start = time.perf_counter()
        for index in gpu:
            if self.placements[index] is Placement.GPU_RESIDENT:
                sub = self.subgroups[index]
                h = hyper[sub.group]
                grad = self._device_grad[index]
                if h.grad_scale != 1.0:
                    grad.mul_(h.grad_scale)
                master, exp_avg, exp_avg_sq = self._device_state[index]
                _update(adamw_step_, master, grad, exp_avg, exp_avg_sq, h,
                        self.groups[sub.group].lowp_device.view(-1).narrow(0, sub.start, sub.numel))
        streamed = [i for i in gpu if self.placements[i] is Placement.GPU_STREAMED]
        if self.plan is not None:
            order = [i for i in self.plan.stream_order if i in set(streamed)]
            streamed = order + [i for i in streamed if i not in set(order)]
        self._streamed_step(streamed, hyper, adamw_step_)
        self.timings.gpu_numel = sum(self.numel(i) for i in gpu)
        if not self._events.cuda:
            self.timings.gpu_step_s = time.perf_counter() - start

    def _streamed_step(self, streamed: list[int], hyper: Sequence[AdamHyper], adamw_step_: Callable) -> None:
        """State in on the upload stream, update on the current stream, state out on the download stream;
        two staging sets so subgroup k+1 loads while k updates."""
        ev = self._events
        for event in self._stream_stored:  # last step's stores to the host land before this step's loads
            ev.wait(event, self._state_load_stream)
        stored = [None, None]
        for k, index in enumerate(streamed):
            slot = k % 2
            sub = self.subgroups[index]
            h = hyper[sub.group]
            staged = [t.narrow(0, 0, sub.numel) for t in self._staging[slot]]
            host = [self._host_view(index, name) for name in ("master", "exp_avg", "exp_avg_sq")]
            with ev.use(self._state_load_stream):
                ev.wait(stored[slot], self._state_load_stream)
                for dst, src in zip(staged, host):
                    dst.copy_(src, non_blocking=True)
                loaded = ev.record(self._state_load_stream)
            ev.wait(loaded)
            grad = self._device_grad[index]
            if h.grad_scale != 1.0:
                grad.mul_(h.grad_scale)
            _update(adamw_step_, staged[0], grad, staged[1], staged[2], h,
                    self.groups[sub.group].lowp_device.view(-1).narrow(0, sub.start, sub.numel))
            updated = ev.record()
            with ev.use(self._download_stream):
                ev.wait(updated, self._download_stream)
                for dst, src in zip(host, staged):
                    dst.copy_(src, non_blocking=True)
                stored[slot] = ev.record(self._download_stream)
        self._stream_stored = [e for e in stored if e is not None]

    # ------------------------------------------------------------------ host worker
    def _ensure_worker(self) -> None:
        if self._worker is not None and self._worker.is_alive():
            return
        self._worker = threading.Thread(target=self._worker_loop, name="interleaf-host-adam", daemon=True)
        self._worker.start()

    def _put_job(self, priority: float, job) -> None:
        self._jobs.put((priority, next(self._job_sequence), job))

    def _worker_loop(self) -> None:
        torch.set_num_threads(self._host_threads)
        if self._events.cuda:
            torch.cuda.set_device(self.device)
        while True:
            _, _, job = self._jobs.get()
            if job is None:
                return
            index, hyper, done, ready, lowp_grads = job
            try:
                if ready is not None:  # the gradient copies this update reads have landed
                    ready.synchronize()
                self._host_step(index, hyper, lowp_grads)
            except BaseException as exc:  # surfaced on the main thread by wait_for/wait_all
                self._worker_error = exc
                logger.exception("interleaf host optimizer step failed")
            finally:
                done.set()

    def _host_step(self, index: int, hyper: list[AdamHyper], lowp_grads: bool) -> None:
        """Update one host subgroup, then send its low-precision weights up (upload stream + event)."""
        adamw_step_ = _adamw_step_()
        start = time.perf_counter()
        sub = self.subgroups[index]
        h = hyper[sub.group]
        bufs = self.groups[sub.group]
        grad = self._host_view(index, "host_grad")
        if lowp_grads and bufs.host_grad_lowp is not None:
            lowp_grad = self._host_view(index, "host_grad_lowp")
            if h.grad_scale == 1.0:
                grad = lowp_grad  # the kernel widens 16-bit gradients exactly
            else:  # widen, then scale in fp32 (as DeepSpeed does)
                grad.copy_(lowp_grad)
                grad.mul_(h.grad_scale)
        elif h.grad_scale != 1.0:
            grad.mul_(h.grad_scale)
        lowp_host = bufs.lowp_host.view(-1).narrow(0, sub.start, sub.numel)
        _update(adamw_step_, self._host_view(index, "master"), grad, self._host_view(index, "exp_avg"),
                self._host_view(index, "exp_avg_sq"), h, lowp_host)
        lowp_device = bufs.lowp_device.view(-1).narrow(0, sub.start, sub.numel)
        with self._events.use(self._upload_stream):
            lowp_device.copy_(lowp_host, non_blocking=self._events.cuda)
            uploaded = self._events.record(self._upload_stream)
        if uploaded is not None:
            self._upload_events[index] = uploaded
            self._previous_uploads.append(uploaded)
        self.timings.cpu_numel += sub.numel
        self.timings.cpu_busy_s += time.perf_counter() - start

    # ------------------------------------------------------------------ waiting
    def _raise_worker_error(self) -> None:
        if self._worker_error is not None:
            exc, self._worker_error = self._worker_error, None
            raise RuntimeError("interleaf: the host optimizer step failed (see the log above)") from exc

    def has_pending(self) -> bool:
        return bool(self._pending)

    def wait_for(self, indices: Iterable[int], *, measure: bool = True) -> None:
        """Block until these subgroups' host updates are done; the current stream waits for their uploads.
        ``measure``: count the time as exposed (False for waits that are not part of training's steady state)."""
        if not self._pending:
            return
        start = None
        before = None
        cuda = self._events.cuda
        for index in indices:
            done = self._pending.pop(index, None)
            if done is None:
                continue
            upload = self._upload_events.pop(index, None)
            blocked = not done.is_set() or (upload is not None and not upload.query())
            if measure and blocked and cuda and before is None:
                before = torch.cuda.Event(enable_timing=True)
                before.record(self._events.current())
            if not done.is_set():
                start = start or time.perf_counter()
                done.wait()
            self._events.wait(upload)
        if before is not None:
            after = torch.cuda.Event(enable_timing=True)
            after.record(self._events.current())
            self._stall_events.append((before, after))
        if start is not None:
            waited = time.perf_counter() - start
            if measure:
                self.timings.host_wait_s += waited
                if not cuda:
                    self._host_stall_s += waited
        self._raise_worker_error()

    def collect_stall_s(self) -> float:
        """Device time spent idle waiting for host updates since the last call (CUDA: timing events around each
        blocking wait, read after they completed; without CUDA: the host's blocked time)."""
        total = self._host_stall_s
        self._host_stall_s = 0.0
        if self._stall_events:
            for _before, after in self._stall_events:  # waits may have run on different streams
                after.synchronize()
            total += sum(before.elapsed_time(after) for before, after in self._stall_events) / 1e3
            self._stall_events = []
        return total

    def wait_all(self, *, measure: bool = True) -> None:
        """Every update of the step in flight is done on the host, and the current stream waits for all uploads."""
        self.wait_for(list(self._pending), measure=measure)
        self._raise_worker_error()

    def sync_state_to_host(self) -> None:
        """Host tensors hold the exact current state of every subgroup (checkpoint, re-plan); synchronizes."""
        self.disturbed = self.disturbed or self.has_pending()
        self.wait_all(measure=False)
        if self._events.cuda:
            torch.cuda.synchronize(self.device)
        for index, (master, exp_avg, exp_avg_sq) in self._device_state.items():
            for name, live in (("master", master), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
                self._host_view(index, name).copy_(live)

    def reload_state_from_host(self, groups: Sequence[FlatGroupBuffers] | None = None) -> None:
        """After the host tensors changed (checkpoint load): rebind them and refresh the device copies."""
        self.disturbed = True
        self.wait_all(measure=False)
        if groups is not None:
            self.groups = list(groups)
        for index, live in self._device_state.items():
            for name, dst in zip(("master", "exp_avg", "exp_avg_sq"), live):
                dst.copy_(self._host_view(index, name))
        if self._events.cuda:
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        self.wait_all(measure=False)
        if self._worker is not None and self._worker.is_alive():
            self._put_job(math.inf, None)
            self._worker.join(timeout=60)
        self._worker = None


PROBE_MAX_NUMEL = 1 << 25
"""Largest host probe (33.5 M parameters, ~0.5 GB of fp32 state): well beyond any last-level cache, so the
probe sees host-memory bandwidth as the real update does (a 4 M probe, 64 MB, read 7.68 G params/s from cache
on an H100 host whose update runs at 5.5 in isolation and 4.7 in training)."""


def probe_numel_for(host_numel: int) -> int:
    """Probe size for a model whose host-updated state holds ``host_numel`` parameters: as large as that state
    (a small model's update is cache-resident too), at most :data:`PROBE_MAX_NUMEL`, at least 4096."""
    return max(4096, min(int(host_numel), PROBE_MAX_NUMEL))


def measure_rates(device: torch.device, *, probe_numel: int = 1 << 22, pin: bool = True,
                  grad_dtype: torch.dtype = torch.float32, lowp_dtype: torch.dtype | None = None,
                  scale_grads: bool = False, host_threads: int | None = None):
    """Probe host AdamW rate, GPU AdamW rate and copy bandwidths (each direction and both at once).

    The host probe runs like the executor's worker: on its own thread with ``host_threads`` threads, gradients in
    ``grad_dtype``, the ``lowp_dtype`` weight copy written in the same pass, and with ``scale_grads`` a scaling
    pass over fp32 gradients first (clipping / loss scaling). Pick ``probe_numel`` with :func:`probe_numel_for`:
    a cache-sized probe overstates a memory-bound kernel. In training the rate is re-measured anyway
    (``ds_plugins.offload.replan``).

    Returns a :class:`ds_plugins.offload.planner.HardwareRates`. On a CPU device the "device" update rate is the
    host rate and copies are counted as free (there is no bus).
    """
    from .planner import HardwareRates

    adamw_step_ = _adamw_step_()

    def adam_rate(dev: torch.device, numel: int, grad_dtype=torch.float32, lowp_dtype=None,
                  scale_grads=False) -> float:
        p, m, v = (torch.rand(numel, device=dev) for _ in range(3))
        g = torch.rand(numel, device=dev).to(grad_dtype)
        lowp = None
        if lowp_dtype is not None:
            lowp = [_pinned_empty(numel, lowp_dtype, pin) if dev.type == "cpu" else
                    torch.empty(numel, dtype=lowp_dtype, device=dev)]
        kwargs = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, lowp_out=lowp)

        def one(step: int) -> None:
            if scale_grads:
                g.mul_(0.999)
            adamw_step_([p], [g], [m], [v], step=step, **kwargs)

        one(1)  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        reps = 3
        for i in range(reps):
            one(2 + i)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return reps * numel / max(time.perf_counter() - start, 1e-9)

    def host_probe() -> float:
        result: list = []

        def run() -> None:
            try:
                if host_threads:
                    torch.set_num_threads(host_threads)
                result.append(adam_rate(torch.device("cpu"), probe_numel, grad_dtype, lowp_dtype, scale_grads))
            except BaseException as exc:  # re-raised on the caller's thread
                result.append(exc)

        thread = threading.Thread(target=run, name="interleaf-host-probe", daemon=True)
        thread.start()
        thread.join()
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]

    cpu_rate = host_probe()
    if device.type != "cuda":
        return HardwareRates(
            cpu_update_params_per_s=cpu_rate, gpu_update_params_per_s=cpu_rate, h2d_bytes_per_s=math.inf,
            d2h_bytes_per_s=math.inf, duplex_bytes_per_s=math.inf,
        )
    gpu_rate = adam_rate(device, 1 << 26)  # 64 M parameters: beyond the L2, like the real update
    nbytes = 64 << 20
    host_a = _pinned_empty(nbytes, torch.uint8, pin)
    host_b = _pinned_empty(nbytes, torch.uint8, pin)
    dev_a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev_b = torch.empty(nbytes, dtype=torch.uint8, device=device)
    up, down = torch.cuda.Stream(device), torch.cuda.Stream(device)

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(3):
            fn()
        torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / 3

    def h2d():
        dev_a.copy_(host_a, non_blocking=True)

    def d2h():
        host_b.copy_(dev_b, non_blocking=True)

    def both():
        with torch.cuda.stream(up):
            dev_a.copy_(host_a, non_blocking=True)
        with torch.cuda.stream(down):
            host_b.copy_(dev_b, non_blocking=True)

    h2d_bw = nbytes / timed(h2d)
    d2h_bw = nbytes / timed(d2h)
    duplex_bw = 2 * nbytes / timed(both)
    return HardwareRates(
        cpu_update_params_per_s=cpu_rate, gpu_update_params_per_s=gpu_rate, h2d_bytes_per_s=h2d_bw,
        d2h_bytes_per_s=d2h_bw, duplex_bytes_per_s=duplex_bw,
    )
