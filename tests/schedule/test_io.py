"""CSV / JSON import and export: identical round trips, torch pipelining's CSV format, clear errors."""
import io
import json

import pytest

from ds_plugins.schedule import PipelineShape, add_communication
from ds_plugins.schedule import io as schedule_io

from schedule_text import ONE_F_ONE_B, SPLIT, V, sched


# Interleaved (looped) pp=2 vp=2: rank 0 holds stages 0 and 2, rank 1 holds 1 and 3.
LOOP2 = sched(
    "0F0 0F1 2F0 2F1 2B0 2B1 0B0 0B1\n1F0 1F1 3F0 3B0 3F1 3B1 1B0 1B1", 2, 2, 2, "loop", name="interleaved"
)
ALL = [ONE_F_ONE_B, SPLIT, V, LOOP2]


def all_variants():
    for s in ALL:
        yield s
        yield add_communication(s)


@pytest.mark.parametrize("schedule", list(all_variants()), ids=lambda s: f"{s.name}-{len(s.actions[0])}")
def test_csv_round_trip_is_identical(schedule, tmp_path):
    path = tmp_path / "s.csv"
    schedule_io.to_csv(schedule, path)
    back = schedule_io.from_csv(path, name=schedule.name)
    assert back == schedule  # name, shape (pp, vp, m, placement inferred) and every action
    # File objects work the same as paths, and give the same text.
    buffer = io.StringIO(newline="")
    schedule_io.to_csv(schedule, buffer)
    assert buffer.getvalue() == path.read_bytes().decode() == schedule_io.csv_text(schedule)
    buffer.seek(0)
    assert schedule_io.from_csv(buffer, name=schedule.name) == schedule


@pytest.mark.parametrize("schedule", list(all_variants()), ids=lambda s: f"{s.name}-{len(s.actions[0])}")
def test_json_round_trip_is_identical(schedule, tmp_path):
    path = tmp_path / "s.json"
    text = schedule_io.to_json(schedule, path)
    assert schedule_io.from_json(path) == schedule
    assert schedule_io.from_json(io.StringIO(text)) == schedule
    data = json.loads(text)
    assert data["placement"] == schedule.shape.placement and data["name"] == schedule.name


def test_csv_text_is_one_row_per_rank_one_token_per_cell():
    text = schedule_io.csv_text(add_communication(ONE_F_ONE_B))
    assert text.split("\r\n") == [
        "0F0,0SEND_F0,0F1,0SEND_F1,0RECV_B0,0B0,0F2,0SEND_F2,0RECV_B1,0B1,0RECV_B2,0B2",
        "1RECV_F0,1F0,1B0,1SEND_B0,1RECV_F1,1F1,1B1,1SEND_B1,1RECV_F2,1F2,1B2,1SEND_B2",
        "",
    ]


def test_reads_torch_dump_with_empty_cells_for_idle_steps():
    # torch's _dump_csv writes a None (idle time step) as an empty cell.
    text = "0F0,0F1,,0B0,,0B1\r\n,1F0,1B0,1F1,1B1,\r\n"
    s = schedule_io.from_csv(io.StringIO(text, newline=""), name="torch")
    assert s.shape == PipelineShape(pp=2, microbatches=2, vp=1, placement="loop")
    assert s.to_text() == "0F0 0F1 0B0 0B1\n1F0 1B0 1F1 1B1"


def test_shape_inference_and_explicit_shape():
    assert schedule_io.from_csv(io.StringIO(schedule_io.csv_text(V))).shape.placement == "v"
    assert schedule_io.from_csv(io.StringIO(schedule_io.csv_text(LOOP2))).shape.placement == "loop"
    # More micro-batches than the tokens use, given explicitly.
    s = schedule_io.from_csv(io.StringIO(schedule_io.csv_text(ONE_F_ONE_B)), microbatches=5, placement="loop")
    assert s.shape.microbatches == 5


@pytest.mark.parametrize("text,kwargs,fragment", [
    ("0F0,0X1\r\n1F0\r\n", {}, "row 0 (rank 0) column 1: cannot parse schedule action '0X1'"),
    ("0UNSHARD\r\n", {}, "cannot parse schedule action '0UNSHARD'"),
    ("0F0,2F0\r\n1F0\r\n", {}, "stages 0..2, not a multiple of pp=2"),
    ("0F0\r\n1F0\r\n", {"pp": 3}, "2 rank rows but pp=3"),
    ("0F0,0F3\r\n1F0\r\n", {"microbatches": 2}, "uses micro-batch 3, but microbatches=2"),
    ("0F0,1F0\r\n0B0,1B0\r\n", {}, "fit neither the looped placement"),
    ("", {}, "has no rows"),
])
def test_csv_errors(text, kwargs, fragment):
    with pytest.raises(ValueError, match=None) as info:
        schedule_io.from_csv(io.StringIO(text, newline=""), **kwargs)
    assert fragment in str(info.value)


@pytest.mark.parametrize("data,fragment", [
    ({"format": "other"}, "not an interleaf schedule"),
    ({"format": "interleaf.schedule", "version": 99}, "version 99 is not supported"),
    ({"format": "interleaf.schedule", "version": 1, "name": "x"}, "lacks pp, vp, microbatches, placement, actions"),
])
def test_json_errors(data, fragment):
    with pytest.raises(ValueError) as info:
        schedule_io.from_dict(data)
    assert fragment in str(info.value)


def test_torch_parses_every_token_we_write(tmp_path):
    """torch.distributed.pipelining's own parser reads our CSV cells back to the same actions."""
    schedules_mod = pytest.importorskip("torch.distributed.pipelining.schedules")
    torch_action = schedules_mod._Action
    for schedule in all_variants():
        path = tmp_path / f"{schedule.name}.csv"
        schedule_io.to_csv(schedule, path)
        import csv

        with open(path, newline="") as handle:
            rows = [[torch_action.from_str(cell) for cell in row] for row in csv.reader(handle)]
        assert len(rows) == schedule.shape.pp
        for ours, theirs in zip(schedule.actions, rows):
            assert [str(a) for a in theirs] == [str(a) for a in ours]
            for a, t in zip(ours, theirs):
                assert (t.stage_index, t.computation_type.value, t.microbatch_index) == (
                    a.stage, a.kind.value, a.microbatch
                )


def test_torch_dump_reads_back(tmp_path):
    """A CSV written the way torch's _dump_csv writes (csv.writer over actions and None) reads back."""
    schedules_mod = pytest.importorskip("torch.distributed.pipelining.schedules")
    torch_action, comp = schedules_mod._Action, schedules_mod._ComputationType
    order = {
        0: [torch_action(0, comp.FORWARD, 0), torch_action(0, comp.FORWARD, 1), None,
            torch_action(0, comp.FULL_BACKWARD, 0), None, torch_action(0, comp.FULL_BACKWARD, 1)],
        1: [None, torch_action(1, comp.FORWARD, 0), torch_action(1, comp.FULL_BACKWARD, 0),
            torch_action(1, comp.FORWARD, 1), torch_action(1, comp.FULL_BACKWARD, 1)],
    }
    import csv

    path = tmp_path / "torch.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        for rank in order:
            writer.writerow(order[rank])
    s = schedule_io.from_csv(path, name="torch")
    assert s.to_text() == "0F0 0F1 0B0 0B1\n1F0 1B0 1F1 1B1"


def _torch_order(schedule, torch_action):
    import csv

    rows = csv.reader(io.StringIO(schedule_io.csv_text(schedule), newline=""))
    return {rank: [torch_action.from_str(cell) for cell in row] for rank, row in enumerate(rows)}


@pytest.mark.parametrize("pp,m", [(2, 2), (3, 5), (4, 8)])
def test_torch_pipelining_accepts_every_registered_schedule(pp, m):
    """torch's own schedule validator (compute CSV) and comms simulator (lowered CSV) accept what we write."""
    schedules_mod = pytest.importorskip("torch.distributed.pipelining.schedules")
    from ds_plugins.schedule.registry import SCHEDULE_NAMES, build_schedule

    for name in SCHEDULE_NAMES:
        s = build_schedule(name, pp=pp, microbatches=m)
        schedules_mod._validate_schedule(_torch_order(s, schedules_mod._Action), pp, s.shape.num_stages, m)
        lowered = _torch_order(add_communication(s), schedules_mod._Action)
        schedules_mod._simulate_comms_compute(lowered, s.shape.rank_of, s.shape.num_stages)
        # The oracle bites: without one receive the lowered schedule cannot run.
        broken = dict(lowered)
        broken[1] = [a for a in lowered[1] if str(a) != f"{s.shape.stages_of(1)[0]}RECV_F0"]
        with pytest.raises(ValueError, match="not progressing"):
            schedules_mod._simulate_comms_compute(broken, s.shape.rank_of, s.shape.num_stages)
