"""Pipeline schedules side by side on the GPT of ../shared/docs/anchors.md, in ONE process group.

For m = 8 and m = 16 micro-batches (micro-batch 1, seq 2048, bf16, pp = 4, SGD):

- ``deepspeed-1f1b``: DeepSpeed's own PipelineEngine (the baseline; bf16 optimizer step);
- interleaf through ``deepspeed.initialize`` + the ``"interleaf"`` config block: ``1f1b``, ``interleaved-1f1b``,
  ``zb-h1``, ``zb-h2``, ``zb-v``, ``auto`` (same bf16 optimizer step);
- torch.distributed.pipelining: ``torch-1f1b`` (Schedule1F1B, best torch schedule at m=16 in anchors.md),
  ``torch-izb`` (ScheduleInterleavedZeroBubble v=2, best at m=8) and ``torch-dualpipev`` (ScheduleDualPipeV,
  V placement: stages r and 2pp-1-r on rank r; needs m >= 2pp), a plain torch SGD step directly on the bf16
  weights (no fp32 master copy: a cheaper step than DeepSpeed's bf16 optimizer). ``torch-zbv``
  (ScheduleZBVZeroBubble) runs on request.

An interleaf variant named ``SCHEDULE/function`` (e.g. ``zb-h2/function``) runs that schedule with the executor's
older split-backward form (``"split_mode": "function"``: split linears as a Python ``autograd.Function``)
against the default recorded-edge form, in the same run.

Reported per variant: tokens/s (warm-up steps excluded), ratio to DeepSpeed 1F1B of the same run, ratio to the
best torch.distributed.pipelining row at the same m (issue 3's target: >= 1.15x), measured
bubble (interleaf: share of each rank's schedule time not computing, mean over ranks, from the executor's
F/I/W/B timings; DeepSpeed: the same from its forward/backward instruction timings; torch: not measured),
bubble vs ideal (1 - tokens/s / ideal, where ideal is the slowest rank's own F+B compute measured in the
interleaf 1f1b run: anchors.md's definition), and peak allocated memory per rank (GiB). Each row's log line also
gives, per rank, the share of the step the host spent issuing it (interleaf rows) and, when any, the caching
allocator's cudaMalloc retries / calls during the timed steps (a retry frees the cache and synchronizes the
device: a stall no schedule model sees).

GPU (writes its section of BENCHMARKS.md, one per layout: "benchmarks/pipeline.py pp=4")::

    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node 4 benchmarks/pipeline.py
    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node 8 benchmarks/pipeline.py --microbatches 16 32         # pp=8
    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node 8 benchmarks/pipeline.py --pp 4 --microbatches 8 16  # pp=4 x dp=2

With ``--pp`` below the rank count, ranks / pp data-parallel pipelines run side by side (DeepSpeed's topology:
rank = stage * dp + replica); tokens/s counts every replica, the torch rows average their gradients over the
replicas with one all-reduce per step.

CPU smoke test (tiny model, gloo, no BENCHMARKS.md)::

    OMP_NUM_THREADS=1 python benchmarks/pipeline.py --tiny --procs 4
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.device_gaps import add_profile_arguments, check_profile_arguments, host_dispatch_us  # noqa: E402
from benchmarks.device_memory import allocated_gib_per_rank, allocator_events, release_between_rows  # noqa: E402
from benchmarks.local_ranks import run_local_ranks, show_interleaf_logs  # noqa: E402
from benchmarks.report import merge_from, section_ids, write_section  # noqa: E402

INTERLEAF = ("1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v", "auto")
TORCH = ("torch-1f1b", "torch-izb", "torch-zbv", "torch-dualpipev")
DEFAULT_VARIANTS = ("deepspeed-1f1b", *INTERLEAF, "torch-1f1b", "torch-izb", "torch-dualpipev")
REPORT_SECTION = "benchmarks/pipeline.py"  # its BENCHMARKS.md sections, one per pp: "benchmarks/pipeline.py pp=4"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny GPT (CPU smoke test)")
    p.add_argument("--microbatches", type=int, nargs="+", default=[8, 16])
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                   help=f"subset of: deepspeed-1f1b {' '.join(INTERLEAF)} {' '.join(TORCH)}; "
                        "an interleaf schedule as SCHEDULE/function runs it with the Function split form")
    p.add_argument("--warmup", type=int, default=4, help="untimed iterations per variant (auto re-plans after 3)")
    p.add_argument("--steps", type=int, default=5, help="timed iterations per variant")
    p.add_argument("--procs", type=int, default=0, help="spawn this many CPU gloo processes (no torchrun)")
    add_profile_arguments(p, "every row")
    p.add_argument("--pp", type=int, default=None,
                   help="pipeline stages (default: all ranks); data parallel = ranks / pp, e.g. --pp 4 on 8 GPUs")
    p.add_argument("--out", default=None, help="markdown file to update (default: BENCHMARKS.md on GPU, none on CPU)")
    p.add_argument("--json", default=None, help="also write the raw results as JSON here")
    p.add_argument("--merge-from", default=None,
                   help="no run: copy this script's section from a markdown file written on the device (--out) "
                        "into BENCHMARKS.md")
    p.add_argument("--nccl-timeout-s", type=float, default=240.0,
                   help="collective/p2p timeout of the process group: a hang aborts instead of eating the budget")
    args = p.parse_args(argv)
    check_profile_arguments(p, args)
    for v in args.variants:
        schedule, _, form = v.partition("/")
        known = v in ("deepspeed-1f1b", *INTERLEAF, *TORCH) or (schedule in INTERLEAF and form == "function")
        if not known:
            p.error(f"unknown variant {v!r}: use deepspeed-1f1b, {', '.join(INTERLEAF)}, {', '.join(TORCH)}, "
                    "or SCHEDULE/function for an interleaf schedule")
    return args


@dataclass
class Row:
    variant: str
    microbatches: int
    tokens_per_s: float
    bubble: float | None
    peak_gib: list[float]
    note: str = ""
    busy_max_s: float | None = None
    schedule: str = ""
    extra: dict = field(default_factory=dict)


def _gpt_config(tiny: bool):
    from benchmarks import gpt

    if tiny:
        return gpt.GPTConfig(layers=8, hidden=64, heads=4, seq=64, vocab=256)
    return gpt.ANCHOR


def _ds_config(m: int, schedule: str | None, bf16: bool, split_mode: str = "") -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": m,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "optimizer": {"type": "SGD", "params": {"lr": 1e-4}},
        "zero_optimization": {"stage": 0},
        "wall_clock_breakdown": False,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
    if schedule is not None:
        # a stuck p2p fails the variant within 2 minutes instead of hanging the whole run
        cfg["interleaf"] = {"pipeline": {"schedule": schedule, "auto_warmup_iterations": 3, "timeout_s": 120.0}}
        if split_mode:
            cfg["interleaf"]["pipeline"]["split_mode"] = split_mode
    return cfg


def _batches(cfg, count: int, device=None):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        t = torch.randint(0, cfg.vocab, (1, cfg.seq + 1), generator=g)
        out.append((t[:, :-1].contiguous(), t[:, 1:].contiguous()))
    return out


def _peak_gib(device) -> float:
    if device.type != "cuda":
        return 0.0
    return torch.cuda.max_memory_allocated(device) / 2**30


def _layout(args) -> tuple[int, int]:
    """(pp, dp) of this run: --pp stages, the ranks split into world / pp data-parallel pipelines."""
    world = torch.distributed.get_world_size()
    pp = args.pp or world
    if pp < 1 or world % pp:
        raise ValueError(f"--pp {pp} must divide the {world} ranks (data parallel = ranks / pp)")
    return pp, world // pp


def _torch_groups(pp: int, dp: int):
    """This rank's pipeline and data-parallel groups in DeepSpeed's topology (rank = stage * dp + replica), for the
    torch.distributed.pipelining rows; (None, None) without data parallelism. Collective: every rank calls it."""
    if dp == 1:
        return None, None
    rank = torch.distributed.get_rank()
    mine = [None, None]
    for d in range(dp):
        group = torch.distributed.new_group([s * dp + d for s in range(pp)])
        if rank % dp == d:
            mine[0] = group
    for st in range(pp):
        group = torch.distributed.new_group([st * dp + d for d in range(dp)])
        if rank // dp == st:
            mine[1] = group
    return mine[0], mine[1]


def _gather_floats(values: list[float], device) -> list[list[float]]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    out = [torch.zeros_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(out, t)
    return [o.cpu().tolist() for o in out]


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_deepspeed(variant: str, m: int, cfg, args, device) -> Row:
    """DeepSpeed's engine (variant deepspeed-1f1b) or interleaf's (variant = schedule name[/function])."""
    import deepspeed
    from deepspeed.pipe import PipelineModule

    from benchmarks import gpt
    from ds_plugins.deepspeed.baseline_timing import DeepSpeedStepTimer

    schedule, _, form = variant.partition("/")
    schedule = None if variant == "deepspeed-1f1b" else schedule
    world = torch.distributed.get_world_size()
    pp, _ = _layout(args)
    module = PipelineModule(layers=gpt.layer_specs(cfg), num_stages=pp, loss_fn=gpt.gpt_loss,
                            partition_method="type:TransformerLayer")
    engine, *_ = deepspeed.initialize(model=module, config=_ds_config(m, schedule, device.type == "cuda", form),
                                      model_parameters=module.parameters())
    runner = getattr(engine, "interleaf_runner", None)
    timer = DeepSpeedStepTimer(engine) if runner is None else None
    data = _batches(cfg, m * (args.warmup + args.steps + (1 if args.profile else 0)))
    it = iter(data)
    for _ in range(args.warmup):
        engine.train_batch(it)
    if timer is not None:
        timer.reset()
    _sync(device)
    warmup_peak = _peak_gib(device)  # the warm-up (first, serialized step; measured steps) apart from the timed ones
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.distributed.barrier()
    alloc_before = allocator_events(device)
    t0 = time.perf_counter()
    host_share = []  # interleaf: host time issuing the executor's step / its device time, per step
    for _ in range(args.steps):
        engine.train_batch(it)
        if runner is not None:
            result = runner.last_result
            host_share.append(result.host_wall_s / max(result.wall_s, 1e-9))
    _sync(device)
    elapsed = time.perf_counter() - t0
    alloc_after = allocator_events(device)
    elapsed = max(r[0] for r in _gather_floats([elapsed], device))
    tokens = cfg.seq * m * args.steps * engine.grid.data_parallel_size
    if runner is not None:
        hist = runner.history[-args.steps:]
        bubble = sum(h.bubble for h in hist) / len(hist)
        busy_max = sum(h.busy_max_s for h in hist) / len(hist)
        name = hist[-1].schedule + (f" ({runner.tuning} for measured costs)" if runner.tuning else "")
    else:
        # idle share of the schedule part (step time minus reduction + optimizer step), mean over ranks
        per_step_wall = elapsed / args.steps
        mine = 1.0 - (timer.busy_s / args.steps) / max(per_step_wall - timer.tail_s / args.steps, 1e-9)
        bubble = sum(r[0] for r in _gather_floats([mine], device)) / world
        busy_max = None
        name = "1f1b"
    timed_peak = _peak_gib(device)
    # after every timed figure is read (the history, the DeepSpeed timer and the peak would count the profiled step)
    profile = None
    if args.profile:
        from benchmarks.device_gaps import profile_step

        profile = profile_step(lambda: engine.train_batch(it), device,
                               label=f"[pipeline bench] profile {variant} m={m}",
                               trace_path=args.trace_dir and os.path.join(
                                   args.trace_dir, f"{variant}_m{m}_rank{torch.distributed.get_rank()}.json.gz"),
                               annotate=[runner.executor] if runner is not None else [])
    both = _gather_floats([warmup_peak, timed_peak], device)
    peaks = [max(r) for r in both]
    row = Row(variant, m, tokens / elapsed, bubble, peaks, busy_max_s=busy_max, schedule=name)
    row.extra["peak_gib_warmup_timed"] = both
    # per rank: cudaMalloc retries (each frees the cache and synchronizes) and cudaMalloc calls in the timed steps
    row.extra["allocator_timed"] = [[int(x) for x in r] for r in _gather_floats(
        [alloc_after[0] - alloc_before[0], alloc_after[1] - alloc_before[1]], device)]
    if host_share:
        # ~1.0: the host was still enqueueing when the GPU finished (host-bound); well below 1: it ran ahead
        row.extra["host_issue_share"] = [r[0] for r in _gather_floats([sum(host_share) / len(host_share)], device)]
    if profile is not None:
        row.extra["profile"] = profile
    release_engine(engine, module)
    del engine, module, runner, timer, it, data
    return row


def release_engine(engine, module) -> None:
    """Make a finished row's engine collectable, so the next row's peak does not include it (call ``gc.collect()``
    afterwards; ``release_between_rows`` does).

    Two reference cycles the garbage collector cannot break on its own:

    - DeepSpeed's bf16 optimizer binds methods to every parameter (``param.get_full_hp_param`` and friends): the
      parameter's ``__dict__`` is cleared. Left alone, the baseline's weights and gradients (3.3 GiB per rank at
      pp=2) stayed allocated under every later row's peak.
    - ``DeepSpeedEngine.forward`` hooks its outputs with a closure over the engine
      (``register_output_backward_hooks(..., backward_prologue)``). DeepSpeed's pipeline engine keeps the last
      stage's outputs (``pipe_buffers['outputs']``) and its loss, whose autograd graph reaches those hooks, after
      the step: engine -> outputs -> autograd node (C++) -> hook -> engine, a cycle the collector cannot see
      through the C++ node. Only the last stage keeps them (the others drop their outputs after backward), so
      DeepSpeed 1F1B's whole engine stayed alive on the last pipeline rank under every later row's peak: bf16
      weights, fp32 master weights and BF16_Optimizer's gradient sums (bf16: DeepSpeed's default
      ``grad_accum_dtype`` is the model dtype), 8 bytes per parameter, plus its two output buffers (logits). On 2x
      H100 at pp=2 that is 871 M parameters x 8 B + 2 x 2048 x 32000 bf16 logits = ~6.8 GiB on rank 1 per
      DeepSpeed row run before (the m=16 DeepSpeed row after the m=8 rows peaked at 18.5 GiB there instead of
      11.7), which made every interleaf and torch row look ~5 GiB heavier than DeepSpeed's own on the last rank.
      The references are dropped here (tests/deepspeed/test_pipeline_memory.py).
    """
    if hasattr(engine, "destroy"):
        engine.destroy()
    state = vars(engine)
    for name in ("pipe_buffers", "loss", "outputs", "total_loss", "fwd_outputs", "agg_train_loss", "dp_group_loss"):
        if name in state:
            state[name] = None
    for p in module.parameters():
        p.__dict__.clear()


def _torch_stage_module(cfg, start: int, stop: int, device):
    from benchmarks import gpt

    layers = [gpt.build_layer(cfg, i) for i in range(start, stop)]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.nn.Sequential(*layers).to(device=device, dtype=dtype)


def run_torch(variant: str, m: int, cfg, args, device) -> Row:
    """torch.distributed.pipelining with the same layers and partition (type:TransformerLayer)."""
    from torch.distributed import pipelining as tp

    from benchmarks import gpt
    from ds_plugins.deepspeed.partition import compute_parts

    pp, dp = _layout(args)
    pp_group, dp_group = _torch_groups(pp, dp)
    rank = torch.distributed.get_rank() // dp  # stage rank in DeepSpeed's topology (rank = stage * dp + replica)
    v = 1 if variant == "torch-1f1b" else 2
    n = pp * v
    parts = compute_parts(gpt.layer_specs(cfg), n, "type:TransformerLayer")
    if variant in ("torch-zbv", "torch-dualpipev"):
        stage_ids = [rank, 2 * pp - 1 - rank]
    else:
        stage_ids = [rank + c * pp for c in range(v)]
    modules = {s: _torch_stage_module(cfg, parts[s], parts[s + 1], device) for s in stage_ids}
    stages = [tp.PipelineStage(modules[s], s, n, device, group=pp_group) for s in stage_ids]

    def loss_fn(logits, labels):
        return gpt.gpt_loss(logits, labels)

    cls = {
        "torch-1f1b": tp.Schedule1F1B,
        "torch-izb": tp.ScheduleInterleavedZeroBubble,
        "torch-zbv": tp.ScheduleZBVZeroBubble,
        "torch-dualpipev": getattr(tp, "ScheduleDualPipeV", None),
    }[variant]
    if cls is None:
        raise ValueError(f"{variant} is not in this torch version")
    schedule = cls(stages[0] if v == 1 else stages, n_microbatches=m, loss_fn=loss_fn)
    params = [p for mod in modules.values() for p in mod.parameters()]
    opt = torch.optim.SGD(params, lr=1e-4)
    data = _batches(cfg, args.warmup + args.steps)
    holds_first = 0 in stage_ids
    holds_last = n - 1 in stage_ids

    def one_step(i: int) -> None:
        g = torch.Generator().manual_seed(i)
        tokens = torch.randint(0, cfg.vocab, (m, cfg.seq + 1), generator=g)
        x = tokens[:, :-1].contiguous().to(device)
        y = tokens[:, 1:].contiguous().to(device)
        kwargs = {}
        if holds_last:
            kwargs["target"] = y
            kwargs["losses"] = []
        if holds_first:
            schedule.step(x, **kwargs)
        else:
            schedule.step(**kwargs)
        if dp_group is not None:  # data parallel: average the replicas' gradients, as DeepSpeed's engine does
            grads = [p.grad for p in params if p.grad is not None]
            for grad in grads:
                grad.div_(dp)
            if grads:
                flat = torch._utils._flatten_dense_tensors(grads)
                torch.distributed.all_reduce(flat, group=dp_group)
                for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                    grad.copy_(synced)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(args.warmup):
        one_step(i)
    _sync(device)
    torch.distributed.barrier()
    t0 = time.perf_counter()
    for i in range(args.steps):
        one_step(args.warmup + i)
    _sync(device)
    elapsed = max(r[0] for r in _gather_floats([time.perf_counter() - t0], device))
    tokens = cfg.seq * m * args.steps * dp
    peaks = [r[0] for r in _gather_floats([_peak_gib(device)], device)]
    row = Row(variant, m, tokens / elapsed, None, peaks, schedule=cls.__name__)
    if args.profile:  # after the timed figures and the peak, as for the DeepSpeed rows
        from benchmarks.device_gaps import profile_step

        row.extra["profile"] = profile_step(
            lambda: one_step(args.warmup + args.steps), device, label=f"[pipeline bench] profile {variant} m={m}",
            trace_path=args.trace_dir and os.path.join(
                args.trace_dir, f"{variant}_m{m}_rank{torch.distributed.get_rank()}.json.gz"))
    del schedule, stages, modules, opt, params, data
    for group in (pp_group, dp_group):
        if group is not None:
            torch.distributed.destroy_process_group(group)
    return row


def run_all(args: argparse.Namespace) -> list[Row]:
    import deepspeed

    import ds_plugins  # noqa: F401  (registers interleaf's DeepSpeed engine)

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=args.nccl_timeout_s))
    rank = torch.distributed.get_rank()
    show_interleaf_logs(rank, "ds_plugins.schedule.generators.auto", "ds_plugins.deepspeed._runner")
    _layout(args)  # a --pp that does not divide the ranks fails here, before any variant
    cfg = _gpt_config(args.tiny)
    if device.type == "cuda":  # every rank at once, as in the rows: the host's speed with all ranks on it
        args.host_dispatch_us = [r[0] for r in _gather_floats([host_dispatch_us(device)], device)]
    rows: list[Row] = []
    # DeepSpeed and interleaf first (both m), torch.distributed.pipelining last: if a torch variant breaks the
    # process group, every other number has already been printed.
    order = [(m, v) for m in args.microbatches for v in args.variants if not v.startswith("torch-")]
    order += [(m, v) for m in args.microbatches for v in args.variants if v.startswith("torch-")]
    for m, variant in order:
        release_between_rows(device)
        # every rank's: a previous row's state left allocated on one rank shows up under this row's peak there
        resident = allocated_gib_per_rank(device)
        t0 = time.perf_counter()
        try:
            if variant.startswith("torch-"):
                row = run_torch(variant, m, cfg, args, device)
            else:
                row = run_deepspeed(variant, m, cfg, args, device)
        except Exception as err:  # keep the other variants' numbers; report the failure in the table
            print(f"[pipeline bench] rank {rank}: {variant} m={m} FAILED: {type(err).__name__}: {err}", flush=True)
            row = Row(variant, m, 0.0, None, [], note=f"failed: {type(err).__name__}: {str(err)[:120]}")
        rows.append(row)
        if rank == 0:
            print(f"[pipeline bench] m={m:2d} {variant:>16}: {row.tokens_per_s:10.0f} tokens/s  "
                  f"bubble {_pct(row.bubble):>6}  peak GiB {'/'.join(f'{p:.1f}' for p in row.peak_gib)}  "
                  f"({time.perf_counter() - t0:.0f} s; {'/'.join(f'{r:.2f}' for r in resident)} GiB per rank "
                  "still allocated before it)"
                  + (f"  peak warm-up/timed {' '.join(f'{w:.1f}/{t:.1f}' for w, t in row.extra['peak_gib_warmup_timed'])}"
                     if "peak_gib_warmup_timed" in row.extra else "")
                  + (f"  host issue / device step {'/'.join(f'{h:.2f}' for h in row.extra['host_issue_share'])}"
                     if "host_issue_share" in row.extra else "")
                  + (f"  cudaMalloc retries/calls in the timed steps "
                     f"{' '.join(f'{r}/{c}' for r, c in row.extra['allocator_timed'])}"
                     if any(r or c for r, c in row.extra.get("allocator_timed", ())) else ""), flush=True)
    rows.sort(key=lambda r: (r.microbatches, args.variants.index(r.variant)))
    return rows


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * max(x, 0.0):.1f}%"


def table(rows: list[Row]) -> str:
    lines = []
    for m in sorted({r.microbatches for r in rows}):
        sub = [r for r in rows if r.microbatches == m]
        base = next((r.tokens_per_s for r in sub if r.variant == "deepspeed-1f1b" and r.tokens_per_s), None)
        ideal_src = next((r for r in sub if r.variant == "1f1b" and r.busy_max_s), None)
        # best torch.distributed.pipelining row at this m (only rows that ran)
        best_torch = max((r.tokens_per_s for r in sub if r.variant.startswith("torch-") and r.tokens_per_s),
                         default=None)
        lines.append(f"m = {m} micro-batches:")
        lines.append("")
        lines.append("| variant | schedule run | tokens/s | vs DeepSpeed 1F1B | vs best torch | measured bubble | "
                     "bubble vs ideal | peak GiB per rank |")
        lines.append("|---|---|---|---|---|---|---|---|")
        # ideal tokens/s: the slowest rank's own F+B time per step, no waiting (from the interleaf 1f1b run)
        ideal = ideal_src.extra.get("ideal_tokens_per_s") if ideal_src is not None else None
        for r in sub:
            # three decimals: a target such as 1.30x must not be met by rounding 1.298x up
            ratio = f"{r.tokens_per_s / base:.3f}x" if base and r.tokens_per_s else "—"
            vs_torch = f"{r.tokens_per_s / best_torch:.3f}x" if best_torch and r.tokens_per_s else "—"
            vs_ideal = f"{100 * max(0.0, 1 - r.tokens_per_s / ideal):.1f}%" if ideal and r.tokens_per_s else "—"
            peaks = " / ".join(f"{p:.1f}" for p in r.peak_gib) if r.peak_gib else "—"
            name = r.variant + (f" ({r.note})" if r.note else "")
            lines.append(f"| {name} | {r.schedule} | {r.tokens_per_s:,.0f} | {ratio} | {vs_torch} | {_pct(r.bubble)} | "
                         f"{vs_ideal} | {peaks} |")
        if ideal:
            ideal_vs_base = f"{ideal / base:.3f}x" if base else "—"
            ideal_vs_torch = f"{ideal / best_torch:.3f}x" if best_torch else "—"
            lines.append(f"| ideal (slowest rank's own F+B, from the 1f1b run) | — | {ideal:,.0f} | "
                         f"{ideal_vs_base} | {ideal_vs_torch} | 0 | 0 | — |")
        lines.append("")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    rows = run_all(args)
    rank = torch.distributed.get_rank()
    cfg = _gpt_config(args.tiny)
    for r in rows:  # ideal tokens/s from the interleaf 1f1b run's slowest-rank compute time
        if r.variant == "1f1b" and r.busy_max_s:
            r.extra["ideal_tokens_per_s"] = cfg.seq * r.microbatches * _layout(args)[1] / r.busy_max_s
    if rank == 0:
        import deepspeed

        device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (gloo)"
        world = torch.distributed.get_world_size()
        pp, dp = _layout(args)
        layout = f"pp={pp}" + (f" dp={dp}" if dp > 1 else "")
        head = (
            f"## Pipeline schedules under DeepSpeed, {layout} (benchmarks/pipeline.py)\n\n"
            f"{datetime.date.today().isoformat()}, {world}x {device_name}, torch {torch.__version__}, "
            f"deepspeed {deepspeed.__version__}. GPT {cfg.layers}L h{cfg.hidden} {cfg.heads} heads seq {cfg.seq} "
            f"vocab {cfg.vocab}, micro-batch 1, {layout}"
            + (" (tokens/s of all replicas; torch rows average gradients over the replicas with one all-reduce)"
               if dp > 1 else "") + ", "
            f"{'bf16' if torch.cuda.is_available() else 'fp32'}, SGD; {args.warmup} warm-up + {args.steps} timed "
            "iterations per variant, all in one process group. DeepSpeed and interleaf rows include DeepSpeed's "
            "optimizer step (on GPU DeepSpeed's BF16_Optimizer: each micro-batch's bf16 gradients added into its "
            "gradient-sum buffers, bf16 by DeepSpeed's default grad_accum_dtype - DeepSpeed by a Python loop over "
            "the parameters, interleaf by one foreach add per stage - then the step on fp32 master weights, copied "
            f"back to bf16); torch rows run {'bf16' if torch.cuda.is_available() else 'fp32'} weights with plain "
            "torch SGD stepping them directly (on GPU: no fp32 master weights, no gradient-sum buffers besides "
            ".grad), a cheaper optimizer step than "
            "DeepSpeed's, which favours the torch rows. vs best torch: tokens/s over the best "
            "torch.distributed.pipelining "
            "row at the same m (issue 3 target >= 1.15x). Measured bubble: idle share of the "
            "schedule on each rank (mean over ranks); bubble vs ideal: 1 - tokens/s / ideal."
            + (f" Host: {os.cpu_count()} CPUs; issuing one tiny CUDA op from Python took "
               f"{'/'.join(f'{u:.1f}' for u in args.host_dispatch_us)} us per rank (all ranks at once; "
               "benchmarks/device_gaps.py host_dispatch_us): the host speed a host-bound step depends on."
               if getattr(args, "host_dispatch_us", None) else "") + "\n"
        )
        text = head + "\n" + table(rows)
        print(text, flush=True)
        out = args.out or (os.path.join(ROOT, "BENCHMARKS.md") if torch.cuda.is_available() else None)
        if out:
            write_section(out, f"{REPORT_SECTION} {layout}", text)
            print(f"updated {out}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump([r.__dict__ for r in rows], f, indent=1)
    torch.distributed.barrier()


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.merge_from:
        for section_id in section_ids(arguments.merge_from, REPORT_SECTION) or [REPORT_SECTION]:
            merge_from(arguments.merge_from, os.path.join(ROOT, "BENCHMARKS.md"), section_id)
        raise SystemExit(0)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/interleaf_torch_extensions"))
    if arguments.procs:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        run_local_ranks(main, arguments, arguments.procs)
    else:
        main(arguments)
