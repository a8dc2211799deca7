"""Closing the loop of ``gpu_fraction: "auto"``: recalibrate the planner from what training measures (torch-free).

The planner (``ds_plugins.offload.planner``) predicts from rates. A start-up probe cannot know the host AdamW rate
*in training* (gradient copies write into the same host memory, the Python thread drives backward, clipping adds
a scaling pass) nor, before the first iterations, the forward+backward window. :class:`Replanner` takes one
:class:`IterationObservation` per step and decides when to plan again and with which inputs:

- the **host rate** is the worker's measured throughput (parameters / busy seconds; the slowest of the last few
  iterations), and where the **measured forward stall** (GPU idle waiting for host-updated weights) exceeds the
  plan's prediction by more than a margin, the lower rate at which the model reproduces that stall
  (:func:`ds_plugins.offload.planner.fit_host_rate`);
- the **window** (forward + backward, nothing exposed) is the iteration period minus the measured stall and the
  predicted GPU step, as a median over recent iterations;
- the **interference** of host work with the GPU-side part of the iteration: the host AdamW threads compete with
  the Python thread that issues the kernels and with the gradient/weight copies for CPUs and memory bandwidth, so
  forward + backward themselves grow while host work runs. The window of iterations with (almost) no host work
  (at most ``quiet_host_share`` of the parameters; ``auto`` always starts with everything on the GPU, and plans
  host work only after ``2 * history - 1`` such iterations) is the **reference** (the lowest median of ``history``
  consecutive ones among the recent ones); the window handed to the planner is never larger than it (a window
  stretched by host work is not room to hide more host work: on 1x H100 with 15 host threads that positive
  feedback kept 55% of the state on the host while the window grew 156.6 -> 266.8 ms and the iteration ran 1.41x
  GPU-resident). Iterations with
  more host work are **samples**; once ``history`` of them exist and their (trimmed mean) window exceeds the
  reference by more than ``interference_margin`` (15%: the window jitters +-15% between iterations on that host,
  see :meth:`Replanner.worth_moving`), the excess is charged to host work as a cost per host-updated parameter
  (trimmed mean of ``(window - reference) / host_numel``) that the planner adds to a placement's overhead
  (``host_interference_s_per_param``). Once charged, only samples whose host work would show it above twice the
  margin update it, and it is dropped only when ``history`` of those stay within the margin: the iterations
  after the move back to the GPU carry too little host work to measure it by, and forgetting it there would walk
  straight back into the stretch (a move every few iterations). It acts as a **rail** when it is large:
  when a host-updated parameter costs more in interference than updating it on the GPU would (the most the host
  half can save), and the latest iteration itself exceeded the reference by the margin, the next plan must put
  strictly more parameters on the GPU (the stall rail's floor, same duration);
- **when**: after every plan change, ``settle_iterations`` iterations are skipped (they still carry the previous
  plan's host work and the move itself), then each iteration is compared with the plan: a re-plan is asked for
  when the host rate, the window or the interference charge drifted by more than ``drift`` (or the charge
  appeared or was dropped), when the stall exceeded the prediction (the
  **safety rail**: the new plan must then put strictly more parameters on the GPU than the failing one, for
  ``replan_interval`` iterations, within the memory budget), and at the latest every ``replan_interval``
  iterations (once the first reference is measured: a shorter interval does not cut it short). A re-plan that yields the same placement moves nothing. A rate fitted to a stall is kept (as an
  upper bound on the host rate) as long as the rail, so the planner does not walk back into the same stall.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

from .._stats import trimmed_mean
from .planner import (
    ByteModel,
    HardwareRates,
    OffloadPlan,
    PlanEstimate,
    estimate,
    fit_host_rate,
    uniform_timings,
    with_host_rate,
)

__all__ = ["IterationObservation", "PlanningContext", "ReplanRequest", "Replanner", "format_rate"]


def format_rate(params_per_s: float) -> str:
    """A host/GPU AdamW rate for logs: G params/s, or M params/s below 0.1 G."""
    if params_per_s >= 1e8:
        return f"{params_per_s / 1e9:.2f} G params/s"
    return f"{params_per_s / 1e6:.2f} M params/s"


@dataclass(frozen=True, slots=True, kw_only=True)
class IterationObservation:
    """What one iteration measured (the executor's ``StepTimings`` of the step whose host half it hid)."""

    period_s: float
    """Time from one step to the next, taken at a point where the host has synchronized with the device (the
    global-norm read): the iteration time."""
    host_numel: int = 0
    """Parameters the host worker updated for that step."""
    host_busy_s: float = 0.0
    """Worker time spent on those updates."""
    stall_s: float = 0.0
    """Device time the compute stream idled waiting for host-updated weights (forward pre-hooks, the next
    backward's first gradient, a global wait): CUDA events around each wait that actually blocked."""
    disturbed: bool = False
    """A checkpoint, a re-plan or any other full synchronization happened: not a steady-state iteration."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanningContext:
    """Everything :func:`ds_plugins.offload.planner.plan_offload` needs besides the rates and the window."""

    numels: tuple[int, ...]
    """Parameters per subgroup, forward order."""
    byte_model: ByteModel = ByteModel()
    early_host_start: bool = False
    per_layer_waits: bool = True
    forward_share: float = 1.0 / 3.0
    """Share of the window attributed to forward."""

    def estimate(self, plan: OffloadPlan, rates: HardwareRates, window_s: float, *,
                 host_interference_s_per_param: float = 0.0) -> PlanEstimate:
        return estimate(plan.placements, uniform_timings(self.numels, window_s, self.forward_share), rates,
                        self.byte_model, early_host_start=self.early_host_start,
                        per_layer_waits=self.per_layer_waits,
                        host_interference_s_per_param=host_interference_s_per_param)


@dataclass(frozen=True, slots=True)
class ReplanRequest:
    """Inputs for the next plan and why it is asked for."""

    rates: HardwareRates
    window_s: float
    min_gpu_numel: int
    """Safety rail: the new plan updates at least this many parameters on the GPU (0: no constraint)."""
    reason: str
    measured: str
    """What was measured, for the log."""
    interference_s_per_param: float = 0.0
    """Measured slowdown of forward + backward per host-updated parameter (0: none beyond the margin)."""


class Replanner:
    """Decides, one observation per step, whether ``auto`` should plan again (see the module docstring)."""

    def __init__(
        self,
        context: PlanningContext,
        *,
        replan_interval: int,
        settle_iterations: int = 1,
        drift: float = 0.1,
        stall_margin_s: float = 0.002,
        stall_margin_fraction: float = 0.03,
        history: int = 3,
        min_gain_fraction: float = 0.02,
        quiet_host_share: float = 0.05,
        interference_margin: float = 0.15,
    ) -> None:
        if replan_interval < 1 or settle_iterations < 0 or history < 1:
            raise ValueError("replan_interval and history must be >= 1, settle_iterations >= 0")
        if not drift > 0 or stall_margin_s < 0 or stall_margin_fraction < 0:
            raise ValueError("drift must be > 0 and the stall margins >= 0")
        if not 0.0 <= quiet_host_share < 1.0 or not interference_margin >= 0:
            raise ValueError("quiet_host_share must be in [0, 1) and interference_margin >= 0")
        self.context = context
        self.replan_interval = replan_interval
        self.settle_iterations = settle_iterations
        self.drift = drift
        self.stall_margin_s = stall_margin_s
        self.stall_margin_fraction = stall_margin_fraction
        self.history = history
        self.min_gain_fraction = min_gain_fraction
        self.quiet_host_share = quiet_host_share
        """Iterations whose host work is at most this share of the parameters measure the reference window."""
        self.interference_margin = interference_margin
        """How far (share of the reference) the window may exceed the reference before host work is charged."""
        self.plan: OffloadPlan | None = None
        self.rates: HardwareRates | None = None
        self.window_s = 0.0
        self._since_plan = 0
        self._settle_left = 0
        self._host_rates: list[float] = []
        self._windows: list[float] = []
        self._fitted_rate: float | None = None
        self._floor_numel = 0
        self._floor_left = 0
        self._reference_windows: list[float] = []
        self._samples: list[tuple[float, int]] = []  # (window, host-updated parameters) of iterations with host work
        self._interference = 0.0  # the current estimate (seconds per host-updated parameter)
        self.interference_s_per_param = 0.0
        """The interference the plan in effect was made with."""
        self.last_observation: IterationObservation | None = None
        self.last_stall_predicted_s = 0.0

    # ------------------------------------------------------------------ bookkeeping
    def planned(self, plan: OffloadPlan, rates: HardwareRates, window_s: float, *, settle: bool,
                interference_s_per_param: float = 0.0) -> None:
        """A plan is in effect from the next backward on. ``settle``: the move drained the step in flight, so
        the next ``settle_iterations`` observations are transitional and skipped. ``interference_s_per_param``:
        the host-work interference the plan was made with (the request's)."""
        self.plan = plan
        self.rates = rates
        self.window_s = window_s
        self.interference_s_per_param = interference_s_per_param
        self._since_plan = 0
        self._settle_left = self.settle_iterations if settle else 0

    def margin_s(self) -> float:
        """How far the measured stall may exceed the prediction before the safety rail acts."""
        return max(self.stall_margin_s, self.stall_margin_fraction * self.window_s)

    def gpu_numel(self) -> int:
        plan = self.plan
        return 0 if plan is None else sum(n for n, p in zip(plan.numels, plan.placements) if p.value != "cpu")

    @property
    def reference_window_s(self) -> float | None:
        """Forward + backward measured with (almost) no host work: the lowest median of ``history`` consecutive
        ones among the last ``2 * history - 1`` such iterations (the median of fewer before that); None until
        one was measured. The lowest, because the first iterations after start-up run slow (1x H100: the first
        three all-GPU windows' median was 195 ms against ~161 ms steady) and a reference that high hides
        interference below the margin; only among the recent ones, so it rises again after a lasting slowdown and
        window jitter does not ratchet it down (the lowest median over the whole run sat ~14% below the mean
        window under +-15% jitter and charged interference where there was none)."""
        windows = self._reference_windows
        if not windows:
            return None
        if len(windows) < self.history:
            return statistics.median(windows)
        return min(statistics.median(windows[k:k + self.history]) for k in range(len(windows) - self.history + 1))

    def _estimate_interference(self, reference: float) -> tuple[float, float, bool]:
        """(interference per host-updated parameter, trimmed mean window of the samples it rests on, whether
        those samples show it beyond the margin now) from the recent samples (see the module docstring). Before
        any is charged, every sample counts; once one is, only samples with enough host work to show it clearly
        (predicted stretch above twice the margin) update or drop it, so the iterations after a move back to the
        GPU (little host work, nothing to see) keep it."""
        charged = self._interference
        samples = self._samples
        if charged > 0:
            samples = [(w, n) for w, n in samples if charged * n > 2.0 * self.interference_margin * reference]
        if len(samples) < self.history:
            return charged, 0.0, False
        excess = trimmed_mean([(window - reference) / reference for window, _ in samples])
        mean_window = reference * (1.0 + excess)
        if excess > self.interference_margin:
            per_param = trimmed_mean([(window - reference) / numel for window, numel in samples])
            return max(0.0, per_param), mean_window, True
        return 0.0, mean_window, False  # within the margin: jitter, or a charge these samples contradict

    # ------------------------------------------------------------------ the decision
    def worth_moving(self, running: PlanEstimate, candidate: PlanEstimate, window_s: float, *, forced: bool) -> bool:
        """Whether to move optimizer state from the running placement to a re-plan's candidate, both estimated
        under the request's rates and ``window_s``. Moving costs an iteration (the move drains the step and
        streams state), so a candidate must either be needed - ``forced`` (the safety rail's floor) or the running
        placement no longer hides its host half (predicted stall beyond the margin) - or save more than
        ``min_gain_fraction`` of the window per iteration. Without this, noise in the measured window (+-15%
        between iterations on the H100 host) moved a few percent of the state back and forth every few steps,
        each move turning a 0.2 s iteration into a 0.4 s one (1x H100, 1.34B GPT)."""
        if forced:
            return True
        if running.forward_stall_s > max(self.stall_margin_s, self.stall_margin_fraction * window_s):
            return True
        return running.overhead_s - candidate.overhead_s > self.min_gain_fraction * window_s

    def observe(self, obs: IterationObservation) -> ReplanRequest | None:
        """Feed one iteration's measurements; a :class:`ReplanRequest` when a new plan should be made now."""
        if self.plan is None or self.rates is None:
            return None
        self._since_plan += 1
        if self._floor_left > 0:
            self._floor_left -= 1
            if self._floor_left == 0:  # the rail and the stall-fitted rate expire together
                self._floor_numel = 0
                self._fitted_rate = None
        if self._settle_left > 0:
            self._settle_left -= 1
            return None
        if obs.disturbed or obs.period_s <= 0:
            return None
        self.last_observation = obs
        ctx = self.context
        old_rate = self.rates.cpu_update_params_per_s
        # window: the iteration minus what the optimizer step added to it (GPU step, gradient-copy tail, stall)
        step_est = ctx.estimate(self.plan, self.rates, self.window_s)
        window = obs.period_s - obs.stall_s - step_est.gpu_step_s - step_est.backward_tail_s
        keep = 2 * self.history - 1
        quiet = obs.host_numel <= self.quiet_host_share * sum(ctx.numels)
        this_window = window
        if window > 0:
            self._windows = (self._windows + [window])[-keep:]
            if quiet:
                self._reference_windows = (self._reference_windows + [window])[-keep:]
            else:
                self._samples = (self._samples + [(window, obs.host_numel)])[-keep:]
        window = statistics.median(self._windows) if self._windows else self.window_s
        # interference: what host work adds to forward + backward, against the window without host work
        reference = self.reference_window_s
        interference, sampled_window, shown = self.interference_s_per_param, 0.0, False
        if reference is not None:
            interference, sampled_window, shown = self._estimate_interference(reference)
            self._interference = interference
            window = min(window, reference)  # a window stretched by host work is no room for more host work
        # host rate: measured throughput in training (the slowest of the recent iterations)
        if obs.host_numel > 0 and obs.host_busy_s > 0:
            self._host_rates = (self._host_rates + [obs.host_numel / obs.host_busy_s])[-self.history:]
        rate = min(self._host_rates) if self._host_rates else old_rate
        if self._fitted_rate is not None:
            rate = min(rate, self._fitted_rate)
        rates = with_host_rate(self.rates, rate)
        predicted = self.plan.estimate.forward_stall_s
        self.last_stall_predicted_s = predicted
        reasons: list[str] = []
        floor = self._floor_numel
        margin = self.margin_s()
        if obs.stall_s > predicted + margin and obs.host_numel > 0:
            fitted = fit_host_rate(
                self.plan.placements, uniform_timings(ctx.numels, window, ctx.forward_share), rates, obs.stall_s,
                ctx.byte_model, early_host_start=ctx.early_host_start, per_layer_waits=ctx.per_layer_waits)
            self._fitted_rate = fitted if self._fitted_rate is None else min(self._fitted_rate, fitted)
            rate = min(rate, fitted)
            rates = with_host_rate(rates, rate)
            floor = max(floor, self.gpu_numel() + 1)
            self._floor_numel, self._floor_left = floor, self.replan_interval
            reasons.append(f"measured stall {1e3 * obs.stall_s:.1f} ms > predicted {1e3 * predicted:.1f} ms + "
                           f"margin {1e3 * margin:.1f} ms (safety rail: more parameters on the GPU)")
        planned_interference = self.interference_s_per_param
        # the interference rail: the samples show the stretch, this iteration too, and a host-updated parameter
        # costs more in stretch than its GPU update would (the most the host half can save per parameter)
        rail = (shown and not quiet and reference is not None
                and this_window - reference > self.interference_margin * reference
                and interference * rates.gpu_update_params_per_s > 1.0
                and floor <= self.gpu_numel() < sum(ctx.numels))
        if rail:
            floor = max(floor, self.gpu_numel() + 1)
            self._floor_numel, self._floor_left = floor, self.replan_interval
        if reference is not None and sampled_window > 0 and (rail or abs(
                interference - planned_interference) > self.drift * max(interference, planned_interference)):
            if interference > 0:
                reasons.append(f"window {1e3 * sampled_window:.1f} ms vs {1e3 * reference:.1f} ms without host "
                               f"work: host work costs {1e9 * interference:.2f} ns per host-updated parameter"
                               + (" (interference rail: more parameters on the GPU)" if rail else ""))
            else:
                reasons.append(f"window {1e3 * sampled_window:.1f} ms vs {1e3 * reference:.1f} ms without host "
                               f"work, within {100 * self.interference_margin:g}%: host work no longer charged")
        if abs(rate - old_rate) > self.drift * old_rate:
            reasons.append(f"host rate {format_rate(old_rate)} -> {format_rate(rate)}")
        if self.window_s > 0 and abs(window - self.window_s) > self.drift * self.window_s:
            reasons.append(f"window {1e3 * self.window_s:.1f} -> {1e3 * window:.1f} ms")
        elif self.window_s <= 0 < window and (not quiet or len(self._reference_windows) >= keep):
            # the first window, measured without host work, is the reference: the lowest median of `history`
            # consecutive ones among `2 * history - 1` iterations (1x H100: the first all-GPU iteration after
            # start-up took 240 ms, the steady ones ~175 ms; taken alone it hid 40% of interference; in a later
            # run the median of the first three was 191.7 ms against ~160 ms steady, and the 37% stretch host
            # work caused stayed near the 15% margin of it for 12 iterations). With host work from the start (a
            # fixed gpu_fraction) there is no reference to wait for.
            reasons.append(f"window measured: {1e3 * window:.1f} ms"
                           + (f" (lowest median of {self.history} consecutive among {len(self._reference_windows)}"
                              " iterations without host work)" if quiet else ""))
        # the periodic re-plan waits for the first reference too: with replan_interval < history it would plan
        # from the slow first iteration alone, and that window would become the reference
        gathering_reference = self.window_s <= 0 and quiet and len(self._reference_windows) < keep
        if self._since_plan >= self.replan_interval and not gathering_reference:
            reasons.append(f"{self._since_plan} iterations since the last plan")
        if not reasons:
            return None
        measured = (f"iteration {1e3 * obs.period_s:.1f} ms, stall {1e3 * obs.stall_s:.1f} ms (predicted "
                    f"{1e3 * predicted:.1f} ms), host {obs.host_numel / 1e6:.1f} M params in "
                    f"{1e3 * obs.host_busy_s:.1f} ms")
        return ReplanRequest(rates=rates, window_s=window, min_gpu_numel=floor, reason="; ".join(reasons),
                             measured=measured, interference_s_per_param=interference)
