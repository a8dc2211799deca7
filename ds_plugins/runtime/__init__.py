"""The pipeline runtime: one executor of lowered schedules, split backward, p2p. Used by both adapters.

See docs/runtime.md.
"""
from .executor import PipelineExecutor, SplitMode, StepResult, Timing, costs_from_ranks, measured_costs
from .p2p import MessageKey, P2PCommunicator
from .stages import StageModule, build_stage_modules, partition_layers
from .weight_grad import (
    WeightGradQueue,
    accumulate_into_grad,
    active_deferral,
    disable_weight_grad_split,
    enable_weight_grad_split,
    split_linear,
)

__all__ = [
    "MessageKey",
    "P2PCommunicator",
    "PipelineExecutor",
    "SplitMode",
    "StageModule",
    "StepResult",
    "Timing",
    "WeightGradQueue",
    "accumulate_into_grad",
    "active_deferral",
    "build_stage_modules",
    "disable_weight_grad_split",
    "enable_weight_grad_split",
    "costs_from_ranks",
    "measured_costs",
    "partition_layers",
    "split_linear",
]
