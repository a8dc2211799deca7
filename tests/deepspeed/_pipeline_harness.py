"""Multi-process harness for the DeepSpeed pipeline tests: one spawned gloo group runs many scenarios.

DeepSpeed start-up dominates on a 2-core box (~30 s per process group), so each test spawns ONE group that builds
engine after engine (``deepspeed.initialize`` per scenario) and writes what it measured (losses, gradients before
the optimizer step, parameters after 1 and 3 steps) per rank to a file; the test process merges the ranks and
compares with a single-process torch reference (:func:`reference_run`).
"""
from __future__ import annotations

import copy
import os
import socket
import tempfile
import traceback
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from benchmarks import gpt

STEPS = 3
MICRO_BATCH = 2
LR = 0.05
MOMENTUM = 0.9


@dataclass(frozen=True)
class Scenario:
    """One engine built and trained inside the spawned group."""

    name: str
    schedule: str | None  # None: DeepSpeed's own PipelineEngine (1F1B)
    microbatches: int = 4
    dp: int = 1
    virtual_stages: int | None = None
    clip: float = 0.0
    tied: bool = False
    checkpoint_interval: int = 0
    bf16: bool = False
    grad_accum_fp32: bool = False  # "data_types": {"grad_accum_dtype": "fp32"} (DeepSpeed allows it with ZeRO-1)
    zero_stage: int = 0
    overlap_comm: bool = False  # ZeRO-1's "overlap_comm": gradients reduced from accumulation hooks
    steps: int = STEPS
    eval_after: bool = False
    layers: int = 6
    lr: float = LR
    memorize: bool = False  # every step sees the same micro-batches (loss must fall fast)
    data_offset: int = 0  # steps of data already consumed (a run resumed from a checkpoint)
    save_to: str | None = None  # checkpoint after `steps` steps into this folder (relative to out dir)
    load_from: str | None = None  # load this checkpoint before training
    expect_error: str | None = None  # substring of a ValueError raised by deepspeed.initialize
    extra: dict = field(default_factory=dict)

    def gpt_config(self) -> gpt.GPTConfig:
        return gpt.with_size(gpt.TINY, layers=self.layers, tied_embeddings=self.tied)

    def ds_config(self) -> dict:
        cfg: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": MICRO_BATCH,
            "gradient_accumulation_steps": self.microbatches,
            "gradient_clipping": self.clip,
            "optimizer": {"type": "SGD", "params": {"lr": self.lr, "momentum": MOMENTUM}},
            "steps_per_print": 10**6,
            "zero_optimization": {"stage": self.zero_stage},
            "pipeline": {"activation_checkpoint_interval": self.checkpoint_interval, "use_reentrant": True},
        }
        if self.zero_stage:
            cfg["zero_allow_untested_optimizer"] = True
        if self.overlap_comm:
            cfg["zero_optimization"]["overlap_comm"] = True
        if self.bf16:
            cfg["bf16"] = {"enabled": True}
        if self.grad_accum_fp32:
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
        if self.schedule is not None:
            block: dict[str, Any] = {"schedule": self.schedule}
            if self.virtual_stages is not None:
                block["virtual_stages"] = self.virtual_stages
            block.update(self.extra)
            cfg["interleaf"] = {"pipeline": block}
        return cfg


def batches(cfg: gpt.GPTConfig, dp_rank: int, scenario: Scenario) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Micro-batches data-parallel replica ``dp_rank`` consumes (deterministic)."""
    total = scenario.microbatches * (scenario.data_offset + scenario.steps + 1)
    if scenario.memorize:
        return gpt.synthetic_batches(cfg, MICRO_BATCH, scenario.microbatches, seed=100 + dp_rank) * (total // scenario.microbatches)
    return gpt.synthetic_batches(cfg, MICRO_BATCH, total, seed=100 + dp_rank)


def _held_layers(engine) -> dict[int, torch.nn.Module]:
    module = engine.module
    if hasattr(module, "layer_modules"):
        return module.layer_modules()
    out = {}
    for i, f in enumerate(module.forward_funcs):
        mod = f if isinstance(f, torch.nn.Module) else getattr(f, "args", (None,))[0]
        if isinstance(mod, torch.nn.Module):
            out[module._local_start + i] = mod
    return out


def _named(engine, what: str) -> dict[str, torch.Tensor]:
    """``"<layer>.<param>" -> tensor`` for parameters this rank owns (tied copies once, under layer 0)."""
    from deepspeed.pipe import TiedLayerSpec

    module = engine.module
    canonical = {}
    for idx, spec in enumerate(module._layer_specs):
        if isinstance(spec, TiedLayerSpec):
            canonical.setdefault(spec.key, idx)
    out = {}
    for idx, mod in sorted(_held_layers(engine).items()):
        spec = module._layer_specs[idx]
        key_idx = canonical[spec.key] if isinstance(spec, TiedLayerSpec) else idx
        for name, p in mod.named_parameters():
            if getattr(p, "ds_pipe_replicated", False):
                continue
            full = f"{key_idx}.{name}"
            if what == "param":
                out[full] = p.detach().float().clone()
            else:
                g = getattr(p, "_hp_grad", None) if engine.bfloat16_enabled() else p.grad
                if g is not None:
                    out[full] = g.detach().float().clone().view(p.shape)
    return out


def _run_scenario(sc: Scenario, rank: int, out_dir: str) -> dict[str, Any]:
    import deepspeed
    from deepspeed.pipe import PipelineModule

    cfg = sc.gpt_config()
    world = torch.distributed.get_world_size()
    pp = world // sc.dp
    extra_kwargs = {}
    if sc.checkpoint_interval:
        extra_kwargs["checkpointable_layers"] = ["TransformerLayer"]
    module = PipelineModule(layers=gpt.layer_specs(cfg), num_stages=pp, loss_fn=gpt.gpt_loss,
                            partition_method="uniform", **extra_kwargs)
    record: dict[str, Any] = {}
    try:
        engine, *_ = deepspeed.initialize(model=module, config=sc.ds_config(), model_parameters=module.parameters())
    except ValueError as err:
        if sc.expect_error is None:
            raise
        record["error"] = str(err)
        return record
    if sc.expect_error is not None:
        record["error"] = None
        return record
    grid = engine.grid
    dp_rank = grid.data_parallel_id
    data = batches(cfg, dp_rank, sc)
    it = iter(data[sc.data_offset * sc.microbatches:])
    if sc.load_from:
        engine.load_checkpoint(os.path.join(out_dir, sc.load_from))

    grads: list[dict[str, torch.Tensor]] = []
    record["engine"] = type(engine).__name__
    record["optimizer"] = type(engine.optimizer).__name__
    record["grad_accum_dtype"] = str(engine.get_data_types()[1])

    runner = getattr(engine, "interleaf_runner", None)
    if runner is not None:
        runner.before_step = lambda r: grads.append(_named(engine, "grad"))
    else:
        original = engine._exec_optimizer_step

        def step_with_probe(*args, **kwargs):
            grads.append(_named(engine, "grad"))
            return original(*args, **kwargs)

        engine._INSTRUCTION_MAP = dict(engine._INSTRUCTION_MAP)
        from deepspeed.runtime.pipe import schedule as ds_schedule

        engine._INSTRUCTION_MAP[ds_schedule.OptimizerStep] = lambda self, **kw: step_with_probe(**kw)

    losses, params = [], []
    for _ in range(sc.steps):
        losses.append(float(engine.train_batch(it)))
        params.append(_named(engine, "param"))
    record.update(losses=losses, grads=grads, params=params, dp_rank=dp_rank)
    if runner is not None:
        record["history"] = [h.__dict__ if hasattr(h, "__dict__") else {s: getattr(h, s) for s in h.__slots__}
                             for h in runner.history]
        record["grad_norms"] = [h["grad_norm"] for h in record["history"]]
        record["tuning"] = runner.tuning
        record["split_mode"] = runner.executor.split_mode
    if sc.eval_after:
        eval_data = gpt.synthetic_batches(cfg, MICRO_BATCH, sc.microbatches, seed=999 + dp_rank)
        record["eval"] = float(engine.eval_batch(iter(eval_data)))
    if sc.save_to:
        engine.save_checkpoint(os.path.join(out_dir, sc.save_to))
    return record


def _worker(rank: int, world: int, port: int, scenarios: list[Scenario], out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    import deepspeed
    import ds_plugins  # noqa: F401  (registers the engine hook)

    deepspeed.init_distributed(dist_backend="gloo")
    results: dict[str, Any] = {}
    for sc in scenarios:
        try:
            results[sc.name] = _run_scenario(sc, rank, out_dir)
        except Exception:  # keep going: one failing scenario must not hide the others
            results[sc.name] = {"exception": traceback.format_exc()}
            torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
            raise
        torch.distributed.barrier()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(world: int, scenarios: list[Scenario], out_dir: str | None = None) -> dict[str, dict[str, Any]]:
    """Spawn ``world`` gloo ranks that run ``scenarios`` in order; returns ``name -> merged record``."""
    import torch.multiprocessing as mp

    out_dir = out_dir or tempfile.mkdtemp(prefix="interleaf_ds_")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/interleaf_torch_extensions"))
    try:
        mp.spawn(_worker, args=(world, _free_port(), scenarios, out_dir), nprocs=world, join=True)
    finally:
        per_rank = []
        for r in range(world):
            path = os.path.join(out_dir, f"rank{r}.pt")
            per_rank.append(torch.load(path, weights_only=False) if os.path.exists(path) else {})
    merged: dict[str, dict[str, Any]] = {}
    for sc in scenarios:
        recs = [pr.get(sc.name, {}) for pr in per_rank]
        merged[sc.name] = _merge(recs)
    return merged


def _merge(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """Union of per-rank tensors of data-parallel replica 0; losses from rank 0; errors from every rank."""
    out: dict[str, Any] = {"ranks": recs}
    if any("exception" in r for r in recs):
        out["exception"] = "\n".join(r["exception"] for r in recs if "exception" in r)
        return out
    if "error" in recs[0]:
        out["errors"] = [r.get("error") for r in recs]
        return out
    replica0 = [r for r in recs if r.get("dp_rank", 0) == 0]
    out["losses"] = recs[0]["losses"]
    for key in ("grads", "params"):
        steps = len(replica0[0][key])
        out[key] = [{k: v for r in replica0 for k, v in r[key][s].items()} for s in range(steps)]
    if "grad_norms" in recs[0]:
        out["grad_norms"] = recs[0]["grad_norms"]
        out["history"] = recs[0]["history"]
        out["tuning"] = [r.get("tuning") for r in recs]
    if "eval" in recs[0]:
        out["eval"] = recs[0]["eval"]
    return out


# ------------------------------------------------------------------------------------------ reference


def reference_run(sc: Scenario) -> dict[str, Any]:
    """The same training in one process with plain torch: SGD(momentum), loss averaged over all micro-batches
    of all data-parallel replicas, optional ``clip_grad_norm_``."""
    cfg = sc.gpt_config()
    torch.manual_seed(0)
    model = gpt.reference_model(cfg)
    layers = list(model)
    opt = torch.optim.SGD(model.parameters(), lr=sc.lr, momentum=MOMENTUM)
    data = [batches(cfg, d, sc) for d in range(sc.dp)]
    pos = 0
    grads, params, norms = [], [], []
    total = sc.microbatches * sc.dp
    for _ in range(sc.steps):
        opt.zero_grad(set_to_none=True)
        for d in range(sc.dp):
            for i in range(sc.microbatches):
                x, y = data[d][pos + i]
                (gpt.gpt_loss(model(x), y) / total).backward()
        pos += sc.microbatches
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), sc.clip if sc.clip > 0 else float("inf"))
        norms.append(float(norm))
        grads.append(_reference_named(layers, "grad"))
        opt.step()
        params.append(_reference_named(layers, "param"))
    return {"grads": grads, "params": params, "norms": norms}


def reference_losses(sc: Scenario) -> list[float]:
    """Mean loss per step over every micro-batch of every replica, before that step's update."""
    cfg = sc.gpt_config()
    model = gpt.reference_model(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=sc.lr, momentum=MOMENTUM)
    data = [batches(cfg, d, sc) for d in range(sc.dp)]
    out = []
    total = sc.microbatches * sc.dp
    for s in range(sc.steps):
        opt.zero_grad(set_to_none=True)
        acc = 0.0
        for d in range(sc.dp):
            for i in range(sc.microbatches):
                x, y = data[d][s * sc.microbatches + i]
                loss = gpt.gpt_loss(model(x), y)
                (loss / total).backward()
                acc += float(loss.detach()) / total
        if sc.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), sc.clip)
        opt.step()
        out.append(acc)
    return out


def _reference_named(layers: list[torch.nn.Module], what: str) -> dict[str, torch.Tensor]:
    out = {}
    for idx, mod in enumerate(layers):
        for name, p in mod.named_parameters():
            t = p.detach() if what == "param" else p.grad
            if t is not None:
                out[f"{idx}.{name}"] = t.detach().float().clone()
    return out


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *, relative: bool = False) -> tuple[float, str]:
    """Largest |a-b| over the union of keys (a key missing on one side is an error); with ``relative``, the largest
    per-tensor ||a-b|| / ||b|| instead, so a small tensor's error is not hidden under an absolute bound."""
    if set(a) != set(b):
        raise AssertionError(f"different parameter sets: only left {sorted(set(a) - set(b))}, "
                             f"only right {sorted(set(b) - set(a))}")
    worst, where = 0.0, ""
    for k in a:
        if relative:
            d = float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30))
        else:
            d = float((a[k] - b[k]).abs().max())
        if d > worst:
            worst, where = d, k
    return worst, where
