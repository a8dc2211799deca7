"""Flags, bad combinations, and apply()/remove() of the Megatron adapter (single process, no pipeline run); and
the example pretraining script, launched as its docstring says (two CPU processes)."""
from __future__ import annotations

import argparse
import re
import sys
import types

import pytest

import megatron_patches
from megatron_patches.arguments import MegatronScheduleConfig, config_from_args, extra_args_provider
from megatron_patches.placement import v_stage_of_chunk


def _parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parser.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None)
    return extra_args_provider(parser).parse_args(argv)


def test_flags_parse_into_config():
    args = _parse(["--pipeline-schedule", "zb-v", "--pipeline-model-parallel-size", "4",
                   "--virtual-pipeline-model-parallel-size", "2"])
    assert config_from_args(args) == MegatronScheduleConfig(schedule="zb-v")
    args = _parse(["--pipeline-schedule", "auto", "--pipeline-memory-limit-gib", "20",
                   "--pipeline-model-parallel-size", "4"])
    assert config_from_args(args) == MegatronScheduleConfig(schedule="auto", memory_limit_gib=20.0)
    assert config_from_args(_parse([])) is None
    assert config_from_args(args).measured_costs  # zb-h1/zb-h2/zb-v are rebuilt from measured costs by default
    args = _parse(["--pipeline-schedule", "zb-h2", "--pipeline-uniform-costs", "--pipeline-model-parallel-size", "4"])
    assert config_from_args(args) == MegatronScheduleConfig(schedule="zb-h2", measured_costs=False)


def test_cuda_graphs_flag_parses_and_needs_a_schedule():
    args = _parse(["--pipeline-schedule", "zb-v", "--pipeline-cuda-graphs", "--pipeline-model-parallel-size", "4",
                   "--virtual-pipeline-model-parallel-size", "2"])
    assert config_from_args(args) == MegatronScheduleConfig(schedule="zb-v", cuda_graphs=True)
    assert not config_from_args(_parse(["--pipeline-schedule", "zb-h2", "--pipeline-model-parallel-size", "2"])).cuda_graphs
    with pytest.raises(ValueError, match="cuda_graphs needs a schedule"):
        megatron_patches.apply(None, cuda_graphs=True)
    assert not megatron_patches.is_applied()


def _graphable_config(**changes):
    base = dict(hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=1, context_parallel_size=1,
                recompute_granularity=None, enable_autocast=False, cpu_offloading=False, num_moe_experts=None)
    return types.SimpleNamespace(**dict(base, **changes))


def _ddp_chunk(**changes):
    ddp_config = dict(overlap_grad_reduce=False, overlap_param_gather=False, delay_wgrad_compute=False)
    return types.SimpleNamespace(ddp_config=types.SimpleNamespace(**dict(ddp_config, **changes)), grad_accs=[],
                                 use_forward_hook=False)


@pytest.mark.parametrize("config_changes, chunk_changes, message", [
    ({"hidden_dropout": 0.1}, {}, "dropout 0"),
    ({"tensor_model_parallel_size": 2}, {}, "--tensor-model-parallel-size 1"),
    ({"context_parallel_size": 2}, {}, "--context-parallel-size 1"),
    ({"recompute_granularity": "full"}, {}, "no activation recompute"),
    ({"enable_autocast": True}, {}, "no --enable-autocast"),
    ({"cpu_offloading": True}, {}, "no activation CPU offloading"),
    ({"num_moe_experts": 8}, {}, "a dense model"),
    ({}, {"overlap_grad_reduce": True}, "DDP without --overlap-grad-reduce"),
    ({}, {"overlap_param_gather": True}, "no --overlap-param-gather"),
    ({}, {"delay_wgrad_compute": True}, "DDP without delay_wgrad_compute"),
])
def test_cuda_graphs_refuse_what_a_capture_cannot_hold(config_changes, chunk_changes, message):
    from megatron_patches.cuda_graphs import check_graphable

    check_graphable(_graphable_config(), [_ddp_chunk()])  # what it supports
    with pytest.raises(ValueError, match=re.escape(message) + ".*drop --pipeline-cuda-graphs"):
        check_graphable(_graphable_config(**config_changes), [_ddp_chunk(**chunk_changes)])
    with pytest.raises(ValueError, match="wrapped in megatron's DistributedDataParallel"):
        check_graphable(_graphable_config(), [types.SimpleNamespace()])


def test_cuda_graph_signature_matches_only_calls_like_the_captured_one():
    import torch

    from megatron_patches.cuda_graphs import _Signature

    tokens = torch.zeros(2, 8, dtype=torch.long)
    sig = _Signature((tokens,), {"labels": tokens, "mask": None, "flag": True}, None, torch.zeros(2, 8))
    assert sig.matches((tokens + 1,), {"labels": tokens + 2, "mask": None, "flag": True}, None)
    assert not sig.matches((torch.zeros(2, 9, dtype=torch.long),), {"labels": tokens, "mask": None, "flag": True}, None)
    assert not sig.matches((tokens.float(),), {"labels": tokens, "mask": None, "flag": True}, None)
    assert not sig.matches((tokens,), {"labels": tokens, "mask": None, "flag": False}, None)
    assert not sig.matches((tokens,), {"labels": tokens, "mask": None, "flag": True}, torch.zeros(8, 2, 4))
    with pytest.raises(ValueError, match="cannot be captured"):
        _Signature((object(),), {}, None, torch.zeros(1))
    with pytest.raises(ValueError, match="return one tensor"):
        _Signature((tokens,), {}, None, (torch.zeros(1), torch.zeros(1)))


def test_unknown_schedule_is_rejected_by_argparse():
    with pytest.raises(SystemExit):
        _parse(["--pipeline-schedule", "zb-x"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--pipeline-schedule", "zb-v", "--pipeline-model-parallel-size", "4"],
         "--virtual-pipeline-model-parallel-size 2"),
        (["--pipeline-schedule", "zb-h1", "--pipeline-model-parallel-size", "4",
          "--virtual-pipeline-model-parallel-size", "2"], "runs one model chunk per rank"),
        (["--pipeline-schedule", "interleaved-1f1b", "--pipeline-model-parallel-size", "4"],
         "--virtual-pipeline-model-parallel-size >= 2"),
        (["--pipeline-schedule", "zb-h2"], "--pipeline-model-parallel-size >= 2"),
        (["--pipeline-schedule", "zb-v", "--pipeline-memory-limit-gib", "10", "--pipeline-model-parallel-size",
          "4", "--virtual-pipeline-model-parallel-size", "2"], "only applies to --pipeline-schedule auto"),
        (["--pipeline-memory-limit-gib", "10"], "needs --pipeline-schedule auto"),
        (["--pipeline-schedule", "auto", "--pipeline-memory-limit-gib", "0", "--pipeline-model-parallel-size", "2"],
         "must be positive"),
        (["--pipeline-cuda-graphs"], "--pipeline-cuda-graphs needs --pipeline-schedule"),
    ],
)
def test_bad_flag_combination_gives_clear_error(argv, message):
    with pytest.raises(ValueError, match=message.replace("-", r"\-").replace("+", r"\+")):
        config_from_args(_parse(argv))


@pytest.mark.parametrize(
    "settings, flag",
    [
        (dict(cuda_graph_impl="local"), "--cuda-graph-impl local (or --enable-cuda-graph)"),
        (dict(cuda_graph_impl="transformer_engine"), "--cuda-graph-impl transformer_engine (or --external-cuda-graph)"),
        (dict(cuda_graph_impl="none", enable_cuda_graph=True), "--enable-cuda-graph"),
        (dict(external_cuda_graph=True), "--external-cuda-graph"),
    ],
)
def test_cuda_graphs_are_rejected_on_the_command_line_and_at_the_first_step(settings, flag):
    """Megatron captures its CUDA graphs for its own schedules' order (the local implementation also creates them
    from inside those schedules), and a graphed backward computes weight gradients: with an interleaf schedule a
    graphed layer's weight gradient could not be deferred into W.
    Both megatron's parsed args and its TransformerConfig (what forward_backward_func sees) carry these names."""
    from megatron_patches.forward_backward import _check_unsupported

    args = _parse(["--pipeline-schedule", "zb-h1", "--pipeline-model-parallel-size", "2"])
    vars(args).update(settings)
    with pytest.raises(ValueError, match=re.escape(flag + " cannot be combined with --pipeline-schedule")):
        config_from_args(args)
    for forward_only in (False, True):
        with pytest.raises(ValueError, match=re.escape(flag + " cannot be combined")):
            _check_unsupported(types.SimpleNamespace(**settings), forward_only)
    _check_unsupported(types.SimpleNamespace(cuda_graph_impl="none"), False)  # megatron's default passes


def test_partial_activation_checkpoints_are_rejected_at_the_first_step():
    from megatron_patches.forward_backward import _check_unsupported

    config = types.SimpleNamespace(num_microbatches_with_partial_activation_checkpoints=2)
    with pytest.raises(ValueError, match="--num-microbatches-with-partial-activation-checkpoints picks"):
        _check_unsupported(config, forward_only=False)
    _check_unsupported(config, forward_only=True)  # evaluation recomputes nothing


def test_encoder_decoder_models_are_rejected():
    pytest.importorskip("megatron.core")
    import torch
    from megatron_patches.forward_backward import _check_decoder_only

    class Chunk(torch.nn.Module):
        def __init__(self, xattn_needed):
            super().__init__()
            self.xattn_needed = xattn_needed  # what megatron's T5Model sets (read by megatron's get_model_xattn)

    class Wrapper(torch.nn.Module):  # megatron's DDP / Float16Module keep the model under .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    with pytest.raises(ValueError, match="encoder-decoder models"):
        _check_decoder_only(Wrapper(Chunk(True)))
    _check_decoder_only(Wrapper(Chunk(False)))
    _check_decoder_only(torch.nn.Linear(2, 2))  # no xattn_needed at all: a decoder-style user module


def test_apply_rejects_unknown_schedule_before_touching_megatron():
    with pytest.raises(ValueError, match="choose one of"):
        megatron_patches.apply("gpipe")
    assert not megatron_patches.is_applied()


def test_v_stage_mapping():
    pp = 4
    stages = sorted(v_stage_of_chunk(r, pp, c) for r in range(pp) for c in (0, 1))
    assert stages == list(range(2 * pp))
    assert v_stage_of_chunk(0, pp, 0) == 0 and v_stage_of_chunk(0, pp, 1) == 2 * pp - 1


def test_apply_patches_early_imported_names_and_remove_restores():
    pytest.importorskip("megatron.core")
    from megatron.core import pipeline_parallel
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import layers

    original = schedules.get_forward_backward_func
    original_backward = layers.LinearWithGradAccumulationAndAsyncCommunication.__dict__["backward"]
    # A training script that imported the name before apply() (megatron.training.training does this).
    early = types.ModuleType("early_training_script")
    early.get_forward_backward_func = original
    sys.modules[early.__name__] = early
    try:
        megatron_patches.apply("zb-h1")
        assert megatron_patches.is_applied()
        for holder in (schedules, pipeline_parallel, early):
            assert holder.get_forward_backward_func is not original
            assert holder.get_forward_backward_func.interleaf_original is original
        assert layers.LinearWithGradAccumulationAndAsyncCommunication.__dict__["backward"] is not original_backward
        # Without pipeline parallelism megatron's own no-pipelining function is returned.
        assert early.get_forward_backward_func(1, None) is schedules.forward_backward_no_pipelining
        fb = early.get_forward_backward_func(4, None)
        assert fb.interleaf_schedule == "zb-h1"
        megatron_patches.apply("zb-h2")  # changing the schedule re-uses the patch
        assert early.get_forward_backward_func(4, None).interleaf_schedule == "zb-h2"
    finally:
        megatron_patches.remove()
        del sys.modules[early.__name__]
    for holder in (schedules, pipeline_parallel, early):
        assert holder.get_forward_backward_func is original
    assert layers.LinearWithGradAccumulationAndAsyncCommunication.__dict__["backward"] is original_backward
    assert not megatron_patches.is_applied()


def test_schedule_from_megatron_training_args(monkeypatch):
    pytest.importorskip("megatron.core")
    from megatron.core.pipeline_parallel import schedules

    global_vars = types.ModuleType("megatron.training.global_vars")
    global_vars._GLOBAL_ARGS = _parse(["--pipeline-schedule", "zb-h2", "--pipeline-model-parallel-size", "2"])
    monkeypatch.setitem(sys.modules, "megatron.training.global_vars", global_vars)
    megatron_patches.apply()
    try:
        assert schedules.get_forward_backward_func(2, None).interleaf_schedule == "zb-h2"
        global_vars._GLOBAL_ARGS = _parse([])
        assert schedules.get_forward_backward_func(2, None) is \
            schedules.forward_backward_pipelining_without_interleaving
    finally:
        megatron_patches.remove()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_example_pretraining_script_runs_on_cpu():
    """examples/megatron/pretrain_gpt.py as its docstring launches it (--cpu: gloo through the test-only shim):
    zb-v on pp=2 x vp=2 for 8 iterations: timed for the first 6 (rebuilt from the costs measured in the first 3,
    then, if rebuilt, planned again from the next 3), the final order untimed after."""
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(root, "examples", "megatron", "pretrain_gpt.py"), "--cpu",
           "--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2", "--num-layers", "4",
           "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2",
           "--global-batch-size", "8", "--train-iters", "8", "--pipeline-schedule", "zb-v"]
    proc = subprocess.run(cmd, cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=230)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("iteration")]
    assert len(lines) == 8 and all("schedule zb-v" in line for line in lines), proc.stdout[-3000:]
