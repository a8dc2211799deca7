"""GPU probe of the pipeline executor alone (no DeepSpeed/Megatron), on the GPT of benchmarks/gpt.py.

Not a unit test (pytest does not collect it). Two modes.

**Pipeline** (torchrun, NCCL, nvidia-h100-x4): every schedule on the anchors.md GPT::

    torchrun --standalone --nproc-per-node 4 tests/runtime/probe_executor_gpu.py            # anchors.md shape
    torchrun --standalone --nproc-per-node 2 tests/runtime/probe_executor_gpu.py --tiny     # quick check

For each micro-batch count and schedule: step time, tokens/s, per-rank bubble (1 - busy/wall from CUDA events),
peak memory per rank, ratio to interleaf 1f1b, and the relative difference of the gradient norm to 1f1b's (same
weights and data: ~1e-3 in bf16, 0 up to rounding in fp32). Prints a table (rank 0).

**Actions** (one GPU, one process, no pipeline, ~1 min): what one action costs, split backward vs not::

    python tests/runtime/probe_executor_gpu.py --actions                    # anchors shape, last stage, bf16
    OMP_NUM_THREADS=1 python tests/runtime/probe_executor_gpu.py --actions --cpu --tiny   # host cost on CPU

One pipeline stage of the anchors GPT (``--stage-layers`` transformer layers, plus final norm + LM head + loss
like the last rank of benchmarks/pipeline.py at pp=4 unless ``--no-head``), bf16 weights, gradients summed into
fp32 buffers the way DeepSpeed's BF16_Optimizer does (``--accumulate hp``; ``grad`` = plain ``param.grad``).
Variants: ``unsplit`` (nn.Linear, F then B: what interleaf 1f1b runs), ``split-B`` (split linears, full backward)
and ``split-IW`` (split linears, I then the deferred W: what zb-h1/zb-v run). Per action kind:

- ``queue-warm ms``: CUDA-event time with the GPU queue held back (a GPU sleep in front of the action), so the
  host has enqueued all of it before it starts: the device time of the action's kernels with no launch gaps;
- ``queue-cold ms``: CUDA-event time after a device synchronize (empty queue): kernels wait for the host, as
  at the start of an action in the pipeline; cold >> warm means the action is host-bound;
- ``host ms``: host time to enqueue the action; ``kernels`` / ``kernel ms``: CUDA kernels launched and their
  summed device time (torch.profiler, one action); ``ops``: top-level aten ops (all threads); ``copies``:
  copy/cast kernels among them.

Then the same stage under the executor (pp=1, ``1f1b`` vs ``zb-h1``): busy time per step (CUDA events, as in
the benchmark's busy_max_s), and the host cost of ``torch.cuda.memory_allocated`` and of a timing event pair.
``--trace DIR`` writes a chrome trace per variant.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from collections import Counter, defaultdict

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # repo root

from benchmarks import gpt  # noqa: E402
from ds_plugins.runtime import (  # noqa: E402
    P2PCommunicator,
    PipelineExecutor,
    WeightGradQueue,
    build_stage_modules,
    enable_weight_grad_split,
    measured_costs,
    partition_layers,
)
from ds_plugins.schedule.registry import SCHEDULE_NAMES, build_schedule  # noqa: E402


def _config(args) -> gpt.GPTConfig:
    return gpt.GPTConfig(layers=args.layers, hidden=args.hidden, heads=args.heads, seq=args.seq, vocab=args.vocab)


_CPU_LAYERS: dict[tuple, nn.Module] = {}


def _layer(cfg: gpt.GPTConfig, index: int, device: torch.device, dtype: torch.dtype, *, cache: bool = False) -> nn.Module:
    """Pipeline layer ``index`` of benchmarks/gpt.py (same weights whatever the partition), on ``device``
    (``cache``: initialise on the CPU once per process, copy for every further use)."""
    if not cache:
        return gpt.build_layer(cfg, index).to(device=device, dtype=dtype)
    key = (cfg, index)
    if key not in _CPU_LAYERS:
        _CPU_LAYERS[key] = gpt.build_layer(cfg, index)
    return copy.deepcopy(_CPU_LAYERS[key]).to(device=device, dtype=dtype)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return gpt.gpt_loss(logits, labels)


# ---------------------------------------------------------------------------------------------------- pipeline
def pipeline_main(args) -> None:
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
    cfg = _config(args)

    rows = []
    for m in args.microbatches:
        g = torch.Generator(device="cpu").manual_seed(0)
        tokens = [torch.randint(0, args.vocab, (1, args.seq), generator=g).to(device) for _ in range(m)]
        labels = [torch.randint(0, args.vocab, (1, args.seq), generator=g).to(device) for _ in range(m)]
        base_time = base_norm = None
        for name in args.schedules:
            if name == "auto":
                costs = _measure_for_auto(cfg, m, pp, rank, device, dtype, tokens, labels)
                schedule = build_schedule("auto", pp=pp, microbatches=m, costs=costs)
            else:
                schedule = build_schedule(name, pp=pp, microbatches=m)
            shape = schedule.shape
            stage_modules = _build(cfg, shape, rank, device, dtype, schedule.splits_backward)
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


def _build(cfg, shape, rank, device, dtype, split):
    """This rank's stage modules: benchmarks/gpt.py's pipeline layers (embedding, blocks, final norm, head) cut
    into pp*vp stages as the DeepSpeed adapter cuts them (split linears only for schedules that split backward,
    as the DeepSpeed runner does)."""
    n = cfg.num_pipeline_layers
    layers: list[nn.Module | None] = [None] * n
    bounds = partition_layers(n, shape.num_stages)
    for stage in shape.stages_of(rank):
        for i in bounds[stage]:
            layers[i] = _layer(cfg, i, device, dtype, cache=True)
    return build_stage_modules(layers, shape, rank, boundaries=bounds, split_weight_grads=split)  # type: ignore[arg-type]


def _measure_for_auto(cfg, m, pp, rank, device, dtype, tokens, labels):
    """Warm up with zb-h1 (split backward, one chunk) twice, gather its per-stage F/I/W times, and return a
    cost model for the V shape auto searches (each V stage = half of a zb-h1 stage's time)."""
    sched = build_schedule("zb-h1", pp=pp, microbatches=m)
    mods = _build(cfg, sched.shape, rank, device, dtype, True)
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


# ---------------------------------------------------------------------------------------------------- actions
class _Stage:
    """One pipeline stage driven action by action the way PipelineExecutor does (received activation made a
    leaf; I = ``torch.autograd.backward`` inside the queue's deferral; W = ``queue.run``)."""

    def __init__(self, cfg, args, device, dtype, split: bool) -> None:
        first = cfg.layers + 1 - args.stage_layers
        indices = list(range(first, cfg.layers + 1))
        if args.head:
            indices += [cfg.layers + 1, cfg.layers + 2]
        self.module = nn.Sequential(*[_layer(cfg, i, device, dtype, cache=True) for i in indices])
        self.head = args.head
        self.device = device
        if split:
            enable_weight_grad_split(self.module)
        self.hp: dict[int, torch.Tensor] = {}
        if args.accumulate == "hp":
            # DeepSpeed BF16_Optimizer's own way (immediate_grad_update): a post-accumulate-grad hook per parameter
            # adds its gradient into an fp32 buffer (``hp.add_(lp.grad.to(fp32).view(...))``) and drops
            # ``lp.grad`` (the DeepSpeed runner now does these sums with one foreach add per stage instead);
            # deferred W gradients go into the same buffer as ds_plugins/deepspeed/_runner.py _bf16_accumulate
            # adds them (``hp.add_(grad.view(...))``).
            for p in self.module.parameters():
                hp = torch.zeros(p.shape, dtype=torch.float32, device=device)
                self.hp[id(p)] = hp

                def hook(p, hp=hp):
                    if p.grad is None:
                        return
                    hp.add_(p.grad.data.to(hp.dtype).view(hp.shape))
                    p.grad = None

                p.register_post_accumulate_grad_hook(hook)
            self.queue = WeightGradQueue(accumulate_grad=self._into_hp)
        else:
            self.queue = WeightGradQueue()
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _into_hp(self, param, grad) -> None:
        hp = self.hp[id(param)]
        hp.add_(grad.detach().view(hp.shape))

    def forward(self, mb: int, x: torch.Tensor, labels: torch.Tensor) -> None:
        leaf = x.detach().requires_grad_(True)
        out = self.module(leaf)
        root = lm_loss(out, labels) if self.head else out
        self.saved[mb] = (leaf, root)

    def backward(self, mb: int, dy: torch.Tensor, *, defer: bool) -> None:
        leaf, root = self.saved.pop(mb)
        grads = None if self.head else [dy]
        if defer:
            with self.queue.deferring(0, mb):
                torch.autograd.backward([root], grads)
        else:
            torch.autograd.backward([root], grads)
        _ = leaf.grad  # what would be sent to the previous stage

    def weight(self, mb: int) -> None:
        self.queue.run(0, mb)

    def zero(self) -> None:
        for p in self.module.parameters():
            p.grad = None
        for hp in self.hp.values():
            hp.zero_()


def _actions_for(variant: str) -> list[str]:
    return ["F", "B"] if variant in ("unsplit", "split-B") else ["F", "I", "W"]


def _run_action(stage: _Stage, kind: str, mb: int, x, labels, dy) -> None:
    if kind == "F":
        stage.forward(mb, x, labels)
    elif kind == "B":
        stage.backward(mb, dy, defer=False)
    elif kind == "I":
        stage.backward(mb, dy, defer=True)
    else:
        stage.weight(mb)


def _one_step(stage, variant, m, xs, labels, dy, timer=None) -> None:
    """F of every micro-batch, then their backward actions (W after all I: deferred, like zb-h1's tail)."""
    kinds = _actions_for(variant)
    for mb in range(m):
        _timed(timer, "F", lambda mb=mb: _run_action(stage, "F", mb, xs[mb], labels[mb], dy))
    for kind in kinds[1:]:
        for mb in range(m):
            _timed(timer, kind, lambda mb=mb, kind=kind: _run_action(stage, kind, mb, xs[mb], labels[mb], dy))


def _timed(timer, kind, fn) -> None:
    if timer is None:
        fn()
    else:
        timer(kind, fn)


class _ActionTimer:
    """Per action kind: host enqueue time and CUDA-event time, with the GPU queue warm (held back by a GPU sleep)
    or cold (synchronized before)."""

    def __init__(self, device, warm: bool, sleep_cycles: int) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.warm = warm
        self.sleep_cycles = sleep_cycles
        self.host: dict[str, list[float]] = defaultdict(list)
        self.events: dict[str, list] = defaultdict(list)

    def __call__(self, kind: str, fn) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            if self.warm:
                torch.cuda._sleep(self.sleep_cycles)  # the GPU is busy while the host enqueues the whole action
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        fn()
        self.host[kind].append(time.perf_counter() - t0)
        if self.cuda:
            end.record()
            self.events[kind].append((start, end))

    def device_ms(self) -> dict[str, float]:
        if not self.cuda:
            return {}
        torch.cuda.synchronize(self.device)
        return {k: 1e3 * sum(s.elapsed_time(e) / 1e3 for s, e in v) / len(v) for k, v in self.events.items()}

    def host_ms(self) -> dict[str, float]:
        return {k: 1e3 * sum(v) / len(v) for k, v in self.host.items()}


_COPY_OPS = ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous")


def _profile_action(stage, variant, kind, m, xs, labels, dy, trace_dir) -> dict:
    """One step in which the ``kind`` action of micro-batch 0 runs under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    cuda = stage.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    stage.zero()
    result: dict = {}
    for k in _actions_for(variant):
        for mb in range(m):
            if k != kind or mb:
                _run_action(stage, k, mb, xs[mb], labels[mb], dy)
                continue
            if cuda:
                torch.cuda.synchronize(stage.device)
            with profile(activities=activities) as prof:
                _run_action(stage, k, mb, xs[mb], labels[mb], dy)
                if cuda:
                    torch.cuda.synchronize(stage.device)
            result = _summarize(prof)
            if trace_dir:
                os.makedirs(trace_dir, exist_ok=True)
                prof.export_chrome_trace(os.path.join(trace_dir, f"{variant}-{kind}.json"))
    return result


def _summarize(prof) -> dict[str, float]:
    events = list(prof.events())
    ops = [e for e in events if e.name.startswith("aten::")
           and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
    copies = [e for e in events if e.name in _COPY_OPS]
    kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")
               and not e.name.startswith(("Memcpy", "Memset"))]
    kernel_us = sum(e.time_range.elapsed_us() for e in kernels)
    names = Counter(e.name for e in ops)
    return {"ops": len(ops), "copies": len(copies), "kernels": len(kernels), "kernel_ms": kernel_us / 1e3,
            "names": names}


def actions_main(args) -> None:
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = _config(args)
    args.stage_layers = min(args.stage_layers, cfg.layers)
    m = args.microbatches[0]
    g = torch.Generator().manual_seed(0)
    xs = [(torch.randn(1, cfg.seq, cfg.hidden, generator=g) * 0.5).to(device, dtype) for _ in range(m)]
    labels = [torch.randint(0, cfg.vocab, (1, cfg.seq), generator=g).to(device) for _ in range(m)]
    dy = (torch.randn(1, cfg.seq, cfg.hidden, generator=g) * 1e-3).to(device, dtype)
    variants = ("unsplit", "split-B", "split-IW")
    rows: dict[str, dict[str, dict[str, float]]] = {}
    grads: dict[str, list[torch.Tensor]] = {}
    sleep_cycles = 0
    if device.type == "cuda":  # ~30 ms of GPU sleep: longer than the host needs to enqueue any one action
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(10**7)
        end.record()
        end.synchronize()
        sleep_cycles = int(10**7 * 30.0 / max(start.elapsed_time(end), 1e-3))
    t_start = time.perf_counter()
    for variant in variants:
        stage = _Stage(cfg, args, device, dtype, split=variant != "unsplit")
        for _ in range(args.warmup):
            stage.zero()
            _one_step(stage, variant, m, xs, labels, dy)
        per_kind: dict[str, dict[str, float]] = defaultdict(dict)
        modes = (("cold", False), ("warm", True)) if device.type == "cuda" else (("cold", False),)
        for mode, warm in modes:
            timer = _ActionTimer(device, warm, sleep_cycles)
            for _ in range(args.steps):
                stage.zero()
                _one_step(stage, variant, m, xs, labels, dy, timer)
            for k, v in timer.device_ms().items():
                per_kind[k][f"{mode} ms"] = v
            if mode == "cold":
                for k, v in timer.host_ms().items():
                    per_kind[k]["host ms"] = v
        stage.zero()
        _one_step(stage, variant, m, xs, labels, dy)
        grads[variant] = [stage.hp[id(p)].clone() if stage.hp else p.grad.clone() for p in stage.module.parameters()]
        for kind in _actions_for(variant):
            summary = _profile_action(stage, variant, kind, m, xs, labels, dy, args.trace)
            per_kind[kind].update({k: v for k, v in summary.items() if k != "names"})
            per_kind[kind]["names"] = summary["names"]  # type: ignore[assignment]
        rows[variant] = per_kind
        del stage
        if device.type == "cuda":
            torch.cuda.empty_cache()

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\naction probe: {card}, torch {torch.__version__}, stage = {args.stage_layers} GPT layers"
          f"{' + final norm + LM head + loss' if args.head else ''} (h{cfg.hidden} s{cfg.seq} vocab {cfg.vocab}), "
          f"{args.dtype}, micro-batch 1, m={m}, accumulate={args.accumulate}, mean of {args.steps} steps")
    cols = ("warm ms", "cold ms", "host ms", "kernel ms", "kernels", "ops", "copies")
    print(f"{'variant':<10} {'action':<6} " + " ".join(f"{c:>10}" for c in cols))
    for variant, per_kind in rows.items():
        for kind, vals in per_kind.items():
            cells = []
            for c in cols:
                v = vals.get(c)
                cells.append(f"{'-':>10}" if v is None else (f"{v:>10.3f}" if isinstance(v, float) else f"{v:>10}"))
            print(f"{variant:<10} {kind:<6} " + " ".join(cells))
        tot = {c: sum(v.get(c, 0.0) for v in per_kind.values()) for c in cols}
        print(f"{variant:<10} {'total':<6} " + " ".join(f"{tot[c]:>10.3f}" if c.endswith("ms") else f"{int(tot[c]):>10}"
                                                     for c in cols))
    base = rows["unsplit"]
    for variant in ("split-B", "split-IW"):
        for c in ("warm ms", "cold ms", "host ms", "kernel ms"):
            a = sum(v.get(c, 0.0) for v in rows[variant].values())
            b = sum(v.get(c, 0.0) for v in base.values())
            if b:
                print(f"{variant} / unsplit, {c:<9}: {a / b:6.3f}")
    print("\nop counts that differ from unsplit (per action kind; backward = B or I+W):")
    ref_f, ref_b = base["F"]["names"], base["B"]["names"]  # type: ignore[index]
    for variant in ("split-B", "split-IW"):
        per = rows[variant]
        f = per["F"]["names"]  # type: ignore[index]
        b = per["B"]["names"] if "B" in per else per["I"]["names"] + per["W"]["names"]  # type: ignore[index,operator]
        for label, got, ref in (("F", f, ref_f), ("backward", b, ref_b)):
            diff = {k: got.get(k, 0) - ref.get(k, 0) for k in set(got) | set(ref) if got.get(k, 0) != ref.get(k, 0)}
            print(f"  {variant:<9} {label:<9} {dict(sorted(diff.items())) or 'same'}")
    for variant in ("split-B", "split-IW"):
        worst = max(((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
                    for a, b in zip(grads[variant], grads["unsplit"]))
        print(f"gradients {variant} vs unsplit: max relative difference {worst:.2e}")
    _executor_costs(cfg, args, device, dtype, m, xs, labels)
    print(f"\nprobe wall time {time.perf_counter() - t_start:.0f} s")


def _profile_step(ex, modules, xs, labels, m, device, trace_dir, name) -> dict[str, list]:
    """One executor step under torch.profiler: prints kernels vs device busy vs gaps (benchmarks/device_gaps.py)
    and returns ``kernel name -> [launches, summed device ms]`` (CUDA only)."""
    if device.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.device_gaps import device_gaps, format_gaps

    for p in modules[0].parameters():
        p.grad = None
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        ex.run(xs, labels, loss_scale=1.0 / m)
        torch.cuda.synchronize(device)
    if trace_dir:
        os.makedirs(trace_dir, exist_ok=True)
        prof.export_chrome_trace(os.path.join(trace_dir, f"executor-{name}.json"))
    summary = device_gaps(prof)
    print(format_gaps(summary, f"  {name:<6} profiled step: "))
    return summary["by_kernel"]


def _compare_kernels(kernels: dict[str, dict[str, list]]) -> None:
    """Kernels whose launches or device time differ most between the two executor variants."""
    (na, a), (nb, b) = kernels.items()
    diff = []
    for k in set(a) | set(b):
        ca, ta = a.get(k, (0, 0.0))
        cb, tb = b.get(k, (0, 0.0))
        if ca != cb or abs(ta - tb) > 0.05:
            diff.append((tb - ta, cb - ca, k))
    diff.sort(key=lambda d: -abs(d[0]))
    print(f"  kernels differing ({nb} - {na}): device ms, launches, name")
    for dt, dc, k in diff[:14]:
        print(f"    {dt:+8.2f} ms {dc:+5d}  {k[:110]}")


def _executor_costs(cfg, args, device, dtype, m, xs, labels) -> None:
    """The stage under PipelineExecutor at pp=1: busy per step for 1f1b (nn.Linear) vs zb-h1 (split), and the
    host cost of the executor's per-action extras."""
    print("\nexecutor at pp=1 (the stage above, no communication):")
    kernels: dict[str, dict[str, list]] = {}
    for name in ("1f1b", "zb-h1"):
        schedule = build_schedule(name, pp=1, microbatches=m)
        indices = list(range(cfg.layers + 1 - args.stage_layers, cfg.layers + 1))
        if args.head:
            indices += [cfg.layers + 1, cfg.layers + 2]
        layers = [nn.Identity()] * indices[0] + [_layer(cfg, i, device, dtype, cache=True) for i in indices]
        bounds = [range(indices[0], indices[-1] + 1)]
        modules = build_stage_modules(layers, schedule.shape, 0, boundaries=bounds,
                                      split_weight_grads=schedule.splits_backward)
        loss_fn = lm_loss if args.head else (lambda out, _t: out.float().square().mean())
        for track in (False, True):
            ex = PipelineExecutor(schedule, 0, modules, p2p=None, loss_fn=loss_fn, device=device,
                                  track_memory=track)
            busy, wall = [], []
            for step in range(args.warmup + args.steps):
                for p in modules[0].parameters():
                    p.grad = None
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                r = ex.run(xs, labels, loss_scale=1.0 / m)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if step >= args.warmup:
                    busy.append(r.busy_s)
                    wall.append(time.perf_counter() - t0)
            print(f"  {name:<6} track_memory={str(track):<5}: busy {1e3 * sum(busy) / len(busy):8.2f} ms, "
                  f"step {1e3 * sum(wall) / len(wall):8.2f} ms (m={m}; per step: "
                  f"{' '.join(f'{1e3 * b:.1f}' for b in busy)})")
        kernels[name] = _profile_step(ex, modules, xs, labels, m, device, args.trace, name)
        del modules, layers
    if device.type == "cuda" and len(kernels) == 2:
        _compare_kernels(kernels)
    if device.type == "cuda":
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            torch.cuda.memory_allocated(device)
        mem_us = 1e6 * (time.perf_counter() - t0) / n
        t0 = time.perf_counter()
        for _ in range(n):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            b.record()
        ev_us = 1e6 * (time.perf_counter() - t0) / n
        print(f"  host cost: torch.cuda.memory_allocated {mem_us:.1f} us per call (the executor called it twice per "
              f"action before track_memory), timing event pair create+record {ev_us:.1f} us")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--microbatches", type=int, nargs="+", default=None)
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULE_NAMES))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--tiny", action="store_true", help="small model, quick correctness + timing check")
    p.add_argument("--cpu", action="store_true", help="CPU (pipeline mode: gloo) to check this script without a GPU")
    p.add_argument("--actions", action="store_true", help="one GPU: per-action cost of split vs unsplit backward")
    p.add_argument("--stage-layers", type=int, default=8, help="--actions: transformer layers in the stage")
    p.add_argument("--no-head", dest="head", action="store_false", help="--actions: stage without norm + LM head")
    p.add_argument("--accumulate", choices=["hp", "grad"], default="hp",
                   help="--actions: fp32 buffers as DeepSpeed bf16 (hp) or param.grad")
    p.add_argument("--trace", default=None, help="--actions: write chrome traces of the profiled actions here")
    args = p.parse_args()
    if args.tiny:
        args.layers, args.hidden, args.heads, args.seq, args.vocab = 8, 256, 4, 128, 1000
        if not args.actions:
            args.dtype = "fp32"
    if args.microbatches is None:
        args.microbatches = [4] if args.actions else ([8] if args.tiny else [8, 16])
    if args.steps is None:
        args.steps = 3 if args.actions else (2 if args.tiny else 4)
    if args.tiny and not args.actions:
        args.warmup = 1
    if args.actions:
        actions_main(args)
    else:
        pipeline_main(args)


if __name__ == "__main__":
    main()
