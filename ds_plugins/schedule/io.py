"""Schedule import/export: CSV as torch.distributed.pipelining and torchtitan read it, and JSON.

CSV format (``_PipelineSchedule._dump_csv`` / ``_load_csv`` in torch.distributed.pipelining, which torchtitan's
``pipeline_parallel_schedule_csv`` option loads): no header; row ``r`` is rank ``r``'s program, one action token
per cell (``2F0``, ``1SEND_B3``, written with the ``csv`` module's default dialect, so rows end in ``\\r\\n``).
torch writes an idle time step as an empty cell; :func:`from_csv` skips empty cells, :func:`to_csv` writes none.
A CSV holds no shape, so :func:`from_csv` infers ``pp`` (rows), ``vp`` (stages / pp), ``microbatches`` (largest
index + 1) and the placement (the one under which every row holds only its own rank's stages), unless given.

JSON keeps the shape and name too: ``{"format": "interleaf.schedule", "version": 1, "name", "pp", "vp",
"microbatches", "placement", "actions": [[token, ...] per rank]}``.
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import IO, Any, Union

from .ir import Action, PipelineShape, Placement, Schedule

__all__ = ["to_csv", "from_csv", "csv_text", "to_dict", "from_dict", "to_json", "from_json"]

PathOrFile = Union[str, "os.PathLike[str]", IO[str]]

_JSON_FORMAT = "interleaf.schedule"
_JSON_VERSION = 1


def _is_path(target: object) -> bool:
    return isinstance(target, (str, os.PathLike))


def to_csv(schedule: Schedule, path_or_file: PathOrFile) -> None:
    """Write ``schedule`` as CSV: one row per rank, one action token per cell."""
    if _is_path(path_or_file):
        with open(path_or_file, "w", newline="") as handle:
            _write_csv_rows(schedule, handle)
    else:
        _write_csv_rows(schedule, path_or_file)  # type: ignore[arg-type]


def _write_csv_rows(schedule: Schedule, handle: IO[str]) -> None:
    writer = csv.writer(handle)
    for program in schedule.actions:
        writer.writerow([str(a) for a in program])


def from_csv(
    path_or_file: PathOrFile,
    *,
    name: str = "csv",
    pp: int | None = None,
    vp: int | None = None,
    microbatches: int | None = None,
    placement: Placement | None = None,
) -> Schedule:
    """Read a CSV schedule (torch pipelining format). Shape arguments left ``None`` are inferred from the
    tokens; raises ``ValueError`` naming the row and column of a bad token or a shape that does not fit."""
    if _is_path(path_or_file):
        with open(path_or_file, newline="") as handle:
            rows = list(csv.reader(handle))
    else:
        rows = list(csv.reader(path_or_file))  # type: ignore[arg-type]
    programs: list[tuple[Action, ...]] = []
    for rank, row in enumerate(rows):
        program = []
        for column, cell in enumerate(row):
            if not cell.strip():
                continue  # torch writes an idle time step (None) as an empty cell
            try:
                program.append(Action.parse(cell))
            except ValueError as exc:
                raise ValueError(f"schedule CSV row {rank} (rank {rank}) column {column}: {exc}") from None
        programs.append(tuple(program))
    return _build(programs, name=name, pp=pp, vp=vp, microbatches=microbatches, placement=placement, source="CSV")


def _build(
    programs: list[tuple[Action, ...]],
    *,
    name: str,
    pp: int | None,
    vp: int | None,
    microbatches: int | None,
    placement: Placement | None,
    source: str,
) -> Schedule:
    if pp is None:
        pp = len(programs)
    if pp < 1:
        raise ValueError(f"schedule {source} has no rows; expected one row per pipeline rank")
    if len(programs) != pp:
        raise ValueError(f"schedule {source} has {len(programs)} rank rows but pp={pp}; give one row per rank")
    actions = [a for prog in programs for a in prog]
    if not actions:
        raise ValueError(f"schedule {source} has no actions")
    max_stage = max(a.stage for a in actions)
    if vp is None:
        if (max_stage + 1) % pp:
            raise ValueError(
                f"schedule {source} uses stages 0..{max_stage}, not a multiple of pp={pp} ranks; pass vp explicitly"
            )
        vp = (max_stage + 1) // pp
    elif max_stage >= pp * vp:
        raise ValueError(f"schedule {source} uses stage {max_stage}, but pp={pp} x vp={vp} has stages 0..{pp * vp - 1}")
    max_microbatch = max(a.microbatch for a in actions)
    if microbatches is None:
        microbatches = max_microbatch + 1
    elif max_microbatch >= microbatches:
        raise ValueError(
            f"schedule {source} uses micro-batch {max_microbatch}, but microbatches={microbatches}; raise microbatches"
        )
    if placement is None:
        placement = _infer_placement(programs, pp=pp, vp=vp, microbatches=microbatches, source=source)
    shape = PipelineShape(pp=pp, microbatches=microbatches, vp=vp, placement=placement)
    return Schedule(name, shape, tuple(programs))


def _infer_placement(
    programs: list[tuple[Action, ...]], *, pp: int, vp: int, microbatches: int, source: str
) -> Placement:
    candidates: list[Placement] = ["loop", "v"] if vp == 2 else ["loop"]
    for candidate in candidates:
        shape = PipelineShape(pp=pp, microbatches=microbatches, vp=vp, placement=candidate)
        if all(shape.rank_of(a.stage) == rank for rank, prog in enumerate(programs) for a in prog):
            return candidate
    held = {rank: sorted({a.stage for a in prog}) for rank, prog in enumerate(programs)}
    raise ValueError(
        f"schedule {source}: the stages on each rank {held} fit neither the looped placement (rank r holds r, r+pp, ...)"
        + (" nor the V placement (rank r holds r and 2*pp-1-r)" if vp == 2 else "")
        + "; fix the rows or pass placement explicitly"
    )


def to_dict(schedule: Schedule) -> dict[str, Any]:
    """A JSON-ready dict holding the schedule's name, shape and per-rank tokens."""
    shape = schedule.shape
    return {
        "format": _JSON_FORMAT,
        "version": _JSON_VERSION,
        "name": schedule.name,
        "pp": shape.pp,
        "vp": shape.vp,
        "microbatches": shape.microbatches,
        "placement": shape.placement,
        "actions": [[str(a) for a in prog] for prog in schedule.actions],
    }


def from_dict(data: dict[str, Any]) -> Schedule:
    """Inverse of :func:`to_dict`; raises ``ValueError`` on a wrong format, version, or token."""
    if not isinstance(data, dict) or data.get("format") != _JSON_FORMAT:
        raise ValueError(f"not an interleaf schedule: expected a JSON object with \"format\": \"{_JSON_FORMAT}\"")
    if data.get("version") != _JSON_VERSION:
        raise ValueError(f"interleaf schedule version {data.get('version')!r} is not supported (expected {_JSON_VERSION})")
    missing = [k for k in ("name", "pp", "vp", "microbatches", "placement", "actions") if k not in data]
    if missing:
        raise ValueError(f"interleaf schedule JSON lacks {', '.join(missing)}")
    programs = []
    for rank, tokens in enumerate(data["actions"]):
        program = []
        for step, token in enumerate(tokens):
            try:
                program.append(Action.parse(token))
            except (ValueError, TypeError, AttributeError) as exc:
                raise ValueError(f"schedule JSON rank {rank} step {step}: {exc}") from None
        programs.append(tuple(program))
    shape = PipelineShape(
        pp=int(data["pp"]), microbatches=int(data["microbatches"]), vp=int(data["vp"]), placement=data["placement"]
    )
    return Schedule(str(data["name"]), shape, tuple(programs))


def to_json(schedule: Schedule, path_or_file: PathOrFile | None = None) -> str:
    """The schedule as JSON text; also written to ``path_or_file`` when given."""
    text = json.dumps(to_dict(schedule), indent=1)
    if path_or_file is None:
        return text
    if _is_path(path_or_file):
        with open(path_or_file, "w") as handle:
            handle.write(text + "\n")
    else:
        path_or_file.write(text + "\n")  # type: ignore[union-attr]
    return text


def from_json(path_or_file: PathOrFile) -> Schedule:
    """Read a schedule written by :func:`to_json` from a path or an open text file."""
    if _is_path(path_or_file):
        with open(path_or_file) as handle:
            text = handle.read()
    else:
        text = path_or_file.read()  # type: ignore[union-attr]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"schedule JSON does not parse: {exc}") from None
    return from_dict(data)


def csv_text(schedule: Schedule) -> str:
    """The CSV text :func:`to_csv` writes, as a string."""
    buffer = io.StringIO(newline="")
    to_csv(schedule, buffer)
    return buffer.getvalue()
