"""interleaf schedules under ``deepspeed.initialize``: exact parity with a single-process torch reference and with
DeepSpeed's own 1F1B engine, on CPU/gloo with 2 and 4 ranks.

Each multi-process test spawns ONE process group that runs many scenarios (see ``_pipeline_harness``); the
group's results are computed once per module (fixtures) and checked by several small tests.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from _pipeline_harness import Scenario, max_abs_diff, reference_losses, reference_run, run_group  # noqa: E402

SCHEDULES = ("1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v", "v-half", "v-min", "auto")
TOL = 1e-5  # fp32; all of these runs have been bit-exact on CPU, the tolerance only absorbs BLAS changes
GRAD_RTOL = 1e-5  # per-tensor ||a-b|| / ||b||: gradient RMS goes down to ~6e-5 here, under an absolute 1e-5

TWO_RANK = [
    Scenario(name="deepspeed-1f1b", schedule=None, eval_after=True),
    *[
        # auto re-plans, zb-h1/zb-h2/zb-v are rebuilt from measured costs after step 1: steps 2-3 run the result
        Scenario(name=s, schedule=s, eval_after=(s == "zb-v"),
                 extra={"auto_warmup_iterations": 1} if s in ("auto", "zb-h1", "zb-h2", "zb-v") else {})
        for s in SCHEDULES
    ],
    Scenario(name="zb-v-clip", schedule="zb-v", clip=0.05),
    Scenario(name="interleaved-clip", schedule="interleaved-1f1b", clip=0.05),
    Scenario(name="deepspeed-tied", schedule=None, tied=True),
    Scenario(name="zb-v-tied", schedule="zb-v", tied=True),
    Scenario(name="1f1b-tied", schedule="1f1b", tied=True),
    Scenario(name="zb-v-function", schedule="zb-v", extra={"split_mode": "function"}),  # the older split form
    Scenario(name="zb-h1-actckpt", schedule="zb-h1", checkpoint_interval=1),
    Scenario(name="zb-v-actckpt", schedule="zb-v", checkpoint_interval=2),
    # checkpoint written under zb-v after 1 step, resumed for 2 steps under other schedules (and zb-v itself)
    Scenario(name="ckpt-save-zb-v", schedule="zb-v", steps=1, save_to="ckpt"),
    Scenario(name="ckpt-load-interleaved", schedule="interleaved-1f1b", steps=2, data_offset=1, load_from="ckpt"),
    Scenario(name="ckpt-load-1f1b", schedule="1f1b", steps=2, data_offset=1, load_from="ckpt"),
    Scenario(name="ckpt-load-zb-v", schedule="zb-v", steps=2, data_offset=1, load_from="ckpt"),
    # the same with DeepSpeed's BF16_Optimizer (fp32 masters + momentum) and ZeRO-1 (partitioned state)
    Scenario(name="bf16-ckpt-continuous", schedule="zb-v", steps=4, bf16=True, lr=0.1, memorize=True),
    Scenario(name="bf16-ckpt-save", schedule="zb-v", steps=2, bf16=True, lr=0.1, memorize=True, save_to="bf16ckpt"),
    Scenario(name="bf16-ckpt-load-1f1b", schedule="1f1b", steps=2, data_offset=2, bf16=True, lr=0.1, memorize=True,
             load_from="bf16ckpt"),
    Scenario(name="zero1-ckpt-save", schedule="zb-v", steps=2, zero_stage=1, save_to="z1ckpt"),
    Scenario(name="zero1-ckpt-load-interleaved", schedule="interleaved-1f1b", steps=2, data_offset=2, zero_stage=1,
             load_from="z1ckpt"),
    # bf16: DeepSpeed's BF16_Optimizer, ours vs DeepSpeed's 1F1B
    Scenario(name="deepspeed-bf16", schedule=None, bf16=True, steps=6, lr=0.1, memorize=True),
    Scenario(name="1f1b-bf16", schedule="1f1b", bf16=True, steps=6, lr=0.1, memorize=True),
    Scenario(name="deepspeed-bf16-tied", schedule=None, bf16=True, steps=3, lr=0.1, memorize=True, tied=True),
    Scenario(name="1f1b-bf16-tied", schedule="1f1b", bf16=True, steps=3, lr=0.1, memorize=True, tied=True),
    Scenario(name="zb-v-bf16", schedule="zb-v", bf16=True, steps=6, lr=0.1, memorize=True),
    # bf16 with fp32 gradient sums: DeepSpeed's BF16_Optimizer under ZeRO-1 with grad_accum_dtype fp32
    Scenario(name="deepspeed-bf16-z1-fp32acc", schedule=None, bf16=True, grad_accum_fp32=True, zero_stage=1, steps=4,
             lr=0.1, memorize=True),
    Scenario(name="1f1b-bf16-z1-fp32acc", schedule="1f1b", bf16=True, grad_accum_fp32=True, zero_stage=1, steps=4,
             lr=0.1, memorize=True),
    Scenario(name="zb-h2-bf16", schedule="zb-h2", bf16=True, steps=6, lr=0.1, memorize=True),
    # bad input: ValueError naming the fix, on every rank
    Scenario(name="bad-schedule", schedule="zb-x", expect_error="unknown pipeline schedule"),
    Scenario(name="bad-layers", schedule="interleaved-1f1b", virtual_stages=4, layers=2,
             expect_error="fewer than pp*vp"),
    Scenario(name="bad-microbatches", schedule="interleaved-1f1b", microbatches=1, expect_error="microbatches >="),
    Scenario(name="bad-zero2", schedule="zb-v", zero_stage=2, expect_error="ZeRO stage 2"),
    Scenario(name="bad-memory-limit", schedule="zb-v", extra={"memory_limit_gib": 1.0},
             expect_error="memory_limit_gib applies to schedule 'auto'"),
    Scenario(name="bad-vp", schedule="zb-v", virtual_stages=3, expect_error="virtual_stages"),
]

FOUR_RANK = [
    Scenario(name="dp2-deepspeed", schedule=None, dp=2),
    # rebuilt from measured costs after step 1: both data-parallel pipelines must take the same decision
    Scenario(name="dp2-zb-v", schedule="zb-v", dp=2, extra={"auto_warmup_iterations": 1}),
    Scenario(name="dp2-1f1b-zero1", schedule="1f1b", dp=2, zero_stage=1),
    Scenario(name="dp2-zb-v-zero1-clip", schedule="zb-v", dp=2, zero_stage=1, clip=0.05),
    # weight (W) and, with split_mode "autograd", norm/bias (I) gradients bypass the hooks overlap_comm reduces from
    Scenario(name="dp2-zb-v-zero1-overlap", schedule="zb-v", dp=2, zero_stage=1, overlap_comm=True),
    Scenario(name="pp4-zb-v", schedule="zb-v"),
    Scenario(name="pp4-interleaved", schedule="interleaved-1f1b"),
    Scenario(name="pp4-zb-h2-tied", schedule="zb-h2", tied=True),
    Scenario(name="dp2-deepspeed-bf16", schedule=None, dp=2, bf16=True, steps=4, lr=0.1, memorize=True),
    Scenario(name="dp2-zb-v-bf16-tied", schedule="zb-v", dp=2, bf16=True, steps=4, lr=0.1, memorize=True, tied=True),
    Scenario(name="dp2-zb-v-bf16", schedule="zb-v", dp=2, bf16=True, steps=4, lr=0.1, memorize=True),
]
FOUR_RANK_FP32 = [s.name for s in FOUR_RANK if not s.bf16]


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory):
    return run_group(2, TWO_RANK, str(tmp_path_factory.mktemp("pp2")))


@pytest.fixture(scope="module")
def four_rank(tmp_path_factory):
    return run_group(4, FOUR_RANK, str(tmp_path_factory.mktemp("pp4")))


def _by_name(name: str, scenarios=TWO_RANK) -> Scenario:
    return next(s for s in scenarios if s.name == name)


def _ok(results, name):
    r = results[name]
    assert "exception" not in r, r.get("exception")
    return r


def _assert_matches_reference(r, sc, *, steps=(0, 2)):
    ref = reference_run(sc)
    for s in steps:
        if sc.zero_stage == 0:  # ZeRO-1 keeps reduced gradients in flat partitions, not in param.grad
            d, where = max_abs_diff(r["grads"][s], ref["grads"][s], relative=True)
            assert d <= GRAD_RTOL, f"{sc.name}: gradient after step {s + 1} differs by {d} (relative) at {where}"
        d, where = max_abs_diff(r["params"][s], ref["params"][s])
        assert d <= TOL, f"{sc.name}: parameter after step {s + 1} differs by {d} at {where}"
    assert r["losses"] == pytest.approx(reference_losses(sc), abs=1e-5)


def _assert_same_run(a, b, label):
    for s in range(len(a["params"])):
        d, where = max_abs_diff(a["grads"][s], b["grads"][s], relative=True)
        assert d <= GRAD_RTOL, f"{label}: gradient after step {s + 1} differs by {d} (relative) at {where}"
        d, where = max_abs_diff(a["params"][s], b["params"][s])
        assert d <= TOL, f"{label}: parameter after step {s + 1} differs by {d} at {where}"
    assert a["losses"] == pytest.approx(b["losses"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_deepspeed_own_engine_matches_reference_and_passes_through(two_rank):
    r = _ok(two_rank, "deepspeed-1f1b")
    assert r["ranks"][0]["engine"] == "InterleafPipelineEngine"  # installed, but without the block: DeepSpeed's path
    assert "history" not in r
    _assert_matches_reference(r, _by_name("deepspeed-1f1b"))


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_schedule_matches_reference_and_deepspeed(two_rank, schedule):
    r = _ok(two_rank, schedule)
    _assert_matches_reference(r, _by_name(schedule))
    _assert_same_run(r, _ok(two_rank, "deepspeed-1f1b"), f"{schedule} vs DeepSpeed 1F1B")
    assert all(h["schedule"] for h in r["history"])
    assert all(0.0 <= h["bubble"] < 1.0 and h["tokens_per_s"] > 0 for h in r["history"])


@pytest.mark.slow
def test_auto_replans_from_measurements(two_rank):
    r = _ok(two_rank, "auto")
    names = [h["schedule"] for h in r["history"]]
    assert names[0] == "zb-v"  # warm-up schedule (auto defaults to two chunks per rank in V)
    assert len(r["history"]) == 3
    # auto_warmup_iterations=1: the re-plan from measured F/I/W times happens after step 1, steps 2-3 run it
    assert names[1:] == ["auto", "auto"], names


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["zb-h1", "zb-h2", "zb-v"])
def test_zero_bubble_schedules_are_rebuilt_from_measured_costs(two_rank, schedule):
    """After auto_warmup_iterations=1 step timed per action, every rank learned the decision (rebuilt order or
    kept) from pipeline rank 0 and runs it; steps 2-3 still match the reference (checked with every schedule)."""
    r = _ok(two_rank, schedule)
    assert r["tuning"][0] in ("rebuilt", "kept") and len(set(r["tuning"])) == 1, r["tuning"]
    assert [h["schedule"] for h in r["history"]] == [schedule] * 3


@pytest.mark.slow
def test_eval_batch_matches_reference(two_rank):
    import torch

    from benchmarks import gpt
    from _pipeline_harness import MICRO_BATCH

    sc = _by_name("zb-v")
    ref = reference_run(sc)
    cfg = sc.gpt_config()
    model = gpt.reference_model(cfg)
    with torch.no_grad():
        names = dict(ref["params"][-1])
        for idx, layer in enumerate(model):
            for n, p in layer.named_parameters():
                p.copy_(names[f"{idx}.{n}"])
        data = gpt.synthetic_batches(cfg, MICRO_BATCH, sc.microbatches, seed=999)
        expected = sum(float(gpt.gpt_loss(model(x), y)) for x, y in data) / sc.microbatches
    assert _ok(two_rank, "zb-v")["eval"] == pytest.approx(expected, abs=1e-5)
    assert _ok(two_rank, "deepspeed-1f1b")["eval"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zb-v-clip", "interleaved-clip"])
def test_clipping_uses_global_norm_over_all_stages(two_rank, name):
    sc = _by_name(name)
    r = _ok(two_rank, name)
    ref = reference_run(sc)
    assert r["grad_norms"] == pytest.approx(ref["norms"], rel=1e-5)
    assert min(ref["norms"]) > sc.clip  # clipping really happened
    _assert_matches_reference(r, sc)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deepspeed-tied", "zb-v-tied", "1f1b-tied"])
def test_tied_embeddings(two_rank, name):
    _assert_matches_reference(_ok(two_rank, name), _by_name(name))


def test_function_split_mode_from_the_config_block(two_rank):
    r = _ok(two_rank, "zb-v-function")
    assert r["ranks"][0]["split_mode"] == "function" and _ok(two_rank, "zb-v")["ranks"][0]["split_mode"] == "autograd"
    _assert_matches_reference(r, _by_name("zb-v-function"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zb-h1-actckpt", "zb-v-actckpt"])
def test_activation_checkpointing(two_rank, name):
    _assert_matches_reference(_ok(two_rank, name), _by_name(name))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ckpt-load-interleaved", "ckpt-load-1f1b", "ckpt-load-zb-v"])
def test_checkpoint_round_trip_across_schedules(two_rank, name):
    """Saved under zb-v after step 1, resumed under another schedule: identical to 3 uninterrupted steps
    (weights from DeepSpeed's layer files, SGD momentum from interleaf's layer-indexed optimizer files)."""
    sc = _by_name(name)
    r = _ok(two_rank, name)
    full = Scenario(name="full", schedule="zb-v", steps=3)
    ref = reference_run(full)
    for s in range(2):
        d, where = max_abs_diff(r["params"][s], ref["params"][s + 1])
        assert d <= TOL, f"{sc.name}: parameter after resumed step {s + 1} differs by {d} at {where}"
    assert r["losses"] == pytest.approx(reference_losses(full)[1:], abs=1e-5)


@pytest.mark.slow
def test_checkpoint_round_trip_bf16_optimizer_across_schedules(two_rank):
    """BF16_Optimizer: fp32 master weights and momentum come back exactly under another schedule."""
    resumed = _ok(two_rank, "bf16-ckpt-load-1f1b")
    full = _ok(two_rank, "bf16-ckpt-continuous")
    assert resumed["losses"] == full["losses"][2:]
    for s in range(2):
        d, where = max_abs_diff(resumed["params"][s], full["params"][s + 2])
        assert d == 0.0, f"bf16 resumed step {s + 1} differs by {d} at {where}"


@pytest.mark.slow
def test_checkpoint_round_trip_zero1_across_schedules(two_rank):
    r = _ok(two_rank, "zero1-ckpt-load-interleaved")
    full = Scenario(name="full", schedule="zb-v", steps=4)
    ref = reference_run(full)
    for s in range(2):
        d, where = max_abs_diff(r["params"][s], ref["params"][s + 2])
        assert d <= TOL, f"ZeRO-1 resumed step {s + 1} differs by {d} at {where}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zb-v-bf16", "zb-h2-bf16"])
def test_bf16_trains_and_tracks_deepspeed(two_rank, name):
    ours = _ok(two_rank, name)["losses"]
    theirs = _ok(two_rank, "deepspeed-bf16")["losses"]
    assert ours[-1] < ours[0] - 0.05, ours
    assert ours == pytest.approx(theirs, abs=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("ours_name,theirs_name", [("1f1b-bf16", "deepspeed-bf16"),
                                                   ("1f1b-bf16-tied", "deepspeed-bf16-tied"),
                                                   ("1f1b-bf16-z1-fp32acc", "deepspeed-bf16-z1-fp32acc")])
def test_bf16_1f1b_equals_deepspeed_bit_for_bit(two_rank, ours_name, theirs_name):
    """Same order of micro-batches, same kernels: our accumulation of the bf16 micro-batch gradients into
    BF16_Optimizer's buffers (one foreach add per stage after each backward, instead of DeepSpeed's per-parameter
    loop) must give DeepSpeed's sums exactly, hence the same parameters after every step: with DeepSpeed's default
    bf16 sums, with fp32 sums (grad_accum_dtype fp32, ZeRO-1), and with tied embedding / LM head (their gradients
    are all-reduced between the two stages)."""
    ours, theirs = _ok(two_rank, ours_name), _ok(two_rank, theirs_name)
    sums = "torch.float32" if "fp32acc" in ours_name else "torch.bfloat16"
    for r in (ours, theirs):
        rank0 = r["ranks"][0]
        assert (rank0["optimizer"], rank0["grad_accum_dtype"]) == ("BF16_Optimizer", sums), rank0["grad_accum_dtype"]
        assert all(r["grads"]) and len(r["grads"]) == len(r["losses"])  # gradients were read at every step
    assert ours["losses"] == theirs["losses"]
    for s in range(len(theirs["losses"])):
        d, where = max_abs_diff(ours["grads"][s], theirs["grads"][s])
        assert d == 0.0, f"step {s + 1}: gradient differs by {d} at {where}"
        d, where = max_abs_diff(ours["params"][s], theirs["params"][s])
        assert d == 0.0, f"step {s + 1}: parameter differs by {d} at {where}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["bad-schedule", "bad-layers", "bad-microbatches", "bad-zero2", "bad-memory-limit", "bad-vp"]
)
def test_bad_config_raises_value_error_on_every_rank(two_rank, name):
    sc = _by_name(name)
    r = _ok(two_rank, name)
    assert len(r["errors"]) == 2
    for err in r["errors"]:
        assert err is not None and sc.expect_error in err, err


@pytest.mark.slow
@pytest.mark.timeout(480)
@pytest.mark.parametrize("name", FOUR_RANK_FP32)
def test_four_ranks(four_rank, name):
    sc = _by_name(name, FOUR_RANK)
    r = _ok(four_rank, name)
    _assert_matches_reference(r, sc)
    if sc.clip > 0:
        ref = reference_run(sc)
        assert r["grad_norms"] == pytest.approx(ref["norms"], rel=1e-5)
        assert min(ref["norms"]) > sc.clip


@pytest.mark.slow
def test_data_parallel_pipelines_take_one_decision_from_measured_costs(four_rank):
    """Every rank gathers the measurements of all ranks, so both dp replicas rebuild (or keep) zb-v alike."""
    tuning = _ok(four_rank, "dp2-zb-v")["tuning"]
    assert len(tuning) == 4 and len(set(tuning)) == 1 and tuning[0] in ("rebuilt", "kept"), tuning


@pytest.mark.slow
def test_four_ranks_bf16_data_parallel(four_rank):
    theirs = _ok(four_rank, "dp2-deepspeed-bf16")["losses"]
    for name in ("dp2-zb-v-bf16", "dp2-zb-v-bf16-tied"):
        ours = _ok(four_rank, name)["losses"]
        assert ours[-1] < ours[0] - 0.05, (name, ours)
        if "tied" not in name:
            assert ours == pytest.approx(theirs, abs=2e-2), (name, ours, theirs)
