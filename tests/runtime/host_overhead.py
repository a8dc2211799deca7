"""Host time the executor adds per compute action, in one process (a measuring script, not a test).

Every pipeline rank's :class:`PipelineExecutor` runs in this process, one after another, with the real
:class:`P2PCommunicator` in NCCL's mode (batched, untagged, one group per direction) whose transport calls
(``batch_isend_irecv``) are replaced by works that complete at once (``--sends-pending``: sends complete only
at step end, as when the host runs ahead of the GPU). Receive buffers are not filled: the numbers are host
time, not results. The "bare" figure runs the same compute actions (stage forward + loss, the input-gradient
backward in the executor's split form, the queued W closures) with the least Python around them; the difference
per action is what the executor, the p2p layer and the per-action timing cost on the host. Compare the split
forms with ``INTERLEAF_SPLIT_MODE=function`` / ``autograd`` (each run's executor and bare loop use the same form).

Keep the device time per action below the host time (small ``--hidden``/``--seq``), else on CUDA the host waits
for the launch queue and measures the GPU. The number of kernels per action, and so the host cost of the model
itself, does not depend on those sizes.

A schedule may name its own layers per stage (``zb-h2:8 zb-v:4``: both run 4x8 pipeline layers, zb-v as 8 chunks
of 4), so a V schedule's actions are compared with actions of the same number of layers. The schedules' steps
are interleaved (machine drift hits all alike), and each also reports the executor's host time per action by kind
and, over the stages holding only transformer layers (``--model gpt``: not the first and the last), per layer.
Per-layer figures that differ between schedules at equal layers per action point at a cost of the schedule's
runtime state (retained graphs, queued W work); equal per-layer figures with a higher cost per action at fewer
layers point at a fixed cost per action (compare ``zb-h2:2 zb-h2:4 zb-h2:8``: the intercept of host time
against layers).

    OMP_NUM_THREADS=1 python tests/runtime/host_overhead.py                       # CPU, 4 Linear per stage
    OMP_NUM_THREADS=1 python tests/runtime/host_overhead.py --model gpt --schedules zb-h2:8 zb-v:4
    python tests/runtime/host_overhead.py --device cuda --model gpt --schedules 1f1b zb-h1 zb-v
    python tests/runtime/host_overhead.py --device cuda --model gpt --schedules zb-h2:8 zb-v:4 zb-h2:4 zb-h2:2
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import ds_plugins.runtime.p2p as p2p_module  # noqa: E402
from ds_plugins.runtime import P2PCommunicator, PipelineExecutor, build_stage_modules  # noqa: E402
from ds_plugins.runtime.p2p import describe  # noqa: E402
from ds_plugins.runtime.weight_grad import backward_input, recording_linears  # noqa: E402
from ds_plugins.schedule.ir import ActionKind  # noqa: E402
from ds_plugins.schedule.registry import build_schedule  # noqa: E402


class _Work:
    __slots__ = ("done",)

    def __init__(self, done: bool) -> None:
        self.done = done

    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return self.done


def _instant_transport(sends_complete: bool) -> types.SimpleNamespace:
    """``torch.distributed`` as p2p.py sees it, with batch_isend_irecv posting nothing."""
    fake = types.SimpleNamespace(**{k: getattr(dist, k) for k in dir(dist) if not k.startswith("__")})
    send_work, recv_work = _Work(sends_complete), _Work(True)
    fake.batch_isend_irecv = lambda ops: [send_work if op.op is dist.isend else recv_work for op in ops]
    return fake


def _model(args, num_stages: int, layers_per_stage: int, device: torch.device):
    """(layers, per-micro-batch inputs, targets, loss_fn)."""
    g = torch.Generator().manual_seed(0)
    if args.model == "linear":
        layers = [nn.Linear(args.hidden, args.hidden) for _ in range(layers_per_stage * num_stages)]
        xs = [torch.randn(args.rows, args.hidden, generator=g) for _ in range(args.microbatches)]
        ys = [torch.randn(args.rows, args.hidden, generator=g) for _ in range(args.microbatches)]

        def loss_fn(out, y):
            return ((out - y) ** 2).mean()
    else:
        from benchmarks import gpt

        cfg = gpt.GPTConfig(layers=layers_per_stage * num_stages - 3 if num_stages > 1 else 1,
                            hidden=args.hidden, heads=args.heads, seq=args.seq, vocab=args.vocab)
        layers = gpt.build_layers(cfg)
        batches = gpt.synthetic_batches(cfg, 1, args.microbatches)
        xs, ys = [b[0] for b in batches], [b[1] for b in batches]
        loss_fn = gpt.gpt_loss
    dtype = torch.bfloat16 if args.bf16 else None
    layers = [layer.to(device=device, dtype=dtype) if dtype else layer.to(device) for layer in layers]
    return layers, [x.to(device) for x in xs], [y.to(device) for y in ys], loss_fn


def _seed_specs(executors, layers_by_stage, x0) -> None:
    """The metadata exchange, done ahead: every stage's output spec from one real forward pass."""
    value = x0
    specs = {}
    for stage, module in enumerate(layers_by_stage):
        value = module(*value) if isinstance(value, tuple) else module(value)
        specs[stage] = describe(value)
        value = tuple(t.detach().requires_grad_(t.is_floating_point()) if torch.is_tensor(t) else t
                      for t in (value if isinstance(value, tuple) else (value,)))
        value = value if len(value) > 1 else value[0]
    for ex in executors:
        for stage, spec in specs.items():
            ex.p2p._recv_specs[(stage, True)] = spec
            ex.p2p._sent_specs[(stage, True)] = spec


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_compute(executor: PipelineExecutor, sink: list) -> None:
    """Record the host seconds of every compute action of ``executor`` into ``sink`` as (kind letter, stage,
    seconds): the executor's own dispatch, the stage work and, for I/B, the autograd pass (on CUDA: the time until
    the autograd engine returned, kernels issued, not run)."""
    compute = executor._compute
    clock = time.perf_counter

    def timed(action, received):
        t0 = clock()
        compute(action, received)
        sink.append((action.kind.value, action.stage, clock() - t0))

    executor._compute = timed  # the executor looks _compute up once per step


def _median(values) -> float:
    """The middle value (the upper one of an even count)."""
    return sorted(values)[len(values) // 2]


def _per_kind(samples, stages=None) -> dict:
    """Median host seconds per action by kind letter (over ``stages`` only, when given)."""
    by_kind: dict = {}
    for kind, stage, seconds in samples:
        if stages is None or stage in stages:
            by_kind.setdefault(kind, []).append(seconds)
    return {k: _median(v) for k, v in sorted(by_kind.items())}


def _executor_step(executors, xs, ys, m, device) -> float:
    total = 0.0
    for ex in executors:
        _sync(device)
        t0 = time.perf_counter()
        ex.run(xs if 0 in ex.stage_modules else None, ys if ex.last_stage in ex.stage_modules else None,
               loss_scale=1.0 / m)
        total += time.perf_counter() - t0
    _sync(device)
    return total


def _bare_step(executors, xs, ys, m, loss_fn, device, samples: list) -> float:
    """Host seconds of every rank's compute actions with no executor around them; appends (kind letter, stage,
    host seconds) of each action to ``samples``."""
    F, I, B = ActionKind.FORWARD, ActionKind.BACKWARD_INPUT, ActionKind.BACKWARD
    total = 0.0
    clock = time.perf_counter
    for ex in executors:
        plan = ex._plans[False].compute
        specs = ex.p2p._recv_specs
        leaves = {}
        for a in plan:
            if a.kind is F and a.stage > 0:
                spec = specs[(a.stage - 1, True)]
                ts = [torch.zeros(e.shape, dtype=e.dtype, device=device).requires_grad_(e.requires_grad)
                      for e in spec.entries]
                leaves[(a.stage, a.microbatch)] = ts[0] if len(ts) == 1 else tuple(ts)
        saved = {}
        queue = ex.queue
        # the executor's split form (split_mode): recorded edges for micro-batches whose backward is an I
        recorded = {(a.stage, a.microbatch) for a in plan if a.kind is I} if ex.split_mode == "autograd" else set()
        _sync(device)
        t0 = clock()
        times = []
        for a in plan:
            s, mb, kind = a.stage, a.microbatch, a.kind
            t_action = clock()
            if kind is F:
                with recording_linears() if (s, mb) in recorded else contextlib.nullcontext() as records:
                    out = ex.stage_modules[s](xs[mb] if s == 0 else leaves[(s, mb)])
                if s == ex.last_stage:
                    out = loss_fn(out, ys[mb]) * (1.0 / m)
                saved[(s, mb)] = (out, records)
            elif kind is I or kind is B:
                out, records = saved.pop((s, mb))
                grads = [None if s == ex.last_stage else torch.ones_like(out)]
                if records:
                    inputs = leaves.get((s, mb), ())
                    inputs = [t for t in (inputs if isinstance(inputs, tuple) else (inputs,)) if t.requires_grad]
                    backward_input([out], grads, inputs, records,
                                   [p for p in ex.stage_modules[s].parameters() if p.requires_grad], queue, s, mb)
                else:
                    with queue.deferring(s, mb) if kind is I else contextlib.nullcontext():
                        torch.autograd.backward([out], grads)
            else:
                queue.run(s, mb)
            times.append(clock() - t_action)
        total += clock() - t0
        samples.extend((a.kind.value, a.stage, t) for a, t in zip(plan, times))
    _sync(device)
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", choices=("linear", "gpt"), default="linear")
    p.add_argument("--pp", type=int, default=4)
    p.add_argument("--microbatches", "-m", type=int, default=16)
    p.add_argument("--schedules", nargs="+", default=["1f1b", "zb-h1", "zb-v"],
                   help="schedule names, each optionally with its own layers per stage: zb-h2:8 zb-v:4")
    p.add_argument("--layers-per-stage", type=int, default=4, help="for schedules named without :LAYERS")
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--rows", type=int, default=2, help="linear model: rows per micro-batch")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--timing", default="action", choices=("none", "action", "sync"))
    p.add_argument("--sends-pending", action="store_true", help="sends complete only at step end")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
        torch.set_flush_denormal(True)  # receive buffers are never filled: denormal garbage would slow the math
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(20000 + os.getpid() % 20000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    p2p_module.dist = _instant_transport(not args.sends_pending)
    print(f"{args.model} model, {args.layers_per_stage} layers per stage unless named, pp={args.pp}, m={args.microbatches}, "
          f"{device}, timing={args.timing}, sends {'pending to step end' if args.sends_pending else 'complete at once'}")
    cases = []
    for entry in args.schedules:
        name, _, lps = entry.partition(":")
        layers_per_stage = int(lps) if lps else args.layers_per_stage
        schedule = build_schedule(name, pp=args.pp, microbatches=args.microbatches)
        shape = schedule.shape
        layers, xs, ys, loss_fn = _model(args, shape.num_stages, layers_per_stage, device)
        executors = []
        by_stage = {}
        samples: list = []
        for rank in range(shape.pp):
            modules = build_stage_modules(layers, shape, rank)
            by_stage.update(modules)
            comm = P2PCommunicator.for_shape(shape, list(range(shape.pp)), device=device, batched=True,
                                             use_tags=False, direction_groups=False)
            # one process stands in for every rank: each communicator believes it is its pipeline rank
            comm.rank = rank
            comm._edge_groups = {edge: dist.group.WORLD for edge in comm._pipeline_edges()}
            comm.uses_direction_groups = True
            executors.append(PipelineExecutor(schedule, rank, modules, p2p=comm, loss_fn=loss_fn, device=device,
                                              timing=args.timing, serialize_first=False))
        _seed_specs(executors, [by_stage[s] for s in range(shape.num_stages)], xs[0])
        actions = sum(len(ex._plans[False].compute) for ex in executors)
        for _ in range(3):
            _executor_step(executors, xs, ys, args.microbatches, device)
            _bare_step(executors, xs, ys, args.microbatches, loss_fn, device, [])
        for ex in executors:
            _time_compute(ex, samples)
        # stages made of transformer layers only (gpt: the first holds the embedding, the last norm, head, loss)
        inner = set(range(shape.num_stages)) if args.model == "linear" else set(range(1, shape.num_stages - 1))
        cases.append(types.SimpleNamespace(label=f"{name}:{layers_per_stage}", layers_per_stage=layers_per_stage,
                                           executors=executors, xs=xs, ys=ys, loss_fn=loss_fn, actions=actions,
                                           samples=samples, inner=inner, ex_times=[], bare_times=[], bare_samples=[]))
    for _ in range(args.steps):  # interleaved, so drifts of the machine hit every schedule and both paths alike
        for case in cases:
            case.ex_times.append(_executor_step(case.executors, case.xs, case.ys, args.microbatches, device))
            case.bare_times.append(_bare_step(case.executors, case.xs, case.ys, args.microbatches, case.loss_fn,
                                              device, case.bare_samples))
    for case in cases:
        actions = case.actions
        ex_min, bare_min = min(case.ex_times), min(case.bare_times)
        ex_med, bare_med = _median(case.ex_times), _median(case.bare_times)
        print(f"{case.label:8s} {actions:4d} actions: executor {1e6 * ex_min / actions:7.1f} us/action (median "
              f"{1e6 * ex_med / actions:7.1f}), bare {1e6 * bare_min / actions:7.1f} (median "
              f"{1e6 * bare_med / actions:7.1f}) -> executor adds {1e6 * (ex_min - bare_min) / actions:6.1f} us/action "
              f"(medians: {1e6 * (ex_med - bare_med) / actions:6.1f})", flush=True)
        kinds = ", ".join(f"{k} {1e6 * v:.0f}" for k, v in _per_kind(case.bare_samples).items())
        print(f"{'':8s} bare host us per action (median) by kind: {kinds}", flush=True)
        executor_kinds = ", ".join(f"{k} {1e6 * v:.0f}" for k, v in _per_kind(case.samples).items())
        print(f"{'':8s} executor host us per action (median) by kind: {executor_kinds}", flush=True)
        inner = _per_kind(case.samples, case.inner)
        if inner:
            per_layer = ", ".join(f"{k} {1e6 * v:.0f} ({1e6 * v / case.layers_per_stage:.0f} per layer)"
                                  for k, v in inner.items())
            print(f"{'':8s} executor host us per action on stages {min(case.inner)}-{max(case.inner)} (median): "
                  f"{per_layer}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
