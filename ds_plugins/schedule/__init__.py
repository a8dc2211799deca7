"""Torch-free pipeline schedule core: IR, cost model, generators, lowering, validation, simulation, pictures.

Nothing in this package imports torch; it runs (and is tested) without it.
"""
from .costs import CostModel
from .ir import Action, ActionKind, PipelineShape, Schedule
from .lowering import add_communication, merge_backward, strip_communication
from .simulate import DeadlockError, LowerBound, SimulationResult, lower_bound, simulate

__all__ = [
    "Action",
    "ActionKind",
    "CostModel",
    "DeadlockError",
    "LowerBound",
    "PipelineShape",
    "Schedule",
    "SimulationResult",
    "add_communication",
    "lower_bound",
    "merge_backward",
    "simulate",
    "strip_communication",
]

# Validation, import/export and pictures (draw imports matplotlib only when a PNG is asked for).
from .validate import ScheduleError, validate  # noqa: E402
from .io import from_csv, from_json, to_csv, to_json  # noqa: E402
from .draw import ascii_timeline, chrome_trace, save_chrome_trace, save_png  # noqa: E402

__all__ += [
    "ScheduleError",
    "validate",
    "from_csv",
    "from_json",
    "to_csv",
    "to_json",
    "ascii_timeline",
    "chrome_trace",
    "save_chrome_trace",
    "save_png",
]

# Generators by name (one module per schedule under generators/).
from .registry import COST_TUNED, SCHEDULE_NAMES, Retuned, build_schedule, retune, schedule_shape  # noqa: E402

__all__ += ["COST_TUNED", "Retuned", "SCHEDULE_NAMES", "build_schedule", "retune", "schedule_shape"]
