"""Pure table logic of the GPU benchmarks (no process group): benchmarks/megatron.py's first-step loss/grad check
and baseline choice, benchmarks/pipeline.py's "vs best torch" column."""
import pytest

from benchmarks import megatron as mb
from benchmarks import pipeline as pb


def _row(variant, tokens, loss, norm, m=8, p2p=None):
    row = {"variant": variant, "microbatches": m, "tokens_per_s": tokens, "peak_gib": [1.0, 1.0],
           "first_loss": loss, "first_grad_norm": norm, "step_s": 1.0}
    if p2p:
        row["p2p"] = p2p
    return row


def test_megatron_check_passes_within_tolerance_and_flags_a_wrong_variant():
    rows = [_row("megatron-1f1b", 90.0, 5.5, 1.0),
            _row("megatron-interleaved", 100.0, 5.5 * (1 + 5e-3), 1.0, p2p="batch_p2p_comm"),
            _row("zb-v", 120.0, 5.5, 1.0 * (1 + 2e-2))]
    failures = mb.check_first_step(rows, [8], rtol=1e-2)
    assert [r["check"] for r in rows[:2]] == ["ok", "ok"]
    assert rows[2]["check"].startswith("MISMATCH") and "first_grad_norm" in rows[2]["check"]
    assert len(failures) == 1 and failures[0][0] == "zb-v" and "zb-v" in failures[0][1]


def test_megatron_baseline_is_the_fastest_interleaved_run_that_passed():
    rows = [_row("megatron-1f1b", 90.0, 5.5, 1.0),
            _row("megatron-interleaved", 100.0, 5.5, 1.0, p2p="batch_p2p_comm"),
            _row("megatron-interleaved", 130.0, 5.5, 1.5, p2p="overlap_p2p_comm"),  # fast but wrong
            _row("megatron-interleaved", 110.0, 5.5, 1.0, p2p="overlap_p2p_comm", m=16),
            _row("megatron-interleaved", 105.0, 5.5, 1.0, p2p="batch_p2p_comm", m=16)]
    failures = mb.check_first_step(rows, [8, 16], rtol=1e-2)
    assert len(failures) == 1 and failures[0][0] == "megatron-interleaved" and "overlap_p2p_comm" in failures[0][1]
    m8 = [r for r in rows if r["microbatches"] == 8]
    assert mb._baseline_row(m8)["tokens_per_s"] == 100.0  # the wrong faster run is not the baseline
    m16 = [r for r in rows if r["microbatches"] == 16]
    assert mb._baseline_row(m16)["p2p"] == "overlap_p2p_comm"
    text = mb.table(rows, [8, 16])
    assert "megatron-interleaved (batch_p2p_comm) **baseline** | 100 | 1.00x" in text
    assert "megatron-interleaved (overlap_p2p_comm) | 130 | 1.30x" in text and "MISMATCH" in text


def test_megatron_reference_without_megatron_1f1b_is_the_majority_row():
    """2x H100, pp=2, no megatron-1f1b row: megatron's batched-p2p interleaved run (run first) returned a wrong
    gradient norm; the three rows that agree are the reference, the wrong one is marked and skipped as baseline."""
    rows = [_row("zb-h2", 28274.0, 10.78738, 1.45072),
            _row("megatron-interleaved", 26462.0, 10.78500, 1.34856e12, p2p="batch_p2p_comm"),
            _row("megatron-interleaved", 28179.0, 10.78738, 1.45072, p2p="overlap_p2p_comm"),
            _row("zb-v", 23051.0, 10.78738, 1.45072)]
    failures = mb.check_first_step(rows, [8], rtol=1e-2)
    assert [v for v, _ in failures] == ["megatron-interleaved"] and "batch_p2p_comm" in failures[0][1]
    assert mb._baseline_row(rows)["p2p"] == "overlap_p2p_comm"


def test_pipeline_vs_best_torch_column():
    rows = [pb.Row("deepspeed-1f1b", 8, 100.0, 0.2, [1.0]),
            pb.Row("zb-v", 8, 150.0, 0.1, [1.0]),
            pb.Row("torch-1f1b", 8, 120.0, None, [1.0]),
            pb.Row("torch-dualpipev", 8, 125.0, None, [1.0]),
            pb.Row("torch-izb", 8, 0.0, None, [], note="failed: ValueError: x")]
    text = pb.table(rows)
    assert "| vs DeepSpeed 1F1B | vs best torch |" in text
    assert "| zb-v |  | 150 | 1.500x | 1.200x |" in text
    assert "| torch-dualpipev |  | 125 | 1.250x | 1.000x |" in text
    assert "| deepspeed-1f1b |  | 100 | 1.000x | 0.800x |" in text
    # a ratio just under a target stays under it in the table
    assert "| 1.298x |" in pb.table([pb.Row("deepspeed-1f1b", 8, 1000.0, 0.2, [1.0]), pb.Row("auto", 8, 1298.3, 0.1, [1.0])])


def test_megatron_measured_costs_per_rank_follow_the_placement():
    """The F/I/W log of interleaf rows: a V-placed rank holds stages r and 2pp-1-r, and its compute per step is
    m x the F+I+W of both."""
    from types import SimpleNamespace

    from ds_plugins.schedule.costs import CostModel
    from ds_plugins.schedule.registry import build_schedule

    costs = CostModel(forward=(0.001, 0.002, 0.003, 0.004), backward_input=(0.001, 0.001, 0.001, 0.002),
                      backward_weight=(0.0005, 0.0005, 0.0005, 0.001), comm=0.0,
                      activation_memory=(1.0,) * 4, weight_grad_memory=(0.5,) * 4)
    runner = SimpleNamespace(measured_costs=costs, schedule=build_schedule("zb-v", pp=2, microbatches=8))
    got = mb._measured_costs(runner)
    assert got["stages_of_rank"] == {0: [0, 3], 1: [1, 2]}
    assert got["fiw_ms_per_stage"][3] == [4.0, 2.0, 1.0]
    assert abs(got["compute_ms_per_step_of_rank"][0] - 8 * (2.5 + 7.0)) < 1e-9
    assert abs(got["compute_ms_per_step_of_rank"][1] - 8 * (3.5 + 4.5)) < 1e-9
    assert "rank 0: stage 0 1.00/1.00/0.50, stage 3 4.00/2.00/1.00 -> 76.0 ms" in mb._format_measured(got)
    assert mb._measured_costs(SimpleNamespace(measured_costs=None)) is None  # no measured warm-up
    assert mb._measured_costs(None) is None  # megatron's own schedules


def test_megatron_activations_held_per_rank_follow_the_order():
    """The row log's "activations the order keeps": 1F1B at pp=2 holds pp - rank micro-batches, with B freeing
    them at once; zb-h2 (F = I = W) runs rank 1's I right after its F but keeps up to 2pp - 1 micro-batches' W
    inputs; a W run 6 micro-batches late (a rebuilt order) shows as 7; V placement counts a stage as 1/vp."""
    from ds_plugins.schedule.ir import Action, PipelineShape, Schedule
    from ds_plugins.schedule.registry import build_schedule

    assert mb._activations_held(build_schedule("1f1b", pp=2, microbatches=8)) == [[2, 2], [1, 1]]
    zb_h2 = mb._activations_held(build_schedule("zb-h2", pp=2, microbatches=8))
    assert zb_h2[1] == [1, 3] and zb_h2[0][0] <= 3
    late_w = "1F0 1I0 1F1 1I1 1F2 1I2 1F3 1I3 1F4 1I4 1F5 1I5 1F6 1I6 1W0 1F7 1I7 1W1 1W2 1W3 1W4 1W5 1W6 1W7"
    rank0 = " ".join(f"0F{i}" for i in range(8)) + " " + " ".join(f"0I{i} 0W{i}" for i in range(8))
    shape = PipelineShape(pp=2, microbatches=8)
    order = Schedule("zb-h2", shape, tuple(tuple(Action.parse(a) for a in r.split()) for r in (rank0, late_w)))
    assert mb._activations_held(order) == [[8, 8], [1, 7]]
    assert mb._activations_held(build_schedule("zb-v", pp=2, microbatches=8)) == [[2, 2], [2, 2]]
    assert "rank 1 1 / 7" in mb._format_held([[8, 8], [1, 7]])


def test_megatron_auto_variant_with_a_memory_budget():
    """``auto@GIB`` runs auto under ``--pipeline-memory-limit-gib GIB`` on the V layout, ``auto-loop[@GIB]`` on
    megatron's looped chunks; malformed or misplaced budgets are unknown variants."""
    assert mb._schedule_of("auto@22") == ("auto", 22.0)
    assert mb._schedule_of("zb-v") == ("zb-v", None)
    assert mb._layout("auto@22.5") == "v" and mb._layout("auto") == "v"
    assert mb._schedule_of("auto-loop@22") == ("auto", 22.0) and mb._schedule_of("auto-loop") == ("auto", None)
    assert mb._layout("auto-loop@22") == "loop2" and mb._layout("auto-loop") == "loop2"
    for bad in ("auto@", "auto@x", "auto@0", "auto@-1", "auto@inf", "auto@nan", "zb-v@22", "nope", "nope@22"):
        assert mb._layout(bad) is None, bad
    assert mb.parse_args(["--variants", "auto@20", "zb-v"]).variants == ["auto@20", "zb-v"]
    with pytest.raises(SystemExit):
        mb.parse_args(["--variants", "zb-h2@20"])


def test_megatron_timed_step_costs_line_names_host_issue_times_when_measured():
    costs = {"fiw_ms_per_stage": {0: [5.0, 7.0, 2.0], 1: [6.0, 7.5, 2.5]}, "simulated_ms": 250.0,
             "simulated_warmup_ms": 260.0, "step_ms": 262.5}
    line = mb._format_timed_step_costs(costs)
    assert line == ("timed steps' F/I/W ms per stage [5.00/7.00/2.00, 6.00/7.50/2.50]; the running order simulates "
                    "250.0 ms under them, 260.0 ms under the costs it was planned from; timed step 262.5 ms")
    costs["host_fiw_ms_per_stage"] = {0: [6.5, 3.0, 0.5], 1: [5.5, 3.5, 0.6]}
    assert "; the host issued them in F/I/W ms per stage [6.50/3.00/0.50, 5.50/3.50/0.60]; the running order" in (
        mb._format_timed_step_costs(costs))
    costs["simulated_host_ms"] = 255.25
    assert ("the running order simulates 250.0 ms under them (255.2 ms with no action ending before its host issued "
            "it), 260.0 ms under the costs it was planned from; timed step 262.5 ms") in mb._format_timed_step_costs(costs)
