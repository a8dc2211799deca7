"""Exactness of every schedule over NCCL, without pytest (for the GPU image). fp64 on GPUs, 1e-12 against a
single-process reference on the same GPU; also the tuple/view/non-tensor model, measured costs -> auto and, on
4 GPUs, dp=2 x pp=2. Exit code 1 on any failure.

    torchrun --standalone --nproc-per-node 2 tests/runtime/nccl_check.py     # pp=2 (V and looped: same peer)
    torchrun --standalone --nproc-per-node 4 tests/runtime/nccl_check.py     # pp=4 and dp=2 x pp=2
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from runtime_workers import all_schedules  # noqa: E402

TOL = 1e-12


def main() -> int:
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cpu = "--cpu" in sys.argv  # gloo with NCCL's settings: checks this script without GPUs
    if cpu:
        dist.init_process_group("gloo")
        modes = {"nccl": {"batched": True, "use_tags": False, "direction_groups": True}}
    else:
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        modes = {"nccl": {}}
    device = "cpu" if cpu else "cuda"
    rank, world = dist.get_rank(), dist.get_world_size()
    t0 = time.perf_counter()
    microbatches = 4 if world == 2 else 8
    mine = all_schedules(rank, world, microbatches, modes, device)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    failures = 0
    if rank == 0:
        card = "CPU gloo" if cpu else torch.cuda.get_device_name(0)
        print(f"nccl_check: {card} x{world}, torch {torch.__version__}, "
              f"{time.perf_counter() - t0:.1f} s")
        for key in sorted(k for k in gathered[0] if "grad_diff" in gathered[0][k]):
            worst = max(g[key]["grad_diff"] for g in gathered)
            loss = max(g[key]["loss_diff"] for g in gathered)
            ok = worst <= TOL and loss <= TOL and all(g[key]["params_compared"] > 0 for g in gathered)
            failures += not ok
            print(f"  {'/'.join(key):<28} grad diff {worst:.2e}  loss diff {loss:.2e}  {'PASS' if ok else 'FAIL'}")
        auto = gathered[0][("measured", "auto")]
        print(f"  measured costs -> auto: {auto['auto_ranks']} rank programs, F per stage {auto['forward']}")
        print("ALL PASS" if failures == 0 else f"{failures} FAILED")
    flag = torch.tensor([failures], device=device)
    dist.broadcast(flag, 0)
    dist.destroy_process_group()
    return int(flag.item() > 0)


if __name__ == "__main__":
    sys.exit(main())
