"""GPU probe of the pipeline executor alone (no DeepSpeed/Megatron): every schedule on a GPT-like model, NCCL.

Not a unit test (pytest does not collect it). On the device machine (nvidia-h100-x4):

    torchrun --standalone --nproc-per-node 4 tests/runtime/probe_executor_gpu.py            # anchors.md shape
    torchrun --standalone --nproc-per-node 2 tests/runtime/probe_executor_gpu.py --tiny     # quick check

For each micro-batch count and schedule: step time, tokens/s, per-rank bubble (1 - busy/wall from CUDA events),
p2p host wait, peak memory per rank, ratio to interleaf 1f1b, and the relative difference of the gradient norm
to 1f1b's (same weights and data: should be ~1e-3 in bf16, 0 up to rounding in fp32). Prints a table (rank 0).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # repo root

from ds_plugins.runtime import P2PCommunicator, PipelineExecutor, build_stage_modules, measured_costs  # noqa: E402
from ds_plugins.schedule.registry import SCHEDULE_NAMES, build_schedule  # noqa: E402


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.ln2 = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, 4 * hidden)
        self.fc2 = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, h)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Layer(nn.Module):
    """One pipeline layer: a block, with the embedding in front (first) or norm + LM head behind (last)."""

    def __init__(self, hidden: int, heads: int, vocab: int, seq: int, first: bool, last: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden) if first else None
        self.pos = nn.Parameter(torch.randn(seq, hidden) * 0.02) if first else None
        self.block = Block(hidden, heads)
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, vocab, bias=False)) if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x) + self.pos
        x = self.block(x)
        return self.head(x) if self.head is not None else x


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--microbatches", type=int, nargs="+", default=[8, 16])
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULE_NAMES))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--tiny", action="store_true", help="small fp32 model, quick correctness + timing check")
    p.add_argument("--cpu", action="store_true", help="gloo on CPU (checks this script without a GPU)")
    args = p.parse_args()
    if args.tiny:
        args.layers, args.hidden, args.heads, args.seq, args.vocab = 8, 256, 4, 128, 1000
        args.microbatches, args.dtype, args.steps, args.warmup = [8], "fp32", 2, 1

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.cpu:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    else:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    cuda = device.type == "cuda"
    rank, pp = dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = False

    rows = []
    for m in args.microbatches:
        g = torch.Generator(device="cpu").manual_seed(0)
        tokens = [torch.randint(0, args.vocab, (1, args.seq), generator=g).to(device) for _ in range(m)]
        labels = [torch.randint(0, args.vocab, (1, args.seq), generator=g).to(device) for _ in range(m)]
        base_time = base_norm = None
        for name in args.schedules:
            if name == "auto":
                costs = _measure_for_auto(args, m, pp, rank, device, dtype, tokens, labels)
                schedule = build_schedule("auto", pp=pp, microbatches=m, costs=costs)
            else:
                schedule = build_schedule(name, pp=pp, microbatches=m)
            shape = schedule.shape
            stage_modules = _build(args, shape, rank, device, dtype)
            p2p = P2PCommunicator.for_shape(shape, list(range(pp)), device=device)
            ex = PipelineExecutor(schedule, rank, stage_modules, p2p=p2p, loss_fn=lm_loss, device=device)
            params = [q for mod in stage_modules.values() for q in mod.parameters()]
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            times, bubbles, waits = [], [], []
            for step in range(args.warmup + args.steps):
                for q in params:
                    q.grad = None
                dist.barrier()
                if cuda:
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                r = ex.run(tokens if 0 in stage_modules else None,
                           labels if shape.num_stages - 1 in stage_modules else None, loss_scale=1.0 / m)
                if cuda:
                    torch.cuda.synchronize(device)
                if step >= args.warmup:
                    times.append(time.perf_counter() - t0)
                    bubbles.append(r.bubble_fraction)
                    waits.append(r.wait_s)
            sq = torch.zeros((), device=device, dtype=torch.float64)
            for q in params:
                if q.grad is not None:
                    sq += q.grad.double().pow(2).sum()
            dist.all_reduce(sq)
            norm = math.sqrt(sq.item())
            step_t = torch.tensor([sum(times) / len(times)], device=device)
            dist.all_reduce(step_t, op=dist.ReduceOp.MAX)
            info = torch.tensor([sum(bubbles) / len(bubbles), sum(waits) / len(waits),
                                 torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0], device=device)
            gathered = [torch.zeros_like(info) for _ in range(pp)]
            dist.all_gather(gathered, info)
            t = step_t.item()
            if name == "1f1b":
                base_time, base_norm = t, norm
            rows.append((m, name, f"{shape.vp}/{shape.placement}", t, m * args.seq / t,
                         (base_time / t) if base_time else float("nan"),
                         [x[0].item() for x in gathered], [x[2].item() for x in gathered],
                         abs(norm - base_norm) / base_norm if base_norm else float("nan")))
            del ex, p2p, stage_modules, params
            if cuda:
                torch.cuda.empty_cache()
    if rank == 0:
        card = torch.cuda.get_device_name(device) if cuda else "CPU (gloo)"
        print(f"\nexecutor probe: {card} x{pp}, torch {torch.__version__}, "
              f"{args.layers}L h{args.hidden} s{args.seq} {args.dtype}, steps {args.steps} after {args.warmup} warm-up")
        print(f"{'m':>3} {'schedule':<17} {'vp':<7} {'step s':>8} {'tokens/s':>10} {'x1f1b':>6} "
              f"{'bubble % per rank':<26} {'peak GiB per rank':<26} {'|dnorm|/norm':>12}")
        for m, name, vp, t, tps, ratio, bub, mem, dn in rows:
            print(f"{m:>3} {name:<17} {vp:<7} {t:>8.4f} {tps:>10.0f} {ratio:>6.3f} "
                  f"{' '.join(f'{100 * b:5.1f}' for b in bub):<26} {' '.join(f'{x:5.1f}' for x in mem):<26} {dn:>12.2e}")
    dist.destroy_process_group()


def _build(args, shape, rank, device, dtype):
    n = args.layers
    layers: list[nn.Module | None] = [None] * n
    from ds_plugins.runtime import partition_layers

    bounds = partition_layers(n, shape.num_stages)
    for stage in shape.stages_of(rank):
        for i in bounds[stage]:
            torch.manual_seed(1000 + i)  # the same weights whatever the partition
            with torch.device(device):  # initialise on the GPU (fast)
                layers[i] = Layer(args.hidden, args.heads, args.vocab, args.seq, i == 0, i == n - 1).to(dtype)
    return build_stage_modules(layers, shape, rank)  # type: ignore[arg-type]


def _measure_for_auto(args, m, pp, rank, device, dtype, tokens, labels):
    """Warm up with zb-h1 (split backward, one chunk) twice, gather its per-stage F/I/W times, and return a
    cost model for the V shape auto searches (each V stage = half of a zb-h1 stage's time)."""
    sched = build_schedule("zb-h1", pp=pp, microbatches=m)
    mods = _build(args, sched.shape, rank, device, dtype)
    p2p = P2PCommunicator.for_shape(sched.shape, list(range(pp)), device=device)
    ex = PipelineExecutor(sched, rank, mods, p2p=p2p, loss_fn=lm_loss, device=device)
    for _ in range(2):
        r = ex.run(tokens if rank == 0 else None, labels if rank == pp - 1 else None, loss_scale=1.0 / m)
    gathered: list = [None] * pp
    dist.all_gather_object(gathered, r.mean_seconds())
    flat = measured_costs(gathered, sched.shape)
    from ds_plugins.schedule.costs import CostModel

    half = lambda xs: tuple(x / 2 for x in xs)  # noqa: E731
    v_order = [flat.forward[r] for r in range(pp)] + [flat.forward[r] for r in reversed(range(pp))]
    vi = [flat.backward_input[r] for r in range(pp)] + [flat.backward_input[r] for r in reversed(range(pp))]
    vw = [flat.backward_weight[r] for r in range(pp)] + [flat.backward_weight[r] for r in reversed(range(pp))]
    n = 2 * pp
    return CostModel(forward=half(v_order), backward_input=half(vi), backward_weight=half(vw),
                     activation_memory=(0.5,) * n, weight_grad_memory=(0.0,) * n)


if __name__ == "__main__":
    main()
