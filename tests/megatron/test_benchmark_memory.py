"""benchmarks/megatron.py's rows start from the same state: nothing of an earlier row or layout survives into the next.

The GPU benchmark runs its rows one after the other in one process (one model build per layout, then every
variant of that layout on it) and reads each row's ``max_memory_allocated``: whatever a finished row or layout
leaves allocated counts under every later row's peak. Here the benchmark's own ``run_all`` runs four rows in the
order of a GPU run (zb-v, megatron interleaved, megatron 1F1B, zb-h2: three layouts, and two rows sharing one
model) on 2 gloo ranks with the tiny GPT, under ``torch.profiler`` with ``profile_memory=True``. The CPU allocator's
profiled total (``Total Allocated`` of the profiler's memory events; the CPU counterpart of
``torch.cuda.memory_allocated``, the method of tests/deepspeed/_memory_harness.py) is read right before every
layout's build and every row, and at the end; the garbage collector counts megatron's and interleaf's objects at
the same points.

What the benchmark's teardown left before ``release_row_state``/``release_layout`` (tiny GPT, per rank): the last
activation a non-first chunk received and its gradient (``TransformerBlock.input_tensor``) and megatron's global
memory buffer (unfused attention's ``baddbmm`` input, b x heads x s x s), from one row into the next and from one
layout into the next layout's build. Models, DDP grad buffers and interleaf's runners were already freed.
"""
from __future__ import annotations

import gc
import os
import socket
import sys
import tempfile

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
ORDER = ("zb-v", "megatron-interleaved", "megatron-1f1b", "zb-h2")
ARGS = ("--tiny", "--microbatches", "4", "--warmup", "1", "--steps", "1", "--variants", *ORDER)
KEPT_BYTES = 4096
"""What may stay allocated beyond the model (weights + DDP grad buffers) before a row, or beyond the first build's
starting point before a build and at the end (a few scalars); the tiny model's smallest leftover found is 16 KiB."""
_MARK = "interleaf_memory_mark "


def _alive() -> dict[str, int]:
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.models.gpt import GPTModel

    from ds_plugins.runtime import PipelineExecutor
    from megatron_patches.forward_backward import _Runner

    gc.collect()
    kinds = {"DistributedDataParallel": DistributedDataParallel, "GPTModel": GPTModel, "interleaf _Runner": _Runner,
             "PipelineExecutor": PipelineExecutor}
    objects = gc.get_objects()
    return {name: sum(isinstance(o, cls) for o in objects) for name, cls in kinds.items()}


def _model_bytes(wrapped) -> int:
    """Bytes of every storage the chunks' parameters and ``main_grad`` views (DDP's grad buffers) live in."""
    storages = {}
    for w in wrapped:
        for p in w.parameters():
            for t in (p, getattr(p, "main_grad", None)):
                if t is not None:
                    s = t.untyped_storage()
                    storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def _totals_before_marks(prof) -> dict[str, int]:
    """Mark name -> the CPU allocator's profiled total right before it, relative to the profile's start."""
    from _cpu_allocations import allocations_and_ranges

    allocs, marks = allocations_and_ranges(prof, _MARK)
    base = allocs[0][1] - allocs[0][2]
    out = {}
    for t, _, name in marks:
        before = [total for ta, total, _ in allocs if ta < t]
        out[name] = (before[-1] if before else base) - base
    return out


def _worker(rank: int, world: int, port: int, out_dir: str, argv: tuple[str, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    import cpu_shim

    cpu_shim.install()
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile, record_function

    from benchmarks import megatron as bench

    dist.init_process_group("gloo")
    args = bench.parse_args(list(argv))
    points: dict[str, dict] = {}
    build, measure = bench._build, bench._measure

    def mark(name: str, **extra) -> None:
        points[name] = {"alive": _alive(), **extra}
        with record_function(_MARK + name):
            pass

    def marked_build(layout, *a, **k):
        mark(f"build {layout}")
        return build(layout, *a, **k)

    def marked_measure(variant, wrapped, *a, **k):
        mark(f"row {variant}", chunks=len(wrapped), model_bytes=_model_bytes(wrapped))
        return measure(variant, wrapped, *a, **k)

    bench._build, bench._measure = marked_build, marked_measure
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            bench.run_all(args)
            mark("end")
    finally:
        bench._build, bench._measure = build, measure
    for name, total in _totals_before_marks(prof).items():
        points[name]["allocated"] = total
    torch.save(points, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def run_marked(argv: tuple[str, ...] = ARGS, world: int = 2) -> list[dict[str, dict]]:
    """benchmarks/megatron.py's ``run_all`` with ``argv`` on ``world`` gloo ranks. Per rank: mark
    ("build <layout>", "row <variant>", "end") -> {allocated (bytes), alive (object counts), and for rows chunks,
    model_bytes}."""
    import torch.multiprocessing as mp

    out_dir = tempfile.mkdtemp(prefix="interleaf_megatron_mem_")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(world, port, out_dir, tuple(argv)), nprocs=world, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def marked():
    return run_marked()


@pytest.mark.timeout(120)
def test_each_layout_is_freed_before_the_next_build(marked):
    """Before every layout's build and after the last row, a rank holds what it held before the first build: no
    model chunk, DDP wrapper or grad buffer, interleaf runner or executor, received activation or megatron global
    buffer of the layout before."""
    for rank, points in enumerate(marked):
        builds = [name for name in points if name.startswith("build ")]
        assert len(builds) == 3, f"rank {rank}: expected three layouts, got {builds}"
        start = points[builds[0]]["allocated"]
        for name in builds[1:] + ["end"]:
            left = points[name]["allocated"] - start
            assert left <= KEPT_BYTES, f"rank {rank}: {left} bytes of earlier layouts still allocated at {name}"
            alive = {k: v for k, v in points[name]["alive"].items() if v}
            assert not alive, f"rank {rank}: still alive at {name}: {alive}"


@pytest.mark.timeout(120)
def test_every_row_starts_from_the_model_alone(marked):
    """Before every row (the first of a layout and those after it on the same model, e.g. zb-h2 after megatron
    1F1B) a rank holds its chunks' weights and DDP grad buffers and nothing else: no earlier row's received
    activation or its gradient, no megatron global buffer, no interleaf runner."""
    for rank, points in enumerate(marked):
        rows = [name for name in points if name.startswith("row ")]
        assert rows == [f"row {v}" for v in ORDER], f"rank {rank}: rows ran as {rows}"
        start = points[next(name for name in points if name.startswith("build "))]["allocated"]
        for name in rows:
            p = points[name]
            extra = p["allocated"] - start - p["model_bytes"]
            assert extra <= KEPT_BYTES, (f"rank {rank}: {extra} bytes beyond the model ({p['model_bytes']} bytes) "
                                         f"allocated before {name}")
            assert p["alive"]["DistributedDataParallel"] == p["chunks"], f"rank {rank}: {p['alive']} at {name}"
            assert p["alive"]["interleaf _Runner"] == 0, f"rank {rank}: an interleaf runner survived until {name}"
            assert p["alive"]["PipelineExecutor"] == 0, f"rank {rank}: an executor survived until {name}"


if __name__ == "__main__":  # the numbers: python tests/megatron/test_benchmark_memory.py [benchmark args]
    for r, pts in enumerate(run_marked(tuple(sys.argv[1:]) or ARGS)):
        for n, p in pts.items():
            print(f"rank {r} {n:28s} " + ", ".join(f"{k} {v}" for k, v in p.items()))
