"""DeepSpeed adapter for interleaf's pipeline schedules.

:func:`install` swaps ``deepspeed.PipelineEngine`` (the class ``deepspeed.initialize`` builds for a
``PipelineModule``) for :class:`InterleafPipelineEngine`. Without an ``"interleaf": {"pipeline": ...}`` block in
the DeepSpeed config the subclass is a pure pass-through. With it:

1. the config is checked and the schedule built (torch-free) **before** any process-group work: a bad value
   raises ``ValueError`` naming the fix on every rank;
2. the user's ``PipelineModule`` (built with ``num_stages = pp``) is re-partitioned into this rank's ``vp``
   chunks with the placement the schedule needs (:mod:`ds_plugins.deepspeed.partition`);
3. ``train_batch`` runs the one executor (:mod:`ds_plugins.runtime`) over the rank's chunks, drains the deferred
   weight gradients, then uses DeepSpeed's own machinery for tied-weight and data-parallel gradient reduction,
   loss scaling / overflow skip and the optimizer step (fp32, bf16, fp16, ZeRO-1). Gradient clipping uses the
   global norm over all stages (DeepSpeed's pipeline path sums only stage 0's gradients into its norm).

The adapter holds no schedule logic: the schedule comes from :func:`ds_plugins.schedule.registry.build_schedule`
and the executor runs it.
"""
from __future__ import annotations

import functools
import inspect
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from ..config import CONFIG_KEY

__all__ = ["install", "uninstall", "InterleafPipelineEngine", "PipelinePlan", "plan_pipeline"]

logger = logging.getLogger(__name__)

_ORIGINAL: dict[str, Any] = {}
_V_SCHEDULES = ("zb-v", "v-half", "v-min")
_LAYOUT_FILE = "interleaf_layer_optim_states"


# ---------------------------------------------------------------------------------------------- install


def install() -> None:
    """Make ``deepspeed.initialize`` build :class:`InterleafPipelineEngine` for ``PipelineModule``s."""
    import deepspeed
    from deepspeed.runtime.pipe import module as pipe_module

    if "engine" in _ORIGINAL:
        return
    _ORIGINAL["engine"] = deepspeed.PipelineEngine
    _ORIGINAL["module_init"] = pipe_module.PipelineModule.__init__
    _ORIGINAL["initialize"] = deepspeed.initialize
    deepspeed.PipelineEngine = _engine_class()
    pipe_module.PipelineModule.__init__ = _recording_module_init(_ORIGINAL["module_init"])
    deepspeed.initialize = _checking_initialize(_ORIGINAL["initialize"])


def uninstall() -> None:
    """Give DeepSpeed its own ``PipelineEngine`` (and ``PipelineModule.__init__``) back."""
    import deepspeed
    from deepspeed.runtime.pipe import module as pipe_module

    if "engine" not in _ORIGINAL:
        return
    deepspeed.PipelineEngine = _ORIGINAL.pop("engine")
    pipe_module.PipelineModule.__init__ = _ORIGINAL.pop("module_init")
    deepspeed.initialize = _ORIGINAL.pop("initialize")


def _config_dict(config: Any) -> Mapping[str, Any] | None:
    """The DeepSpeed config as a dict when it is one or a readable JSON file; None otherwise (not checked)."""
    if isinstance(config, Mapping):
        return config
    if isinstance(config, (str, os.PathLike)) and os.path.isfile(config):
        import json

        try:
            with open(config) as f:
                loaded = json.load(f)
        except (OSError, ValueError):
            return None
        return loaded if isinstance(loaded, Mapping) else None
    return None


def _checking_initialize(original):
    """``deepspeed.initialize`` that refuses an ``"interleaf": {"pipeline": ...}`` block on a model that is not a
    ``PipelineModule`` (DeepSpeed would build a plain engine and the schedule would silently not run)."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def initialize(*args, **kwargs):
        from deepspeed.runtime.pipe.module import PipelineModule

        bound = signature.bind_partial(*args, **kwargs).arguments
        model = bound.get("model")
        config = bound.get("config") or bound.get("config_params")
        if config is None and bound.get("args") is not None:
            config = getattr(bound["args"], "deepspeed_config", None)
        block = (_config_dict(config) or {}).get(CONFIG_KEY)
        if isinstance(block, Mapping) and block.get("pipeline") is not None and model is not None \
                and not isinstance(model, PipelineModule):
            raise ValueError(
                f'the DeepSpeed config has "{CONFIG_KEY}": {{"pipeline": ...}} but the model is a '
                f"{type(model).__name__}, not a deepspeed.pipe.PipelineModule: build the model as a PipelineModule "
                f'(num_stages = pp) or remove the "pipeline" block'
            )
        return original(*args, **kwargs)

    return initialize


def _recording_module_init(original):
    """``PipelineModule.__init__`` that also remembers ``partition_method`` (DeepSpeed does not keep it), so the
    re-partition into pp*vp chunks uses the user's method. Otherwise unchanged."""
    signature = inspect.signature(original)

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        try:
            bound = signature.bind(self, *args, **kwargs)
            method = bound.arguments.get("partition_method", "parameters")
        except TypeError:
            method = "parameters"
        self._interleaf_partition_method = method

    __init__.__wrapped__ = original  # type: ignore[attr-defined]
    return __init__


# ---------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True, slots=True)
class PipelinePlan:
    """What the config asks for, checked: the schedule (compute actions, all ranks) and its shape."""

    config: Any  # PipelineConfig
    schedule: Any  # ds_plugins.schedule.ir.Schedule
    microbatches: int

    @property
    def shape(self):
        return self.schedule.shape


def _default_vp(schedule: str) -> int:
    return 2 if schedule == "interleaved-1f1b" or schedule in _V_SCHEDULES else 1


def plan_pipeline(
    pipeline_config: Any,
    *,
    pp: int,
    microbatches: int,
    zero_stage: int = 0,
    model_parallel_size: int = 1,
    schedule_name: str | None = None,
) -> PipelinePlan:
    """Check the ``interleaf.pipeline`` block against the DeepSpeed setup and build the (first) schedule.

    Torch-free and collective-free: every rank raises the same ``ValueError`` before any process-group work.
    ``auto`` starts from ``zb-v`` (its warm-up schedule; ``zb-h1`` with ``virtual_stages`` 1, interleaved-1f1b
    with more) with the same shape the final plan will use.
    """
    from ..schedule.registry import build_schedule

    cfg = pipeline_config
    if zero_stage >= 2:
        raise ValueError(
            f"ZeRO stage {zero_stage} cannot be combined with pipeline parallelism (DeepSpeed refuses it too): "
            'set "zero_optimization": {"stage": 0} or {"stage": 1}'
        )
    if model_parallel_size != 1:
        raise ValueError(
            "interleaf pipeline schedules support pipe x data parallel topologies only; this PipelineModule has "
            f"a model (tensor-slicing) dimension of {model_parallel_size}: remove the interleaf block or the "
            "model axis of the topology"
        )
    if pp < 2:
        raise ValueError(f"pipeline schedules need at least 2 pipeline stages (num_stages={pp}); build the "
                         "PipelineModule with num_stages >= 2 or remove the interleaf block")
    name = schedule_name or cfg.schedule
    if cfg.memory_limit_gib is not None and cfg.schedule != "auto":
        raise ValueError(
            f"memory_limit_gib applies to schedule 'auto' only (schedule is {cfg.schedule!r}): set "
            '"schedule": "auto" or "memory_limit_gib": null'
        )
    # auto: 2 chunks in V by default (its search then covers zb-v, v-half, v-min and greedy V orders: on 2x H100
    # zb-v ran fastest of all; one chunk per rank leaves it zb-h1/zb-h2-like orders only)
    vp = cfg.virtual_stages if cfg.virtual_stages is not None else (2 if name == "auto" else _default_vp(name))
    if name == "auto":
        name = "zb-h1" if vp == 1 else ("zb-v" if vp == 2 else "interleaved-1f1b")
    if name in ("1f1b", "zb-h1", "zb-h2") and vp != 1:
        raise ValueError(f"schedule {name!r} runs one chunk per rank: set virtual_stages to 1 or null (got {vp})")
    if name in _V_SCHEDULES and vp != 2:
        raise ValueError(f"schedule {name!r} puts exactly 2 chunks on each rank (V shape): set virtual_stages to 2 "
                         f"or null (got {vp})")
    try:
        schedule = build_schedule(name, pp=pp, microbatches=microbatches, vp=vp)
    except ValueError as err:
        raise ValueError(
            f"interleaf pipeline schedule {name!r} with pp={pp}, vp={vp}, {microbatches} micro-batches "
            f"(gradient_accumulation_steps): {err}"
        ) from err
    return PipelinePlan(config=cfg, schedule=schedule, microbatches=microbatches)


def _read_block(config_class: Any):
    from ..config import InterleafConfig

    param_dict = getattr(config_class, "_param_dict", None) or {}
    return InterleafConfig.from_ds_config(param_dict).pipeline


# ---------------------------------------------------------------------------------------------- engine

_ENGINE_CLASS: type | None = None


def _engine_class() -> type:
    global _ENGINE_CLASS
    if _ENGINE_CLASS is None:
        _ENGINE_CLASS = _make_engine_class()
    return _ENGINE_CLASS


def __getattr__(name: str):  # InterleafPipelineEngine is built lazily (importing it imports DeepSpeed)
    if name == "InterleafPipelineEngine":
        return _engine_class()
    raise AttributeError(name)


def _make_engine_class() -> type:
    import torch
    from deepspeed import comm as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.pipe.engine import PipelineEngine
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from . import _runner
    from .partition import chunk_layout, repartition

    class InterleafPipelineEngine(PipelineEngine):
        """``PipelineEngine`` that runs interleaf's schedules when the config has an ``interleaf.pipeline``
        block, and is DeepSpeed's own engine otherwise."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            object.__setattr__(self, "_interleaf", None)
            config_class = kwargs.get("config_class")
            pipe_cfg = _read_block(config_class) if config_class is not None else None
            if pipe_cfg is None:
                super().__init__(*args, **kwargs)
                return
            module = kwargs.get("model")
            if module is None:
                raise ValueError("deepspeed.initialize(model=...) needs the PipelineModule")
            grid = module._grid
            plan = plan_pipeline(
                pipe_cfg,
                pp=grid.pipe_parallel_size,
                microbatches=config_class.gradient_accumulation_steps,
                zero_stage=int(config_class.zero_optimization_stage),
                model_parallel_size=grid.model_parallel_size,
            )
            method = getattr(module, "_interleaf_partition_method", None)
            if method is None:
                method = "parameters"
                logger.warning(
                    "interleaf: the PipelineModule was built before ds_plugins was imported, so its "
                    "partition_method is unknown; re-partitioning with 'parameters' (import ds_plugins first)"
                )
            layout = chunk_layout(module._layer_specs, plan.shape, method)

            # ---- process-group work starts here
            device = get_accelerator().device_name(module.local_rank)
            old_params = {id(p) for p in module.parameters()}  # ids only: the old layers must be freed
            old_param_layer = _param_layer_keys(module)
            chunks = repartition(module, layout, device)
            kwargs["model_parameters"] = _remap_parameters(kwargs.get("model_parameters"), module, old_params,
                                                           old_param_layer)
            if kwargs.get("optimizer") is not None and isinstance(kwargs["optimizer"], torch.optim.Optimizer):
                _remap_client_optimizer(kwargs["optimizer"], module, old_params, old_param_layer)
            super().__init__(*args, **kwargs)

            runner = _runner.ScheduleRunner(self, plan, layout, chunks)
            object.__setattr__(self, "_interleaf", runner)
            # We clip by the cross-stage norm ourselves; DeepSpeed's optimizers must not clip again.
            runner.max_grad_norm = float(self._config.gradient_clipping or 0.0)
            if hasattr(self.optimizer, "clip_grad"):
                self.optimizer.clip_grad = 0.0

        # -- topology seen by DeepSpeed's loss aggregation and data loading
        def is_last_stage(self) -> bool:
            runner = self._interleaf
            if runner is None:
                return super().is_last_stage()
            return runner.holds_loss_stage

        def is_first_stage(self) -> bool:
            runner = self._interleaf
            if runner is None:
                return super().is_first_stage()
            return runner.holds_first_stage

        def _loss_stage_global_rank(self) -> int:
            runner = self._interleaf
            if runner is None:
                return super()._loss_stage_global_rank()
            return runner.loss_global_rank

        def gradient_clipping(self):
            runner = self._interleaf
            if runner is None:
                return super().gradient_clipping()
            return 0.0  # clipping is done by the runner with the cross-stage norm

        # -- training and evaluation
        def train_batch(self, data_iter=None):
            runner = self._interleaf
            if runner is None:
                return super().train_batch(data_iter)
            return runner.train_batch(data_iter)

        def eval_batch(self, data_iter, return_logits=False, compute_loss=True, reduce_output="avg",
                       bcast_loss=True, num_micro_batches=None):
            runner = self._interleaf
            if runner is None:
                return super().eval_batch(data_iter, return_logits, compute_loss, reduce_output, bcast_loss,
                                          num_micro_batches)
            return runner.eval_batch(data_iter, return_logits=return_logits, compute_loss=compute_loss,
                                     reduce_output=reduce_output, bcast_loss=bcast_loss,
                                     num_micro_batches=num_micro_batches)

        # -- checkpoints: DeepSpeed's layer files plus layer-indexed optimizer state (schedule independent)
        def save_checkpoint(self, save_dir, tag=None, client_state={}, save_latest=True,
                            exclude_frozen_parameters=False):
            runner = self._interleaf
            result = super().save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=save_latest,
                                             exclude_frozen_parameters=exclude_frozen_parameters)
            if runner is not None:
                if tag is None:
                    tag = f"global_step{self.global_steps}"
                runner.save_layer_optimizer_states(os.path.join(save_dir, str(tag)))
                dist.barrier()
            return result

        def load_checkpoint(self, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                            load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
            runner = self._interleaf
            if runner is None:
                return super().load_checkpoint(load_dir, tag, load_module_strict, load_optimizer_states,
                                               load_lr_scheduler_states, load_module_only, custom_load_fn)
            if tag is None:
                latest = os.path.join(load_dir, "latest")
                if os.path.isfile(latest):
                    with open(latest) as f:
                        tag = f.read().strip()
            ckpt_dir = os.path.join(load_dir, str(tag))
            # Written by interleaf: optimizer state is layer-indexed (any schedule). Otherwise (DeepSpeed's own
            # engine wrote it) DeepSpeed loads it, which works when the rank layout is the same (1f1b).
            layer_indexed = runner.has_layer_optimizer_states(ckpt_dir)
            result = super().load_checkpoint(load_dir, tag, load_module_strict,
                                             load_optimizer_states=load_optimizer_states and not layer_indexed,
                                             load_lr_scheduler_states=load_lr_scheduler_states,
                                             load_module_only=load_module_only, custom_load_fn=custom_load_fn)
            if result[0] is not None and not load_module_only:
                if load_optimizer_states and layer_indexed:
                    runner.load_layer_optimizer_states(ckpt_dir)
                elif not load_optimizer_states and hasattr(self.optimizer, "refresh_fp32_params"):
                    self.optimizer.refresh_fp32_params()  # fp32 masters from the loaded weights
            return result

        @property
        def interleaf_runner(self):
            """The schedule runner (None when the config has no interleaf block)."""
            return self._interleaf

    InterleafPipelineEngine.__module__ = __name__
    InterleafPipelineEngine.__qualname__ = "InterleafPipelineEngine"
    _runner.register_optimizer_types(BF16_Optimizer, DeepSpeedZeroOptimizer)
    return InterleafPipelineEngine


# ---------------------------------------------------------------------------------------------- parameters


def _param_layer_keys(module) -> dict[int, tuple[str, str]]:
    """id(param) -> (layer class name, parameter name inside the layer) for the layers built now."""
    import torch.nn as nn

    out: dict[int, tuple[str, str]] = {}
    for func in module.forward_funcs:
        mod = func if isinstance(func, nn.Module) else getattr(func, "args", (None,))[0]
        if isinstance(mod, nn.Module):
            for pname, p in mod.named_parameters():
                out.setdefault(id(p), (type(mod).__name__, pname))
    return out


def _new_param_keys(module) -> list[tuple[Any, tuple[str, str]]]:
    import torch.nn as nn

    seen: set[int] = set()
    out = []
    for funcs in module._interleaf_chunk_funcs:
        for func in funcs:
            mod = func if isinstance(func, nn.Module) else getattr(func, "args", (None,))[0]
            if isinstance(mod, nn.Module):
                for pname, p in mod.named_parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        out.append((p, (type(mod).__name__, pname)))
    for p in module.parameters():  # anything registered outside the layers
        if id(p) not in seen:
            seen.add(id(p))
            out.append((p, ("", "")))
    return out


def _group_of_new_params(groups_of_old: list[set[int]], module, old_param_layer) -> list[list[Any]]:
    """Assign each parameter of the re-partitioned module to the param group its kind was in before."""
    key_to_group: dict[tuple[str, str], int] = {}
    for gi, ids in enumerate(groups_of_old):
        for pid in ids:
            key = old_param_layer.get(pid)
            if key is not None:
                key_to_group.setdefault(key, gi)
    new_groups: list[list[Any]] = [[] for _ in groups_of_old]
    for p, key in _new_param_keys(module):
        if not p.requires_grad:
            continue
        gi = key_to_group.get(key)
        if gi is None:
            if len(groups_of_old) == 1:
                gi = 0
            else:
                raise ValueError(
                    f"interleaf re-partitions the PipelineModule, and cannot tell which of your {len(groups_of_old)} "
                    f"parameter groups a parameter {key[1]!r} of layer type {key[0]!r} belongs to (no such layer "
                    "was on this rank before): pass model_parameters=None (or module.parameters()), or build param "
                    "groups after deepspeed.initialize"
                )
        new_groups[gi].append(p)
    return new_groups


def _remap_parameters(model_parameters, module, old_params, old_param_layer):
    """``model_parameters`` given for the pp-stage module, rewritten for the re-partitioned one."""
    if model_parameters is None:
        return None
    items = list(model_parameters)  # a generator over module.parameters() is consumed here
    if not items:
        return items
    if all(isinstance(x, dict) for x in items):
        groups_old = [{id(p) for p in g["params"]} for g in items]
        new = _group_of_new_params(groups_old, module, old_param_layer)
        out = []
        for g, params in zip(items, new):
            g2 = dict(g)
            g2["params"] = params
            out.append(g2)
        return out
    ids = {id(p) for p in items}
    if ids and not ids & old_params and not ids - {id(p) for p in module.parameters()}:
        return items  # already the new parameters (a lazy generator)
    return [p for p in module.parameters() if p.requires_grad]


def _remap_client_optimizer(optimizer, module, old_params, old_param_layer) -> None:
    if any(len(s) for s in optimizer.state.values()):
        raise ValueError("interleaf re-partitions the PipelineModule: pass an optimizer that has not stepped yet "
                         "(or a DeepSpeed 'optimizer' config section)")
    groups_old = [{id(p) for p in g["params"]} for g in optimizer.param_groups]
    new = _group_of_new_params(groups_old, module, old_param_layer)
    for g, params in zip(optimizer.param_groups, new):
        g["params"] = params
    optimizer.state.clear()
