"""Peak tensor memory per pipeline rank on CPU, the way ``benchmarks/pipeline.py`` measures it on GPU.

One spawned gloo group builds the rows of the pipeline benchmark one after the other in the same process (DeepSpeed's
own 1F1B first, then interleaf schedules), each torn down with the benchmark's own
:func:`benchmarks.pipeline.release_engine`. Every row runs under ``torch.profiler`` with ``profile_memory=True``
from the moment its model is built until it is released: the CPU allocator's profiled total (``Total Allocated``
of the profiler's memory events) then counts every tensor allocated by any row and not freed yet, the CPU
counterpart of ``torch.cuda.memory_allocated``. A row's peak is the largest total during its measured step, so
state an earlier row left behind counts under a later row's peak, as it does in ``max_memory_allocated`` on GPU.
"""
from __future__ import annotations

import gc
import os
import tempfile
from typing import Any

import torch

from benchmarks import gpt

MICROBATCHES = 4
# the benchmark's GPT scaled down (GPU: h2048, vocab 32000, seq 2048, 16 layers a rank): LM head ~1/7 of the last
# rank's parameters, logits ~1/2 of one layer's activations per micro-batch (GPU: ~1/13 and ~1/1)
CONFIG = gpt.GPTConfig(layers=8, hidden=256, heads=4, seq=128, vocab=2000)
ROWS = ("deepspeed-1f1b", "1f1b", "zb-v")
_STEP = "interleaf_memory_probe_step"


def _ds_config(schedule: str | None) -> dict[str, Any]:
    """The benchmark's own DeepSpeed config for a row (bf16: DeepSpeed's BF16_Optimizer, as the GPU benchmark runs
    it)."""
    from benchmarks.pipeline import _ds_config as benchmark_config

    return benchmark_config(MICROBATCHES, schedule, bf16=True)


def _allocations(prof: Any) -> tuple[list[tuple[int, int, int]], tuple[int, int]]:
    """(time ns, total allocated bytes after it, bytes) of every CPU allocation (bytes > 0) and free (< 0), in
    time order, and the measured step's span."""
    from _cpu_allocations import allocations_and_ranges

    allocs, ranges = allocations_and_ranges(prof, _STEP)
    if not ranges:
        raise RuntimeError("the measured step's record_function range is missing from the profile")
    return allocs, ranges[0][:2]


def _count_alive(cls: type) -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, cls))


def _row(variant: str, data: list, release: Any) -> dict[str, Any]:
    import deepspeed
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.engine import PipelineEngine
    from torch.profiler import ProfilerActivity, profile, record_function

    schedule = None if variant == "deepspeed-1f1b" else variant
    it = iter(data)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        module = PipelineModule(layers=gpt.layer_specs(CONFIG), num_stages=2, loss_fn=gpt.gpt_loss,
                                partition_method="type:TransformerLayer")
        engine, *_ = deepspeed.initialize(model=module, config=_ds_config(schedule),
                                          model_parameters=module.parameters())
        del _  # (optimizer, data loader, scheduler): only the engine is kept, as in the benchmark
        engine.train_batch(it)  # warm-up (interleaf: first step of the executor)
        # interleaf adds every micro-batch's bf16 gradients into BF16_Optimizer's gradient-sum buffers and drops
        # them: none may be left on the parameters when the optimizer step comes (DeepSpeed's step would free them,
        # hiding the cost)
        grads_left: list[int] = []
        runner = getattr(engine, "interleaf_runner", None)
        if runner is not None:
            runner.before_step = lambda r: grads_left.append(sum(p.grad is not None for p in module.parameters()))
        with record_function(_STEP):
            engine.train_batch(it)
        del runner
        release(engine, module)
        del engine, module
        gc.collect()
    allocs, (t0, t1) = _allocations(prof)
    before = [total for t, total, _ in allocs if t < t0]
    during = [total for t, total, _ in allocs if t0 <= t <= t1]
    return {
        "start": allocs[0][1] - allocs[0][2],  # before the row's first allocation: earlier rows' leftovers
        "step_start": before[-1] if before else 0,
        "peak": max(during),
        "step_end": during[-1],  # what the measured step left allocated (vs step_start: what it kept)
        "end": allocs[-1][1],  # after release + gc.collect
        "engines_alive": _count_alive(PipelineEngine),
        "grads_left": grads_left[0] if grads_left else 0,
    }


def _worker(rank: int, world: int, port: int, out_dir: str, old_release: bool) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    import deepspeed

    import ds_plugins  # noqa: F401  (registers the engine hook)
    from benchmarks.pipeline import release_engine

    def release_before_fix(engine: Any, module: Any) -> None:  # what benchmarks/pipeline.py did until the fix
        engine.destroy()
        for p in module.parameters():
            p.__dict__.clear()

    deepspeed.init_distributed(dist_backend="gloo")
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(2 * MICROBATCHES):
        t = torch.randint(0, CONFIG.vocab, (1, CONFIG.seq + 1), generator=g)
        data.append((t[:, :-1].contiguous(), t[:, 1:].contiguous()))
    rows = {}
    for variant in ROWS:
        rows[variant] = _row(variant, data, release_before_fix if old_release else release_engine)
        torch.distributed.barrier()
    torch.save(rows, os.path.join(out_dir, f"rank{rank}.pt"))


def run_rows(*, old_release: bool = False) -> list[dict[str, dict[str, Any]]]:
    """Per pipeline rank: ``row -> {start, step_start, peak, step_end, end (bytes), engines_alive, grads_left}``.
    ``old_release``: tear rows down as benchmarks/pipeline.py did before :func:`release_engine` existed."""
    import socket

    import torch.multiprocessing as mp

    out_dir = tempfile.mkdtemp(prefix="interleaf_mem_")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/interleaf_torch_extensions"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, out_dir, old_release), nprocs=2, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(2)]


if __name__ == "__main__":  # the numbers: PYTHONPATH=. python tests/deepspeed/_memory_harness.py [--old-release]
    import sys

    per_rank = run_rows(old_release="--old-release" in sys.argv)
    for r, rows in enumerate(per_rank):
        for name, row in rows.items():
            print(f"rank {r} {name:>15}: " + ", ".join(
                f"{k} {v}" if k in ("engines_alive", "grads_left") else f"{k} {v / 2**20:.3f} MiB"
                for k, v in row.items()))
