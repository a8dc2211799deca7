"""Pictures of a simulated schedule: ASCII timeline, PNG (matplotlib) and Chrome-trace JSON.

All three read a :class:`~ds_plugins.schedule.simulate.SimulationResult`. Actions are labelled by kind
(``F`` forward, ``I`` input gradient, ``W`` weight gradient, ``B`` full backward) and micro-batch; in the ASCII
timeline the letter is upper case for a rank's even chunks (chunk 0) and lower case for odd ones (chunk 1),
so interleaved and V schedules show which model chunk runs. Idle time is ``.``.

matplotlib is imported only by :func:`save_png` (``pip install interleaf[draw]``).
"""
from __future__ import annotations

import json
import math
import os
from typing import IO, Any, Union

from .ir import ActionKind, PipelineShape
from .simulate import SimulationResult, TimedAction

__all__ = ["ascii_timeline", "save_png", "chrome_trace", "save_chrome_trace", "KIND_COLOURS"]

PathOrFile = Union[str, "os.PathLike[str]", IO[str]]

KIND_COLOURS: dict[ActionKind, str] = {
    ActionKind.FORWARD: "#4c72b0",
    ActionKind.BACKWARD_INPUT: "#dd8452",
    ActionKind.BACKWARD_WEIGHT: "#55a868",
    ActionKind.BACKWARD: "#8172b3",
}
"""PNG colour of each compute kind (F blue, I orange, W green, B purple)."""

_KIND_NAMES = {
    ActionKind.FORWARD: "F forward",
    ActionKind.BACKWARD_INPUT: "I input grad",
    ActionKind.BACKWARD_WEIGHT: "W weight grad",
    ActionKind.BACKWARD: "B full backward",
}


def _chunk(timed: TimedAction, pp: int) -> int:
    # Both placements number a rank's chunks by stage // pp (loop: c*pp + r; V: r and 2*pp-1-r).
    return timed.action.stage // pp


def _label(timed: TimedAction, pp: int) -> str:
    letter = timed.action.kind.value
    if _chunk(timed, pp) % 2:
        letter = letter.lower()
    return f"{letter}{timed.action.microbatch}"


def _origin(result: SimulationResult) -> float:
    starts = [t.start for tl in result.timeline for t in tl]
    return min(starts) if starts else 0.0


def _rank_bubble(result: SimulationResult, rank: int) -> float:
    return result.idle[rank] / result.makespan if result.makespan > 0 else 0.0


def ascii_timeline(
    result: SimulationResult, *, columns_per_unit: float | None = None, max_width: int = 160
) -> str:
    """One row per rank, time left to right. By default the shortest action is just wide enough for its label
    (``F12``), shrunk to fit ``max_width`` columns; labels that do not fit their span are cut to the letter."""
    pp = len(result.timeline)
    if max_width < 1:
        raise ValueError(f"max_width must be >= 1, got {max_width}")
    t0 = _origin(result)
    span = result.makespan
    all_actions = [t for tl in result.timeline for t in tl]
    if columns_per_unit is None:
        durations = [t.end - t.start for t in all_actions if t.end > t.start]
        widest = max((len(_label(t, pp)) for t in all_actions), default=1)
        columns_per_unit = (widest + 1) / min(durations) if durations else 1.0
        if span > 0 and span * columns_per_unit > max_width:
            columns_per_unit = max_width / span
    elif not columns_per_unit > 0:
        raise ValueError(f"columns_per_unit must be positive, got {columns_per_unit}")
    width = max(1, math.ceil(span * columns_per_unit - 1e-9))
    rows = []
    for rank, timeline in enumerate(result.timeline):
        cells = ["."] * width
        for t in timeline:
            first = min(width - 1, round((t.start - t0) * columns_per_unit))
            last = min(width, round((t.end - t0) * columns_per_unit))
            if t.end > t.start and last <= first:
                last = first + 1
            label = _label(t, pp)
            text = label if last - first >= len(label) else label[0]
            for c in range(first, last):
                k = c - first
                cells[c] = text[k] if k < len(text) else " "
        rows.append(
            f"rank {rank:<{len(str(pp - 1))}} |{''.join(cells)}| busy {result.busy[rank]:g}, "
            f"bubble {_rank_bubble(result, rank):.1%}"
        )
    unit = 1 / columns_per_unit
    legend = (
        "F forward, I input grad, W weight grad, B full backward (lower case: odd model chunk), "
        f"digits micro-batch, '.' idle; one column = {unit:.3g} time units"
    )
    return "\n".join(rows + [legend])


def save_png(
    result: SimulationResult,
    path: str | os.PathLike[str],
    *,
    name: str = "",
    shape: PipelineShape | None = None,
    dpi: int = 110,
) -> None:
    """Draw the timeline to a PNG: one lane per rank, F/I/W/B coloured, micro-batch numbers on the bars,
    each rank's bubble % on the right, a legend, and a title with the schedule name, shape and makespan."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("PNG timelines need matplotlib: pip install 'interleaf[draw]'") from exc

    pp = len(result.timeline)
    t0 = _origin(result)
    span = result.makespan if result.makespan > 0 else 1.0
    most_actions = max((len(tl) for tl in result.timeline), default=1)
    fig_width = min(30.0, max(9.0, 0.22 * most_actions + 3))
    fig_height = 1.7 + 0.55 * pp
    fig = Figure(figsize=(fig_width, fig_height))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    # Width of one time unit in points, to decide which bars have room for their micro-batch number.
    axis_points = fig_width * 72 * 0.78
    font_size = 7 if most_actions > 40 else 8
    for rank, timeline in enumerate(result.timeline):
        y = pp - 1 - rank
        for t in timeline:
            kind = t.action.kind
            odd_chunk = _chunk(t, pp) % 2 == 1
            ax.barh(
                y,
                t.end - t.start,
                left=t.start - t0,
                height=0.8,
                color=KIND_COLOURS.get(kind, "#999999"),
                alpha=0.6 if odd_chunk else 1.0,
                hatch="//" if odd_chunk else None,
                edgecolor="white",
                linewidth=0.6,
            )
            bar_points = (t.end - t.start) / span * axis_points
            text = str(t.action.microbatch)
            if bar_points >= font_size * 0.65 * len(text) + 2:
                ax.text(
                    (t.start + t.end) / 2 - t0, y, text, ha="center", va="center", fontsize=font_size, color="white"
                    if not odd_chunk else "black",
                )
        ax.text(span * 1.005, y, f"bubble {_rank_bubble(result, rank):.1%}", va="center", fontsize=9)
    ax.set_yticks(range(pp))
    ax.set_yticklabels([f"rank {pp - 1 - y}" for y in range(pp)])
    ax.set_xlim(0, span)
    ax.set_ylim(-0.6, pp - 0.4)
    ax.set_xlabel("simulated time")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    used = sorted({t.action.kind for tl in result.timeline for t in tl}, key=list(KIND_COLOURS).index)
    handles = [Patch(color=KIND_COLOURS[k], label=_KIND_NAMES[k]) for k in used]
    if any(_chunk(t, pp) % 2 for tl in result.timeline for t in tl):
        handles.append(Patch(facecolor="#bbbbbb", hatch="//", edgecolor="white", label="odd model chunk"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
    title = name or "schedule"
    if shape is not None:
        title += f"   pp={shape.pp} vp={shape.vp} m={shape.microbatches}"
    title += f"   makespan {result.makespan:g}   bubble {result.bubble_fraction:.1%}"
    ax.set_title(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.35 / fig_height, 1, 1))  # leave the bottom strip to the legend
    fig.savefig(os.fspath(path), dpi=dpi)


def chrome_trace(result: SimulationResult, *, name: str = "", time_unit_us: float = 1000.0) -> dict[str, Any]:
    """The timeline as a Chrome-trace / Perfetto ``{"traceEvents": [...]}`` object: one process and thread per
    rank (``pid = tid = rank``, as torch.distributed.pipelining's trace dump), one complete (``"X"``) event per
    action; ``ts``/``dur`` are microseconds, one simulated time unit = ``time_unit_us``."""
    if not time_unit_us > 0:
        raise ValueError(f"time_unit_us must be positive, got {time_unit_us}")
    t0 = _origin(result)
    pp = len(result.timeline)
    events: list[dict[str, Any]] = []
    for rank in range(pp):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "tid": rank, "args": {"name": f"rank {rank}"}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": rank, "tid": rank, "args": {"sort_index": rank}})
        events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": rank, "args": {"name": "compute"}})
    for rank, timeline in enumerate(result.timeline):
        for t in timeline:
            a = t.action
            events.append(
                {
                    "name": str(a),
                    "cat": _KIND_NAMES[a.kind].split(" ", 1)[1],
                    "ph": "X",
                    "pid": rank,
                    "tid": rank,
                    "ts": (t.start - t0) * time_unit_us,
                    "dur": (t.end - t.start) * time_unit_us,
                    "args": {"stage": a.stage, "kind": a.kind.value, "microbatch": a.microbatch,
                             "chunk": _chunk(t, pp)},
                }
            )
    trace: dict[str, Any] = {"traceEvents": events, "displayTimeUnit": "ms"}
    trace["otherData"] = {
        "schedule": name,
        "makespan": result.makespan,
        "bubble_fraction": result.bubble_fraction,
        "time_unit_us": time_unit_us,
    }
    return trace


def save_chrome_trace(
    result: SimulationResult, path_or_file: PathOrFile, *, name: str = "", time_unit_us: float = 1000.0
) -> None:
    """Write :func:`chrome_trace` as JSON (open it in chrome://tracing or ui.perfetto.dev)."""
    trace = chrome_trace(result, name=name, time_unit_us=time_unit_us)
    if isinstance(path_or_file, (str, os.PathLike)):
        with open(path_or_file, "w") as handle:
            json.dump(trace, handle)
    else:
        json.dump(trace, path_or_file)
