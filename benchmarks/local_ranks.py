"""Run a script's ``main(args)`` in N local CPU processes without torchrun (the ``--procs N`` mode of
benchmarks/pipeline.py, benchmarks/megatron.py and examples/deepspeed/train_gpt_pipeline.py)."""
from __future__ import annotations

import argparse
import os
import socket
from typing import Callable


def run_local_ranks(main: Callable[[argparse.Namespace], None], args: argparse.Namespace, procs: int) -> None:
    """Spawn ``procs`` processes that each call ``main(args)`` with the environment torchrun would give them
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/MASTER_PORT on a free localhost port) and one torch thread."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    mp.spawn(_rank, args=(procs, free_port, main, args), nprocs=procs, join=True)


def _rank(rank: int, world: int, port: int, main: Callable[[argparse.Namespace], None],
          args: argparse.Namespace) -> None:
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    main(args)
