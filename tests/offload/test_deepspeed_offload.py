"""InterleafZeroOptimizer on DeepSpeed's CPU accelerator (gloo): exactness against DeepSpeed without offload and
against plain torch AdamW, clipping, fp16 overflow, checkpoints with a changed split, ZeRO-2 dp=2, ZeRO-1 + PP=2.

The "GPU" half runs on the CPU accelerator device: split, worker thread, per-layer waits, rollback-free skip and
checkpoint paths are exercised; timing needs a GPU (benchmarks/offload.py).
"""
from __future__ import annotations

import pytest
import torch

from . import _harness as H

TOL = 1e-6  # per-tensor relative error ||a-b|| / ||b||
STREAM_BUDGET = 27000 / 2**30  # one subgroup resident, the other five streamed (see test_streamed_subgroups_exact)
STEPS = 10


def _plan_info(engine) -> dict:
    opt = engine.optimizer
    ex = opt._executor
    return {
        "gpu_fraction": opt.last_plan.gpu_fraction if opt.last_plan is not None else None,
        "cpu_numel": ex.timings.cpu_numel,
        "gpu_numel": ex.timings.gpu_numel,
        "subgroups": len(ex.subgroups),
        "step": [int(opt.optimizer.state[p]["step"]) for p in opt.single_partition_of_fp32_groups],
        "hooks": len(opt._wait_handles),  # per-layer forward waits (registered while some subgroup is on the host)
        "early_numel": ex.timings.early_numel,
        "placements": [p.value for p in ex.placements],
        "host_grads_16bit": opt._host_grads_lowp is not None,
        "plan_reasons": [h["reason"] for h in opt.plan_history],
    }


def _record_plan(tag, engine, result):
    if tag == "end" and type(engine.optimizer).__name__ == "InterleafZeroOptimizer":
        result["plan"] = _plan_info(engine)


def _record_masters(tag, engine, result):
    """fp32 master partitions (what bf16 training really updates) and, for interleaf, the plan."""
    if tag != "end":
        return
    _record_plan(tag, engine, result)
    if hasattr(engine.optimizer, "sync_optimizer_state"):
        engine.optimizer.sync_optimizer_state()
    result["masters"] = [t.detach().double().numpy().copy() for t in engine.optimizer.single_partition_of_fp32_groups]


def _masters_rel_diff(a, b) -> float:
    import numpy as np

    return max(float(np.linalg.norm(x - y) / np.linalg.norm(y)) for x, y in zip(a["masters"], b["masters"]))


# ---------------------------------------------------------------------------------------------- fp32 parity
def _fp32_scenarios(rank, world):
    out = {}
    out["torch"] = H.torch_reference(STEPS)
    out["torch_clip"] = H.torch_reference(STEPS, clip=0.05)
    out["ds"] = H.train_engine(H.ds_config(offload=False), STEPS)
    out["ds_clip"] = H.train_engine(H.ds_config(offload=False, clip=0.05), STEPS)
    for fraction in (0.0, 0.5, "auto", 1.0):
        out[f"il_{fraction}"] = H.train_engine(H.ds_config(interleaf={"gpu_fraction": fraction}), STEPS,
                                               engine_hook=_record_plan)
    out["il_nowait"] = H.train_engine(H.ds_config(interleaf={"gpu_fraction": 0.5}), STEPS, wait_each_step=False,
                                      engine_hook=_record_plan)
    out["ds_functional"] = H.train_engine(H.ds_config(offload=False), STEPS, model=H.FunctionalHeadModel())
    out["il_functional"] = H.train_engine(H.ds_config(interleaf={"gpu_fraction": 0.0}), STEPS,
                                          model=H.FunctionalHeadModel(), wait_each_step=False)
    out["il_clip"] = H.train_engine(H.ds_config(clip=0.05, interleaf={"gpu_fraction": 0.5}), STEPS,
                                    engine_hook=_record_plan)
    out["il_stage1"] = H.train_engine(H.ds_config(stage=1, interleaf={"gpu_fraction": 0.5}), STEPS,
                                      engine_hook=_record_plan)
    out["il_cpu_mode"] = H.train_engine(H.ds_config(interleaf={"mode": "cpu"}), STEPS, engine_hook=_record_plan)
    # a budget that holds only part of the state resident: the rest of the GPU share streams
    out["il_streamed"] = H.train_engine(
        H.ds_config(interleaf={"gpu_fraction": 1.0, "gpu_memory_budget_gib": STREAM_BUDGET}), STEPS,
        engine_hook=_record_plan)
    # bf16: host updates start during backward when the step cannot be skipped or rescaled
    bf16 = {"bf16": {"enabled": True, "check_grad_overflow": False}}
    for clip in (0.0, 0.05):
        out[f"ds_bf16_{clip}"] = H.train_engine(H.ds_config(offload=False, clip=clip, **bf16), STEPS,
                                                dtype=torch.bfloat16, engine_hook=_record_masters)
        out[f"il_bf16_{clip}"] = H.train_engine(H.ds_config(clip=clip, interleaf={"gpu_fraction": 0.5}, **bf16),
                                                STEPS, dtype=torch.bfloat16, engine_hook=_record_masters,
                                                wait_each_step=False)
    # gradient accumulation 2 (DeepSpeed's accumulate-through-host path) with clipping
    ga = dict(gradient_accumulation_steps=2, train_batch_size=2 * H.BATCH)
    data = H.batches(2 * STEPS)

    def ga_run(cfg, dtype=torch.float32):
        import deepspeed

        model = H.make_model(dtype)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          optimizer=H.make_optimizer(model.parameters()), config=cfg)
        for x, y in data:
            engine.backward(H.loss_fn(engine(x.to(dtype)), y))
            engine.step()
        if hasattr(engine.optimizer, "wait_for_updates"):
            engine.optimizer.wait_for_updates()
        result = {"params": H.snapshot(engine.module)}
        _record_masters("end", engine, result)
        return result

    out["ds_ga"] = ga_run(H.ds_config(offload=False, clip=0.05, **ga))
    out["il_ga"] = ga_run(H.ds_config(clip=0.05, interleaf={"gpu_fraction": 0.5}, **ga))
    # bf16 + GA: host updates start in the backward of the last micro-batch only
    out["ds_ga_bf16"] = ga_run(H.ds_config(offload=False, **ga, **bf16), torch.bfloat16)
    out["il_ga_bf16"] = ga_run(H.ds_config(interleaf={"gpu_fraction": 0.5}, **ga, **bf16), torch.bfloat16)
    return out


@pytest.fixture(scope="module")
def fp32_runs(tmp_path_factory):
    return H.run_ranks(_fp32_scenarios, 1, tmp_path_factory.mktemp("fp32"))[0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fraction", [0.0, 0.5, "auto", 1.0])
def test_params_equal_deepspeed_without_offload(fp32_runs, fraction):
    run = fp32_runs[f"il_{fraction}"]
    assert run["optimizer"] == "InterleafZeroOptimizer"
    for step in range(STEPS):
        assert H.max_rel_diff(run["params"][step], fp32_runs["ds"]["params"][step]) <= TOL, step
        assert H.max_rel_diff(run["params"][step], fp32_runs["torch"]["params"][step]) <= TOL, step
    assert run["plan"]["step"] == [STEPS]
    # per-layer waits are installed (dp=1) exactly while some subgroup is updated on the host
    assert (run["plan"]["hooks"] > 0) == any(p == "cpu" for p in run["plan"]["placements"]), run["plan"]
    reasons = run["plan"]["plan_reasons"]
    if fraction == "auto":  # re-planned from the first measured iteration (and possibly later ones)
        assert len(reasons) >= 2 and "window measured" in reasons[1], reasons
    else:  # a forced split: the first measured iteration only refreshes its prediction
        assert len(reasons) == 2, reasons


@pytest.mark.timeout(300)
def test_next_forward_waits_per_layer(fp32_runs):
    """No explicit wait between steps: only the forward pre-hooks order each layer after its host update."""
    run, ref = fp32_runs["il_nowait"], fp32_runs["ds"]
    assert run["losses"] == pytest.approx(ref["losses"], rel=1e-6)
    assert H.max_rel_diff(run["params"][-1], ref["params"][-1]) <= TOL


@pytest.mark.timeout(300)
@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_bf16_host_updates_during_backward_only_when_exact(fp32_runs, clip):
    run, ref = fp32_runs[f"il_bf16_{clip}"], fp32_runs[f"ds_bf16_{clip}"]
    assert _masters_rel_diff(run, ref) <= TOL
    assert run["losses"] == pytest.approx(ref["losses"], rel=1e-6)
    if clip == 0.0:  # nothing can skip or rescale the step: the host half starts during backward
        assert run["plan"]["early_numel"] == run["plan"]["cpu_numel"] > 0
        assert run["plan"]["host_grads_16bit"]  # and its gradients come down as bf16
    else:  # clipping needs the global norm first
        assert run["plan"]["early_numel"] == 0 and run["plan"]["cpu_numel"] > 0
        assert not run["plan"]["host_grads_16bit"]
    assert fp32_runs["il_0.5"]["plan"]["early_numel"] == 0  # fp32 skips on a non-finite norm: no early start


@pytest.mark.timeout(300)
def test_weights_read_outside_their_module_are_waited_for(fp32_runs):
    """The head's weights are used by the parent's forward (F.linear), the head's own forward never runs."""
    run, ref = fp32_runs["il_functional"], fp32_runs["ds_functional"]
    assert run["losses"] == pytest.approx(ref["losses"], rel=1e-6)
    assert H.max_rel_diff(run["params"][-1], ref["params"][-1]) <= TOL


@pytest.mark.timeout(300)
def test_split_really_splits(fp32_runs):
    half = fp32_runs["il_0.5"]["plan"]
    assert 0.3 <= half["gpu_fraction"] <= 0.7
    assert half["cpu_numel"] > 0 and half["gpu_numel"] > 0 and half["subgroups"] >= 4
    assert fp32_runs["il_0.0"]["plan"]["gpu_numel"] == 0
    assert fp32_runs["il_1.0"]["plan"]["cpu_numel"] == 0
    assert fp32_runs["il_cpu_mode"]["plan"]["gpu_numel"] == 0
    assert H.max_rel_diff(fp32_runs["il_cpu_mode"]["params"][-1], fp32_runs["ds"]["params"][-1]) <= TOL


@pytest.mark.timeout(300)
def test_streamed_subgroups_exact(fp32_runs):
    run = fp32_runs["il_streamed"]
    # the model's subgroups are [384, 600, 48, 600, 192, 8] parameters: 27000 B hold the first resident
    # (16 B/param) plus the others' GPU gradients (4 B/param) and two staging buffers of the biggest (2 x 12 B)
    assert run["plan"]["placements"] == ["gpu_resident"] + ["gpu_streamed"] * 5
    assert H.max_rel_diff(run["params"][-1], fp32_runs["ds"]["params"][-1]) <= TOL


@pytest.mark.timeout(300)
def test_zero_stage1(fp32_runs):
    assert H.max_rel_diff(fp32_runs["il_stage1"]["params"][-1], fp32_runs["ds"]["params"][-1]) <= TOL


@pytest.mark.timeout(300)
def test_clipping_active_and_exact(fp32_runs):
    run, ref = fp32_runs["il_clip"], fp32_runs["ds_clip"]
    assert all(norm > 0.05 * 2 for norm in ref["norms"]), ref["norms"]  # clipping acts on every step
    assert run["norms"] == pytest.approx(ref["norms"], rel=1e-5)
    for step in range(STEPS):
        assert H.max_rel_diff(run["params"][step], ref["params"][step]) <= TOL, step
        assert H.max_rel_diff(run["params"][step], fp32_runs["torch_clip"]["params"][step]) <= TOL, step
    # and clipping changed the result
    assert H.max_rel_diff(run["params"][-1], fp32_runs["ds"]["params"][-1]) > 1e-3


@pytest.mark.timeout(300)
def test_gradient_accumulation(fp32_runs):
    assert H.max_rel_diff(fp32_runs["il_ga"]["params"], fp32_runs["ds_ga"]["params"]) <= TOL
    run = fp32_runs["il_ga_bf16"]
    assert _masters_rel_diff(run, fp32_runs["ds_ga_bf16"]) <= TOL
    assert run["plan"]["early_numel"] == run["plan"]["cpu_numel"] > 0


# ---------------------------------------------------------------------------------------------- fp16 overflow
def _fp16_scenarios(rank, world):
    from deepspeed.accelerator import get_accelerator

    type(get_accelerator()).is_fp16_supported = lambda self: True  # fp16 on the CPU accelerator, for the test
    out = {}
    for poisoned in ("first", "last"):  # a GPU-half layer and a host-half layer
        def engine_hook(tag, engine, result, poisoned=poisoned):
            if tag == "init":
                layers = [m for m in engine.module if isinstance(m, torch.nn.Linear)]
                target = layers[0] if poisoned == "first" else layers[-1]
                engine.step_counter = [0]

                def inject(grad):
                    return grad * float("inf") if engine.global_steps == 3 else grad

                target.weight.register_hook(inject)
            else:
                _record_plan(tag, engine, result)
                if hasattr(engine.optimizer, "sync_optimizer_state"):
                    engine.optimizer.sync_optimizer_state()
                result["masters"] = [
                    t.detach().double().numpy().copy() for t in engine.optimizer.single_partition_of_fp32_groups]
                result["loss_scale"] = engine.optimizer.loss_scale

        cfg = H.ds_config(fp16=True, interleaf={"gpu_fraction": 0.5})
        out[f"il_{poisoned}"] = H.train_engine(cfg, STEPS, dtype=torch.float16, engine_hook=engine_hook)
        out[f"ds_{poisoned}"] = H.train_engine(H.ds_config(fp16=True, offload=False), STEPS, dtype=torch.float16,
                                               engine_hook=engine_hook)
    return out


@pytest.mark.timeout(300)
def test_fp16_overflow_skips_both_halves(tmp_path):
    runs = H.run_ranks(_fp16_scenarios, 1, tmp_path)[0]
    for poisoned in ("first", "last"):
        run, ref = runs[f"il_{poisoned}"], runs[f"ds_{poisoned}"]
        assert run["skipped"] == 1 and ref["skipped"] == 1
        # the poisoned step (index 3) changed nothing, on either half
        for name in run["params"][3]:
            assert (run["params"][3][name] == run["params"][2][name]).all(), name
        assert run["plan"]["step"] == [STEPS - 1]  # step counter not advanced by the skipped step
        assert run["plan"]["cpu_numel"] > 0 and run["plan"]["gpu_numel"] > 0
        assert run["loss_scale"] == ref["loss_scale"]
        import numpy as np

        for mine, theirs in zip(run["masters"], ref["masters"]):
            assert np.linalg.norm(mine - theirs) <= TOL * np.linalg.norm(theirs)
        assert H.max_rel_diff(run["params"][-1], ref["params"][-1]) <= 1e-3  # fp16 weights: same rounding


# ---------------------------------------------------------------------------------------------- checkpoints
def _checkpoint_scenarios(rank, world, ckpt_dir):
    out = {}
    data = H.batches(STEPS)
    out["straight"] = H.train_engine(H.ds_config(interleaf={"gpu_fraction": 0.5}), STEPS, data=data)
    out["ds"] = H.train_engine(H.ds_config(offload=False), STEPS, data=data)

    def save(tag, engine, result):
        if tag == "end":
            engine.save_checkpoint(ckpt_dir, tag="half")

    H.train_engine(H.ds_config(interleaf={"gpu_fraction": 0.5}), STEPS // 2, data=data[:STEPS // 2],
                   engine_hook=save)
    for name, cfg in (
        ("resumed_gpu", H.ds_config(interleaf={"gpu_fraction": 1.0})),
        ("resumed_cpu", H.ds_config(interleaf={"gpu_fraction": 0.0})),
        ("resumed_plain_deepspeed", H.ds_config()),  # DeepSpeed's own ZeRO-Offload reads our checkpoint
    ):
        def load(tag, engine, result):
            if tag == "init":
                engine.load_checkpoint(ckpt_dir, tag="half")

        out[name] = H.train_engine(cfg, STEPS - STEPS // 2, data=data[STEPS // 2:], engine_hook=load)
    return out


@pytest.mark.timeout(300)
def test_checkpoint_roundtrip_with_changed_split(tmp_path):
    runs = H.run_ranks(_checkpoint_scenarios, 1, tmp_path, str(tmp_path / "ckpt"))[0]
    assert H.max_rel_diff(runs["straight"]["params"][-1], runs["ds"]["params"][-1]) <= TOL
    for name in ("resumed_gpu", "resumed_cpu", "resumed_plain_deepspeed"):
        for k in range(STEPS - STEPS // 2):
            got = runs[name]["params"][k]
            assert H.max_rel_diff(got, runs["straight"]["params"][STEPS // 2 + k]) <= TOL, (name, k)


# ---------------------------------------------------------------------------------------------- host threads
@pytest.mark.parametrize("env, expected", [
    ({}, (1, "")),
    ({"LOCAL_WORLD_SIZE": "4"}, (4, "LOCAL_WORLD_SIZE")),  # torchrun
    ({"LOCAL_SIZE": "8"}, (8, "LOCAL_SIZE")),  # DeepSpeed's launcher sets no LOCAL_WORLD_SIZE
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, (2, "OMPI_COMM_WORLD_LOCAL_SIZE")),
    ({"LOCAL_WORLD_SIZE": "4", "LOCAL_SIZE": "8"}, (4, "LOCAL_WORLD_SIZE")),  # torchrun's wins
    ({"LOCAL_WORLD_SIZE": "", "LOCAL_SIZE": "8"}, (8, "LOCAL_SIZE")),
    ({"LOCAL_WORLD_SIZE": "four", "MPI_LOCALNRANKS": "3"}, (3, "MPI_LOCALNRANKS")),  # not a number: skipped
    ({"LOCAL_WORLD_SIZE": "0"}, (1, "")),
])
def test_local_ranks_from_the_launchers_variables(env, expected):
    """host_threads auto divides the CPUs by the processes on this host, whichever launcher started them: with
    `deepspeed --num_gpus 8` and only LOCAL_WORLD_SIZE read, each of 8 ranks took half of the host's CPUs."""
    from ds_plugins.deepspeed.offload_optimizer import _local_ranks

    assert _local_ranks(env) == expected


def test_ranks_sharing_cpus_sees_per_rank_binding():
    """With a process group, host_threads auto counts the ranks on this host whose affinity overlaps this one's:
    8 ranks sharing 16 CPUs share them; 8 ranks bound to 2 CPUs each (deepspeed --bind_cores_to_rank) share
    none, where dividing by the launcher's local size would leave each rank 2 // 8 // 2 -> 1 thread."""
    from ds_plugins.deepspeed.offload_optimizer import _sharing_cpus

    everything = list(range(16))
    shared = [("a", everything)] * 8 + [("b", everything)] * 8
    assert _sharing_cpus(shared, "a", frozenset(everything)) == 8
    bound = [("a", [2 * r, 2 * r + 1]) for r in range(8)]
    assert _sharing_cpus(bound, "a", frozenset({4, 5})) == 1
    halves = [("a", list(range(8)))] * 4 + [("a", list(range(8, 16)))] * 4  # one NUMA node per 4 ranks
    assert _sharing_cpus(halves, "a", frozenset(range(8))) == 4
    assert _sharing_cpus([("b", everything)], "a", frozenset(everything)) == 1  # never below one


# ---------------------------------------------------------------------------------------------- bad configs
def test_bad_config_errors_torch_free():
    from ds_plugins.offload.settings import offload_config_from_ds_config as check

    zero = {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    assert check({"zero_optimization": zero}) is None
    assert check({"zero_optimization": zero, "interleaf": {"offload": {}}}).gpu_fraction == "auto"
    with pytest.raises(ValueError, match="unknown offload mode"):
        check({"zero_optimization": zero, "interleaf": {"offload": {"mode": "gpu"}}})
    with pytest.raises(ValueError, match=r"gpu_fraction must be in \[0, 1\]"):
        check({"zero_optimization": zero, "interleaf": {"offload": {"gpu_fraction": 1.5}}})
    with pytest.raises(ValueError, match="needs ZeRO stage 1 or 2"):
        check({"interleaf": {"offload": {"gpu_fraction": 0.5}}})
    with pytest.raises(ValueError, match="needs ZeRO stage 1 or 2"):
        check({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
               "interleaf": {"offload": {}}})
    with pytest.raises(ValueError, match='offload_optimizer.device": "cpu"'):
        check({"zero_optimization": {"stage": 2}, "interleaf": {"offload": {}}})
    with pytest.raises(ValueError, match='offload_optimizer.device": "cpu"'):
        check({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}},
               "interleaf": {"offload": {}}})
    with pytest.raises(ValueError, match="unknown key"):
        check({"zero_optimization": zero, "interleaf": {"offload": {"fraction": 0.5}}})


def _bad_config_scenarios(rank, world):
    import deepspeed

    errors = {}
    for name, cfg, opt in (
        ("no_zero", {**H.ds_config(offload=False, stage=0), "interleaf": {"offload": {}}}, None),
        ("no_offload", H.ds_config(offload=False, interleaf={}), None),
        ("bad_fraction", H.ds_config(interleaf={"gpu_fraction": -0.1}), None),
        ("sgd", H.ds_config(interleaf={}), "sgd"),
    ):
        model = H.make_model()
        optimizer = (torch.optim.SGD(model.parameters(), lr=0.1) if opt == "sgd"
                     else H.make_optimizer(model.parameters()))
        try:
            deepspeed.initialize(model=model, model_parameters=model.parameters(), optimizer=optimizer, config=cfg)
            errors[name] = None
        except ValueError as exc:
            errors[name] = str(exc)
    # without the block: DeepSpeed's own class, untouched
    model = H.make_model()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      optimizer=H.make_optimizer(model.parameters()), config=H.ds_config())
    errors["plain_class"] = type(engine.optimizer).__module__ + "." + type(engine.optimizer).__name__
    # uninstall: DeepSpeed's class and engine method come back; the block is then ignored
    import deepspeed.runtime.engine as ds_engine
    import ds_plugins
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    ds_plugins.uninstall()
    errors["restored"] = ds_engine.DeepSpeedZeroOptimizer is DeepSpeedZeroOptimizer and \
        ds_engine.DeepSpeedEngine._configure_optimizer.__module__ == "deepspeed.runtime.engine"
    model = H.make_model()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      optimizer=H.make_optimizer(model.parameters()),
                                      config=H.ds_config(interleaf={"gpu_fraction": 0.5}))
    errors["after_uninstall"] = type(engine.optimizer).__name__
    return errors


@pytest.mark.timeout(300)
def test_bad_config_errors_through_deepspeed(tmp_path):
    errors = H.run_ranks(_bad_config_scenarios, 1, tmp_path)[0]
    assert "needs ZeRO stage 1 or 2" in errors["no_zero"]
    assert 'offload_optimizer.device": "cpu"' in errors["no_offload"]
    assert "gpu_fraction must be in [0, 1]" in errors["bad_fraction"]
    assert "Adam/AdamW only" in errors["sgd"]
    assert errors["plain_class"] == "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer"
    assert errors["restored"] and errors["after_uninstall"] == "DeepSpeedZeroOptimizer"


# ---------------------------------------------------------------------------------------------- 2 ranks
def _dp2_scenarios(rank, world):
    return {
        "ds": H.train_engine(H.ds_config(offload=False, world=world, clip=0.05), STEPS, rank=rank, world=world),
        "il": H.train_engine(H.ds_config(world=world, clip=0.05, interleaf={"gpu_fraction": 0.5}), STEPS,
                             rank=rank, world=world, engine_hook=_record_plan),
    }


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_zero2_two_ranks(tmp_path):
    runs = H.run_ranks(_dp2_scenarios, 2, tmp_path)
    for rank_runs in runs:
        assert rank_runs["il"]["plan"]["hooks"] == 0  # dp > 1: the step all-gathers after the host half
        for step in range(STEPS):
            assert H.max_rel_diff(rank_runs["il"]["params"][step], rank_runs["ds"]["params"][step]) <= TOL, step
    assert H.max_rel_diff(runs[0]["il"]["params"][-1], runs[1]["il"]["params"][-1]) == 0.0


def _pipeline_scenarios(rank, world):
    import deepspeed
    from deepspeed.pipe import PipelineModule

    def run(cfg):
        module = PipelineModule(layers=H.pipeline_layer_specs(), num_stages=world, loss_fn=H.loss_fn,
                                partition_method="uniform")
        engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(),
                                          optimizer=H.make_optimizer(module.parameters()), config=cfg)
        data = H.batches(2 * STEPS)
        params, losses = [], []
        for step in range(STEPS):
            losses.append(float(engine.train_batch(iter([data[2 * step], data[2 * step + 1]]))))
            if hasattr(engine.optimizer, "wait_for_updates"):
                engine.optimizer.wait_for_updates()
            params.append(H.snapshot(engine.module))
        return {"params": params, "losses": losses, "optimizer": type(engine.optimizer).__name__,
                "engine": type(engine).__name__, "hooks": len(getattr(engine.optimizer, "_wait_handles", []))}

    pipe = dict(gradient_accumulation_steps=2, train_batch_size=2 * H.BATCH, pipeline={"activation_checkpoint_interval": 0})
    both = H.ds_config(stage=1, interleaf={"gpu_fraction": 0.5}, **pipe)
    both["interleaf"]["pipeline"] = {"schedule": "zb-h1"}
    return {
        "ds": run(H.ds_config(stage=1, offload=False, **pipe)),
        "il": run(H.ds_config(stage=1, interleaf={"gpu_fraction": 0.5}, **pipe)),
        "il_zb": run(both),  # interleaf's pipeline engine (zb-h1) and interleaf's offload together
    }


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pipeline_engine_zero1(tmp_path):
    runs = H.run_ranks(_pipeline_scenarios, 2, tmp_path)
    for rank_runs in runs:
        ref = rank_runs["ds"]
        for name in ("il", "il_zb"):
            run = rank_runs[name]
            assert run["optimizer"] == "InterleafZeroOptimizer" and run["hooks"] > 0, name
            assert run["losses"] == pytest.approx(ref["losses"], rel=1e-6), name
            for step in range(STEPS):
                assert H.max_rel_diff(run["params"][step], ref["params"][step]) <= TOL, (name, step)
        assert rank_runs["il_zb"]["engine"] == "InterleafPipelineEngine"


# ---------------------------------------------------------------------------------------------- auto, closed loop
HOST_DELAY_S = 0.02  # per host subgroup, outside the worker's busy timer: only the measured stall can show it


def _slow_host_scenarios(rank, world):
    import time

    from ds_plugins.offload.executor import HybridAdamExecutor

    original = HybridAdamExecutor._host_step

    def delayed(self, index, hyper, lowp_grads):
        time.sleep(HOST_DELAY_S)  # e.g. the host memory shared with another job: the update lands late
        return original(self, index, hyper, lowp_grads)

    out = {"ds": H.train_engine(H.ds_config(offload=False), STEPS)}

    def record(tag, engine, result):
        if tag == "end":
            _record_plan(tag, engine, result)
            result["history"] = list(engine.optimizer.plan_history)
            result["gpu_state_bytes"] = engine.optimizer._executor.gpu_state_bytes()

    HybridAdamExecutor._host_step = delayed
    try:
        # wait_each_step=False: only the forward pre-hooks wait for the host, as in training
        out["auto"] = H.train_engine(H.ds_config(interleaf={"gpu_fraction": "auto"}), STEPS, engine_hook=record,
                                     wait_each_step=False)
        out["auto_budget"] = H.train_engine(
            H.ds_config(interleaf={"gpu_fraction": "auto", "gpu_memory_budget_gib": 600 * 16 / 2**30}), STEPS,
            engine_hook=record, wait_each_step=False)
    finally:
        HybridAdamExecutor._host_step = original
    return out


@pytest.mark.timeout(300)
def test_auto_moves_toward_the_gpu_when_the_host_stalls(tmp_path):
    """A host whose updates land late (the worker's busy time looks fine): the measured forward stall exceeds the
    prediction, the re-planner fits a slower host rate and the safety rail moves the split toward the GPU within
    the memory budget; every move keeps the parameters equal to DeepSpeed without offload."""
    runs = H.run_ranks(_slow_host_scenarios, 1, tmp_path)[0]
    run, ref = runs["auto"], runs["ds"]
    assert H.max_rel_diff(run["params"][-1], ref["params"][-1]) <= TOL
    assert run["losses"] == pytest.approx(ref["losses"], rel=1e-6)
    history = run["history"]
    assert history[0]["reason"].startswith("first plan")
    rails = [h for h in history if "safety rail" in h["reason"]]
    assert rails, [h["reason"] for h in history]
    first_rail = rails[0]
    before = history[history.index(first_rail) - 1]
    assert first_rail["gpu_fraction"] > before["gpu_fraction"]
    assert first_rail["moved"] and "stall" in first_rail["measured"]
    assert run["plan"]["gpu_fraction"] > history[0]["gpu_fraction"]
    # subgroups [384, 600, 48, 600, 192, 8]: a budget of 9600 B holds only the first one's state (16 B/param);
    # the rail asks for more but the plan stays within the budget
    capped = runs["auto_budget"]
    assert H.max_rel_diff(capped["params"][-1], ref["params"][-1]) <= TOL
    assert any("safety rail" in h["reason"] for h in capped["history"])
    assert capped["plan"]["placements"] == ["gpu_resident"] + ["cpu"] * 5
    assert capped["gpu_state_bytes"] <= 600 * 16
