"""DeepSpeed ZeRO-1/2 hook: interleaved optimizer-state offloading.

:func:`install` swaps ``deepspeed.runtime.engine.DeepSpeedZeroOptimizer`` (what ``deepspeed.initialize`` builds
for ZeRO stage 1/2) for :class:`InterleafZeroOptimizer` and wraps ``DeepSpeedEngine._configure_optimizer`` so the
optimizer sees the ``"interleaf": {"offload": ...}`` block and the model. Without that block (or when the class
is built outside ``deepspeed.initialize``) constructing :class:`InterleafZeroOptimizer` returns a plain
``DeepSpeedZeroOptimizer``: DeepSpeed runs exactly as without interleaf.

With the block (and ``zero_optimization.offload_optimizer.device: "cpu"``), DeepSpeed's offload machinery stays
in charge of reduction, gradient partitions, norms, overflow tracking, loss scaling and checkpoint format; this
class changes where gradients go (host for CPU-updated subgroups, a GPU buffer for GPU-updated ones, both off the
compute stream) and replaces the update with :class:`ds_plugins.offload.executor.HybridAdamExecutor`.
See ``docs/offload.md``.
"""
from __future__ import annotations

import contextvars
import logging
import math
import os
import time
from typing import Any

import torch
import deepspeed.runtime.engine as ds_engine
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.utils import all_gather_dp_groups, is_invalid_grad_norm
from deepspeed.runtime.zero.stage_1_and_2 import (
    INITIAL_MICRO_STEP_ID,
    OPTIMIZER_TIMERS,
    DeepSpeedZeroOptimizer,
)

from ..config import OffloadConfig
from ..offload.executor import (
    AdamHyper,
    FlatGroupBuffers,
    HybridAdamExecutor,
    Subgroup,
    measure_rates,
    probe_numel_for,
)
from ..offload.planner import ByteModel, HardwareRates, estimate, plan_offload, uniform_timings
from ..offload.replan import IterationObservation, PlanningContext, ReplanRequest, Replanner, format_rate
from ..offload.settings import offload_config_from_ds_config

__all__ = ["InterleafZeroOptimizer", "install", "uninstall", "SUBGROUPS_PER_RANK"]

logger = logging.getLogger(__name__)

SUBGROUPS_PER_RANK = 64
"""Flat partitions are cut into about this many subgroups (at parameter boundaries) for placement."""

FORWARD_SHARE = 1.0 / 3.0
"""Share of the measured forward+backward window attributed to forward (backward ~ 2x forward)."""

_DEEPSPEED_CLASS = DeepSpeedZeroOptimizer
_PENDING_CONFIG: contextvars.ContextVar[OffloadConfig | None] = contextvars.ContextVar(
    "interleaf_offload_config", default=None
)
_original_configure_optimizer = None


def _adam_flavour(optimizer: torch.optim.Optimizer) -> tuple[bool, bool]:
    """(adamw_mode, bias_correction) of a supported base optimizer; ValueError naming the fix otherwise."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    group = optimizer.param_groups[0]
    if isinstance(optimizer, DeepSpeedCPUAdam):
        if not getattr(optimizer, "fp32_optimizer_states", True):
            raise ValueError("interleaf offload keeps fp32 optimizer states: remove fp32_optimizer_states=false")
        return bool(optimizer.adam_w_mode), bool(group.get("bias_correction", True))
    if isinstance(optimizer, (torch.optim.AdamW, torch.optim.Adam)):
        if any(g.get("amsgrad", False) or g.get("maximize", False) for g in optimizer.param_groups):
            raise ValueError("interleaf offload supports Adam/AdamW without amsgrad/maximize")
        adamw = isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))
        return adamw, True
    raise ValueError(
        f"interleaf offload updates Adam/AdamW only, got {type(optimizer).__name__}: use "
        '"optimizer": {"type": "AdamW", ...} in the DeepSpeed config (or torch.optim.AdamW), or remove the '
        '"interleaf.offload" block'
    )


class InterleafZeroOptimizer(DeepSpeedZeroOptimizer):
    """ZeRO-1/2 with host-offloaded optimizer state, updated partly on the GPU and partly on the host, overlapped.

    Exact by construction, never by rollback: when DeepSpeed could skip the step (overflow / non-finite norm) or
    rescale it (clipping, loss scale), nothing is updated before the global norm and the overflow flag (which
    span both halves) are known. Only when the step can be neither skipped nor rescaled (bf16 with
    ``check_grad_overflow: false`` and ``gradient_clipping: 0``) do host updates start during backward, as soon
    as a subgroup's gradients are all on their way to the host.
    """

    early_host_start: bool = True
    """Allow host updates during backward when that is exact (set False on an instance to measure without)."""
    host_grads_16bit: bool = True
    """bf16 models without clipping send host subgroups' gradients down as bf16 (2 B/param, read as is by the
    kernel) instead of fp32; set False before the first step to keep fp32."""

    def __new__(cls, *args: Any, **kwargs: Any):
        if _PENDING_CONFIG.get() is None:
            return _DEEPSPEED_CLASS(*args, **kwargs)
        return super().__new__(cls)

    def __init__(self, init_optimizer, param_names, timers, optimizer_params, **kwargs: Any) -> None:
        config = _PENDING_CONFIG.get()
        assert config is not None  # __new__ returned a DeepSpeed instance otherwise
        self.interleaf_config: OffloadConfig = config
        self._adamw_mode, self._bias_correction = _adam_flavour(init_optimizer)
        super().__init__(init_optimizer, param_names, timers, optimizer_params, **kwargs)
        if not self.cpu_offload:
            raise ValueError('interleaf offload needs "zero_optimization.offload_optimizer.device": "cpu"')
        if self.has_moe_layers or self.low_precision_master_weights_and_grads or self.torch_autocast_gradscaler:
            raise ValueError(
                "interleaf offload supports dense models with fp32 master weights and no torch autocast scaler; "
                'remove the "interleaf.offload" block for this model'
            )
        self._device_overflow: torch.Tensor | None = None
        self._grads_per_subgroup: dict[int, int] = {}
        self._grads_missing: dict[int, int] = {}
        self._early_hyper: list[AdamHyper] | None = None
        self._executor: HybridAdamExecutor | None = None
        self._host_grads_lowp: list[torch.Tensor] | None = None
        self._routed_this_iteration = False
        self._param_subgroup: dict[int, int] = {}
        self._module: torch.nn.Module | None = None
        self._hook_handles: list = []
        self._probe_handles: list = []
        self._per_layer_waits = False
        """Forward pre-hooks wait per layer for host updates (dp = 1 with a module); registered only while some
        subgroup is updated on the host (:meth:`_register_forward_waits`)."""
        self._forward_waits: list[tuple[torch.nn.Module, Any, bool]] = []  # (module, hook, prepend)
        self._wait_handles: list = []
        self._forward_seen: set[int] = set()
        self._rates: HardwareRates | None = None
        self._steps_done = 0
        self._replanner: Replanner | None = None
        self._last_sync: float | None = None
        self._excluded_s = 0.0
        self.last_plan = None
        self.plan_history: list[dict] = []
        """One record per plan (step, GPU share, predicted overhead, what was measured and why it re-planned)."""
        self.last_observation: IterationObservation | None = None

    # ------------------------------------------------------------------ wiring
    def attach_module(self, module: torch.nn.Module) -> None:
        """Let the next forward wait per layer for host-updated weights (else ``step`` waits for all of them).

        Until the first step, a probe records which modules' forwards run: parameters whose owning module never
        runs its forward (read directly by a parent, e.g. ``F.linear(x, self.head.weight)``) are then waited
        for at the start of the model's forward instead of per layer.
        """
        self._module = module
        self._forward_seen: set[int] = set()
        for m in module.modules():
            if next(m.parameters(recurse=False), None) is not None:
                self._probe_handles.append(
                    m.register_forward_pre_hook(lambda mod, _inputs: self._forward_seen.add(id(mod))))

    def _dp_world_size(self) -> int:
        return max(dist.get_world_size(group=g) for g in self.real_dp_process_group)

    def _forward_rank(self) -> dict[int, int]:
        """param id -> position in forward order (module.parameters() order; flat order without a module)."""
        order: dict[int, int] = {}
        if self._module is not None:
            for position, p in enumerate(self._module.parameters()):
                order.setdefault(id(p), position)
        return order

    def _build_executor(self) -> None:
        rank_of = self._forward_rank()
        total = sum(int(s) for s in self.partition_size)
        target = max(1, math.ceil(total / SUBGROUPS_PER_RANK))
        pieces: list[tuple[int, Subgroup, list[int]]] = []  # (forward key, subgroup, param ids)
        for i in range(len(self.bit16_groups)):
            size = int(self.partition_size[i])
            entries = sorted(
                (self.grad_position[self.get_param_id(p)][2], self.get_param_id(p), p)
                for p in self.params_in_partition[i]
            )
            start, members = 0, []
            for dest, param_id, _p in entries:
                if members and dest - start >= target:
                    pieces.append((i, Subgroup(group=i, start=start, numel=dest - start), members))
                    start, members = dest, []
                members.append(param_id)
            if size > start or members:
                pieces.append((i, Subgroup(group=i, start=start, numel=size - start), members))
        # forward order: by the earliest forward position of the subgroup's parameters
        flat_rank = {id(p): n for n, p in enumerate(p for g in self.bit16_groups for p in g)}

        def key(item):
            _, sub, members = item
            positions = [rank_of.get(id(self.param_dict[m]), len(rank_of) + flat_rank[id(self.param_dict[m])])
                         for m in members]
            return (min(positions) if positions else math.inf, sub.group, sub.start)

        pieces.sort(key=key)
        subgroups = [sub for _, sub, _ in pieces]
        self._param_subgroup = {m: index for index, (_, _, members) in enumerate(pieces) for m in members}
        self._grads_per_subgroup = {index: len(members) for index, (_, _, members) in enumerate(pieces)}
        self._reset_grad_tracking()
        for i in range(len(self.bit16_groups)):
            self._ensure_state(i)
        if self._lowp_host_grads_possible():
            self._host_grads_lowp = []
            for size in self.partition_size:
                buffer = torch.zeros(int(size), dtype=self.dtype, device="cpu")
                self._host_grads_lowp.append(
                    get_accelerator().pin_memory(buffer) if self.cpu_offload_pin_memory else buffer)
        self._executor = HybridAdamExecutor(
            subgroups, self._flat_buffers(), device=torch.device(get_accelerator().current_device_name()),
            pin_memory=self.cpu_offload_pin_memory, host_threads=_host_threads(self.interleaf_config),
        )
        if self._module is not None and self._dp_world_size() == 1:
            self._install_forward_waits()

    def _install_forward_waits(self) -> None:
        executor = self._executor
        for handle in self._probe_handles:
            handle.remove()
        self._probe_handles = []
        at_model_start: set[int] = set()  # subgroups of parameters used outside their module's forward
        for module in self._module.modules():
            ids = sorted({self._param_subgroup[self.get_param_id(p)] for p in module.parameters(recurse=False)
                          if id(p) in self.param_id and self.get_param_id(p) in self._param_subgroup})
            if not ids:
                continue
            if id(module) not in self._forward_seen:
                at_model_start.update(ids)
                continue

            def wait(_module, _inputs, ids=tuple(ids)):
                if executor.has_pending():
                    executor.wait_for(ids)

            self._forward_waits.append((module, wait, False))
        if at_model_start:
            logger.info("interleaf offload: %d subgroup(s) hold parameters used outside their module's forward; "
                        "the forward waits for them at its start", len(at_model_start))

            def wait_first(_module, _inputs, ids=tuple(sorted(at_model_start))):
                if executor.has_pending():
                    executor.wait_for(ids)

            self._forward_waits.append((self._module, wait_first, True))
        self._per_layer_waits = True
        self._hook_handles.append(
            self._module.register_state_dict_pre_hook(lambda *args, **kwargs: executor.wait_all())
        )
        self._register_forward_waits()

    def _register_forward_waits(self) -> None:
        """Forward pre-hooks on while some subgroup is updated on the host, off otherwise: with every subgroup on
        the GPU there is never anything to wait for, and any forward pre-hook moves a module's call off PyTorch's
        fast path (host time per module call, every forward). Call after placements changed; a move to the GPU
        has drained the host work in flight (``apply_plan``)."""
        ex = self._executor
        needed = self._per_layer_waits and ex is not None and not all(
            ex.is_on_gpu(i) for i in range(len(ex.subgroups)))
        if needed and not self._wait_handles:
            self._wait_handles = [module.register_forward_pre_hook(hook, prepend=prepend)
                                  for module, hook, prepend in self._forward_waits]
        elif not needed and self._wait_handles:
            for handle in self._wait_handles:
                handle.remove()
            self._wait_handles = []

    def _ensure_state(self, i: int) -> dict:
        """The base optimizer's state for flat partition i, created in its own format (checkpoint-compatible)."""
        flat = self.single_partition_of_fp32_groups[i]
        state = self.optimizer.state[flat]
        if "exp_avg" not in state:
            def zeros():
                t = torch.zeros_like(flat, dtype=torch.float32, device="cpu")
                return get_accelerator().pin_memory(t) if self.cpu_offload_pin_memory else t

            state["step"] = torch.tensor(0.0) if isinstance(self.optimizer, torch.optim.Optimizer) and not hasattr(
                self.optimizer, "ds_opt_adam") else 0
            state["exp_avg"] = zeros()
            state["exp_avg_sq"] = zeros()
        return state

    def _flat_buffers(self) -> list[FlatGroupBuffers]:
        buffers = []
        for i in range(len(self.bit16_groups)):
            state = self._ensure_state(i)
            partition_id = dist.get_rank(group=self.real_dp_process_group[i])
            master = self.single_partition_of_fp32_groups[i]
            buffers.append(FlatGroupBuffers(
                master=master.data, exp_avg=state["exp_avg"], exp_avg_sq=state["exp_avg_sq"],
                host_grad=master.grad.data, lowp_device=self.parallel_partitioned_bit16_groups[i][partition_id].data,
                lowp_host=self.param_buffer_of_bit16_for_cpu_offload_groups[i].data,
                host_grad_lowp=self._host_grads_lowp[i] if self._host_grads_lowp is not None else None,
            ))
        return buffers

    # ------------------------------------------------------------------ planning
    def _budget_bytes(self) -> float:
        if self.interleaf_config.gpu_memory_budget_gib is not None:
            return self.interleaf_config.gpu_memory_budget_gib * 2**30
        device = torch.device(get_accelerator().current_device_name())
        if device.type != "cuda":
            return math.inf
        total = torch.cuda.get_device_properties(device).total_memory
        others_peak = torch.cuda.max_memory_reserved(device) - self._executor.gpu_state_bytes()
        margin = max(2**30, 0.05 * total)
        return max(0.0, total - others_peak - margin)

    def _planning_context(self) -> PlanningContext:
        ex = self._executor
        return PlanningContext(
            numels=tuple(sub.numel for sub in ex.subgroups),
            byte_model=ByteModel(grad_bytes=2 if self._host_grads_lowp is not None else 4),
            early_host_start=self._early_start_allowed(),
            per_layer_waits=self._dp_world_size() == 1 and self._per_layer_waits,
            forward_share=FORWARD_SHARE,
        )

    def _probe_rates(self) -> HardwareRates:
        """Start-up rates, the host probe shaped like this run's host update (see ``measure_rates``)."""
        ex = self._executor
        lowp = self.dtype if self.dtype in (torch.bfloat16, torch.float16) else None
        return measure_rates(
            ex.device, pin=self.cpu_offload_pin_memory,
            probe_numel=probe_numel_for(sum(sub.numel for sub in ex.subgroups)),
            grad_dtype=torch.bfloat16 if self._host_grads_lowp is not None else torch.float32, lowp_dtype=lowp,
            scale_grads=self.clip_grad > 0.0 or self.loss_scale != 1.0, host_threads=ex._host_threads,
        )

    def _plan(self, carry_grads: bool, request: ReplanRequest | None = None) -> None:
        """Plan from the latest measurements. ``carry_grads``: this step's gradients move with their subgroup
        (first plan, before the update); otherwise the plan applies from the next backward on. ``request``: the
        re-planner's calibrated inputs (measured host rate, window, safety-rail floor); None for the first plan
        (start-up probe, window unknown)."""
        began = time.perf_counter()
        cfg = self.interleaf_config
        ex = self._executor
        if self._rates is None:
            self._rates = probed = self._probe_rates()
            logger.info("interleaf offload start-up probe: host AdamW %.2f G params/s (%d threads), GPU AdamW "
                        "%.1f G params/s, H2D %.1f GB/s, D2H %.1f GB/s, both %.1f GB/s",
                        probed.cpu_update_params_per_s / 1e9, ex._host_threads,
                        probed.gpu_update_params_per_s / 1e9, probed.h2d_bytes_per_s / 1e9,
                        probed.d2h_bytes_per_s / 1e9, probed.duplex_bytes_per_s / 1e9)
        context = self._planning_context()
        if self._replanner is None:
            self._replanner = Replanner(context, replan_interval=cfg.replan_interval)
        self._replanner.context = context
        rates = request.rates if request is not None else self._rates
        window = request.window_s if request is not None else 0.0
        floor = request.min_gpu_numel if request is not None else 0
        interference = request.interference_s_per_param if request is not None else 0.0
        fraction = 0.0 if cfg.mode == "cpu" else cfg.gpu_fraction
        timings = uniform_timings(context.numels, window, context.forward_share)

        def running_plan():
            """The plan in effect, its prediction refreshed from the measurements."""
            old = self.last_plan
            return type(old)(placements=old.placements, cpu_update_order=old.cpu_update_order,
                             stream_order=old.stream_order, numels=old.numels,
                             estimate=estimate(old.placements, timings, rates, context.byte_model,
                                               early_host_start=context.early_host_start,
                                               per_layer_waits=context.per_layer_waits,
                                               host_interference_s_per_param=interference))

        kept = ""
        if fraction != "auto" and self.last_plan is not None:
            plan = running_plan()  # a forced split never moves
        else:
            plan = plan_offload(timings, rates, gpu_fraction=fraction, gpu_memory_budget_bytes=self._budget_bytes(),
                                early_host_start=context.early_host_start, per_layer_waits=context.per_layer_waits,
                                byte_model=context.byte_model, min_gpu_numel=floor,
                                host_interference_s_per_param=interference)
            if request is not None and self.last_plan is not None and plan.placements != self.last_plan.placements:
                running = running_plan()
                forced = floor > self._replanner.gpu_numel()
                if not self._replanner.worth_moving(running.estimate, plan.estimate, window, forced=forced):
                    kept = (f"; kept the running placement: the re-plan ({100 * plan.gpu_fraction:.1f}% on the GPU) "
                            f"would save {1e3 * (running.estimate.overhead_s - plan.estimate.overhead_s):.1f} ms "
                            f"per iteration, under {100 * self._replanner.min_gain_fraction:g}% of the window")
                    plan = running
        before = self.last_plan.gpu_fraction if self.last_plan is not None else None
        moved = plan.placements != tuple(ex.placements)
        if moved:
            if carry_grads:
                self._apply_plan_keeping_grads(plan)
            else:
                ex.apply_plan(plan)
            self._register_forward_waits()
        self._rates = rates
        self._replanner.planned(plan, rates, window, settle=moved and not carry_grads,
                                interference_s_per_param=interference)
        self.last_plan = plan
        record = {
            "step": self._steps_done, "gpu_fraction": plan.gpu_fraction, "host_state": plan.host_state_fraction,
            "moved": moved, "predicted_overhead_s": plan.estimate.overhead_s,
            "predicted_stall_s": plan.estimate.forward_stall_s, "window_s": window,
            "host_rate": rates.cpu_update_params_per_s, "min_gpu_numel": floor,
            "interference_s_per_param": interference,
            "reason": (request.reason + kept) if request is not None else "first plan (start-up probe, window not measured)",
            "measured": request.measured if request is not None else "",
        }
        self.plan_history.append(record)
        logger.info(
            "interleaf offload plan at step %d: %.1f%% of parameters updated on the GPU%s, %.1f%% of optimizer "
            "state on the host, predicted overhead %.1f ms (stall %.1f ms; window %.1f ms, host AdamW %s)%s; "
            "because: %s%s", self._steps_done, 100 * plan.gpu_fraction,
            "" if before is None else f" (was {100 * before:.1f}%)", 100 * plan.host_state_fraction,
            1e3 * plan.estimate.overhead_s, 1e3 * plan.estimate.forward_stall_s, 1e3 * window,
            format_rate(rates.cpu_update_params_per_s), "" if moved else ", nothing moved", record["reason"],
            f"; measured: {record['measured']}" if record["measured"] else "",
        )
        device = ex.device
        if device.type == "cuda" and (moved or request is None):
            # the memory budget of the next plans is the peak since the state on the GPU last changed
            # (_budget_bytes); resetting only then leaves the user's max_memory_* counters alone otherwise. State
            # moved off the GPU leaves its blocks reserved: return them first, or the reserved peak would count
            # them as other users' memory and block moving state back
            if moved:
                torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        self._excluded_s += time.perf_counter() - began

    def _observe(self, synced: float) -> IterationObservation | None:
        """At the step's synchronization point: the last iteration's measurements (None when there is none)."""
        ex = self._executor
        stall = ex.collect_stall_s() if ex is not None else 0.0
        last, self._last_sync = self._last_sync, synced
        excluded, self._excluded_s = self._excluded_s, 0.0
        if ex is None or last is None or self._replanner is None:
            return None
        ex.begin_iteration()  # the previous step's host work is complete: its timings are final
        disturbed, ex.disturbed = ex.disturbed, False
        timings = ex.last_timings
        obs = IterationObservation(period_s=synced - last - excluded, host_numel=timings.cpu_numel,
                                   host_busy_s=timings.cpu_busy_s, stall_s=stall, disturbed=disturbed)
        self.last_observation = obs
        return obs

    def _replan_request(self, obs: IterationObservation | None) -> ReplanRequest | None:
        """The re-planner's verdict on an observation; called once the GPU half of the step is enqueued (the device
        would otherwise idle through this Python after the norm's synchronization)."""
        if obs is None:
            return None
        request = self._replanner.observe(obs)
        if request is not None and self.interleaf_config.mode == "interleaved" and (
                self.interleaf_config.gpu_fraction == "auto" or len(self.plan_history) == 1):
            return request  # auto re-plans; a forced split only refreshes its prediction once measured
        return None

    def _apply_plan_keeping_grads(self, plan) -> None:
        """Apply a plan between gradient arrival and the update: this step's gradients move with the subgroup."""
        ex = self._executor
        before = list(ex.placements)
        moved_to_host = {i: ex.device_grad(i).to("cpu") for i, p in enumerate(before) if ex.is_on_gpu(i)
                         and plan.placements[i].value == "cpu"}
        ex.apply_plan(plan)
        for index, grad in moved_to_host.items():
            ex._host_view(index, "host_grad").copy_(grad)
        for index, placement in enumerate(plan.placements):
            if placement.value != "cpu" and before[index].value == "cpu":
                ex.device_grad(index).copy_(ex._host_view(index, "host_grad"))

    # ------------------------------------------------------------------ gradients
    def _early_start_allowed(self) -> bool:
        """Host updates may start during backward only when DeepSpeed can neither skip nor rescale this step:
        no clipping, no loss scaling, bf16 without the overflow check (fp32 and fp16 skip on a non-finite norm)."""
        return (self.early_host_start and self.clip_grad == 0.0 and self.dtype == torch.bfloat16
                and not self.check_grad_overflow and self.loss_scale == 1.0 and self.torch_autocast_gradscaler is None)

    def _lowp_host_grads_possible(self) -> bool:
        """bf16 gradients reach the hook as bf16 and are never rescaled: send them down as they are."""
        return (self.host_grads_16bit and self.dtype == torch.bfloat16 and self.clip_grad == 0.0
                and not self.use_grad_accum_attribute
                and not any(self._use_compact_grad_partition_buffer(i) for i in range(len(self.bit16_groups))))

    def _next_step_hyper(self, grad_scale: float) -> list[AdamHyper]:
        hyper = []
        for i, group in enumerate(self.optimizer.param_groups):
            state = self._ensure_state(i)
            beta1, beta2 = group["betas"]
            hyper.append(AdamHyper(
                lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]), step=int(state["step"]) + 1, adamw_mode=self._adamw_mode,
                bias_correction=bool(group.get("bias_correction", self._bias_correction)), grad_scale=grad_scale,
            ))
        return hyper

    def _route_grad(self, param_id: int, dest_offset: int, num_elements: int, source: torch.Tensor) -> None:
        """Send one parameter's gradient slice where its subgroup is updated; start the subgroup's host update
        as soon as its last gradient is on the way, when that is exact (see _early_start_allowed)."""
        ex = self._executor
        ex.begin_iteration()
        self._routed_this_iteration = True
        destination = self._grad_destination(param_id, dest_offset, num_elements)
        if destination.dtype != torch.float32 and source.dtype != destination.dtype:
            raise RuntimeError(f"interleaf: a {source.dtype} gradient for a {destination.dtype} host buffer; set "
                               "engine.optimizer.host_grads_16bit = False before the first step")
        ex.copy_grad(destination, source)
        index = self._param_subgroup[param_id]
        self._grads_missing[index] -= 1
        if self._grads_missing[index] == 0 and not ex.is_on_gpu(index) and self.is_gradient_accumulation_boundary():
            if self._early_hyper is None and self._early_start_allowed():
                self._early_hyper = self._next_step_hyper(grad_scale=1.0)
            if self._early_hyper is not None:
                ex.submit_early(index, self._early_hyper, lowp_grads=self._host_grads_lowp is not None)

    def copy_grads_in_partition(self, param, group_idx=None):
        if self._executor is not None:
            self._executor.begin_iteration()  # the last step's host update still reads the gradient buffer
        if self._executor is None or not self._use_compact_grad_partition_buffer(
            group_idx if group_idx is not None else self._get_param_group_idx(param)
        ):
            return super().copy_grads_in_partition(param, group_idx)
        # compact fp32 partition (grad_accum_dtype fp32 with low-precision params): route like the plain path
        if group_idx is None:
            group_idx = self._get_param_group_idx(param)
        param_id = self.get_param_id(param)
        self._offload_accumulated_param_ids.add(param_id)
        if self.is_gradient_accumulation_boundary():
            from deepspeed.runtime.zero.utils import get_norm_dtype

            [_, _, dest_offset, num_elements] = self.grad_position[param_id]
            partition_id = dist.get_rank(group=self.real_dp_process_group[group_idx])
            source = self._get_compact_grad_partition_slice(group_idx, partition_id, param_id, num_elements)
            self.norm_for_param_grads[param_id] = source.data.to(get_norm_dtype()).norm(2)
            self.update_offload_overflow_tracker(source)
            self._route_grad(param_id, dest_offset, num_elements, source)
            self.clear_grad_attribute(param)

    def _grad_destination(self, param_id: int, dest_offset: int, num_elements: int) -> torch.Tensor:
        ex = self._executor
        index = self._param_subgroup[param_id]
        if ex.is_on_gpu(index):
            return ex.device_grad(index).narrow(0, dest_offset - ex.subgroups[index].start, num_elements)
        group = ex.subgroups[index].group
        if self._host_grads_lowp is not None:
            return self._host_grads_lowp[group].narrow(0, dest_offset, num_elements)
        return self.single_partition_of_fp32_groups[group].grad.view(-1).narrow(0, dest_offset, num_elements)

    def async_inplace_copy_grad_to_fp32_buffer_from_gpu(self, param):
        if self._executor is None:
            return super().async_inplace_copy_grad_to_fp32_buffer_from_gpu(param)
        param_id = self.get_param_id(param)
        [_, source_offset, dest_offset, num_elements] = self.grad_position[param_id]
        grad_accum = self.get_param_gradient_attribute(param)
        source = grad_accum.view(-1).narrow(0, source_offset, num_elements)
        self._route_grad(param_id, dest_offset, num_elements, source)
        self.clear_grad_attribute(param)

    # ------------------------------------------------------------------ overflow flag and norm without per-tensor syncs
    def update_offload_overflow_tracker(self, grad):
        """DeepSpeed tests every gradient with a host sync; keep the flag on the device until the step. Nothing
        at all when ``step`` will not read the flag (``check_grad_overflow`` off: bf16 without the check, fp32):
        the test is 13 kernels per gradient (1x H100, 1.34B GPT: ~3,800 launches per backward)."""
        if grad is None or not self.check_grad_overflow:
            return
        flag = self._has_inf_or_nan(grad.data)
        self._device_overflow = flag if self._device_overflow is None else self._device_overflow.logical_or(flag)

    def has_overflow(self, partition_gradients=True):
        if self._device_overflow is not None:
            if bool(self._device_overflow):
                self.local_overflow = True
            self._device_overflow = None
        return super().has_overflow(partition_gradients)

    def complete_grad_norm_calculation_for_cpu_offload(self, params):
        """DeepSpeed's global norm over this rank's gradients, with one host sync instead of one per tensor."""
        from deepspeed.runtime.constants import PIPE_REPLICATED
        from deepspeed.runtime.utils import is_model_parallel_parameter

        norms = []
        for p in params:
            if hasattr(p, PIPE_REPLICATED) and p.ds_pipe_replicated:
                continue
            if is_model_parallel_parameter(p) or self.model_parallel_rank == 0:
                param_id = self.get_param_id(p)
                if param_id in self.norm_for_param_grads:
                    norms.append(self.norm_for_param_grads[param_id])
                elif not self.ignore_unused_parameters:
                    raise RuntimeError("a trainable parameter got no gradient; set "
                                       "zero_optimization.ignore_unused_parameters or use every parameter")
        # the sum of squares stays on the device (rounded to fp32 there exactly as FloatTensor([float]) rounds it on
        # the host): the one host read is the reduced total below
        if norms:
            total_dev_norm = torch.stack(norms).double().pow(2).sum().to(
                device=get_accelerator().current_device_name(), dtype=torch.float32).reshape(1)
        else:
            total_dev_norm = get_accelerator().FloatTensor([0.0])
        dist.all_reduce(total_dev_norm, op=dist.ReduceOp.SUM, group=self.dp_process_group)
        self._model_parallel_all_reduce(tensor=total_dev_norm, op=dist.ReduceOp.SUM)
        total_norm = total_dev_norm[0].item() ** 0.5
        if total_norm in (float("inf"), -float("inf")) or total_norm != total_norm:
            total_norm = -1.0
        return torch.tensor(total_norm, device=self.device, dtype=torch.float)

    # ------------------------------------------------------------------ the step
    def _inverse_grad_scale(self, scaled_norm, loss_scale: float) -> float:
        """1 / (loss scale x clip coefficient), computed as DeepSpeed's unscale_and_clip_grads does."""
        if self.clip_grad == 0.0 and loss_scale == 1.0:
            return 1.0
        combined = loss_scale
        if self.clip_grad > 0.0:
            norm = scaled_norm
            if is_invalid_grad_norm(norm):
                norm = torch.tensor(float("inf"), dtype=torch.float)
            clip = ((norm / loss_scale) + 1e-6) / self.clip_grad
            combined = torch.clamp(clip, min=1.0) * loss_scale
        inverse = 1.0 / combined
        return float(inverse)

    def step(self, closure=None):
        self.micro_step_id = INITIAL_MICRO_STEP_ID
        self._wait_for_offload_copies()
        if self._executor is not None:
            self._executor.wait_grad_copies()
        self._offload_accumulated_param_ids = set()
        if not self.compute_grad_norm:
            self._global_grad_norm = None

        self.overflow = False
        if self.check_grad_overflow:
            self.check_overflow(partition_gradients=self.partition_gradients)
        self._device_overflow = None
        scaled_norm = None
        if self.compute_grad_norm and not self.overflow:
            scaled_norm = self.scaled_global_norm()
            if (self.dtype != torch.bfloat16 or self.check_grad_overflow) and is_invalid_grad_norm(scaled_norm):
                self.overflow = True
        # the norm read above synchronized with the device: backward is over, the iteration period ends here
        synced = time.perf_counter()
        observation = self._observe(synced) if not self.overflow else None
        if self.overflow:
            self._last_sync = None  # a skipped step is no steady-state iteration
            if self._executor is not None:
                self._executor.collect_stall_s()
        prev_scale = self.loss_scale
        self._update_scale(self.overflow)
        if self.overflow:  # neither half has been touched: skipping is exact
            if self.compute_grad_norm:
                self._global_grad_norm = float("inf")
            self.zero_grad(set_to_none=True)
            self._release_preflattened_grad_buffers()
            self.reset_cpu_buffers()
            if self._early_hyper is not None:
                raise RuntimeError("interleaf: a step that started early host updates was skipped; this cannot "
                                   "happen with bf16, check_grad_overflow false and gradient_clipping 0")
            self._reset_grad_tracking()
            for timer in OPTIMIZER_TIMERS:
                self.timers(timer).start()
                self.timers(timer).stop()
            return
        if scaled_norm is not None:
            self._global_grad_norm = scaled_norm / prev_scale
        # unscale with the scale the gradients were produced with (prev_scale), also on a scale increase
        grad_scale = self._inverse_grad_scale(scaled_norm, prev_scale)

        first_step = self._executor is None
        if first_step:
            self._build_executor()
            self._plan(carry_grads=True)
        hyper = self._next_step_hyper(grad_scale)
        if self._early_hyper is not None and self._early_hyper != hyper:
            logger.error(
                "interleaf: hyper-parameters changed between backward and step() (%s -> %s); host subgroups "
                "updated during backward used the old ones. Change the learning rate before backward, or set "
                "engine.optimizer.early_host_start = False", self._early_hyper, hyper)
        for i in range(len(self.optimizer.param_groups)):
            self._ensure_state(i)["step"] += 1
        # gradients routed by the executor this iteration sit in the 16-bit host buffer (when that is on); the
        # first step's came through DeepSpeed's own fp32 path
        self._executor.step(hyper, lowp_grads=self._host_grads_lowp is not None and self._routed_this_iteration)
        request = self._replan_request(observation)
        self._reset_grad_tracking()
        for i in range(len(self.bit16_groups)):  # as DeepSpeed's offload step: drop this step's grad partitions
            self._release_preflattened_grad_buffers(i)
            self.averaged_gradients[i] = None
        self._lazy_init_hp_params_optimizer_state()
        self.reset_cpu_buffers()
        self._steps_done += 1
        if self._dp_world_size() > 1 or not self._per_layer_waits:
            self._executor.wait_all()
            all_gather_dp_groups(groups_flat=self.bit16_groups_flat,
                                 partitioned_param_groups=self.parallel_partitioned_bit16_groups,
                                 dp_process_group=self.real_dp_process_group,
                                 start_alignment_factor=self.nccl_start_alignment_factor,
                                 allgather_bucket_size=self.allgather_bucket_size)
        for i in range(len(self.bit16_groups)):
            self._update_model_bit16_weights(i)
        if request is not None:  # applies from the next backward on; a move waits for this step's host half
            self._plan(carry_grads=False, request=request)
        if first_step:  # the first step's rest (probe, first kernel calls, state moves) is no steady state
            self._last_sync, self._excluded_s = time.perf_counter(), 0.0

    def _reset_grad_tracking(self) -> None:
        self._grads_missing = dict(self._grads_per_subgroup)
        self._early_hyper = None
        self._routed_this_iteration = False

    def wait_for_updates(self) -> None:
        """Block until every weight of the last step is in place (the forward hooks do this per layer)."""
        if self._executor is not None:
            self._executor.wait_all()
            if self._executor.device.type == "cuda":
                torch.cuda.current_stream(self._executor.device).synchronize()

    @torch.no_grad()
    def update_lp_params(self):
        self.sync_optimizer_state()
        return super().update_lp_params()

    def sync_optimizer_state(self) -> None:
        """Write the live state of GPU-resident subgroups into the host tensors DeepSpeed exposes (fp32 master
        partitions, optimizer state): call before reading them directly (checkpoints do it themselves)."""
        if self._executor is not None:
            self._executor.sync_state_to_host()

    # ------------------------------------------------------------------ checkpoints (DeepSpeed's format)
    def state_dict(self):
        self.sync_optimizer_state()
        return super().state_dict()

    def load_state_dict(self, *args: Any, **kwargs: Any):
        self.sync_optimizer_state()
        result = super().load_state_dict(*args, **kwargs)
        if self._executor is not None:
            if self.cpu_offload_pin_memory:
                for i in range(len(self.bit16_groups)):
                    state = self.optimizer.state[self.single_partition_of_fp32_groups[i]]
                    for key in ("exp_avg", "exp_avg_sq"):
                        if key in state and not state[key].is_pinned():
                            state[key] = get_accelerator().pin_memory(state[key].to(torch.float32))
            self._executor.reload_state_from_host(self._flat_buffers())
        return result

    def destroy(self):
        for handle in self._hook_handles + self._probe_handles + self._wait_handles:
            handle.remove()
        self._hook_handles = []
        self._probe_handles = []
        self._wait_handles = []
        if self._executor is not None:
            self._executor.close()
        super().destroy()


LOCAL_SIZE_VARIABLES = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE",
                        "MPI_LOCALNRANKS")
"""Environment variables that give the number of processes on this host, first one set wins: torchrun
(``LOCAL_WORLD_SIZE``), DeepSpeed's own launcher ``deepspeed`` (``LOCAL_SIZE``; it sets no ``LOCAL_WORLD_SIZE``),
Open MPI, MVAPICH2, MPICH / Intel MPI (Hydra)."""


def _local_ranks(environ: Any = None) -> tuple[int, str]:
    """(processes on this host, the variable that said so) from :data:`LOCAL_SIZE_VARIABLES`; (1, "") when none
    is set. A value that is not a positive integer is skipped with a warning."""
    environ = os.environ if environ is None else environ
    for name in LOCAL_SIZE_VARIABLES:
        value = str(environ.get(name, "")).strip()
        if not value:
            continue
        try:
            count = int(value)
        except ValueError:
            count = 0
        if count >= 1:
            return count, name
        logger.warning("interleaf offload: ignoring %s=%r (not a positive integer) for the host AdamW's thread count",
                       name, value)
    return 1, ""


def _sharing_cpus(entries: list[tuple[str, list[int]]], host: str, mask: frozenset[int]) -> int:
    """How many of the gathered ``(hostname, affinity mask)`` entries (this rank's included) run on this host on
    CPUs that overlap ``mask``: the processes this rank shares its CPUs with."""
    return max(1, sum(1 for h, m in entries if h == host and not mask.isdisjoint(m)))


def _ranks_sharing_cpus(mask: frozenset[int]) -> int | None:
    """Processes sharing this rank's CPUs, from every rank's hostname and affinity mask (one all_gather_object
    over the world group, at the first optimizer step, which every rank reaches); None without a process group.
    Unlike a launcher's local size it sees per-rank CPU binding (``deepspeed --bind_cores_to_rank``, numactl,
    SLURM's cpu-bind): ranks bound to disjoint CPUs do not share them."""
    import socket

    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()):
        return None
    gathered: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(gathered, (socket.gethostname(), sorted(mask)))
    return _sharing_cpus(gathered, socket.gethostname(), mask)


def _host_threads(config: OffloadConfig) -> int:
    """The host AdamW's thread count: ``config.host_threads``, or with ``auto`` half of this rank's share of the
    CPUs in its affinity mask (see :attr:`OffloadConfig.host_threads`)."""
    try:
        mask = frozenset(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        mask = frozenset(range(os.cpu_count() or 1))
    cpus = len(mask)
    sharing = _ranks_sharing_cpus(mask) if config.host_threads == "auto" else None
    if sharing is not None:
        local_ranks, source = sharing, "the ranks on this host whose CPU affinity overlaps this one's"
    else:
        local_ranks, source = _local_ranks()
    threads = config.resolved_host_threads(cpus, local_ranks)
    if config.host_threads == "auto" and threads != torch.get_num_threads():
        logger.info("interleaf offload: host AdamW on %d threads (%d CPUs in this process's affinity mask, %d local "
                    "rank(s)%s; torch.get_num_threads() is %d); set interleaf.offload.host_threads to override",
                    threads, cpus, local_ranks, f" from {source}" if source else ", no launcher variable set",
                    torch.get_num_threads())
    return threads


def _configure_optimizer(self, client_optimizer, model_parameters):
    """Wrapper of ``DeepSpeedEngine._configure_optimizer``: hands the offload block to our optimizer class."""
    config = offload_config_from_ds_config(getattr(self._config, "_param_dict", None))
    if config is None:
        return _original_configure_optimizer(self, client_optimizer, model_parameters)
    token = _PENDING_CONFIG.set(config)
    try:
        result = _original_configure_optimizer(self, client_optimizer, model_parameters)
    finally:
        _PENDING_CONFIG.reset(token)
    if isinstance(self.optimizer, InterleafZeroOptimizer):
        self.optimizer.attach_module(self.module)
    return result


def install() -> None:
    """Route DeepSpeed ZeRO-1/2 optimizers with an ``interleaf.offload`` block to :class:`InterleafZeroOptimizer`."""
    global _original_configure_optimizer
    if ds_engine.DeepSpeedZeroOptimizer is InterleafZeroOptimizer:
        return
    ds_engine.DeepSpeedZeroOptimizer = InterleafZeroOptimizer
    _original_configure_optimizer = ds_engine.DeepSpeedEngine._configure_optimizer
    ds_engine.DeepSpeedEngine._configure_optimizer = _configure_optimizer


def uninstall() -> None:
    """Give DeepSpeed its own class back."""
    global _original_configure_optimizer
    if ds_engine.DeepSpeedZeroOptimizer is InterleafZeroOptimizer:
        ds_engine.DeepSpeedZeroOptimizer = _DEEPSPEED_CLASS
    if _original_configure_optimizer is not None:
        ds_engine.DeepSpeedEngine._configure_optimizer = _original_configure_optimizer
        _original_configure_optimizer = None
