"""Interleaved optimizer-state offloading: a torch-free planner and the hybrid host/GPU AdamW executor.

``planner`` (torch-free) decides which parameter subgroups update on the GPU and which on the host; ``replan``
(torch-free) recalibrates it from what training measures and decides when to plan again; ``executor`` runs the
split AdamW step; the DeepSpeed hook lives in ``ds_plugins.deepspeed.offload_optimizer``.
Importing this package does not import torch.
"""
from .planner import (
    ByteModel,
    HardwareRates,
    OffloadPlan,
    Placement,
    PlanEstimate,
    SubgroupTiming,
    estimate,
    fit_host_rate,
    plan_offload,
    uniform_timings,
)
from .replan import IterationObservation, PlanningContext, ReplanRequest, Replanner
from .settings import offload_config_from_ds_config

__all__ = [
    "ByteModel",
    "HardwareRates",
    "OffloadPlan",
    "Placement",
    "PlanEstimate",
    "SubgroupTiming",
    "estimate",
    "fit_host_rate",
    "plan_offload",
    "uniform_timings",
    "IterationObservation",
    "PlanningContext",
    "ReplanRequest",
    "Replanner",
    "offload_config_from_ds_config",
]
