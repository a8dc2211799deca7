"""Pictures: ASCII timeline, PNG and Chrome trace reflect the simulated times exactly."""
import json

import pytest

from ds_plugins.schedule import CostModel, simulate
from ds_plugins.schedule.draw import ascii_timeline, chrome_trace, save_chrome_trace, save_png

from schedule_text import ONE_F_ONE_B, SPLIT, V


def run(schedule, **costs):
    return simulate(schedule, CostModel.uniform(schedule.shape, **costs))


def test_ascii_rows_match_simulated_times():
    result = run(ONE_F_ONE_B)  # F = 1, B = I + W = 2
    text = ascii_timeline(result)
    rows = text.splitlines()[:2]
    # Shortest action (F, 1 unit) gets len("F0") + 1 = 3 columns: every boundary falls on a column.
    cells = [row.split("|")[1] for row in rows]
    assert {len(c) for c in cells} == {round(result.makespan * 3)}
    for rank, c in enumerate(cells):
        assert c.count(".") == round(result.idle[rank] * 3)
        for t in result.timeline[rank]:
            label = f"{t.action.kind.value}{t.action.microbatch}"
            assert c[round(t.start * 3): round(t.start * 3) + len(label)] == label
        bubble = result.idle[rank] / result.makespan
        assert rows[rank].endswith(f"bubble {bubble:.1%}")
    assert rows[0].startswith("rank 0 |F0 F1 ")
    assert "one column = 0.333 time units" in text


def test_ascii_lower_case_marks_odd_chunks_and_width_is_capped():
    result = run(V)
    text = ascii_timeline(result)
    row0 = text.splitlines()[0]
    assert "F0" in row0 and "f0" in row0 and "b0" in row0  # stage 3 is rank 0's chunk 1
    narrow = ascii_timeline(result, max_width=20)
    assert all(len(line.split("|")[1]) <= 20 for line in narrow.splitlines()[:2])
    with pytest.raises(ValueError):
        ascii_timeline(result, columns_per_unit=0)


def test_chrome_trace_events(tmp_path):
    result = run(SPLIT, comm=0.25)
    trace = chrome_trace(result, name="split", time_unit_us=10.0)
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    meta = [e for e in trace["traceEvents"] if e["ph"] == "M"]
    assert len(events) == sum(len(tl) for tl in result.timeline)
    assert {(e["pid"], e["args"]["name"]) for e in meta if e["name"] == "process_name"} == {(0, "rank 0"), (1, "rank 1")}
    for rank, timeline in enumerate(result.timeline):
        mine = [e for e in events if e["pid"] == rank]
        assert all(e["tid"] == rank for e in mine)
        for e, t in zip(mine, timeline):
            assert e["name"] == str(t.action)
            assert e["ts"] == pytest.approx(t.start * 10.0) and e["dur"] == pytest.approx((t.end - t.start) * 10.0)
    assert trace["otherData"]["makespan"] == result.makespan
    path = tmp_path / "trace.json"
    save_chrome_trace(result, path, name="split")
    assert json.loads(path.read_text())["traceEvents"]


def test_png_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "v.png"
    save_png(run(V), path, name="v", shape=V.shape)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
