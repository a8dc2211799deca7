"""What ``InterleafPipelineEngine.train_batch`` does: drive the executor, then DeepSpeed's reduction and step.

The schedule comes from the registry and runs on :class:`ds_plugins.runtime.executor.PipelineExecutor`; this
module only feeds it data, finalises gradients the way DeepSpeed's optimizers expect, clips by the global norm
over all stages and calls DeepSpeed's own tied-gradient / data-parallel reduction and optimizer step.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from deepspeed import comm as dist

from ..runtime.executor import PipelineExecutor, StepResult, costs_from_ranks, measured_costs
from ..runtime.p2p import P2PCommunicator
from ..runtime.weight_grad import (
    WeightGradQueue,
    accumulate_all_into_grad,
    accumulate_into_grad,
    enable_weight_grad_split,
)
from ..schedule.registry import COST_TUNED, build_schedule, retune

__all__ = ["ScheduleRunner", "IterationStats"]

logger = logging.getLogger(__name__)

_BF16_OPTIMIZER: type | None = None
_ZERO_OPTIMIZER: type | None = None
_LAYOUT_JSON = "interleaf_layout.json"
_OPTIM_SUFFIX = "interleaf_optim_states.pt"


def register_optimizer_types(bf16: type, zero: type) -> None:
    global _BF16_OPTIMIZER, _ZERO_OPTIMIZER
    _BF16_OPTIMIZER, _ZERO_OPTIMIZER = bf16, zero


@dataclass(frozen=True, slots=True)
class IterationStats:
    """One training iteration as measured on this rank (pipeline-group figures where noted)."""

    step: int
    loss: float
    wall_s: float
    """Whole ``train_batch`` (schedule + reduction + optimizer step)."""
    pipeline_s: float
    """The executor's step (forward/backward schedule only)."""
    bubble: float
    """Mean over the pipeline ranks of idle/wall of the executor's step."""
    bubble_max: float
    tokens: int
    """Tokens in the global batch (first input tensor: batch x sequence, times data-parallel size)."""
    tokens_per_s: float
    schedule: str
    grad_norm: float | None
    busy_max_s: float
    """Largest per-rank compute time (F/I/W/B) of the executor's step: the bubble-free step time."""


class ScheduleRunner:
    """Everything the interleaf engine adds to one ``PipelineEngine``."""

    def __init__(self, engine: Any, plan: Any, layout: Any, chunks: list[Any]) -> None:
        self.engine = engine
        self.plan = plan
        self.layout = layout
        self.config = plan.config
        grid = engine.grid
        self.grid = grid
        self.rank = grid.get_stage_id()
        shape = plan.shape
        self.shape = shape
        self.chunks = {c.stage: c for c in chunks}
        last = shape.num_stages - 1
        self.holds_first_stage = 0 in self.chunks
        self.holds_loss_stage = last in self.chunks
        self.loss_global_rank = grid.stage_to_global(shape.rank_of(last))
        self.first_global_rank = grid.stage_to_global(shape.rank_of(0))
        self.device = engine.device
        self.pipe_group = grid.get_pipe_parallel_group()
        self.max_grad_norm = 0.0
        self.history: list[IterationStats] = []
        self.last_result: StepResult | None = None
        self.before_step: Any = None
        """Optional ``callable(runner)`` run after gradient reduction and clipping, right before the optimizer step
        (tests read the final gradients here)."""
        self.steps = 0
        self._tokens_per_microbatch: int | None = None
        # auto and (measured_costs) zb-h1/zb-h2/zb-v: the first auto_warmup_iterations steps are timed per action;
        # then the schedule is planned (auto) or rebuilt (retune) from every rank's measured F/I/W times
        self._measuring = self.config.schedule == "auto" or (
            self.config.measured_costs and self.config.schedule in COST_TUNED)
        self._samples: list[dict] = []
        self._memory: list[dict] = []
        self.tuning: str | None = None
        """After the measured warm-up of zb-h1/zb-h2/zb-v: ``"rebuilt"`` (running the order rebuilt from measured
        costs) or ``"kept"`` (the simulator found it no faster); None before or without it."""

        opt = engine.optimizer
        self._bf16 = _BF16_OPTIMIZER is not None and isinstance(opt, _BF16_OPTIMIZER)
        self._zero = _ZERO_OPTIMIZER is not None and isinstance(opt, _ZERO_OPTIMIZER)
        if self._bf16:
            self._prepare_bf16(opt)
        self.queue = (WeightGradQueue(accumulate_grad=self._bf16_accumulate, accumulate_grads=self._bf16_accumulate_all)
                      if self._bf16 else WeightGradQueue())
        if engine.torch_autocast_enabled():
            if getattr(engine, "torch_autocast_z0_gradscaler", None) is not None:
                raise ValueError("interleaf pipeline schedules do not support torch_autocast with fp16 gradient "
                                 'scaling: use the "fp16" section (DeepSpeed loss scaling) or bf16 autocast')
            from deepspeed.runtime.torch_autocast import autocast_if_enabled

            for chunk in self.chunks.values():
                chunk.forward_context = lambda eng=engine: autocast_if_enabled(eng)
        if plan.schedule.splits_backward or self.config.schedule == "auto":
            for chunk in self.chunks.values():
                enable_weight_grad_split(chunk)
        self.p2p = P2PCommunicator.for_shape(
            shape, list(grid.pp_group), group=self.pipe_group, device=self.device, timeout_s=self.config.timeout_s
        )
        self.executor = self._make_executor(plan.schedule, self.p2p)
        self._eval: dict[int, PipelineExecutor] = {}
        self._eval_p2p: P2PCommunicator | None = None

    # ------------------------------------------------------------------ setup
    def _loss_fn(self, output: Any, target: Any) -> torch.Tensor:
        loss_fn = self.engine.module.loss_fn
        if loss_fn is None:  # DeepSpeed: "some models just return loss from forward()"
            return output
        return loss_fn(output, target)

    def _make_executor(self, schedule: Any, p2p: P2PCommunicator, *, serialize_first: bool | None = None
                       ) -> PipelineExecutor:
        return PipelineExecutor(
            schedule,
            self.rank,
            self.chunks,
            p2p=p2p,
            loss_fn=self._loss_fn,
            device=self.device,
            weight_grad_queue=self.queue,
            timing="action",
            track_memory=self._measuring,  # only the measured warm-up reads memory figures
            serialize_first=serialize_first,
            after_backward=self._flush_bf16_grads if self._bf16 else None,
            split_mode=self.config.split_mode,
        )

    def _prepare_bf16(self, opt: Any) -> None:
        """BF16_Optimizer sums the micro-batches' gradients in its "hp" gradient buffers, of dtype
        ``data_types.grad_accum_dtype`` (DeepSpeed's default: the model dtype, so bf16 under bf16; fp32 when the
        config asks for it): each micro-batch's gradient added once (``hp.add_(lp_grad.to(hp.dtype))`` in its
        ``_update_hp_grad``). DeepSpeed does that with one Python call per parameter per micro-batch (its
        ``immediate_grad_update`` hooks, or its
        loop after each backward): ~200 host calls and 400 kernel launches per stage per micro-batch, host time
        the GPU waits for when kernels are short. Here the same sums run as one ``torch._foreach_add_`` over the
        stage's parameters after each I/B action (:meth:`_flush_bf16_grads`, the executor's ``after_backward``),
        and deferred W gradients go into the buffers straight from the queue (:meth:`_bf16_accumulate`). Same
        additions in the same order and dtype as DeepSpeed's 1F1B."""
        index: dict[int, tuple[int, int, torch.Tensor]] = {}
        for i, group in enumerate(opt.bf16_groups):
            for j, p in enumerate(group):
                hp = opt.fp32_groups_gradients[i][j].view(p.shape)  # view of DeepSpeed's flat buffer (grad_accum_dtype)
                index[id(p)] = (i, j, hp)
                p._hp_grad = opt.fp32_groups_gradients[i][j]
        self._bf16_index = index
        self._bf16_stage_params: dict[int, list[tuple[torch.nn.Parameter, torch.Tensor, int, int]]] = {}
        for stage, chunk in self.chunks.items():
            entries = []
            for p in chunk.parameters():
                where = index.get(id(p))
                if where is not None and p.requires_grad:
                    entries.append((p, where[2], where[0], where[1]))
            self._bf16_stage_params[stage] = entries
        # a trained parameter outside every chunk's modules (none in DeepSpeed's own layouts) is still summed:
        # every stage's flush looks at it
        covered = {id(e[0]) for entries in self._bf16_stage_params.values() for e in entries}
        stray = [(p, index[id(p)][2], i, j) for i, group in enumerate(opt.bf16_groups) for j, p in enumerate(group)
                 if p.requires_grad and id(p) not in covered]
        for entries in self._bf16_stage_params.values():
            entries.extend(stray)
        for hook in getattr(opt, "_grad_acc_hooks", ()):  # "immediate_grad_update": true in the user's config
            hook.remove()
        opt._grad_acc_hooks = []
        # keeps DeepSpeed's own update_hp_grads (run by its engine/optimizer after a backward) a no-op
        opt.immediate_grad_update = True

    @torch.no_grad()
    def _flush_bf16_grads(self, stage: int) -> None:
        """Add the gradients autograd left on ``stage``'s parameters to DeepSpeed's accumulation buffers and release them
        (after every I/B action of the stage: one micro-batch's gradients at a time)."""
        hps, grads = [], []
        has = self.engine.optimizer.fp32_groups_has_gradients
        for p, hp, i, j in self._bf16_stage_params[stage]:
            g = p.grad
            if g is not None:
                hps.append(hp)
                grads.append(g)
                p.grad = None
                has[i][j] = True
        if hps:
            torch._foreach_add_(hps, grads)

    def _bf16_accumulate(self, param: torch.nn.Parameter, grad: torch.Tensor) -> None:
        """``hp += grad`` as DeepSpeed's ``_update_hp_grad`` does (``hp.add_(lp_grad.to(hp.dtype))``), the same
        sum (a bf16 -> fp32 conversion is exact); on CUDA a conversion happens inside the add kernel. Runs
        in the W action, under ``no_grad`` (``WeightGradQueue.run``)."""
        where = self._bf16_index.get(id(param))
        if where is None:  # not optimized (frozen): keep autograd's behaviour
            accumulate_into_grad(param, grad)
            return
        i, j, hp = where
        hp.add_(grad)
        self.engine.optimizer.fp32_groups_has_gradients[i][j] = True

    def _bf16_accumulate_all(self, params: Sequence[torch.nn.Parameter], grads: Sequence[torch.Tensor | None]) -> None:
        """The input-gradient pass's gradients of a stage's other parameters (executor ``split_mode="autograd"``)
        into the same buffers with one foreach add: the sums :meth:`_flush_bf16_grads` makes, without the round
        trip through ``.grad``."""
        index = self._bf16_index
        has = self.engine.optimizer.fp32_groups_has_gradients
        hps, adds = [], []
        for p, g in zip(params, grads):
            if g is None:
                continue
            where = index.get(id(p))
            if where is None:  # not optimized (frozen): keep autograd's behaviour
                accumulate_all_into_grad((p,), (g,))
                continue
            i, j, hp = where
            hps.append(hp)
            adds.append(g)
            has[i][j] = True
        if hps:
            torch._foreach_add_(hps, adds)

    # ------------------------------------------------------------------ data
    def _load(self, microbatches: int) -> tuple[list[Any] | None, list[Any] | None]:
        eng = self.engine
        inputs: list[Any] | None = [] if self.holds_first_stage else None
        targets: list[Any] | None = [] if self.holds_loss_stage else None
        if not (self.holds_first_stage or self.holds_loss_stage):
            return None, None
        reentrant = eng._reentrant_activation_checkpointing()
        for _ in range(microbatches):
            batch = eng._next_batch()
            if inputs is not None:
                inputs.append(_to_device_input(batch[0], eng.device, reentrant))
            if targets is not None:
                targets.append(_to_device(batch[1], eng.device))
        return inputs, targets

    def _tokens(self, inputs: list[Any] | None) -> int:
        if self._tokens_per_microbatch is None:
            count = 0
            if inputs:
                first = inputs[0][0] if isinstance(inputs[0], (tuple, list)) else inputs[0]
                if isinstance(first, torch.Tensor):
                    count = int(first.shape[0] * first.shape[1]) if first.dim() >= 2 else int(first.numel())
            t = torch.tensor([count], dtype=torch.long, device=self.device)
            dist.broadcast(t, src=self.first_global_rank, group=self.pipe_group)
            self._tokens_per_microbatch = int(t.item())
        return self._tokens_per_microbatch * self.plan.microbatches * self.grid.data_parallel_size

    # ------------------------------------------------------------------ training
    def _loss_scale(self) -> float:
        eng = self.engine
        if eng.fp16_enabled():
            scale = eng._get_optimizer_loss_scale()
            return float(scale) if scale is not None else 1.0
        return 1.0

    def train_batch(self, data_iter: Any = None) -> torch.Tensor:
        eng = self.engine
        if not torch.is_grad_enabled():
            raise RuntimeError("train_batch() requires gradients enabled. Use eval_batch() instead.")
        if data_iter is not None:
            eng.set_dataiterator(data_iter)
        eng.module.train()
        eng.total_loss = None
        eng.total_additional_losses = None
        eng._compute_loss = True
        _sync(self.device)
        t0 = time.perf_counter()

        m = self.plan.microbatches
        inputs, targets = self._load(m)
        tokens = self._tokens(inputs)
        result = self.executor.run(inputs, targets, loss_scale=self._loss_scale() / m)

        eng._exec_reduce_tied_grads()
        eng._exec_reduce_grads()
        grad_norm = self._clip_by_global_norm()
        if self.before_step is not None:
            self.before_step(self)
        eng._exec_optimizer_step()
        eng._global_grad_norm = grad_norm  # DeepSpeed's optimizers store their own (stage-0-only) norm

        if self.holds_loss_stage:
            eng.total_loss = torch.stack([loss.float() for loss in result.losses]).sum()
        with torch.no_grad():
            eng.agg_train_loss = eng._aggregate_total_loss()
        _sync(self.device)
        wall = time.perf_counter() - t0
        self.steps += 1
        self._record(result, wall, tokens, grad_norm)
        if self._measuring:
            self._measure_step(result)
        return eng.agg_train_loss

    def _record(self, result: StepResult, wall: float, tokens: int, grad_norm: Any) -> None:
        eng = self.engine
        self.last_result = result
        stats = torch.tensor([result.bubble_fraction, result.busy_s, result.wall_s], dtype=torch.float64)
        stats = stats.to(self.device)
        gathered = [torch.zeros_like(stats) for _ in range(self.shape.pp)]
        torch.distributed.all_gather(gathered, stats, group=self.pipe_group)
        rows = torch.stack(gathered).cpu().tolist()
        bubbles = [row[0] for row in rows]
        pipeline_s = max(row[2] for row in rows)
        busy_max = max(row[1] for row in rows)
        norm = None
        if grad_norm is not None:
            norm = float(grad_norm)
        it = IterationStats(
            step=eng.global_steps,
            loss=float(eng.agg_train_loss),
            wall_s=wall,
            pipeline_s=pipeline_s,
            bubble=sum(bubbles) / len(bubbles),
            bubble_max=max(bubbles),
            tokens=tokens,
            tokens_per_s=tokens / wall if wall > 0 else 0.0,
            schedule=self.executor.schedule.name,
            grad_norm=norm,
            busy_max_s=busy_max,
        )
        self.history.append(it)
        if eng.global_rank == 0:
            args = (it.schedule, it.step, it.loss, it.tokens_per_s, 100 * it.bubble, 100 * it.bubble_max, it.wall_s)
            message = "interleaf %s step %d: loss %.4f, %.0f tokens/s, bubble %.1f%% (max %.1f%%), iteration %.3f s"
            logger.info(message, *args)
            every = eng.steps_per_print()
            if every and it.step % every == 0:  # also at DeepSpeed's own print cadence, through its logger
                from deepspeed.utils import logger as deepspeed_logger

                deepspeed_logger.info(message, *args)

    # ------------------------------------------------------------------ clipping
    def _grads_for_norm(self) -> tuple[list[torch.Tensor], list[torch.Tensor], bool]:
        """(tensors whose squares sum to this rank's share of the norm, tensors to clip, partitioned over dp)."""
        eng = self.engine
        opt = eng.optimizer
        if self._bf16:
            norm_tensors, _ = opt.get_grads_for_norm()
            return list(norm_tensors), list(opt.get_grads_for_norm(for_clipping=True)), False
        if self._zero:
            norm_tensors, clip_tensors = [], []
            for i, grads in enumerate(opt.averaged_gradients.values() if isinstance(opt.averaged_gradients, dict)
                                      else opt.averaged_gradients):
                if grads is None:
                    continue
                for g, p in zip(grads, opt.params_in_partition[i]):
                    clip_tensors.append(g)
                    if not getattr(p, "ds_pipe_replicated", False):
                        norm_tensors.append(g)
            return norm_tensors, clip_tensors, True
        params = [p for p in eng.module.parameters() if p.grad is not None]
        norm_tensors = [p.grad for p in params if not getattr(p, "ds_pipe_replicated", False)]
        return norm_tensors, [p.grad for p in params], False

    @torch.no_grad()
    def _clip_by_global_norm(self) -> torch.Tensor:
        """Global L2 norm of the gradients over every stage (tied weights once), unscaled; clips in place when
        ``gradient_clipping`` > 0. Non-finite norms are left to the optimizer's overflow check."""
        norm_tensors, clip_tensors, partitioned = self._grads_for_norm()
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        if norm_tensors:
            norms = torch._foreach_norm([t.detach() for t in norm_tensors], 2)
            total = total + torch.stack([n.float() for n in norms]).pow(2).sum()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.pipe_group)
        if partitioned and self.grid.data_parallel_size > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.grid.get_data_parallel_group())
        norm = total.sqrt() / self._loss_scale()
        self.engine._global_grad_norm = norm
        if self.max_grad_norm > 0:
            coef = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
            coef = torch.where(torch.isfinite(norm), coef, torch.ones_like(coef))
            for t in clip_tensors:
                t.mul_(coef.to(t.dtype))
        return norm

    # ------------------------------------------------------------------ measured warm-up (auto, retune)
    def _measure_step(self, result: StepResult) -> None:
        cfg = self.config
        self._samples.append(result.typical_seconds())
        self._memory.append(result.mean_memory_bytes())
        if self.steps < cfg.auto_warmup_iterations:
            return
        self._measuring = False
        # every rank's measurements, from all pipelines (data-parallel replicas, model-parallel slices): each
        # pipeline's rank 0 then plans from the same data, so all pipelines run the same schedule (ranks of one
        # stage in different pipelines would otherwise pick orders from their own noise)
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, (self._samples[1:] or self._samples, self._memory))
        schedule_box: list[Any] = [None]
        if self.rank == 0:
            schedule_box[0] = self._plan_auto(gathered) if cfg.schedule == "auto" else self._plan_retune(gathered)
        torch.distributed.broadcast_object_list(schedule_box, src=self.grid.stage_to_global(0), group=self.pipe_group)
        outcome = schedule_box[0]
        if isinstance(outcome, str):
            raise ValueError(outcome)
        schedule = self.executor.schedule if outcome is None else outcome
        if cfg.schedule != "auto":
            self.tuning = "kept" if outcome is None else "rebuilt"
        if schedule.splits_backward:
            for chunk in self.chunks.values():
                enable_weight_grad_split(chunk)
        # a new executor either way: the warm-up one times every action and reads memory around it. Its first step
        # needs no serialized run: the warm-up steps loaded every kernel these actions launch.
        self.executor = self._make_executor(schedule, self.p2p, serialize_first=False)
        if self.engine.global_rank == 0 and cfg.schedule == "auto":
            logger.info("interleaf auto: now running the schedule planned from the measured costs")

    def _plan_retune(self, gathered: list[Any]) -> Any:
        """On pipeline rank 0: ``self.config.schedule`` rebuilt from every rank's measurements when the simulator
        finds the rebuilt order faster under them (else None: keep running the current one)."""
        current = self.executor.schedule
        try:
            costs, _ = costs_from_ranks(gathered, self.shape)
            outcome = retune(current, costs)
        except ValueError as err:  # an optimisation only: training goes on with the order it has
            logger.warning("interleaf %s: not rebuilt from measured costs (%s); keeping the current order",
                           current.name, err)
            return None
        logger.info("interleaf %s: measured %s; %s", current.name, costs.describe(),
                    outcome.summary())
        return outcome.schedule if outcome.changed else None

    def _plan_auto(self, gathered: list[Any]) -> Any:
        """On pipeline rank 0: build the auto schedule from every rank's measurements (or an error message)."""
        shape = self.shape
        try:
            costs, measured_memory = costs_from_ranks(gathered, shape)
            limit = None
            if self.config.memory_limit_gib is not None and measured_memory:
                limit = self.config.memory_limit_gib * 2**30
            elif self.config.memory_limit_gib is not None:
                logger.warning("interleaf auto: no device memory measurements here (CPU); memory_limit_gib ignored")
            logger.info("interleaf auto: measured %s", costs.describe())
            # the model is partitioned already: search its placement only (a winner in the other one could not run)
            schedule = build_schedule("auto", pp=shape.pp, microbatches=shape.microbatches, vp=shape.vp, costs=costs,
                                      memory_limit=limit, placement=shape.placement)
        except ValueError as err:
            return f"interleaf auto schedule: {err}"
        return schedule

    def measured_cost_model(self) -> Any:
        """Cost model from the last step's measured F/I/W/B times of every pipeline rank (collective over the
        pipeline group), e.g. to simulate and draw the schedule as it ran."""
        gathered: list[Any] = [None] * self.shape.pp
        torch.distributed.all_gather_object(gathered, self.last_result.typical_seconds(), group=self.pipe_group)
        return measured_costs(gathered, self.shape)

    # ------------------------------------------------------------------ evaluation
    def _eval_executor(self, microbatches: int) -> PipelineExecutor:
        if microbatches not in self._eval:
            if self._eval_p2p is None:
                self._eval_p2p = P2PCommunicator.for_shape(
                    self.shape, list(self.grid.pp_group), group=self.pipe_group, device=self.device,
                    timeout_s=self.config.timeout_s,
                )
            if microbatches == self.plan.microbatches:
                schedule = self.executor.schedule
            else:
                name = "zb-v" if self.shape.placement == "v" else ("1f1b" if self.shape.vp == 1 else "interleaved-1f1b")
                schedule = build_schedule(name, pp=self.shape.pp, microbatches=microbatches, vp=self.shape.vp)
            self._eval[microbatches] = self._make_executor(schedule, self._eval_p2p)
        return self._eval[microbatches]

    def eval_batch(self, data_iter: Any, *, return_logits: bool, compute_loss: bool, reduce_output: Any,
                   bcast_loss: bool, num_micro_batches: int | None) -> Any:
        eng = self.engine
        m = self.plan.microbatches if num_micro_batches is None else num_micro_batches
        executor = self._eval_executor(m)
        eng.eval_return_logits = return_logits
        eng.module.eval()
        eng._compute_loss = compute_loss
        train_iterator = eng.data_iterator
        eng.set_dataiterator(data_iter)
        inputs, targets = self._load(m)
        dist.barrier()
        result = executor.run(inputs, targets if compute_loss else None, forward_only=True,
                              return_outputs=return_logits or not compute_loss)
        eval_output = None
        if self.holds_loss_stage:
            outputs = list(result.losses) if compute_loss else list(result.outputs)
            eng.fwd_outputs = outputs
            eval_output = eng._reduce_outputs(outputs, reduce=reduce_output, micro_batches=m)
        if compute_loss and (bcast_loss or eng.monitor.enabled):
            eval_output = eng._bcast_pipe_scalar(eval_output)
        eng.set_dataiterator(train_iterator)
        eng.eval_return_logits = False
        if return_logits:
            return eval_output, (list(result.outputs) if self.holds_loss_stage else None)
        return eval_output

    # ------------------------------------------------------------------ checkpoints
    def layout_record(self) -> dict[str, Any]:
        return {
            "schedule": self.executor.schedule.name,
            "pp": self.shape.pp,
            "vp": self.shape.vp,
            "placement": self.shape.placement,
            "parts": list(self.layout.parts),
        }

    def has_layer_optimizer_states(self, ckpt_dir: str) -> bool:
        """Whether ``ckpt_dir`` was written by the interleaf engine (layer-indexed optimizer state)."""
        return os.path.isfile(os.path.join(ckpt_dir, _LAYOUT_JSON))

    def _plain_optimizer(self) -> torch.optim.Optimizer | None:
        opt = self.engine.optimizer
        return opt if isinstance(opt, torch.optim.Optimizer) else None

    def _owned_layer_params(self) -> dict[int, dict[str, torch.nn.Parameter]]:
        """Layer index -> its trainable parameters this rank owns (a tied module once, under its first layer)."""
        from deepspeed.pipe import TiedLayerSpec

        module = self.engine.module
        canonical: dict[str, int] = {}
        for idx, spec in enumerate(module._layer_specs):
            if isinstance(spec, TiedLayerSpec):
                canonical.setdefault(spec.key, idx)
        out: dict[int, dict[str, torch.nn.Parameter]] = {}
        seen: set[int] = set()
        for idx, mod in sorted(module.layer_modules().items()):
            spec = module._layer_specs[idx]
            key_idx = canonical[spec.key] if isinstance(spec, TiedLayerSpec) else idx
            for name, p in mod.named_parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.setdefault(key_idx, {})[name] = p
        return out

    def _inner_state_keys(self) -> list[str]:
        """Optimizer-state keys of a DeepSpeed-wrapped optimizer (the same on every rank), 'step' excluded."""
        inner = getattr(self.engine.optimizer, "optimizer", None)
        keys: set[str] = set()
        if isinstance(inner, torch.optim.Optimizer):
            for state in inner.state.values():
                keys.update(k for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0)
        return sorted(keys)

    def _flat_master_partitions(self) -> list[torch.Tensor]:
        opt = self.engine.optimizer
        flat = getattr(opt, "fp32_groups_flat_partition", None)  # BF16_Optimizer
        if flat is None:
            flat = getattr(opt, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
        return list(flat or [])

    def _inner_step_value(self) -> Any:
        inner = getattr(self.engine.optimizer, "optimizer", None)
        for t in self._flat_master_partitions():
            step = inner.state.get(t, {}).get("step") if inner is not None else None
            if step is not None:
                return step.detach().cpu().clone() if torch.is_tensor(step) else step
        return None

    @torch.no_grad()
    def _materialize_optimizer_state(self) -> bool:
        """Create a DeepSpeed-wrapped optimizer's moment buffers before its first step (one zero-gradient step of
        the inner optimizer at lr 0: parameters unchanged) and link them to the parameters, so saved moments can
        be written into them. Returns False when that is not possible."""
        opt = self.engine.optimizer
        inner = getattr(opt, "optimizer", None)
        flat = self._flat_master_partitions()
        if not isinstance(inner, torch.optim.Optimizer) or not flat or not hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
            return False
        if not inner.state:
            lrs = [g["lr"] for g in inner.param_groups]
            for g in inner.param_groups:
                g["lr"] = 0.0
            for t in flat:
                t.grad = torch.zeros_like(t)
            inner.step()
            for t in flat:
                t.grad = None
            for g, lr in zip(inner.param_groups, lrs):
                g["lr"] = lr
        opt._lazy_init_hp_params_optimizer_state()
        return True

    def save_layer_optimizer_states(self, ckpt_dir: str) -> None:
        """Next to DeepSpeed's files: the layout, and per layer the optimizer state of its parameters (plain torch
        optimizers: their state; BF16_Optimizer / ZeRO-1: fp32 master weights and moments), so a checkpoint loads
        under any schedule. Collective over the data-parallel group (ZeRO partitions are gathered)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        eng = self.engine
        if eng.global_rank == 0:
            os.makedirs(ckpt_dir, exist_ok=True)
            with open(os.path.join(ckpt_dir, _LAYOUT_JSON), "w") as f:
                json.dump(self.layout_record(), f)
        opt = self._plain_optimizer()
        writer = self.grid.data_parallel_id == 0
        if writer:
            os.makedirs(ckpt_dir, exist_ok=True)
        keys = self._inner_state_keys() if opt is None else []
        group_of = {id(p): gi for gi, g in enumerate(opt.param_groups) for p in g["params"]} if opt else {}
        for idx, params in self._owned_layer_params().items():
            if any(getattr(p, "ds_pipe_replicated", False) for p in params.values()):
                continue  # the owning rank writes a tied module's state
            entry = {}
            for name, p in params.items():
                if opt is not None:
                    state = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v)
                             for k, v in opt.state.get(p, {}).items()}
                    gi = group_of.get(id(p))
                    hyper = {k: v for k, v in opt.param_groups[gi].items() if k != "params"} if gi is not None else {}
                    entry[name] = {"state": state, "group": hyper}
                else:
                    fp32 = safe_get_full_fp32_param(p)
                    state = {k: safe_get_full_optimizer_state(p, k) for k in keys}
                    entry[name] = {
                        "fp32": None if fp32 is None else fp32.detach().cpu(),
                        "state": {k: v.detach().cpu() for k, v in state.items() if v is not None},
                    }
            if writer:
                if opt is None:
                    entry["__inner_step__"] = self._inner_step_value()
                torch.save(entry, os.path.join(ckpt_dir, f"layer_{idx:02d}-{_OPTIM_SUFFIX}"))

    def load_layer_optimizer_states(self, ckpt_dir: str) -> None:
        """Inverse of :meth:`save_layer_optimizer_states` for this rank's (possibly different) layers."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        opt = self._plain_optimizer()
        group_of = {id(p): gi for gi, g in enumerate(opt.param_groups) for p in g["params"]} if opt else {}
        missing, moments_skipped = [], False
        materialized = opt is None and self._materialize_optimizer_state()
        inner_step = None
        for idx, params in self._owned_layer_params().items():
            path = os.path.join(ckpt_dir, f"layer_{idx:02d}-{_OPTIM_SUFFIX}")
            if not os.path.isfile(path):
                missing.append(idx)
                continue
            entry = torch.load(path, map_location="cpu", weights_only=False)
            if entry.get("__inner_step__") is not None:
                inner_step = entry["__inner_step__"]
            for name, p in params.items():
                saved = entry.get(name)
                if saved is None:
                    raise ValueError(f"{path} has no optimizer state for parameter {name!r} of layer {idx}")
                if opt is not None:
                    opt.state[p] = {k: (v.to(p.device) if torch.is_tensor(v) else v) for k, v in saved["state"].items()}
                    gi = group_of.get(id(p))
                    if gi is not None:
                        opt.param_groups[gi].update(saved["group"])
                    continue
                if "fp32" not in saved:
                    raise ValueError(f"{path} was written for a plain torch optimizer; this run uses "
                                     f"{type(self.engine.optimizer).__name__}: load with load_optimizer_states=False")
                mapping = getattr(p, "_hp_mapping", None)
                if saved["fp32"] is not None:
                    safe_set_full_fp32_param(p, saved["fp32"].to(p.device))
                for key, value in saved["state"].items():
                    if mapping is not None and key in getattr(mapping, "optim_fragment", {}):
                        safe_set_full_optimizer_state(p, value.to(p.device), key)
                    elif mapping is not None:
                        moments_skipped = True
        if materialized and inner_step is not None:
            inner = self.engine.optimizer.optimizer
            for t in self._flat_master_partitions():
                if "step" in inner.state.get(t, {}):
                    old = inner.state[t]["step"]
                    inner.state[t]["step"] = inner_step.to(old.device) if torch.is_tensor(old) else inner_step
        if missing:
            if opt is None and hasattr(self.engine.optimizer, "refresh_fp32_params"):
                self.engine.optimizer.refresh_fp32_params()
            raise ValueError(
                f"checkpoint {ckpt_dir} has no interleaf optimizer state for layers {missing}: it was not written by "
                "the interleaf engine; load it with load_optimizer_states=False"
            )
        if moments_skipped:
            logger.warning(
                "interleaf: %s has not stepped yet, so its moment buffers do not exist to be filled: fp32 master "
                "weights were restored, moments restart from zero", type(self.engine.optimizer).__name__,
            )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_copy(t: torch.Tensor, device: Any, *, copy: bool = True) -> torch.Tensor:
    """``t`` on ``device``, detached (a copy also when it is there already, unless ``copy=False``). Host to GPU
    goes through pinned memory without blocking: a plain ``.to("cuda")`` of pageable memory synchronizes the
    stream, so the host could not queue the step's first kernels while the copies run (torch's caching host
    allocator keeps the pinned block until its copy is done)."""
    device = torch.device(device)
    t = t.detach()
    if t.device == device:
        return t.clone() if copy else t
    if device.type == "cuda" and t.device.type == "cpu":
        # a caller's pinned buffer may be refilled in place by its loader before the copy runs: stage a copy
        staged = torch.empty_like(t, pin_memory=True).copy_(t) if t.is_pinned() else t.pin_memory()
        return staged.to(device, non_blocking=True)
    return t.to(device)


def _to_device(value: Any, device: Any) -> Any:
    if torch.is_tensor(value):
        return _device_copy(value, device, copy=False)
    if isinstance(value, (tuple, list)):
        return tuple(_to_device(v, device) for v in value)
    return value


def _to_device_input(value: Any, device: Any, reentrant: bool) -> Any:
    """First-stage input as DeepSpeed loads it: a detached copy on the device; floating tensors require grad
    under reentrant activation checkpointing (else the first checkpointed block is cut from autograd)."""
    if torch.is_tensor(value):
        t = _device_copy(value, device)
        if reentrant and t.is_floating_point():
            t.requires_grad_(True)
        return t
    if isinstance(value, (tuple, list)):
        return tuple(_to_device_input(v, device, reentrant) for v in value)
    return value
