"""Where each optimizer-state subgroup is updated: a torch-free performance model (Deep Optimizer States idea).

Time line of one iteration as the executor runs it (``ds_plugins.offload.executor``):

1. **Backward** produces gradients last layer first. Gradients of host-updated (CPU) subgroups stream to pinned
   host memory on a side stream while backward continues (``grad_bytes`` per parameter, device to host).
2. **Step**, once the global gradient norm and the overflow flag are known (exact: nothing is updated before;
   when the step can be neither skipped nor rescaled, host updates instead start during backward, subgroup by
   subgroup as gradients land, see ``early_host_start``):
   - the GPU stream updates the GPU subgroups: *resident* ones keep fp32 master, m and v in GPU memory; *streamed*
     ones bring their 12 B/param of state up and take it back down (PCIe-bound);
   - at the same time a host thread updates the CPU subgroups in forward order (host-memory-bound kernel) and
     sends each one's low-precision weights up (``lowp_bytes`` per parameter) as soon as it is done.
3. **Next forward** starts when the GPU stream is done with its step; a layer whose weights are updated on the
   host waits (on the GPU, per layer) for that subgroup's upload only.

The planner puts a forward-order prefix of subgroups on the GPU (the first layers are needed first by the next
forward and their gradients arrive last in backward) and the rest on the host, resident within the GPU memory
budget and streamed beyond it. ``gpu_fraction="auto"`` picks the smallest prefix whose predicted iteration
overhead is within ``tolerance`` of the best one; a number forces the prefix closest to that share.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Sequence

__all__ = [
    "Placement",
    "HardwareRates",
    "ByteModel",
    "SubgroupTiming",
    "OffloadPlan",
    "PlanEstimate",
    "estimate",
    "plan_offload",
]


class Placement(str, Enum):
    """Where a subgroup's AdamW update runs and where its fp32 state lives between steps."""

    GPU_RESIDENT = "gpu_resident"
    """State kept in GPU memory; updated on the GPU."""
    GPU_STREAMED = "gpu_streamed"
    """State on the host; brought to the GPU for the update and taken back."""
    CPU = "cpu"
    """State on the host; updated on the host, low-precision weights sent up."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HardwareRates:
    """Measured rates (the executor measures them; tests pass synthetic numbers)."""

    cpu_update_params_per_s: float
    """Host AdamW throughput (parameters per second, all host threads)."""
    gpu_update_params_per_s: float
    """GPU AdamW throughput (parameters per second)."""
    h2d_bytes_per_s: float
    """Pinned host-to-device copy bandwidth."""
    d2h_bytes_per_s: float
    """Device-to-host copy bandwidth into pinned memory."""
    duplex_bytes_per_s: float
    """Total bandwidth when both directions run at once (PCIe is not full duplex in practice)."""

    def __post_init__(self) -> None:
        for name in ("cpu_update_params_per_s", "gpu_update_params_per_s", "h2d_bytes_per_s", "d2h_bytes_per_s",
                     "duplex_bytes_per_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be > 0 (use math.inf for 'free'), got {value}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ByteModel:
    """Bytes per parameter moved or held (see anchors: fp32 master + m + v, bf16/fp16 model weights)."""

    state_bytes: int = 12
    """fp32 master weight, exp_avg and exp_avg_sq."""
    grad_bytes: int = 4
    """Gradient sent down for a host-updated parameter (fp32 master gradient)."""
    lowp_bytes: int = 2
    """Low-precision weight sent up after a host update."""
    gpu_grad_bytes: int = 4
    """fp32 gradient kept on the GPU for a GPU-updated parameter."""

    def __post_init__(self) -> None:
        for name in ("state_bytes", "grad_bytes", "lowp_bytes", "gpu_grad_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True, kw_only=True)
class SubgroupTiming:
    """One subgroup, listed in forward order (the order of its layers in the model)."""

    numel: int
    """Parameters in the subgroup (this rank's partition)."""
    forward_s: float = 0.0
    """Forward time of the layers whose parameters the subgroup holds."""
    backward_s: float = 0.0
    """Backward time of those layers."""

    def __post_init__(self) -> None:
        if self.numel < 0:
            raise ValueError(f"numel must be >= 0, got {self.numel}")
        if self.forward_s < 0 or self.backward_s < 0:
            raise ValueError(f"forward_s/backward_s must be >= 0, got {self.forward_s}/{self.backward_s}")


@dataclass(frozen=True, slots=True)
class PlanEstimate:
    """Predicted cost of one placement (seconds unless named otherwise)."""

    backward_tail_s: float
    """Gradient device-to-host copies still running after backward ends."""
    gpu_step_s: float
    """GPU stream time of the step (resident updates + streamed state in/out)."""
    cpu_busy_s: float
    """Host update time of all CPU subgroups."""
    forward_stall_s: float
    """Time the next forward waits for host-updated weights."""
    gpu_state_bytes: int
    """GPU memory the placement needs for optimizer state, GPU gradients and streaming buffers."""

    @property
    def overhead_s(self) -> float:
        """Time added to forward + backward by the optimizer step."""
        return self.backward_tail_s + self.gpu_step_s + self.forward_stall_s


@dataclass(frozen=True, slots=True)
class OffloadPlan:
    """The planner's answer: a placement per subgroup (forward order) and the order of the host work."""

    placements: tuple[Placement, ...]
    cpu_update_order: tuple[int, ...]
    """Host updates (and weight uploads) in this order: first needed by the next forward first."""
    stream_order: tuple[int, ...]
    """Streamed subgroups' state loads in this order."""
    estimate: PlanEstimate
    numels: tuple[int, ...]

    @property
    def gpu_fraction(self) -> float:
        """Share of parameters updated on the GPU."""
        total = sum(self.numels)
        gpu = sum(n for n, p in zip(self.numels, self.placements) if p is not Placement.CPU)
        return gpu / total if total else 0.0

    @property
    def host_state_fraction(self) -> float:
        """Share of optimizer state that lives on the host between steps (CPU and streamed subgroups)."""
        total = sum(self.numels)
        host = sum(n for n, p in zip(self.numels, self.placements) if p is not Placement.GPU_RESIDENT)
        return host / total if total else 0.0


def _safe_div(x: float, rate: float) -> float:
    return 0.0 if x == 0 else x / rate


def estimate(
    placements: Sequence[Placement],
    subgroups: Sequence[SubgroupTiming],
    rates: HardwareRates,
    byte_model: ByteModel = ByteModel(),
    *,
    early_host_start: bool = False,
) -> PlanEstimate:
    """Simulate one iteration's optimizer-related time line for a placement (see the module docstring).

    Times count from the start of backward. ``early_host_start``: host updates start as soon as a subgroup's
    gradients have landed instead of after backward. Either way the host thread picks, among the subgroups it may
    start, the one the next forward needs first (the executor's priority queue).
    """
    if len(placements) != len(subgroups):
        raise ValueError(f"{len(placements)} placements for {len(subgroups)} subgroups")
    bm = byte_model
    # 1. backward: reverse order; CPU subgroups' gradients go down as they appear.
    total_backward = sum(s.backward_s for s in subgroups)
    produced = 0.0
    d2h_done = 0.0
    landed: dict[int, float] = {}
    for index in reversed(range(len(subgroups))):
        sub, where = subgroups[index], placements[index]
        produced += sub.backward_s
        if where is Placement.CPU:
            d2h_done = max(d2h_done, produced) + _safe_div(sub.numel * bm.grad_bytes, rates.d2h_bytes_per_s)
            landed[index] = d2h_done
    step_start = max(total_backward, d2h_done)
    backward_tail = step_start - total_backward

    # 2. step: GPU stream (resident, then streamed state in/out), host thread in parallel.
    gpu_step = 0.0
    max_streamed = 0
    resident_numel = 0
    streamed_numel = 0
    for sub, where in zip(subgroups, placements):
        if where is Placement.GPU_RESIDENT:
            gpu_step += _safe_div(sub.numel, rates.gpu_update_params_per_s)
            resident_numel += sub.numel
        elif where is Placement.GPU_STREAMED:
            one_way = sub.numel * bm.state_bytes
            gpu_step += max(
                _safe_div(one_way, rates.h2d_bytes_per_s),
                _safe_div(one_way, rates.d2h_bytes_per_s),
                _safe_div(2 * one_way, rates.duplex_bytes_per_s),
                _safe_div(sub.numel, rates.gpu_update_params_per_s),
            )
            streamed_numel += sub.numel
            max_streamed = max(max_streamed, sub.numel)
    if streamed_numel:  # pipeline fill: the first load overlaps no update (the last store runs under forward)
        first = next(s.numel for s, w in zip(subgroups, placements) if w is Placement.GPU_STREAMED)
        gpu_step += _safe_div(first * bm.state_bytes, rates.h2d_bytes_per_s)

    # the host thread takes, among the subgroups it may start, the one the next forward needs first
    ready_at = dict(landed) if early_host_start else {index: step_start for index in landed}
    cpu_free = 0.0
    cpu_busy = 0.0
    upload_done = 0.0
    upload_ready: dict[int, float] = {}
    waiting = set(ready_at)
    while waiting:
        startable = [i for i in waiting if ready_at[i] <= cpu_free]
        if not startable:
            cpu_free = min(ready_at[i] for i in waiting)
            continue
        index = min(startable)
        waiting.remove(index)
        sub = subgroups[index]
        work = _safe_div(sub.numel, rates.cpu_update_params_per_s)
        cpu_free += work
        cpu_busy += work
        upload_done = max(upload_done, cpu_free) + _safe_div(sub.numel * bm.lowp_bytes, rates.h2d_bytes_per_s)
        upload_ready[index] = upload_done

    # 3. next forward: starts when the GPU stream finished its step; CPU layers wait for their upload.
    forward_start = step_start + gpu_step
    clock = forward_start
    for index, sub in enumerate(subgroups):
        if index in upload_ready:
            clock = max(clock, upload_ready[index])
        clock += sub.forward_s
    forward_stall = clock - forward_start - sum(s.forward_s for s in subgroups)

    gpu_bytes = (
        resident_numel * (bm.state_bytes + bm.gpu_grad_bytes)
        + streamed_numel * bm.gpu_grad_bytes
        + (2 * max_streamed * bm.state_bytes if max_streamed else 0)
    )
    return PlanEstimate(
        backward_tail_s=backward_tail,
        gpu_step_s=gpu_step,
        cpu_busy_s=cpu_busy,
        forward_stall_s=max(0.0, forward_stall),
        gpu_state_bytes=int(gpu_bytes),
    )


def _prefix_placements(
    subgroups: Sequence[SubgroupTiming], gpu_count: int, budget_bytes: float, byte_model: ByteModel
) -> list[Placement] | None:
    """First ``gpu_count`` subgroups on the GPU, the rest on the host; as many of the GPU ones resident (the first
    ones) as the budget allows next to the streamed ones' gradients and two staging buffers. None if none fits."""
    resident_bytes = byte_model.state_bytes + byte_model.gpu_grad_bytes
    for resident in range(gpu_count, -1, -1):
        streamed = subgroups[resident:gpu_count]
        need = sum(s.numel for s in subgroups[:resident]) * resident_bytes
        if streamed:
            need += sum(s.numel for s in streamed) * byte_model.gpu_grad_bytes
            need += 2 * max(s.numel for s in streamed) * byte_model.state_bytes
        if need <= budget_bytes:
            return (
                [Placement.GPU_RESIDENT] * resident
                + [Placement.GPU_STREAMED] * (gpu_count - resident)
                + [Placement.CPU] * (len(subgroups) - gpu_count)
            )
    return None


def _make_plan(placements: list[Placement], subgroups: Sequence[SubgroupTiming], est: PlanEstimate) -> OffloadPlan:
    return OffloadPlan(
        placements=tuple(placements),
        cpu_update_order=tuple(i for i, p in enumerate(placements) if p is Placement.CPU),
        stream_order=tuple(i for i, p in enumerate(placements) if p is Placement.GPU_STREAMED),
        estimate=est,
        numels=tuple(s.numel for s in subgroups),
    )


def plan_offload(
    subgroups: Sequence[SubgroupTiming],
    rates: HardwareRates,
    *,
    gpu_fraction: float | str = "auto",
    gpu_memory_budget_bytes: float = math.inf,
    byte_model: ByteModel = ByteModel(),
    tolerance: float = 0.02,
    early_host_start: bool = False,
) -> OffloadPlan:
    """Choose GPU/CPU placement per subgroup (``subgroups`` in forward order).

    ``gpu_fraction`` a number in [0, 1]: the forward-order prefix whose parameter share is closest to it (ties to
    the smaller share), resident within ``gpu_memory_budget_bytes`` and streamed beyond it; if even streaming does
    not fit, the largest prefix that fits. ``"auto"``: the smallest prefix whose predicted overhead is within
    ``tolerance`` (relative to forward + backward time, at least 0.1 ms) of the best prefix that fits.
    ``early_host_start``: the executor may start host updates during backward (see :func:`estimate`).
    """
    if not subgroups:
        raise ValueError("plan_offload needs at least one subgroup")
    if gpu_fraction != "auto":
        if isinstance(gpu_fraction, str) or not 0.0 <= float(gpu_fraction) <= 1.0:
            raise ValueError(f'gpu_fraction must be in [0, 1] or "auto", got {gpu_fraction!r}')
    if not gpu_memory_budget_bytes >= 0:
        raise ValueError(f"gpu_memory_budget_bytes must be >= 0, got {gpu_memory_budget_bytes}")
    total = sum(s.numel for s in subgroups)
    prefix_numel = [0]
    for s in subgroups:
        prefix_numel.append(prefix_numel[-1] + s.numel)

    candidates: list[tuple[int, list[Placement], PlanEstimate]] = []
    for count in range(len(subgroups) + 1):
        placements = _prefix_placements(subgroups, count, gpu_memory_budget_bytes, byte_model)
        if placements is None:
            continue
        candidates.append((count, placements, estimate(placements, subgroups, rates, byte_model,
                                                       early_host_start=early_host_start)))
    # count 0 (everything on the host) always fits.

    if gpu_fraction != "auto":
        target = float(gpu_fraction) * total

        def distance(item: tuple[int, list[Placement], PlanEstimate]) -> tuple[float, int]:
            return (abs(prefix_numel[item[0]] - target), item[0])

        count, placements, est = min(candidates, key=distance)
        return _make_plan(placements, subgroups, est)

    best = min(c[2].overhead_s for c in candidates)
    window = sum(s.forward_s + s.backward_s for s in subgroups)
    slack = max(tolerance * window, 1e-4)
    for count, placements, est in candidates:  # ascending GPU share
        if est.overhead_s <= best + slack:
            return _make_plan(placements, subgroups, est)
    raise AssertionError("unreachable: the best candidate is within its own slack")
