"""interleaf for megatron-core: zero-bubble and V pipeline schedules behind megatron's own entry points.

Usage (megatron-core 0.16.x)::

    import megatron_patches
    megatron_patches.apply("zb-v")            # or apply() + --pipeline-schedule zb-v via extra_args_provider
    ...
    forward_backward_func = get_forward_backward_func()   # now runs interleaf's schedule
    losses = forward_backward_func(forward_step_func=..., data_iterator=..., model=..., ...)
    megatron_patches.remove()                 # megatron's own schedules again

V schedules (zb-v, v-half, v-min) need the chunks in V placement: build them with
:func:`build_model_chunks` (the one change in a training script). See docs/megatron.md.

:func:`apply` patches:

- ``get_forward_backward_func`` in ``megatron.core.pipeline_parallel`` and ``...pipeline_parallel.schedules``,
  and in every already-imported module that holds the name (``from megatron.core.pipeline_parallel import
  get_forward_backward_func`` done before ``apply()``, e.g. ``megatron.training.training``);
- ``LinearWithGradAccumulationAndAsyncCommunication.backward`` (weight-gradient deferral in I passes only; when
  no interleaf schedule runs, megatron's original backward runs).

Importing this package imports neither torch nor megatron.
"""
from __future__ import annotations

import logging
import sys
from typing import Optional

from .arguments import (
    SCHEDULE_NAMES,
    MegatronScheduleConfig,
    config_from_args,
    extra_args_provider,
)

__all__ = [
    "SCHEDULE_NAMES",
    "MegatronScheduleConfig",
    "apply",
    "build_model_chunks",
    "config_from_args",
    "extra_args_provider",
    "is_applied",
    "remove",
]

logger = logging.getLogger(__name__)

_state: dict = {}


def build_model_chunks(model_provider_func):
    """V placement chunks ``[stage r, stage 2*pp-1-r]`` for this rank (see :mod:`megatron_patches.placement`)."""
    from .placement import build_model_chunks as _build

    return _build(model_provider_func)


def _schedule_from_megatron_args() -> Optional[MegatronScheduleConfig]:
    """``--pipeline-schedule`` from megatron.training's parsed args, when megatron.training is in use."""
    module = sys.modules.get("megatron.training.global_vars")
    if module is None or getattr(module, "_GLOBAL_ARGS", None) is None:
        return None
    return config_from_args(module._GLOBAL_ARGS)


def _current_config() -> Optional[MegatronScheduleConfig]:
    config = _state.get("config")
    if config is not None:
        return config
    return _schedule_from_megatron_args()


def apply(schedule: Optional[str] = None, *, memory_limit_gib: Optional[float] = None,
          measured_costs: bool = True, cuda_graphs: bool = False) -> None:
    """Route megatron's ``get_forward_backward_func()`` to interleaf's ``schedule``.

    With ``schedule=None`` the schedule comes from megatron.training's ``--pipeline-schedule`` flag (added by
    :func:`extra_args_provider`); when that is unset too, megatron's own schedules are used. Calling again
    changes the schedule. ``measured_costs=False`` keeps zb-h1/zb-h2/zb-v in their F = I = W order (default: rebuilt
    from the F/I/W times measured in the first training steps when that simulates faster). ``cuda_graphs=True``
    captures every action of the final order as a CUDA graph and replays them (:mod:`megatron_patches.cuda_graphs`).
    Raises ``ValueError`` for an unknown name or a bad flag combination.
    """
    config = None
    if schedule is not None:
        config = MegatronScheduleConfig(schedule=schedule, memory_limit_gib=memory_limit_gib,
                                        measured_costs=measured_costs, cuda_graphs=cuda_graphs)
    elif memory_limit_gib is not None:
        raise ValueError("memory_limit_gib needs schedule='auto'")
    elif cuda_graphs:
        raise ValueError("cuda_graphs needs a schedule (it graphs interleaf's actions)")
    _unwrap_graphed_chunks()
    _state["config"] = config
    _state["funcs"] = {}
    if _state.get("applied"):
        return

    from megatron.core import pipeline_parallel
    from megatron.core.pipeline_parallel import schedules
    from ds_plugins.runtime import active_deferral

    from . import linear_weight_grad

    original = schedules.get_forward_backward_func
    _state["original"] = original

    def get_forward_backward_func(pp_size: Optional[int] = None, vp_size: Optional[int] = None):
        """megatron's ``get_forward_backward_func`` with interleaf's schedule when one is chosen."""
        func = original(pp_size, vp_size)
        current = _current_config()
        if current is None or func is schedules.forward_backward_no_pipelining:
            return func
        funcs = _state["funcs"]
        key = (current, func)
        if key not in funcs:
            from ds_plugins.schedule.registry import build_schedule

            from .forward_backward import make_forward_backward_func

            funcs[key] = make_forward_backward_func(current, build_schedule=build_schedule, fallback=func)
        return funcs[key]

    get_forward_backward_func.__doc__ = original.__doc__
    get_forward_backward_func.interleaf_original = original  # type: ignore[attr-defined]
    _state["patched"] = get_forward_backward_func
    holders = [schedules, pipeline_parallel] + [
        module for module in list(sys.modules.values())
        if _holds(module, original) and module is not schedules and module is not pipeline_parallel
    ]
    for module in holders:
        module.get_forward_backward_func = get_forward_backward_func
    _state["holders"] = holders

    def collecting():
        target = active_deferral()
        return None if target is None else target.put

    linear_weight_grad.install(collecting)
    _state["applied"] = True
    logger.info("interleaf megatron patches applied (schedule: %s)", config.schedule if config else "from args")


def remove() -> None:
    """Undo :func:`apply`: every patched module gets megatron's own ``get_forward_backward_func`` back."""
    if not _state.get("applied"):
        _state.clear()
        return
    from . import linear_weight_grad

    original = _state["original"]
    patched = _state["patched"]
    for module in _state["holders"]:
        if getattr(module, "get_forward_backward_func", None) is patched:
            module.get_forward_backward_func = original
    # Modules that imported the patched name while applied.
    for module in list(sys.modules.values()):
        if _holds(module, patched):
            module.get_forward_backward_func = original
    linear_weight_grad.uninstall()
    _unwrap_graphed_chunks()
    _state.clear()


def _unwrap_graphed_chunks() -> None:
    """Every model chunk wrapped for ``cuda_graphs`` gets its own ``forward`` back (its runner wraps it again at
    its next step and replays the graphs it captured)."""
    from .cuda_graphs import uninstall_all

    uninstall_all()


def _holds(module, func) -> bool:
    """Whether ``module`` has ``func`` bound to the name ``get_forward_backward_func``."""
    try:
        return vars(module).get("get_forward_backward_func") is func
    except TypeError:  # objects in sys.modules without a __dict__
        return False


def is_applied() -> bool:
    return bool(_state.get("applied"))
