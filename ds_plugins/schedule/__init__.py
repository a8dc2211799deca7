"""Torch-free pipeline schedule core: IR, cost model, generators, lowering, validation, simulation, pictures.

Nothing in this package imports torch; it runs (and is tested) without it.
"""
from .costs import CostModel
from .ir import Action, ActionKind, PipelineShape, Schedule
from .lowering import add_communication, merge_backward, strip_communication
from .simulate import DeadlockError, SimulationResult, simulate

__all__ = [
    "Action",
    "ActionKind",
    "CostModel",
    "DeadlockError",
    "PipelineShape",
    "Schedule",
    "SimulationResult",
    "add_communication",
    "merge_backward",
    "simulate",
    "strip_communication",
]
