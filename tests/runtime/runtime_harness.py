"""Test helpers for the pipeline runtime: spawn gloo ranks with a hard timeout, small fp64 models, references.

Workers run in fresh processes (spawn); each writes ``rank<r>.pkl`` with its result or its traceback, so a
failing rank shows its own error in the test output instead of a bare exit code.
"""
from __future__ import annotations

import os
import pickle
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.multiprocessing as mp
from torch import nn

HIDDEN = 8
IN_FEATURES = 6
OUT_FEATURES = 5
ROWS = 3  # rows per micro-batch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable, rank: int, world: int, port: int, out_dir: str, args: tuple, backend: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    path = Path(out_dir) / f"rank{rank}.pkl"
    try:
        import torch.distributed as dist

        kwargs = {}
        if backend == "nccl":
            torch.cuda.set_device(rank)
            kwargs["device_id"] = torch.device("cuda", rank)
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, **kwargs
        )
        result = fn(rank, world, *args)
        path.write_bytes(pickle.dumps(("ok", result)))
        dist.destroy_process_group()
    except BaseException:  # report, do not hang the others longer than their own timeouts
        path.write_bytes(pickle.dumps(("error", traceback.format_exc())))
        raise


def run_ranks(
    fn: Callable,
    world: int,
    *args: Any,
    tmp_path: Path,
    timeout_s: float = 120.0,
    required_ranks: Sequence[int] | None = None,
    backend: str = "gloo",
) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; returns per-rank results (None for a rank not in
    ``required_ranks`` that left none) or raises with the failing rank's traceback. Processes still alive after
    ``timeout_s`` are killed (the test then fails)."""
    required = set(range(world)) if required_ranks is None else set(required_ranks)
    ctx = mp.get_context("spawn")
    port = free_port()
    out_dir = Path(tmp_path) / f"ranks_{fn.__name__}_{port}"
    out_dir.mkdir(parents=True)
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, str(out_dir), args, backend)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    results, errors = [], []
    for r in range(world):
        f = out_dir / f"rank{r}.pkl"
        if not f.exists():
            if r not in required:
                results.append(None)
                continue
            errors.append(f"rank {r}: no result (exit code {procs[r].exitcode})")
            results.append(None)
            continue
        status, payload = pickle.loads(f.read_bytes())
        if status == "error":
            errors.append(f"rank {r} raised:\n{payload}")
            results.append(None)
        else:
            results.append(payload)
    if hung:
        errors.insert(0, f"ranks {hung} still running after {timeout_s} s (killed)")
    if errors:
        raise AssertionError("\n".join(errors))
    return results


# ---------------------------------------------------------------------------------------------- models
class Block(nn.Module):
    """Pre-norm residual MLP block: x + fc2(gelu(fc1(norm(x))))."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, 2 * hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class Head(nn.Module):
    def __init__(self, hidden: int, out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


def mlp_layers(num_layers: int, seed: int = 0) -> list[nn.Module]:
    """``num_layers`` layers: input projection, residual blocks, norm + head; fp64, deterministic."""
    if num_layers < 2:
        raise ValueError("need at least 2 layers")
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(IN_FEATURES, HIDDEN)]
    layers += [Block(HIDDEN) for _ in range(num_layers - 2)]
    layers.append(Head(HIDDEN, OUT_FEATURES))
    return [layer.double() for layer in layers]


class TupleIn(nn.Module):
    """Stage-0 layer of the tuple model: takes (x, positions) and returns a tuple with a non-contiguous view,
    an integer tensor, a float tensor that needs no gradient, and non-tensor values."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(IN_FEATURES, HIDDEN)
        self.pos = nn.Embedding(16, HIDDEN)

    def forward(self, value):
        x, positions = value
        h = self.proj(x) + self.pos(positions)
        mask = (positions % 2).to(h.dtype)  # needs no gradient
        return h.t(), positions, mask, "tag", 0.5, None  # h.t() is a view


class TupleBlock(nn.Module):
    """Middle layer: consumes and produces the same tuple; its main output is again a transposed view."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Block(HIDDEN)
        self.gate = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, value):
        h_t, positions, mask, tag, factor, nothing = value
        if tag != "tag" or nothing is not None or not isinstance(positions, torch.Tensor):
            raise RuntimeError("non-tensor values did not pass through")
        h = h_t.t()
        h = self.block(h) + factor * self.gate(h) * mask[:, None]
        return h.t(), positions, mask, tag, factor, nothing


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = Head(HIDDEN, OUT_FEATURES)

    def forward(self, value):
        h_t = value[0]
        return self.head(h_t.t())


def tuple_layers(num_layers: int, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [TupleIn()] + [TupleBlock() for _ in range(num_layers - 2)] + [TupleOut()]
    return [layer.double() for layer in layers]


def mlp_batches(microbatches: int, seed: int = 1) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(ROWS, IN_FEATURES, generator=g, dtype=torch.float64) for _ in range(microbatches)]
    ys = [torch.randn(ROWS, OUT_FEATURES, generator=g, dtype=torch.float64) for _ in range(microbatches)]
    return xs, ys


def tuple_batches(microbatches: int, seed: int = 1) -> tuple[list[tuple], list[torch.Tensor]]:
    xs, ys = mlp_batches(microbatches, seed)
    g = torch.Generator().manual_seed(seed + 1)
    inputs = [(x, torch.randint(0, 16, (ROWS,), generator=g)) for x in xs]
    return inputs, ys


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((output - target) ** 2).mean()


def reference_grads(
    layers: Sequence[nn.Module],
    inputs: Sequence[Any],
    targets: Sequence[Any],
    *,
    loss_scale: float,
    steps: int = 1,
) -> tuple[list[list[torch.Tensor | None]], list[torch.Tensor]]:
    """Plain single-process training step(s) of the whole layer list; returns per-layer param grads and the
    per-micro-batch losses of the last step."""
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    losses = []
    for _ in range(steps):
        losses = []
        for x, y in zip(inputs, targets):
            value = x
            for layer in layers:
                value = layer(value)
            loss = mse(value, y)
            (loss * loss_scale).backward()
            losses.append(loss.detach())
    return [[p.grad for p in layer.parameters()] for layer in layers], losses


def max_grad_diff(
    pipeline_layers: Sequence[nn.Module], reference: Sequence[Sequence[torch.Tensor | None]], layer_ids: Sequence[int]
) -> tuple[float, int]:
    """Largest |grad - reference grad| over the given layers' parameters, and how many parameters compared."""
    worst, count = 0.0, 0
    for i in layer_ids:
        for p, ref in zip(pipeline_layers[i].parameters(), reference[i]):
            if (p.grad is None) != (ref is None):
                return float("inf"), count
            if ref is not None:
                worst = max(worst, (p.grad - ref).abs().max().item())
                count += 1
    return worst, count
