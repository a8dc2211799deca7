"""Why benchmarks/megatron.py's rows drift: the host's speed per row, Python's garbage collector, pinning.

Runs ``benchmarks/megatron.py`` (same arguments, row by row; not with ``--alternate``) with every row wrapped. Before
each row every rank times a fixed pure-Python loop (1,000,000 iterations) and 3,000 tiny kernel launches (issue
time only): the host's speed at that moment. Then, by ``--drift``:

- ``gc``: rows alternate between Python's garbage collector on (even rows, in run order) and off (odd rows:
  ``gc.disable`` for the whole row); every row starts after a ``gc.collect``. Each rank logs, per row, the
  collections per generation (``gc.callbacks``), their total and their longest pause.
- ``pinning``: rows alternate between unpinned (even rows) and pinned (odd rows): each local rank's issuing threads
  (the main thread and the autograd threads, ``pt_autograd_*``, which issue backward) on one CPU of their own (one
  sibling group of ``/sys/devices/system/cpu/*/topology``, group 0 left to the system), every other thread of
  the process on the CPUs no rank reserved. Rank 0 logs each thread's CPU time over the row as a share of its
  wall time (``/proc/self/task``, Linux only).

Alternating pairs of rows in one process compare the two settings under the same drift; BENCHMARKS.md (megatron
pp=4, session 14 runs) has what they showed on 4x H200. The rows' table goes to ``--out`` as usual::

    torchrun --nproc_per_node 4 benchmarks/megatron_drift.py --drift pinning --microbatches 8 \\
        --variants megatron-interleaved megatron-interleaved zb-v zb-v auto auto \\
        --interleaved-p2p overlap_p2p_comm --out drift.md

CPU smoke test: ``OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/megatron_drift.py --drift gc --tiny
--microbatches 4 --variants megatron-interleaved megatron-interleaved``.
"""
from __future__ import annotations

import gc
import glob
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]  # "megatron" is megatron-core
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks import megatron as bench  # noqa: E402

MAIN_TID = threading.get_native_id()
ALL_CPUS = sorted(os.sched_getaffinity(0))


def probe() -> tuple[float, float]:
    """Seconds for a fixed pure-Python loop and for issuing 3,000 tiny kernels (the device synchronised around)."""
    t0 = time.perf_counter()
    acc = 0
    for i in range(1_000_000):
        acc += i * i % 7
    py = time.perf_counter() - t0
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    x = torch.zeros(16, device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3000):
        x.add_(1.0)
    launch = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return py, launch


# ------------------------------------------------------------------------------------------------ gc
class _Collections:
    """Python collections per generation while a row runs: count, total and longest pause (seconds)."""

    def __init__(self) -> None:
        self.reset()
        self._began = 0.0
        gc.callbacks.append(self._callback)

    def reset(self) -> None:
        self.count, self.total, self.longest = [0, 0, 0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]

    def _callback(self, phase, info) -> None:
        g = info["generation"]
        if phase == "start":
            self._began = time.perf_counter()
        else:
            d = time.perf_counter() - self._began
            self.count[g] += 1
            self.total[g] += d
            self.longest[g] = max(self.longest[g], d)


# ------------------------------------------------------------------------------------------------ pinning
def sibling_groups() -> list[tuple[int, ...]]:
    """The CPUs of this process's affinity mask by core (hyperthread siblings together)."""
    groups = set()
    for path in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/topology/thread_siblings_list"):
        cpus = []
        for part in open(path).read().strip().split(","):
            a, _, b = part.partition("-")
            cpus += list(range(int(a), int(b or a) + 1))
        groups.add(tuple(cpus))
    return sorted(g for g in groups if all(c in ALL_CPUS for c in g))


def threads() -> list[tuple[int, str, float]]:
    """``(tid, name, CPU seconds so far)`` of every thread of this process."""
    out = []
    for task in glob.glob("/proc/self/task/*"):
        tid = int(os.path.basename(task))
        try:
            comm = open(f"{task}/comm").read().strip()
            fields = open(f"{task}/stat").read().rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            continue
        out.append((tid, comm, cpu))
    return out


def set_pinning(on: bool):
    """Pin (or unpin) this rank's issuing threads as the module docstring says; returns ``(its CPUs or None, the
    names of the threads pinned)``."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    groups = sibling_groups()
    reserved = [set(groups[(1 + r) % len(groups)]) for r in range(world)]  # group 0 left to the system
    others = sorted(set(ALL_CPUS) - set().union(*reserved)) or ALL_CPUS
    mine = sorted(reserved[local])
    moved = []
    for tid, comm, _ in threads():
        issuing = tid == MAIN_TID or comm.startswith("pt_autograd")
        mask = (mine if issuing else others) if on else ALL_CPUS
        try:
            os.sched_setaffinity(tid, mask)
            if issuing and on:
                moved.append(comm)
        except OSError:
            pass
    return (mine if on else None), moved


# ------------------------------------------------------------------------------------------------ rows
def wrap_rows(mode: str) -> None:
    """Wrap ``benchmarks.megatron._measure_with_config`` (every row-by-row row) for ``mode``."""
    original = bench._measure_with_config
    collections = _Collections() if mode == "gc" else None
    index = [0]

    def measured(variant, *args, **kwargs):
        second = index[0] % 2 == 1
        row_index = index[0]
        index[0] += 1
        rank = dist.get_rank()
        if mode == "pinning":
            cpus, moved = set_pinning(second)
            py, launch = probe()
            before = {tid: cpu for tid, _, cpu in threads()}
        else:
            py, launch = probe()
            gc.collect()
            collections.reset()
            if second:
                gc.disable()
        t0 = time.perf_counter()
        try:
            row = original(variant, *args, **kwargs)
        finally:
            gc.enable()
        wall = time.perf_counter() - t0
        where = f"rank {rank} row {row_index} {variant} m={row['microbatches']}"
        speed = f"probe before: python loop {1e3 * py:.1f} ms, 3000 launches {1e3 * launch:.1f} ms"
        if mode == "pinning":
            row["pinned"] = second
            print(f"[pin] {where} pinned {second} cpus {cpus} ({','.join(sorted(set(moved)))}): step "
                  f"{row['step_s'] * 1e3:.1f} ms; {speed}", flush=True)
            if rank == 0:
                busy = sorted(((cpu - before.get(tid, 0.0)) / wall, comm) for tid, comm, cpu in threads())[::-1]
                print(f"[threads] rank 0 row {row_index}: " + ", ".join(f"{c}:{b:.2f}" for b, c in busy[:10]),
                      flush=True)
        else:
            row["gc"] = "off" if second else "on"
            print(f"[gc] {where} gc {row['gc']}: step {row['step_s'] * 1e3:.1f} ms; collections gen0/1/2 "
                  f"{collections.count}, total ms {[round(1e3 * x, 1) for x in collections.total]}, longest ms "
                  f"{[round(1e3 * x, 2) for x in collections.longest]}; row wall {wall:.1f} s, objects "
                  f"{len(gc.get_objects())}; {speed}", flush=True)
        return row

    bench._measure_with_config = measured


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = None
    if "--drift" in argv:
        i = argv.index("--drift")
        mode = argv[i + 1] if i + 1 < len(argv) else None
        del argv[i:i + 2]
    if mode not in ("gc", "pinning"):
        raise SystemExit("benchmarks/megatron_drift.py: give --drift gc or --drift pinning (then benchmarks/"
                         "megatron.py's arguments)")
    args = bench.parse_args(argv)
    if args.alternate:
        raise SystemExit("benchmarks/megatron_drift.py wraps rows run one after another: drop --alternate")
    if int(os.environ.get("RANK", "0")) == 0 and mode == "pinning":
        groups = sibling_groups()
        print(f"[topo] {len(ALL_CPUS)} cpus, {len(groups)} sibling groups, first {groups[:6]}", flush=True)
    wrap_rows(mode)
    bench.main(args)


if __name__ == "__main__":
    main()
