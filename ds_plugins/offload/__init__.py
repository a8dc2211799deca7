"""Interleaved optimizer-state offloading: a torch-free planner and the hybrid host/GPU AdamW executor.

``planner`` (torch-free) decides which parameter subgroups update on the GPU and which on the host;
``executor`` runs the split AdamW step; the DeepSpeed hook lives in ``ds_plugins.deepspeed.offload_optimizer``.
Importing this package does not import torch.
"""
from .planner import ByteModel, HardwareRates, OffloadPlan, Placement, PlanEstimate, SubgroupTiming, estimate, plan_offload
from .settings import offload_config_from_ds_config

__all__ = [
    "ByteModel",
    "HardwareRates",
    "OffloadPlan",
    "Placement",
    "PlanEstimate",
    "SubgroupTiming",
    "estimate",
    "plan_offload",
    "offload_config_from_ds_config",
]
