"""Test harness for the DeepSpeed offload tests: tiny models, DeepSpeed configs, runs in spawned processes.

Each scenario runs in a fresh process (``run_ranks``) so DeepSpeed's process group and the interleaf hooks never
leak into the pytest process. Runs return parameters (float64 numpy, by name) after every step, losses, and
whatever the scenario adds.
"""
from __future__ import annotations

import copy
import os
import socket
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

LR = 1e-2
BETAS = (0.9, 0.95)
EPS = 1e-8
WEIGHT_DECAY = 0.1
IN, HIDDEN, OUT, BATCH = 16, 24, 8, 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(IN, HIDDEN),
        torch.nn.GELU(),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.LayerNorm(HIDDEN),
        torch.nn.Linear(HIDDEN, HIDDEN, bias=False),
        torch.nn.Tanh(),
        torch.nn.Linear(HIDDEN, OUT),
    )
    return model.to(dtype)


class SeededLinear(torch.nn.Linear):
    """A Linear that initialises itself from its own seed: same weights however a pipeline builds its layers."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, seed: int = 0) -> None:
        super().__init__(in_features, out_features, bias=bias)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.weight.copy_(torch.randn(self.weight.shape, generator=g) / in_features**0.5)
            if self.bias is not None:
                self.bias.copy_(torch.randn(self.bias.shape, generator=g) * 0.1)


def pipeline_layer_specs():
    """The layers of :func:`make_model` as DeepSpeed LayerSpecs with self-seeded weights."""
    from deepspeed.pipe import LayerSpec

    return [
        LayerSpec(SeededLinear, IN, HIDDEN, True, 1),
        LayerSpec(torch.nn.GELU),
        LayerSpec(SeededLinear, HIDDEN, HIDDEN, True, 2),
        LayerSpec(torch.nn.LayerNorm, HIDDEN),
        LayerSpec(SeededLinear, HIDDEN, HIDDEN, False, 3),
        LayerSpec(torch.nn.Tanh),
        LayerSpec(SeededLinear, HIDDEN, OUT, True, 4),
    ]


class FunctionalHeadModel(torch.nn.Module):
    """A model whose forward reads a child's weights directly (the child's own forward never runs)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.GELU(), torch.nn.Linear(HIDDEN, HIDDEN))
        self.head = torch.nn.Linear(HIDDEN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(torch.tanh(self.body(x)), self.head.weight, self.head.bias)


def batches(steps: int, rank: int = 0, world: int = 1, scale: float = 1.0):
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(steps):
        x = torch.randn(BATCH * world, IN, generator=g) * scale
        y = torch.randn(BATCH * world, OUT, generator=g)
        out.append((x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]))
    return out


def loss_fn(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(pred.float(), target.float())


def ds_config(*, stage: int = 2, offload: bool = True, interleaf: dict | None = None, clip: float = 0.0,
              fp16: bool = False, world: int = 1, pin_memory: bool = False, **extra: Any) -> dict:
    zero: dict[str, Any] = {"stage": stage, "reduce_bucket_size": 500, "allgather_bucket_size": 1000}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        "train_batch_size": BATCH * world,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "gradient_clipping": clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if fp16:
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 1000, "hysteresis": 1}
    if interleaf is not None:
        cfg["interleaf"] = {"offload": interleaf}
    cfg.update(extra)
    return cfg


def make_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, foreach=False)


def snapshot(module: torch.nn.Module) -> dict[str, Any]:
    return {name: p.detach().double().cpu().numpy().copy() for name, p in module.named_parameters()}


def init_dist(rank: int, world: int, port: int, accelerator: str = "cpu") -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR=accelerator)
    if accelerator == "cpu":
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    else:
        torch.cuda.set_device(rank)
    import ds_plugins  # noqa: F401  (installs the hooks)
    import deepspeed

    ds_plugins.install()
    deepspeed.init_distributed(dist_backend="gloo" if accelerator == "cpu" else "nccl", auto_mpi_discovery=False)


def train_engine(config: dict, steps: int, *, rank: int = 0, world: int = 1, dtype=torch.float32,
                 grad_hook: Callable | None = None, engine_hook: Callable | None = None, model=None,
                 data=None, wait_each_step: bool = True) -> dict[str, Any]:
    """deepspeed.initialize + ``steps`` steps; params after each step (``wait_each_step=False``: only the per-layer
    waits of the forward hooks order the next forward after the host updates; params only after the last step)."""
    import deepspeed

    model = model if model is not None else make_model(dtype)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), optimizer=make_optimizer(model.parameters()),
        config=copy.deepcopy(config))
    if engine_hook is not None:
        engine_hook("init", engine, None)
    per_step, losses, norms = [], [], []
    for step, (x, y) in enumerate(data if data is not None else batches(steps, rank, world)):
        loss = loss_fn(engine(x.to(engine.device, dtype)), y.to(engine.device))
        engine.backward(loss)
        if grad_hook is not None:
            grad_hook(step, engine)
        engine.step()
        wait = getattr(engine.optimizer, "wait_for_updates", None)
        last = step == steps - 1
        if wait is not None and (wait_each_step or last):  # interleaf: host updates land per layer otherwise
            wait()
        losses.append(float(loss.detach()))
        norms.append(float(engine.get_global_grad_norm() or 0.0))
        if wait_each_step or last:
            per_step.append(snapshot(engine.module))
    result = {"params": per_step, "losses": losses, "norms": norms, "skipped": engine.skipped_steps,
              "optimizer": type(engine.optimizer).__name__}
    if engine_hook is not None:
        engine_hook("end", engine, result)
    return result


def torch_reference(steps: int, *, clip: float = 0.0) -> dict[str, Any]:
    """Plain single-process torch.optim.AdamW (the ground truth for fp32)."""
    model = make_model()
    opt = make_optimizer(model.parameters())
    per_step = []
    for x, y in batches(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        per_step.append(snapshot(model))
    return {"params": per_step}


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, out_path: str, accelerator: str) -> None:
    try:
        init_dist(rank, world, port, accelerator)
        result = fn(rank, world, *args)
        torch.save({"ok": True, "result": result}, f"{out_path}.{rank}")
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, f"{out_path}.{rank}")
        raise


def run_ranks(fn: Callable, world: int, tmp_path, *args: Any, timeout: float = 240.0,
              accelerator: str = "cpu") -> list[Any]:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes (gloo on DeepSpeed's CPU accelerator, or
    nccl with ``accelerator="cuda"``); return each rank's result."""
    out = str(tmp_path / f"result_{fn.__name__}")
    port = free_port()
    ctx = mp.start_processes(_entry, args=(world, port, fn, args, out, accelerator), nprocs=world, join=False,
                             start_method="spawn")
    import time

    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{fn.__name__} did not finish within {timeout} s")
    results = []
    for rank in range(world):
        record = torch.load(f"{out}.{rank}", weights_only=False)
        if not record["ok"]:
            raise AssertionError(f"rank {rank} failed:\n{record['error']}")
        results.append(record["result"])
    return results


def max_rel_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest per-tensor relative error ||a - b|| / ||b|| over the parameters."""
    import numpy as np

    assert a.keys() == b.keys(), (a.keys(), b.keys())
    return max(float(np.linalg.norm(a[k] - b[k]) / max(np.linalg.norm(b[k]), 1e-30)) for k in a)
