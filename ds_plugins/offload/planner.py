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
   host waits (on the GPU, per layer) for that subgroup's upload only (``per_layer_waits``; without the per-layer
   hooks, e.g. dp > 1, the forward starts after every upload).

What the model does NOT know by itself is the host AdamW rate *during training*: the host kernel is
memory-bound, and while it runs the gradients' device-to-host copies write into the same host memory, the
Python thread drives backward, and with clipping the host also rescales fp32 gradients. On one H100 host
(2026-11-26) a cache-sized start-up probe said 7.68 G params/s, the in-training update ran at 4.7 G params/s,
and the plan made from the probe (17% on the GPU, 5 ms predicted) cost 109 ms per iteration. So the rates fed
to :func:`plan_offload` are re-measured in training (``ds_plugins.offload.replan``): the host rate from the
worker's busy time, corrected by :func:`fit_host_rate` when the measured GPU stall exceeds the prediction.

Nor does the time line know that host work slows the GPU-side part itself: the host AdamW threads compete with
the Python thread that issues the kernels and with the gradient/weight copies for CPUs and memory bandwidth. On
the same host with 15 host threads, 55% of the state on the host stretched forward + backward from 156.6 ms
(nothing on the host) to 220-267 ms with no stall at all. The re-planner measures that stretch against the
window measured without host work and feeds it back as a cost per host-updated parameter
(``host_interference_s_per_param``), which the estimate adds to the overhead (``interference_s``).

The planner puts a forward-order prefix of subgroups on the GPU (the first layers are needed first by the next
forward and their gradients arrive last in backward) and the rest on the host, resident within the GPU memory
budget and streamed beyond it. ``gpu_fraction="auto"`` picks the smallest prefix whose predicted iteration
overhead is within ``tolerance`` of the best one, judged with the host rate derated by ``rate_margin`` (a host
slower than measured costs up to the whole host update per iteration, a GPU share a little too large costs only
GPU memory); a number forces the prefix closest to that share.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
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
    "fit_host_rate",
    "plan_offload",
    "uniform_timings",
    "with_host_rate",
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
    interference_s: float = 0.0
    """How much longer forward + backward take because host work runs next to them (the host AdamW threads compete
    with the thread that issues the kernels and with the gradient/weight copies for CPUs and memory bandwidth):
    host-updated parameters times the measured interference per parameter (0 when not measured)."""

    @property
    def overhead_s(self) -> float:
        """Time added to forward + backward by the optimizer step (and by its host half running next to them)."""
        return self.backward_tail_s + self.gpu_step_s + self.forward_stall_s + self.interference_s


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
    per_layer_waits: bool = True,
    host_interference_s_per_param: float = 0.0,
) -> PlanEstimate:
    """Simulate one iteration's optimizer-related time line for a placement (see the module docstring).

    Times count from the start of backward. ``early_host_start``: host updates start as soon as a subgroup's
    gradients have landed instead of after backward. Either way the host thread picks, among the subgroups it may
    start, the one the next forward needs first (the executor's priority queue). ``per_layer_waits``: each layer
    of the next forward waits for its own subgroup's upload (the executor's forward pre-hooks); False: the forward
    starts only after every upload (``step`` waits for the whole host half, as with dp > 1).
    ``host_interference_s_per_param``: seconds that forward + backward grow per host-updated parameter (measured
    by ``ds_plugins.offload.replan``; the estimate's ``interference_s``).
    """
    if len(placements) != len(subgroups):
        raise ValueError(f"{len(placements)} placements for {len(subgroups)} subgroups")
    if not host_interference_s_per_param >= 0:
        raise ValueError(f"host_interference_s_per_param must be >= 0, got {host_interference_s_per_param}")
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
    if not per_layer_waits and upload_ready:
        forward_start = max(forward_start, max(upload_ready.values()))
    clock = forward_start
    for index, sub in enumerate(subgroups):
        if index in upload_ready:
            clock = max(clock, upload_ready[index])
        clock += sub.forward_s
    forward_stall = clock - (step_start + gpu_step) - sum(s.forward_s for s in subgroups)

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
        interference_s=host_interference_s_per_param * sum(
            s.numel for s, w in zip(subgroups, placements) if w is Placement.CPU),
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


def with_host_rate(rates: HardwareRates, cpu_update_params_per_s: float) -> HardwareRates:
    """``rates`` with another host AdamW rate (the other rates unchanged)."""
    return replace(rates, cpu_update_params_per_s=cpu_update_params_per_s)


def uniform_timings(numels: Sequence[int], window_s: float, forward_share: float = 1.0 / 3.0
                    ) -> list[SubgroupTiming]:
    """Per-subgroup forward/backward times from one measured forward+backward window, spread by parameter count
    (forward ``forward_share`` of it: backward ~ 2x forward)."""
    if not 0.0 <= forward_share <= 1.0:
        raise ValueError(f"forward_share must be in [0, 1], got {forward_share}")
    if not window_s >= 0:
        raise ValueError(f"window_s must be >= 0, got {window_s}")
    total = sum(numels) or 1
    return [SubgroupTiming(numel=n, forward_s=window_s * forward_share * n / total,
                           backward_s=window_s * (1.0 - forward_share) * n / total) for n in numels]


def fit_host_rate(
    placements: Sequence[Placement],
    subgroups: Sequence[SubgroupTiming],
    rates: HardwareRates,
    observed_stall_s: float,
    byte_model: ByteModel = ByteModel(),
    *,
    early_host_start: bool = False,
    per_layer_waits: bool = True,
    relative_precision: float = 1e-3,
) -> float:
    """The host AdamW rate at which :func:`estimate` predicts ``observed_stall_s`` of forward stall for this
    placement: the in-training rate the measured stall implies (bisection; the stall falls as the rate grows).

    Returns ``rates.cpu_update_params_per_s`` when the model already predicts at least the observed stall (or no
    subgroup is on the host); never more than it.
    """
    if not any(p is Placement.CPU for p in placements):
        return rates.cpu_update_params_per_s

    def stall(rate: float) -> float:
        return estimate(placements, subgroups, with_host_rate(rates, rate), byte_model,
                        early_host_start=early_host_start, per_layer_waits=per_layer_waits).forward_stall_s

    high = rates.cpu_update_params_per_s
    if stall(high) >= observed_stall_s:
        return high
    low = high
    for _ in range(60):  # find a rate slow enough to stall at least as long as observed
        low /= 2.0
        if stall(low) >= observed_stall_s:
            break
    else:
        return low
    while high - low > relative_precision * high:
        middle = 0.5 * (low + high)
        if stall(middle) >= observed_stall_s:
            low = middle
        else:
            high = middle
    return low


def plan_offload(
    subgroups: Sequence[SubgroupTiming],
    rates: HardwareRates,
    *,
    gpu_fraction: float | str = "auto",
    gpu_memory_budget_bytes: float = math.inf,
    byte_model: ByteModel = ByteModel(),
    tolerance: float = 0.02,
    early_host_start: bool = False,
    per_layer_waits: bool = True,
    rate_margin: float = 0.1,
    min_gpu_numel: int = 0,
    host_interference_s_per_param: float = 0.0,
) -> OffloadPlan:
    """Choose GPU/CPU placement per subgroup (``subgroups`` in forward order).

    ``gpu_fraction`` a number in [0, 1]: the forward-order prefix whose parameter share is closest to it (ties to
    the smaller share), resident within ``gpu_memory_budget_bytes`` and streamed beyond it; if even streaming does
    not fit, the largest prefix that fits. ``"auto"``: the smallest prefix whose predicted overhead is within
    ``tolerance`` (relative to forward + backward time, at least 0.1 ms) of the best prefix that fits, both judged
    with the host rate times ``1 - rate_margin`` (a plan just past the point where the host half stops hiding
    costs the whole excess host time; one a little before it costs GPU memory only). ``min_gpu_numel`` (``auto``
    only; the re-planner's safety rail): prefixes with fewer GPU-updated parameters are not considered, unless
    none with as many fits the budget (then the largest that fits). The plan's ``estimate`` is at the nominal
    rates. ``early_host_start`` / ``per_layer_waits`` / ``host_interference_s_per_param``: see :func:`estimate`;
    the interference makes every host-updated parameter cost that much on top of the time line, so ``auto`` keeps
    state on the GPU wherever the host half would slow forward + backward more than it saves.
    """
    if not subgroups:
        raise ValueError("plan_offload needs at least one subgroup")
    if gpu_fraction != "auto":
        if isinstance(gpu_fraction, str) or not 0.0 <= float(gpu_fraction) <= 1.0:
            raise ValueError(f'gpu_fraction must be in [0, 1] or "auto", got {gpu_fraction!r}')
    if not gpu_memory_budget_bytes >= 0:
        raise ValueError(f"gpu_memory_budget_bytes must be >= 0, got {gpu_memory_budget_bytes}")
    if not 0.0 <= rate_margin < 1.0:
        raise ValueError(f"rate_margin must be in [0, 1), got {rate_margin}")
    total = sum(s.numel for s in subgroups)
    prefix_numel = [0]
    for s in subgroups:
        prefix_numel.append(prefix_numel[-1] + s.numel)

    def evaluate(placements: list[Placement], r: HardwareRates) -> PlanEstimate:
        return estimate(placements, subgroups, r, byte_model, early_host_start=early_host_start,
                        per_layer_waits=per_layer_waits, host_interference_s_per_param=host_interference_s_per_param)

    candidates: list[tuple[int, list[Placement]]] = []
    for count in range(len(subgroups) + 1):
        placements = _prefix_placements(subgroups, count, gpu_memory_budget_bytes, byte_model)
        if placements is not None:
            candidates.append((count, placements))
    # count 0 (everything on the host) always fits.

    if gpu_fraction != "auto":
        target = float(gpu_fraction) * total
        count, placements = min(candidates, key=lambda item: (abs(prefix_numel[item[0]] - target), item[0]))
        return _make_plan(placements, subgroups, evaluate(placements, rates))

    floor = [c for c in candidates if prefix_numel[c[0]] >= min_gpu_numel]
    if not floor:  # the rail asks for more GPU share than the budget holds: the most that fits
        floor = [max(candidates, key=lambda c: c[0])]
    pessimistic = with_host_rate(rates, rates.cpu_update_params_per_s * (1.0 - rate_margin))
    judged = [(count, placements, evaluate(placements, pessimistic)) for count, placements in floor]
    best = min(est.overhead_s for _, _, est in judged)
    window = sum(s.forward_s + s.backward_s for s in subgroups)
    slack = max(tolerance * window, 1e-4)
    for count, placements, est in judged:  # ascending GPU share
        if est.overhead_s <= best + slack:
            return _make_plan(placements, subgroups, evaluate(placements, rates))
    raise AssertionError("unreachable: the best candidate is within its own slack")
