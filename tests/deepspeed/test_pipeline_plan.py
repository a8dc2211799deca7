"""Fast checks of the DeepSpeed pipeline adapter that need no process group: config checks, install/uninstall,
the auto re-plan decision, and the demo/benchmark scripts' CPU smoke runs (slow-marked)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ds_plugins.config import PipelineConfig
from ds_plugins.deepspeed.pipeline_engine import plan_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize(
    "cfg, kwargs, message",
    [
        (dict(schedule="zb-v"), dict(zero_stage=2), 'set "zero_optimization": {"stage": 0} or {"stage": 1}'),
        (dict(schedule="zb-v"), dict(zero_stage=3), "ZeRO stage 3"),
        (dict(schedule="zb-v"), dict(model_parallel_size=2), "pipe x data parallel"),
        (dict(schedule="zb-v"), dict(pp=1), "at least 2 pipeline stages"),
        (dict(schedule="interleaved-1f1b"), dict(microbatches=2, pp=4), "raise microbatches to >= 4"),
        (dict(schedule="zb-h1", virtual_stages=2), {}, "set virtual_stages to 1"),
        (dict(schedule="v-half", virtual_stages=4), {}, "set virtual_stages to 2"),
        (dict(schedule="zb-v", memory_limit_gib=4.0), {}, "memory_limit_gib applies to schedule 'auto' only"),
    ],
)
def test_bad_pipeline_config_names_the_fix(cfg, kwargs, message):
    args = dict(pp=4, microbatches=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("{", r"\{")
                       .replace("}", r"\}").replace("*", r"\*")):
        plan_pipeline(PipelineConfig(**cfg), **args)


def test_unknown_schedule_is_rejected_by_the_config_block():
    with pytest.raises(ValueError, match="unknown pipeline schedule 'zb-x'"):
        PipelineConfig(schedule="zb-x")


@pytest.mark.parametrize(
    "name, vp, placement, stages",
    [
        ("1f1b", 1, "loop", 4),
        ("interleaved-1f1b", 2, "loop", 8),
        ("zb-h1", 1, "loop", 4),
        ("zb-h2", 1, "loop", 4),
        ("zb-v", 2, "v", 8),
        ("v-half", 2, "v", 8),
        ("v-min", 2, "v", 8),
        ("auto", 2, "v", 8),  # warm-up under zb-v, two chunks per rank in V
    ],
)
def test_plan_shapes(name, vp, placement, stages):
    plan = plan_pipeline(PipelineConfig(schedule=name), pp=4, microbatches=8)
    assert plan.shape.vp == vp and plan.shape.placement == placement and plan.shape.num_stages == stages
    if name == "auto":
        assert plan.schedule.name == "zb-v"


def test_auto_with_one_chunk_warms_up_under_zb_h1():
    plan = plan_pipeline(PipelineConfig(schedule="auto", virtual_stages=1), pp=4, microbatches=8)
    assert plan.schedule.name == "zb-h1" and plan.shape.placement == "loop"


def test_install_swaps_and_uninstall_restores_deepspeed_engine():
    import deepspeed
    from deepspeed.runtime.pipe.engine import PipelineEngine

    import ds_plugins
    from ds_plugins.deepspeed import pipeline_engine

    ds_plugins.install()
    assert deepspeed.PipelineEngine is pipeline_engine.InterleafPipelineEngine
    assert issubclass(deepspeed.PipelineEngine, PipelineEngine)
    ds_plugins.uninstall()
    try:
        assert deepspeed.PipelineEngine is PipelineEngine
        from deepspeed.runtime.pipe.module import PipelineModule

        assert not hasattr(PipelineModule.__init__, "__wrapped__")
    finally:
        ds_plugins.install()
    assert deepspeed.PipelineEngine is pipeline_engine.InterleafPipelineEngine


def _bare_runner(memory_limit_gib):
    from ds_plugins.deepspeed._runner import ScheduleRunner

    plan = plan_pipeline(PipelineConfig(schedule="auto", memory_limit_gib=memory_limit_gib), pp=2, microbatches=4)
    runner = ScheduleRunner.__new__(ScheduleRunner)
    runner.shape = plan.shape
    runner.config = plan.config
    return runner


def _measurements(shape, activation_bytes):
    out = []
    for rank in range(shape.pp):
        times = {}
        mem = {}
        for s in shape.stages_of(rank):
            times.update({("F", s): 1.0, ("I", s): 1.0, ("W", s): 0.5})
            mem.update({("F", s): float(activation_bytes), ("I", s): -activation_bytes / 2})
        out.append(([times], [mem]))
    return out


def test_auto_replan_from_measured_costs():
    runner = _bare_runner(None)
    schedule = runner._plan_auto(_measurements(runner.shape, 2**30))
    assert schedule.shape == runner.shape
    assert schedule.splits_backward


def test_auto_memory_limit_below_any_schedule_is_a_clear_error():
    runner = _bare_runner(0.25)  # GiB, while one micro-batch needs 1 GiB of activations per stage
    outcome = runner._plan_auto(_measurements(runner.shape, 2**30))
    assert isinstance(outcome, str) and "memory_limit" in outcome and "raise" in outcome


def _measured_fiw(shape, f, i, w):
    """Every rank's per-action times (seconds) as the runner gathers them; memory: none (CPU)."""
    out = []
    for rank in range(shape.pp):
        times = {}
        for s in shape.stages_of(rank):
            times.update({("F", s): f, ("I", s): i, ("W", s): w})
        out.append(([times], []))
    return out


def _bare_tuned_runner(schedule, microbatches):
    from types import SimpleNamespace

    from ds_plugins.deepspeed._runner import ScheduleRunner

    plan = plan_pipeline(PipelineConfig(schedule=schedule), pp=2, microbatches=microbatches)
    runner = ScheduleRunner.__new__(ScheduleRunner)
    runner.shape, runner.config = plan.shape, plan.config
    runner.executor = SimpleNamespace(schedule=plan.schedule)
    return runner, plan.schedule


def test_zb_v_rebuilt_from_gpu_like_measured_costs():
    """H100-like costs (I = 2.16 F, W = 1.12 F): the zb-v order built for F = I = W idles 21% of the step at pp=2,
    m=8 (simulated), the rebuilt one 7%: the runner switches to it."""
    runner, built = _bare_tuned_runner("zb-v", 8)
    rebuilt = runner._plan_retune(_measured_fiw(runner.shape, 4.1e-3, 8.86e-3, 4.59e-3))
    assert rebuilt is not None and rebuilt is not built
    assert rebuilt.name == "zb-v" and rebuilt.shape == built.shape


def test_retune_keeps_the_order_for_uniform_costs():
    runner, _ = _bare_tuned_runner("zb-h1", 8)
    assert runner._plan_retune(_measured_fiw(runner.shape, 1e-3, 1e-3, 1e-3)) is None


def test_measured_costs_config():
    assert PipelineConfig(schedule="zb-v").measured_costs is True
    assert PipelineConfig.from_dict({"schedule": "zb-v", "measured_costs": False}).measured_costs is False


def _run_script(args, timeout):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_demo_runs_on_cpu(tmp_path):
    png = tmp_path / "zb-v.png"
    proc = _run_script(["examples/deepspeed/train_gpt_pipeline.py", "--procs", "4", "--steps", "3",
                        "--png", str(png)], timeout=230)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "[    DeepSpeed 1F1B] step  3" in out and "[    interleaf zb-v] step  3" in out
    assert "tokens/s" in out and "bubble" in out
    assert png.exists() and png.stat().st_size > 1000


def _tiny_benchmark(tmp_path, args, variants) -> str:
    """benchmarks/pipeline.py --tiny on 4 CPU processes; its BENCHMARKS.md section, after checking every variant
    ran."""
    out_md = tmp_path / "BENCH.md"
    proc = _run_script(["benchmarks/pipeline.py", "--tiny", "--procs", "4", *args, "--warmup", "4", "--steps", "1",
                        "--variants", *variants, "--out", str(out_md)], timeout=230)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAILED" not in proc.stdout
    text = out_md.read_text()
    for variant in variants:
        assert f"| {variant}" in text, text
    return text


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_benchmark_runs_tiny_on_cpu(tmp_path):
    text = _tiny_benchmark(tmp_path, ["--microbatches", "8"], ["deepspeed-1f1b", "1f1b", "zb-v", "auto", "torch-1f1b"])
    assert "| ideal" in text, text


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_benchmark_runs_pipeline_times_data_parallel_on_cpu(tmp_path):
    """--pp 2 on 4 ranks: two data-parallel pipelines (issue 6's pp=4 x dp=2 layout, scaled down); the torch rows
    build their pipeline and data-parallel groups in DeepSpeed's topology."""
    text = _tiny_benchmark(tmp_path, ["--pp", "2", "--microbatches", "4"], ["deepspeed-1f1b", "zb-v", "torch-1f1b"])
    assert "<!-- benchmarks/pipeline.py pp=2 dp=2 -->" in text


def test_retune_that_cannot_build_keeps_the_running_order(caplog):
    """The rebuild is an optimisation: measurements it cannot use (here: no timings at all) log a warning and the
    runner keeps its order instead of failing the training step."""
    runner, _ = _bare_tuned_runner("zb-v", 8)
    empty = [([], []) for _ in range(runner.shape.pp)]
    with caplog.at_level("WARNING"):
        assert runner._plan_retune(empty) is None
    assert "not rebuilt from measured costs" in caplog.text
