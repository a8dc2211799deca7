"""A benchmark's ranks: run a script's ``main(args)`` in N local CPU processes without torchrun (the ``--procs N``
mode of benchmarks/pipeline.py, benchmarks/megatron.py and examples/deepspeed/train_gpt_pipeline.py), and show
interleaf's own log lines on rank 0."""
from __future__ import annotations

import argparse
import os
import socket
from typing import Callable


def show_interleaf_logs(rank: int, *loggers: str) -> None:
    """On rank 0, print the INFO lines of interleaf's ``loggers`` (what ``auto`` picked, what the measured-cost
    rebuilds simulated) to stdout with an ``[interleaf]`` prefix, next to the benchmark's own lines."""
    if rank != 0:
        return
    import logging
    import sys

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[interleaf] %(message)s"))
    for name in loggers:
        log = logging.getLogger(name)
        log.setLevel(logging.INFO)
        log.addHandler(handler)


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
