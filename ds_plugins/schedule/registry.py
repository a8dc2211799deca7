"""Schedules by name: the one entry point the CLI and the runtimes use.

``schedule_shape(name, pp=, microbatches=, vp=)`` gives the pipeline shape a schedule runs on (default ``vp`` and
placement per schedule); ``build_schedule(...)`` returns its compute actions (F/B/I/W). Defaults:

=====================  ==========  ==========================================================
name                   default vp  placement / notes
=====================  ==========  ==========================================================
1f1b                   1           loop; vp must be 1
interleaved-1f1b       2           loop; vp >= 2; microbatches >= pp
zb-h1, zb-h2           1           loop; vp must be 1
zb-v, v-half, v-min    2           V; vp must be 2
auto                   2           V when vp == 2 (searches loop too; the result's shape says
                                   which won), loop otherwise; with ``costs`` and no ``vp``,
                                   vp = costs stages / pp
=====================  ==========  ==========================================================

``retune(schedule, costs)``: the zero-bubble schedules (:data:`COST_TUNED`) are greedy orders built for a cost
model; built for F = I = W (the default) they can run far from zero bubble when the real times differ (measured on
H100, GPT layers: I ~ 2.2 F, W ~ 1.1 F, because attention's backward is in I; simulated zb-v at pp=4, m=8: 31%
bubble instead of 6%). ``retune`` rebuilds the schedule from measured costs with its own generator and memory
budget and keeps whichever of the two the simulator finds faster under those costs.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from .costs import CostModel
from .generators.auto import auto
from .generators.interleaved_1f1b import interleaved_1f1b
from .generators.list_scheduler import MICROBATCHES_PER_RANK, memory_cap, zero_bubble_schedule
from .generators.one_f_one_b import one_f_one_b
from .generators.v_half import v_half
from .generators.v_min import v_min
from .generators.zb_h1 import zb_h1
from .generators.zb_h2 import zb_h2
from .generators.zb_v import zb_v
from .ir import PipelineShape, Schedule
from .simulate import LowerBound, SimulationResult, lower_bound, simulate

__all__ = ["COST_TUNED", "SCHEDULE_NAMES", "Retuned", "build_schedule", "retune", "schedule_shape"]

SCHEDULE_NAMES: tuple[str, ...] = ("1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v", "v-half", "v-min", "auto")

_GENERATORS: dict[str, Callable[[PipelineShape, CostModel], Schedule]] = {
    "1f1b": one_f_one_b,
    "interleaved-1f1b": interleaved_1f1b,
    "zb-h1": zb_h1,
    "zb-h2": zb_h2,
    "zb-v": zb_v,
    "v-half": v_half,
    "v-min": v_min,
}
COST_TUNED: tuple[str, ...] = ("zb-h1", "zb-h2", "zb-v")
"""Schedules whose order depends on the cost model (greedy list schedules): :func:`retune` rebuilds them from measured
costs. 1f1b, interleaved-1f1b, v-half and v-min have fixed orders; ``auto`` searches from measured costs itself."""
_ONE_CHUNK = ("1f1b", "zb-h1", "zb-h2")
_V_SHAPED = ("zb-v", "v-half", "v-min")
_EPS = 1e-9


def _check_name(name: str) -> None:
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"unknown schedule {name!r}: pick one of {', '.join(SCHEDULE_NAMES)}")


def schedule_shape(name: str, *, pp: int, microbatches: int, vp: int | None = None) -> PipelineShape:
    """The pipeline shape ``name`` runs on; raises ``ValueError`` saying what to change if it cannot."""
    _check_name(name)
    if pp < 1:
        raise ValueError(f"pp must be >= 1, got {pp}")
    if microbatches < 1:
        raise ValueError(f"microbatches must be >= 1, got {microbatches}")
    if vp is not None and vp < 1:
        raise ValueError(f"vp must be >= 1, got {vp}")
    if name in _ONE_CHUNK:
        if vp not in (None, 1):
            alt = "interleaved-1f1b" if name == "1f1b" else "zb-v"
            raise ValueError(f"{name} runs one chunk per rank: drop vp or set vp=1 (got vp={vp}); for more chunks use {alt}")
        return PipelineShape(pp=pp, microbatches=microbatches, vp=1, placement="loop")
    if name == "interleaved-1f1b":
        vp = 2 if vp is None else vp
        if vp < 2:
            raise ValueError(f"interleaved-1f1b needs vp >= 2 chunks per rank (got vp={vp}); use 1f1b for vp=1")
        if microbatches < pp:
            raise ValueError(
                f"interleaved-1f1b needs microbatches >= pp ({microbatches} < {pp}); raise microbatches to >= {pp}"
            )
        return PipelineShape(pp=pp, microbatches=microbatches, vp=vp, placement="loop")
    if name in _V_SHAPED:
        if vp not in (None, 2):
            raise ValueError(f"{name} uses V placement with exactly 2 chunks per rank: drop vp or set vp=2 (got vp={vp})")
        return PipelineShape(pp=pp, microbatches=microbatches, vp=2, placement="v")
    # auto
    vp = 2 if vp is None else vp
    return PipelineShape(pp=pp, microbatches=microbatches, vp=vp, placement="v" if vp == 2 else "loop")


def build_schedule(
    name: str,
    *,
    pp: int,
    microbatches: int,
    vp: int | None = None,
    costs: CostModel | None = None,
    memory_limit: float | None = None,
    placement: str | None = None,
) -> Schedule:
    """Build schedule ``name`` (compute actions only: F/B/I/W).

    ``costs`` defaults to :meth:`CostModel.uniform` of the shape; its stage count must be pp * vp. Without
    ``vp``, a given ``costs`` fixes it (stages / pp) for schedules that allow that vp. ``memory_limit`` is a
    per-rank activation-memory cap in the cost model's units: ``auto`` searches under it (default: 1F1B's peak);
    a handcrafted schedule whose peak exceeds it raises ``ValueError`` naming what fits. ``placement``
    (``"loop"`` or ``"v"``, ``auto`` only): the placement the model is already partitioned for; ``auto`` then
    searches that placement alone instead of both (with vp = 2).
    """
    _check_name(name)
    if placement is not None and name != "auto":
        raise ValueError(f"placement applies to 'auto' only; {name} fixes its own placement")
    if memory_limit is not None and not memory_limit > 0:
        raise ValueError(f"memory_limit must be a positive number (activation memory per rank), got {memory_limit}")
    if costs is not None and vp is None and name in ("auto", "interleaved-1f1b") and pp >= 1:
        if costs.num_stages % pp == 0 and costs.num_stages >= pp:
            vp = costs.num_stages // pp  # the cost model fixes the chunks per rank
    shape = schedule_shape(name, pp=pp, microbatches=microbatches, vp=vp)
    if costs is None:
        costs = CostModel.uniform(shape)
    elif costs.num_stages != shape.num_stages:
        raise ValueError(
            f"cost model has {costs.num_stages} stages but {name} with pp={pp}, vp={shape.vp} has "
            f"{shape.num_stages}; give one cost per stage (pp * vp = {shape.num_stages}) or change vp"
        )
    if name == "auto":
        if placement is not None:
            shape = replace(shape, placement=placement)  # PipelineShape checks the name and V's vp = 2
        return auto(shape, costs, memory_limit, fixed_placement=placement is not None)
    schedule = _GENERATORS[name](shape, costs)
    if memory_limit is not None:
        peak = max(simulate(schedule, costs).peak_activation_memory)
        if peak > memory_limit + _EPS:
            raise ValueError(
                f"{name} needs {peak:g} activation memory per rank, over memory_limit {memory_limit:g}; raise "
                "memory_limit, or pick a leaner schedule (v-half, v-min) or 'auto', which searches under the cap"
            )
    return schedule


@dataclass(frozen=True, slots=True)
class Retuned:
    """What :func:`retune` chose and why."""

    schedule: Schedule
    """The schedule to run: the rebuilt one when it simulates faster, else the one given."""
    before: SimulationResult
    """The given schedule simulated under the measured costs."""
    after: SimulationResult
    """The fastest admissible rebuilt schedule simulated under the measured costs."""
    given: Schedule
    """The schedule :func:`retune` was given."""
    memory_model: str = "measured"
    """The memory model the rebuilt order of :attr:`after` was built under: ``"measured"`` (``costs``' own) or
    ``"uniform"`` (every chunk's activations alike, as the running order)."""
    dropped: str = ""
    """Why a rebuilt candidate was not considered (empty when none was dropped)."""
    bound: LowerBound | None = None
    """:func:`~ds_plugins.schedule.simulate.lower_bound` of the shape under the measured costs: what no order of this
    shape and placement can beat."""

    @property
    def changed(self) -> bool:
        """Whether :attr:`schedule` is the rebuilt order."""
        return self.schedule is not self.given

    def summary(self) -> str:
        """For logs, with costs in seconds (what ``measured_costs`` builds); ends with :attr:`bound`, what no order of
        the shape can beat under the measured times."""
        return (f"simulated step {1e3 * self.before.makespan:.1f} ms (bubble {100 * self.before.bubble_fraction:.1f}%) "
                f"as built for F = I = W, {1e3 * self.after.makespan:.1f} ms (bubble "
                f"{100 * self.after.bubble_fraction:.1f}%) rebuilt for the measured times under the "
                f"{self.memory_model} memory model (peak activation memory per rank "
                f"{_peaks(self.before)} -> {_peaks(self.after)})"
                + (f"; {self.dropped}" if self.dropped else "") + ": "
                + ("running the rebuilt order" if self.changed else "keeping the current order")
                + (f"; under the measured times {self.bound.describe(scale=1e3, unit=' ms')}"
                   if self.bound is not None else ""))


def _peaks(result: SimulationResult) -> str:
    return _peaks_of(result.peak_activation_memory)


def _peaks_of(peaks: tuple[float, ...] | list[float]) -> str:
    in_bytes = max(peaks, default=0.0) > 2**20
    return "[" + ", ".join(f"{p / 2**30:.2f} GiB" if in_bytes else f"{p:.2f}" for p in peaks) + "]"


_RETUNE_MIN_GAIN = 1e-3
"""Rebuilt orders within 0.1% of the running one's simulated step time are not worth a switch."""

RETUNE_MEMORY_SLACK = 0.01
"""How much more activation memory (relative) a rebuild may hold on a rank than :func:`retune`'s limits there.
Measured chunk activations of identical layers differ by a few tenths of a percent (megatron GPT, 4-layer chunks:
2.00 vs 1.99 GiB), so an exact comparison turned on that noise: on 4x H200 (session 11) it dropped a zb-v rebuild
12% faster for holding less than 0.01 GiB more than the running order on a rank, and starved the rebuild under
measured memory of its last micro-batch on a rank (8 chunks of 2.00 GiB against a cap of 4 x (2.00 + 1.99) GiB):
two warm-ups ran orders simulated at 314.3 and 320.2 ms, where their logged costs give 313.7 / 320.0 ms with exact
limits and 275.7 / 268.5 ms with the slack. A 1% slack moves a rank's peak by at most 1% of its activations;
session 9's rebuilds that raised rank 0's activations by 12-17% stay refused."""


def retune(schedule: Schedule, costs: CostModel) -> Retuned:
    """Rebuild ``schedule`` (one of :data:`COST_TUNED`) from ``costs`` with its own generator and memory budget,
    trying every knob combination of the greedy list scheduler under that budget and under tighter ones
    (``search=True``: :func:`~.generators.list_scheduler.budget_descent`, 2-4x the time of the knobs alone;
    zb-v at pp=8, m=32 about 7 s on one CPU core), once under ``costs``' memory
    model and once under the uniform one the running order was built with (every chunk's activations alike);
    :attr:`Retuned.schedule` is the fastest rebuilt order when it simulates more than 0.1% faster under ``costs``,
    else ``schedule`` itself. Neither candidate holds more on a rank than the running order's fullest rank: the
    one under ``costs``' memory model is built within the schedule's own budget of micro-batches per rank in
    ``costs``' units, lowered on each rank to the running order's highest per-rank peak; the one under the uniform
    model is dropped when, under ``costs``' memory, it would hold more on some rank than both the running order
    there and that cap (:attr:`Retuned.dropped`). Each of these limits has :data:`RETUNE_MEMORY_SLACK` (1%) added:
    measured activations carry that much noise.
    :attr:`Retuned.bound` is :func:`~ds_plugins.schedule.simulate.lower_bound` of the shape under ``costs``.
    """
    if schedule.name not in COST_TUNED:
        raise ValueError(f"{schedule.name} has a fixed order; only {', '.join(COST_TUNED)} are rebuilt from costs "
                         "('auto' searches from measured costs itself)")
    shape = schedule.shape
    costs.for_shape(shape)
    generator = _GENERATORS[schedule.name]
    before = simulate(schedule, costs)
    # A rebuild never holds more activation memory on a rank (beyond RETUNE_MEMORY_SLACK) than the running order's
    # highest rank does, nor more than the schedule's budget of micro-batches per rank (in costs' units) where that
    # is lower: under a measured memory model the budget of a rank with heavy chunks (V placement's rank 0 with the
    # LM head) lies above what the running order holds anywhere, and rebuilds that used it raised zb-v's peak over
    # DeepSpeed's 1F1B from 1.03-1.06x to 1.10-1.11x (4x H200, session 9: rank 0's activations 4.43 -> 4.95,
    # 4.31 -> 4.93 and 4.32 -> 5.04 GiB).
    per_rank = MICROBATCHES_PER_RANK[schedule.name](shape.pp)
    slack = 1 + RETUNE_MEMORY_SLACK
    ceiling = max(before.peak_activation_memory) * slack
    budget = memory_cap(shape, costs, per_rank)
    cap = tuple(min(b * slack, ceiling) for b in budget)
    measured = zero_bubble_schedule(schedule.name, shape, costs, per_rank, search=True, cap=cap)
    candidates = [("measured", measured, simulate(measured, costs))]  # (memory model, order, its simulation)
    # the same times with the memory model the running order was built for (every chunk's activations alike): a
    # measured memory model can starve the greedy scheduler (Megatron on 2x H200: the rebuild under measured memory
    # simulated slower than the F = I = W order, which was kept and ran 0.84x megatron's interleaved 1F1B, while
    # auto, at the same peak, ran 1.06x). Counted in uniform units such an order holds what the running one holds,
    # but in real bytes it may hold the heavy chunks where the running order held light ones (zb-v, pp=2: 1.2x the
    # running order's peak, 1.5x its budget of pp micro-batches), so per rank it must fit what the running order
    # holds there, or else the cap above, under the measured memory
    dropped = ""
    uniform = CostModel.uniform(shape)
    if (costs.activation_memory, costs.weight_grad_memory) != (uniform.activation_memory, uniform.weight_grad_memory):
        rebuilt = generator(shape, replace(costs, activation_memory=uniform.activation_memory,
                                           weight_grad_memory=uniform.weight_grad_memory), search=True)
        allowed = [max(held * slack, c) for held, c in zip(before.peak_activation_memory, cap)]
        held = simulate(rebuilt, costs)
        over = [r for r, (p, a) in enumerate(zip(held.peak_activation_memory, allowed)) if p > a * (1 + 1e-9) + 1e-12]
        if over:
            dropped = (f"the rebuild under the uniform memory model ({1e3 * held.makespan:.1f} ms) was dropped: it "
                       f"would hold {_peaks(held)}, on rank(s) {over} more than allowed there ({_peaks_of(allowed)}: "
                       f"what the running order holds on that rank, or up to the running order's fullest rank "
                       f"within {per_rank:g} micro-batches' activations, each + {100 * RETUNE_MEMORY_SLACK:g}%)")
        else:
            candidates.append(("uniform", rebuilt, held))
    memory_model, rebuilt, after = min(candidates, key=lambda c: c[2].makespan)
    faster = after.makespan < before.makespan * (1 - _RETUNE_MIN_GAIN)
    return Retuned(rebuilt if faster else schedule, before, after, schedule, memory_model, dropped,
                   lower_bound(shape, costs))
