"""The interleaf command line: numbers match the closed forms, files round-trip, bad arguments exit 2 cleanly."""
import json
import os
import subprocess
import sys

import pytest

from ds_plugins.cli import main
from ds_plugins.schedule import CostModel, PipelineShape, add_communication, simulate
from ds_plugins.schedule import io as schedule_io
from ds_plugins.schedule.registry import SCHEDULE_NAMES, build_schedule


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def simulate_json(capsys, *args):
    code, out, err = run_cli(capsys, "simulate", *args, "--json")
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1  # one JSON object, nothing else
    return json.loads(out)


@pytest.mark.parametrize("pp,m", [(2, 2), (4, 8), (4, 16), (8, 8)])
def test_1f1b_matches_closed_form(capsys, pp, m):
    data = simulate_json(capsys, "--schedule", "1f1b", "--pp", pp, "--microbatches", m)
    # Unit costs per rank: F = I = W = 1, so B = 2 and the step is (m + pp - 1)(F + B).
    assert data["makespan"] == pytest.approx((m + pp - 1) * 3)
    assert data["bubble_fraction"] == pytest.approx((pp - 1) / (m + pp - 1))
    assert data["peak_activation_memory"] == pytest.approx([min(pp - r, m) for r in range(pp)])
    assert (data["schedule"], data["pp"], data["vp"], data["microbatches"]) == ("1f1b", pp, 1, m)
    assert data["busy"] == pytest.approx([3 * m] * pp)
    assert data["idle"] == pytest.approx([data["makespan"] - 3 * m] * pp)


def test_interleaved_matches_closed_form(capsys):
    pp, m, vp = 4, 8, 2
    data = simulate_json(capsys, "--schedule", "interleaved-1f1b", "--pp", pp, "--microbatches", m, "--vp", vp)
    assert data["vp"] == 2
    assert data["bubble_fraction"] == pytest.approx((pp - 1) / (vp * m + pp - 1))


def test_costs_argument_changes_the_model(capsys):
    costly = simulate_json(capsys, "--schedule", "1f1b", "--pp", 4, "--microbatches", 8, "--costs", "2,1,1")
    # Per-rank F = 2, B = I + W = 2: the 1F1B step is (m + pp - 1)(F + B).
    assert costly["makespan"] == pytest.approx(11 * 4)
    assert costly["costs"] == {"F": 2.0, "I": 1.0, "W": 1.0, "comm": 0.0}
    with_comm = simulate_json(capsys, "--schedule", "1f1b", "--pp", 4, "--microbatches", 8, "--costs", "2,1,1,0.5")
    # The last micro-batch's forward and backward each cross pp - 1 links on the critical path.
    assert with_comm["makespan"] >= 11 * 4 + 2 * 3 * 0.5
    shape = PipelineShape(pp=4, microbatches=8)
    costs = CostModel.uniform(shape, forward=2, backward_input=1, backward_weight=1, comm=0.5)
    assert with_comm["makespan"] == pytest.approx(simulate(build_schedule("1f1b", pp=4, microbatches=8), costs).makespan)


def test_text_output(capsys):
    code, out, err = run_cli(capsys, "simulate", "--schedule", "zb-h1", "--pp", 4, "--microbatches", 8)
    assert code == 0 and err == ""
    data = simulate_json(capsys, "--schedule", "zb-h1", "--pp", 4, "--microbatches", 8)
    assert f"makespan {data['makespan']:g}" in out
    assert f"bubble {data['bubble_fraction']:.1%}" in out
    for rank in range(4):
        assert f"rank {rank} |" in out
    assert "'.' idle" in out


def test_output_files_round_trip(capsys, tmp_path):
    csv_path, trace, png = tmp_path / "s.csv", tmp_path / "t.json", tmp_path / "s.png"
    args = ["--schedule", "zb-v", "--pp", 4, "--microbatches", 8, "--csv", csv_path, "--trace", trace]
    if _has_matplotlib():
        args += ["--png", png]
    data = simulate_json(capsys, *args)
    expected = build_schedule("zb-v", pp=4, microbatches=8)
    assert schedule_io.from_csv(csv_path, name="zb-v") == expected
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    assert len(events) == sum(len(p) for p in expected.actions)
    assert max(e["ts"] + e["dur"] for e in events) == pytest.approx(data["makespan"] * 1000.0)
    if _has_matplotlib():
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert sorted(data["outputs"]) == sorted(str(p) for p in ([csv_path, trace] + ([png] if _has_matplotlib() else [])))

    # Lowered CSV (torch's compute_comms format) reads back as the lowered schedule and draws the same numbers.
    simulate_json(capsys, "--schedule", "zb-v", "--pp", 4, "--microbatches", 8, "--csv", csv_path, "--lowered")
    assert schedule_io.from_csv(csv_path, name="zb-v") == add_communication(expected)
    code, out, err = run_cli(capsys, "draw", "--from-csv", csv_path, "--json")
    assert code == 0, err
    drawn = json.loads(out)
    assert drawn["makespan"] == pytest.approx(data["makespan"])
    assert drawn["peak_activation_memory"] == pytest.approx(data["peak_activation_memory"])
    assert (drawn["schedule"], drawn["placement"]) == ("s", "v")


def test_draw_reports_an_invalid_csv(capsys, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("0F0,0B0,0F1,0B1\r\n1F1,1F0,1B0,1B1\r\n")
    code, out, err = run_cli(capsys, "draw", "--from-csv", path)
    assert code == 2 and out == ""
    first, *grid = err.splitlines()
    assert first.startswith("interleaf: error: deadlock: rank 0 waits at 0B0 for 1B0")
    # Under the one-line reason: the step x rank grid with the stuck cells marked.
    assert grid[0].split() == ["rank", "0", "rank", "1"]
    assert grid[1].startswith("step 0:") and "[1F1]" in grid[1] and grid[1].endswith("<-- ERROR HERE")


def test_compare_lists_every_schedule(capsys):
    code, out, err = run_cli(capsys, "compare", "--pp", 4, "--microbatches", 8)
    assert code == 0, err
    lines = out.splitlines()
    for name in SCHEDULE_NAMES:
        assert any(line.split()[0] == name for line in lines[3:]), name
    assert [line for line in lines if line.startswith("1f1b ")][0].split()[-1] == "1.000"

    code, out, err = run_cli(capsys, "compare", "--pp", 4, "--microbatches", 8, "--json")
    rows = {r["schedule"]: r for r in json.loads(out)["schedules"]}
    assert set(rows) == set(SCHEDULE_NAMES)
    assert rows["1f1b"]["makespan"] == pytest.approx(33) and rows["1f1b"]["ratio_to_1f1b"] == 1.0
    for name, row in rows.items():
        assert "error" not in row, (name, row)
        assert row["ratio_to_1f1b"] == pytest.approx(row["makespan"] / 33)
    # ZB-H1: a third of 1F1B's bubble time at 1F1B's peak memory (Zero Bubble PP, sec. 3.1).
    assert rows["zb-h1"]["max_peak_activation_memory"] == rows["1f1b"]["max_peak_activation_memory"]
    assert rows["auto"]["makespan"] <= min(r["makespan"] for r in rows.values()) + 1e-9


def test_compare_explains_schedules_that_cannot_be_built(capsys):
    code, out, err = run_cli(capsys, "compare", "--pp", 4, "--microbatches", 8, "--vp", 2, "--memory-limit", 3)
    assert code == 0, err
    line = [row for row in out.splitlines() if row.startswith("1f1b ")][0]
    assert "not available: 1f1b runs one chunk per rank" in line
    data = json.loads(run_cli(capsys, "compare", "--pp", 4, "--microbatches", 8, "--vp", 2,
                              "--memory-limit", 3, "--json")[1])
    rows = {r["schedule"]: r for r in data["schedules"]}
    assert "over memory_limit 3" in rows["zb-v"]["error"]
    built = [r for r in rows.values() if "makespan" in r]
    assert built and all(r["max_peak_activation_memory"] <= 3 + 1e-9 for r in built)
    # Ratios still refer to plain 1F1B (vp = 1, no cap): 33 time units here.
    assert all(r["ratio_to_1f1b"] == pytest.approx(r["makespan"] / 33) for r in built)


@pytest.mark.parametrize("args,fragment", [
    (["simulate", "--schedule", "nope", "--pp", "4", "--microbatches", "8"], "unknown schedule 'nope'"),
    (["simulate", "--schedule", "interleaved-1f1b", "--pp", "4", "--microbatches", "2"], "microbatches >= pp"),
    (["simulate", "--schedule", "zb-v", "--pp", "4", "--microbatches", "8", "--vp", "3"], "set vp=2"),
    (["simulate", "--schedule", "1f1b", "--pp", "4", "--microbatches", "8", "--vp", "2"], "one chunk per rank"),
    (["simulate", "--schedule", "1f1b", "--pp", "4", "--microbatches", "8", "--costs", "1,-1,1"], "non-negative"),
    (["simulate", "--schedule", "1f1b", "--pp", "4", "--microbatches", "8", "--costs", "1,x,1"], "must be numbers"),
    (["simulate", "--schedule", "1f1b", "--pp", "4", "--microbatches", "8", "--costs", "0,0,0"], "F+I+W must be"),
    (["simulate", "--schedule", "1f1b", "--pp", "0", "--microbatches", "8"], "--pp: must be >= 1"),
    (["simulate", "--schedule", "1f1b", "--pp", "4", "--microbatches", "8", "--memory-limit", "-1"], "positive"),
    (["simulate", "--schedule", "1f1b", "--pp", "4", "--microbatches", "8", "--memory-limit", "2"],
     "1f1b needs 4 activation memory per rank, over memory_limit 2"),
    (["simulate", "--pp", "4", "--microbatches", "8"], "required: --schedule"),
    (["compare", "--pp", "4"], "required: --microbatches"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["draw", "--from-csv", "/nonexistent/s.csv"], "no such file"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, args, fragment):
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert out == ""
    assert err.startswith("interleaf: error: ") and err.count("\n") == 1, err
    assert fragment in err
    assert "Traceback" not in err


def test_console_script(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "interleaf")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "ds_plugins.cli"]
    ok = subprocess.run(command + ["compare", "--pp", "2", "--microbatches", "4"], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0 and "zb-v" in ok.stdout, ok.stderr
    bad = subprocess.run(command + ["simulate", "--schedule", "zb-x", "--pp", "2", "--microbatches", "4"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_plan_recommends_the_fastest_fitting_schedule_as_a_config_block(capsys):
    from ds_plugins.config import InterleafConfig

    code, out, err = run_cli(capsys, "plan", "--pp", 4, "--microbatches", 8, "--memory-limit", 3, "--json")
    assert code == 0, err
    data = json.loads(out)
    fitting = [r for r in data["schedules"] if "makespan" in r]
    assert fitting and all(r["max_peak_activation_memory"] <= 3 + 1e-9 for r in fitting)
    best = data["recommended"]
    assert best["makespan"] == pytest.approx(min(r["makespan"] for r in fitting))
    pipeline = InterleafConfig.from_ds_config(data["config"]).pipeline
    assert (pipeline.schedule, pipeline.virtual_stages) == (best["schedule"], best["vp"])

    code, out, err = run_cli(capsys, "plan", "--pp", 4, "--microbatches", 8)
    lines = out.splitlines()
    fastest = lines[lines.index("fastest first:") + 1].split()[0]
    assert code == 0 and f'"schedule": "{fastest}"' in out
    code, out, err = run_cli(capsys, "plan", "--pp", 4, "--microbatches", 8, "--memory-limit", 0.5)
    assert code == 2 and err.startswith("interleaf: error: no schedule fits these arguments")


def test_help_texts_name_only_existing_flags():
    """Every ``--flag`` a help text mentions is an option of the command it belongs to."""
    import argparse
    import re

    from ds_plugins.cli import _build_parser

    def walk(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from walk(sub)

    for parser in walk(_build_parser()):
        options = {o for a in parser._actions for o in a.option_strings}
        for action in parser._actions:
            for flag in re.findall(r"--[a-z][a-z-]*", action.help or ""):
                assert flag in options, f"{parser.prog}: help of {action.dest} names {flag}, which it does not take"
