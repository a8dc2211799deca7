"""Worker processes for the Megatron adapter tests (CPU, gloo; or one GPU per rank, NCCL). Each worker returns
plain results to the test.

Run with :func:`run_ranks`; on gloo every worker installs the test-only CPU shim first.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import traceback
import zlib
from functools import partial

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, out_dir, fn, args, backend):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    for p in (HERE, ROOT):
        if p not in sys.path:
            sys.path.insert(0, p)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    else:
        import cpu_shim

        cpu_shim.install()
    import datetime

    kwargs = {"device_id": torch.device("cuda", rank)} if backend == "nccl" else {}
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120), **kwargs)
    try:
        result = fn(rank, world, *args)
    except BaseException:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(fn, world: int, *args, backend: str = "gloo"):
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes (gloo on the CPU shim, or ``backend="nccl"``
    with GPU ``rank`` per rank); returns the per-rank results."""
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(_entry, args=(world, _free_port(), out_dir, fn, args, backend), nprocs=world,
                               start_method="spawn")
        except Exception as err:
            msgs = []
            for r in range(world):
                path = os.path.join(out_dir, f"error{r}.txt")
                if os.path.exists(path):
                    msgs.append(f"--- rank {r} ---\n" + open(path).read())
            raise RuntimeError("\n".join(msgs) or str(err)) from None
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


# --------------------------------------------------------------------------------------------- common
def benchmark_rows(rank, world, argv):
    """benchmarks/megatron.py's ``run_all`` with ``argv`` on this rank: its rows."""
    from benchmarks import megatron as bench

    return bench.run_all(bench.parse_args(list(argv)))


def graphed_benchmark_rows(rank, world, argv):
    """benchmarks/megatron.py's rows with ``+graphs`` variants through :func:`graphs_stand_in`'s capture (CPU):
    the rows, how many passes were replayed, and whether a model chunk still has a wrapped ``forward`` after."""
    from benchmarks import megatron as bench
    from megatron_patches import cuda_graphs

    cuda_graphs.capture_override = graphs_stand_in()
    before = GRAPH_REPLAYS[0]
    try:
        rows = bench.run_all(bench.parse_args(list(argv)))
    finally:
        cuda_graphs.capture_override = None
    return {"rows": rows, "replays": GRAPH_REPLAYS[0] - before, "live": len(cuda_graphs._LIVE)}


def alternate_trace_worker(rank, world, argv):
    """benchmarks/megatron.py --alternate with every timed step recorded on this rank: ``(variant, interleaf's
    patches applied, its linear patch installed, (batch_p2p_comm, overlap_p2p_comm))`` at the step's start."""
    import megatron_patches
    from benchmarks import megatron as bench
    from megatron.core.utils import get_model_config
    from megatron_patches import linear_weight_grad

    trace = []
    prepare = bench._prepare

    def recording(variant, wrapped, *args, **kwargs):
        step, enter, func, first_loss, first_grad_norm = prepare(variant, wrapped, *args, **kwargs)
        config = get_model_config(wrapped[0])

        def traced():
            trace.append((variant, megatron_patches.is_applied(), linear_weight_grad.is_installed(),
                          (config.batch_p2p_comm, config.overlap_p2p_comm)))
            return step()

        return traced, enter, func, first_loss, first_grad_norm

    bench._prepare = recording
    try:
        rows = bench.run_all(bench.parse_args(list(argv)))
    finally:
        bench._prepare = prepare
    return {"rows": rows, "trace": trace}


def ideal_worker(rank, world, layout, split, m):
    """benchmarks/megatron.py's ``ideal`` step on the tiny GPT in ``layout`` on this rank, once: every chunk's
    ``main_grad`` after it, how many weight GEMMs were queued, and whether the linear patch is still installed."""
    from benchmarks import megatron as bench
    from megatron_patches import linear_weight_grad

    shape = bench.TINY
    wrapped, config = bench._build(layout, shape, pp=world, gpu=False)
    try:
        g = torch.Generator().manual_seed(3)
        data = [tuple(torch.randint(0, shape["vocab"], (1, shape["seq"]), generator=g) for _ in range(2))
                for _ in range(m)]
        func = bench._ideal_step_func(split=split, shape=shape, device=torch.device("cpu"))
        before = linear_weight_grad.deferred_count
        for w in wrapped:
            w.zero_grad_buffer()
        out = func(forward_step_func=bench._forward_step_factory(shape, torch.device("cpu")),
                   data_iterator=[iter(data) for _ in wrapped], model=wrapped, num_microbatches=m,
                   seq_length=shape["seq"], micro_batch_size=1)
        grads = [{n: p.main_grad.detach().clone() for n, p in w.named_parameters()} for w in wrapped]
        return {"returned": out, "grads": grads, "deferred": linear_weight_grad.deferred_count - before,
                "installed_after": linear_weight_grad.is_installed()}
    finally:
        bench.release_layout(wrapped, config)


def graphed_ideal_worker(rank, world, layout, split, m):
    """benchmarks/megatron.py's ``-graphed`` ideal step with a stand-in capture (its replay runs the recorded pass
    again: the CPU has no CUDA graphs) on the tiny GPT: three calls, the first eager and capturing, the others
    replaying, the third on other data. Returns each call's ``main_grad`` per chunk, the eager (not graphed) step's
    on the third call's data, how many passes were recorded and how many weight GEMMs were queued."""
    from benchmarks import megatron as bench
    from megatron_patches import linear_weight_grad

    shape = bench.TINY
    wrapped, config = bench._build(layout, shape, pp=world, gpu=False)
    recorded = []

    def capture(fn, pool, stream):
        recorded.append(fn)
        return fn

    try:
        g = torch.Generator().manual_seed(5)
        data = [[tuple(torch.randint(0, shape["vocab"], (1, shape["seq"]), generator=g) for _ in range(2))
                 for _ in range(m)] for _ in range(2)]
        forward_step = bench._forward_step_factory(shape, torch.device("cpu"))

        def call(func, batches):
            for w in wrapped:
                w.zero_grad_buffer()
            out = func(forward_step_func=forward_step, data_iterator=[iter(batches) for _ in wrapped], model=wrapped,
                       num_microbatches=m, seq_length=shape["seq"], micro_batch_size=1)
            assert out == []
            return [{n: p.main_grad.detach().clone() for n, p in w.named_parameters()} for w in wrapped]

        graphed = bench._ideal_step_func(split=split, shape=shape, device=torch.device("cpu"), graphed=True,
                                         capture=capture)
        before = linear_weight_grad.deferred_count
        grads = [call(graphed, data[0])]
        captured = len(recorded)
        grads += [call(graphed, data[0]), call(graphed, data[1])]
        deferred = linear_weight_grad.deferred_count - before
        eager = call(bench._ideal_step_func(split=split, shape=shape, device=torch.device("cpu")), data[1])
        from megatron.core.utils import get_attr_wrapped_model

        ends = [get_attr_wrapped_model(w, "pre_process") or get_attr_wrapped_model(w, "post_process") for w in wrapped]
        return {"grads": grads, "eager": eager, "captured": captured, "recorded": len(recorded), "uses_data": ends,
                "deferred": deferred, "installed_after": linear_weight_grad.is_installed()}
    finally:
        bench.release_layout(wrapped, config)


def init_parallel(tp: int, pp: int, vp, **kwargs):
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tp, pp, vp, **kwargs)


def fake_apex():
    """megatron's gradient-accumulation fusion needs apex's CUDA kernel; give its reference path a torch twin."""
    from megatron.core.tensor_parallel import layers

    class _Fused:
        @staticmethod
        def wgrad_gemm_accum_fp32(total_input, grad_output, main_grad):
            main_grad.add_(grad_output.t().matmul(total_input).to(main_grad.dtype))

        wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32

    layers.fused_weight_gradient_mlp_cuda = _Fused
    layers._grad_accum_fusion_available = True


def deterministic_init(named_params, key_of):
    """Every parameter from a generator seeded by its model-global name: the same weights however the model
    is cut into chunks and placed on ranks."""
    with torch.no_grad():
        for name, p in named_params:
            g = torch.Generator().manual_seed(zlib.crc32(key_of(name).encode()))
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _megatron_own(pp_size=None, vp_size=None):
    """megatron's original get_forward_backward_func, even while megatron_patches is applied."""
    from megatron.core.pipeline_parallel import schedules

    f = schedules.get_forward_backward_func
    return getattr(f, "interleaf_original", f)(pp_size, vp_size)


def _check_graphs_follow_weights(wrapped, run, func, name):
    """Move every weight in place (an optimizer step's way), run ``func`` (replaying its graphs) and the same
    schedule without graphs on the moved weights, require the same gradients, and move the weights back."""
    from ds_plugins.schedule.registry import build_schedule
    from megatron.core.pipeline_parallel import schedules
    from megatron_patches.arguments import MegatronScheduleConfig
    from megatron_patches.forward_backward import make_forward_backward_func

    eager = make_forward_backward_func(MegatronScheduleConfig(schedule=name.split("+")[0], measured_costs=False),
                                       build_schedule=build_schedule,
                                       fallback=schedules.forward_backward_pipelining_without_interleaving)
    # evaluation between replayed steps runs eagerly and gives the same losses
    evaluated, evaluated_eager = run(func, forward_only=True)[1], run(eager, forward_only=True)[1]
    if evaluated != evaluated_eager and not torch.allclose(torch.stack(evaluated), torch.stack(evaluated_eager)):
        raise AssertionError(f"{name}: a forward-only step after the capture gave other losses than the eager one")
    params = [p for w in wrapped for p in w.parameters()]
    with torch.no_grad():
        deltas = [torch.full_like(p, 1e-2) * (1 + (i % 3)) for i, p in enumerate(params)]
        for p, d in zip(params, deltas):
            p.add_(d)
    try:
        replays = GRAPH_REPLAYS[0]
        replayed = run(func, data_seed=300)  # other weights and other data
        if GRAPH_REPLAYS[0] == replays:
            raise AssertionError(f"{name}: the step after the weights moved replayed no graph")
        own = run(eager, data_seed=300)
    finally:
        with torch.no_grad():
            for p, d in zip(params, deltas):
                p.sub_(d)
    for what, got, want in (("gradients", replayed[0], own[0]),
                            ("losses", dict(enumerate(replayed[1])), dict(enumerate(own[1])))):
        if got.keys() != want.keys():
            raise AssertionError(f"{name}: the replayed and the eager step returned different {what}")
        if not want:  # (losses: only on the rank of the last stage)
            continue
        worst = max((got[k] - want[k]).abs().max().item() for k in want)
        scale = max(g.abs().max().item() for g in want.values())
        if not worst <= 1e-5 * max(1.0, scale):
            raise AssertionError(f"{name}: on moved weights and new data the replayed step's {what} differ from the "
                                 f"eager schedule's by {worst:.3g} (scale {scale:.3g}): the graphs read stale tensors")


def _mixed_backward_func(name):
    """``"zb-h1+B"``: zb-h1 with the last micro-batch's I+W of every stage replaced by one full B at the I's place,
    so a full backward follows split ones on the same weights in one step."""
    from ds_plugins.schedule.ir import Action, ActionKind, Schedule
    from ds_plugins.schedule.registry import build_schedule
    from megatron.core.pipeline_parallel import schedules
    from megatron_patches.arguments import MegatronScheduleConfig
    from megatron_patches.forward_backward import make_forward_backward_func

    base = name.split("+")[0]

    def mixed(_name, **kwargs):
        kwargs.pop("memory_limit", None)
        schedule = build_schedule(base, **kwargs)
        last = kwargs["microbatches"] - 1
        programs = []
        for prog in schedule.actions:
            new = []
            for a in prog:
                if a.microbatch == last and a.kind is ActionKind.BACKWARD_INPUT:
                    new.append(Action(a.stage, ActionKind.BACKWARD, last))
                elif not (a.microbatch == last and a.kind is ActionKind.BACKWARD_WEIGHT):
                    new.append(a)
            programs.append(tuple(new))
        return Schedule(name, schedule.shape, tuple(programs))

    config = MegatronScheduleConfig(schedule=base, measured_costs=False, cuda_graphs="+graphs" in name)
    return make_forward_backward_func(config, build_schedule=mixed,
                                      fallback=schedules.forward_backward_pipelining_without_interleaving)


def _steps_for(name):
    """``auto`` picks its schedule and "<zb schedule>+measured" is rebuilt from measured costs after timing its first
    steps, then planned again from the timings of that order: check the step after both rounds. "+graphs": one
    eager step shows the chunks' calls, the next captures and replays, the one checked replays again."""
    from megatron_patches.forward_backward import SETTLE_STEPS

    steps = SETTLE_STEPS + 1 if name.split("+")[0] == "auto" or "+measured" in name else 1
    return steps + 2 if "+graphs" in name else steps


def _apply(name):
    """``megatron_patches.apply`` for a case name: "<schedule>[+B][+measured][+graphs]". Plain zb-h1/zb-h2/zb-v run
    their F = I = W order from the first step (measured_costs off); "+measured" runs the measured warm-up and the
    rebuilt (or kept) order after it; "+graphs" turns on per-action CUDA graphs (on CPU through
    :func:`graphs_stand_in`)."""
    import megatron_patches

    megatron_patches.apply(name.split("+")[0], measured_costs="+measured" in name, cuda_graphs="+graphs" in name)


GRAPH_REPLAYS = [0]
"""How many passes :func:`graphs_stand_in`'s replays ran in this process."""


def graphs_stand_in():
    """megatron_patches.cuda_graphs's capture, with every replay counted in :data:`GRAPH_REPLAYS`: on GPU (NCCL) the
    real CUDA graph; on CPU a stand-in whose "replay" runs the recorded pass again (its Python included)."""
    from megatron_patches.cuda_graphs import cuda_graph_capture

    real = torch.cuda.is_available() and dist.get_backend() == "nccl"

    def capture(fn, pool, stream):
        replay = cuda_graph_capture(fn, pool, stream) if real else fn

        def counted():
            GRAPH_REPLAYS[0] += 1
            replay()

        return counted

    return capture


# --------------------------------------------------------------------------------------------- toy model
def _toy_config(pp, vp, h, tp=1, sp=False):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=pp * (vp or 1), hidden_size=h, num_attention_heads=tp, pipeline_dtype=torch.float32,
        use_cpu_initialization=True, batch_p2p_comm=False, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp, deallocate_pipeline_outputs=True,
        tensor_model_parallel_size=tp, sequence_parallel=sp,
    )


def _toy_stage_class():
    from megatron.core import tensor_parallel as tpl
    from megatron.core.enums import ModelType
    from megatron.core.transformer.module import MegatronModule

    class ToyStage(MegatronModule):
        """Residual MLP block of megatron's parallel linears + LayerNorm; stage 0 reads x."""

        def __init__(self, config, *, first, last, vp_stage=None):
            super().__init__(config)
            h = config.hidden_size
            self.model_type = ModelType.encoder_or_decoder
            self.first, self.last, self.vp_stage = first, last, vp_stage
            init = partial(torch.nn.init.normal_, std=0.1)
            self.norm = torch.nn.LayerNorm(h)
            self.fc1 = tpl.ColumnParallelLinear(h, 2 * h, config=config, init_method=init, gather_output=False,
                                                bias=True)
            self.fc2 = tpl.RowParallelLinear(2 * h, h, config=config, init_method=init, input_is_parallel=True,
                                             bias=True, skip_bias_add=False)
            self.input_tensor = None

        def set_input_tensor(self, t):
            self.input_tensor = t[0] if isinstance(t, list) else t

        def forward(self, x):
            if not self.first:
                x = self.input_tensor
            y, _ = self.fc1(self.norm(x))
            y, _ = self.fc2(torch.nn.functional.gelu(y))
            return x + y

    return ToyStage


def _toy_forward_step(data_iterator, model):
    x, y = next(data_iterator)
    out = model(x)

    def loss_func(output):
        loss = ((output - y) ** 2).mean()
        return loss, {"loss": loss.detach().clone()}

    return out, loss_func


def _toy_data(m, s, b, h, shard=None):
    """Micro-batches (x, y) of shape [s, b, h]; ``shard=(i, n)`` keeps sequence shard i of n (sequence parallel)."""
    g = torch.Generator().manual_seed(1234)
    data = [(torch.randn(s, b, h, generator=g), torch.randn(s, b, h, generator=g)) for _ in range(m)]
    if shard is not None:
        i, n = shard
        data = [(x.chunk(n)[i].contiguous(), y.chunk(n)[i].contiguous()) for x, y in data]
    return data


TOY_SHAPE = (4, 2, 8)  # s, b, h


def toy_reference(pp, vp, m, grad_scale=1.0):
    """Single-process reference of the toy pipeline: all stages in one process, plain autograd, loss averaged
    over micro-batches. Needs an initialised megatron parallel state with tp=1."""
    s, b, h = TOY_SHAPE
    ToyStage = _toy_stage_class()
    n = pp * vp
    cfg = _toy_config(1, None, h)
    stages = [ToyStage(cfg, first=k == 0, last=k == n - 1) for k in range(n)]
    for k, st in enumerate(stages):
        deterministic_init(st.named_parameters(), lambda name, k=k: f"stage{k}.{name}.tp0")
    losses = []
    for x, y in _toy_data(m, s, b, h):
        act = x
        for st in stages:
            st.set_input_tensor(act)
            act = st(x)
        loss = ((act - y) ** 2).mean()
        (loss / m * grad_scale).backward()
        losses.append(loss.detach())
    grads = {f"stage{k}.{n_}.tp0": p.grad.clone() for k, st in enumerate(stages) for n_, p in st.named_parameters()}
    return grads, losses


def toy_worker(rank, world, tp, pp, cases, m, sp=False, grad_scale=None, replan_min_gain=None, replan_error=False,
               eval_midway=False):
    """For each (placement, vp, schedules) case: run each schedule ("megatron" = megatron's own schedule for the
    chunk layout) on the same weights. Returns ``{"runs": {(placement, vp, name): ({stage.param.tp: grad},
    [logged losses], deferred W count)}, "reference": {vp: single-process (grads, losses)}, "runners":
    {(placement, vp, name): [(second round outcome, executor timing) per runner]}}`` (reference only
    for tp == 1)."""
    import megatron_patches
    from megatron.core import parallel_state as ps
    from megatron_patches import linear_weight_grad
    from megatron_patches.placement import build_model_chunks

    s, b, h = TOY_SHAPE
    ToyStage = _toy_stage_class()
    if replan_min_gain is not None:  # force the second round's choice (-1: always re-plan, 1: always keep)
        from megatron_patches import forward_backward

        forward_backward.REPLAN_MIN_GAIN = replan_min_gain
    if replan_error:  # the second round's simulate (looked up when it runs) fails: it must keep the order
        import ds_plugins.schedule

        def failing(*args, **kwargs):
            raise ValueError("forced by the test")

        ds_plugins.schedule.simulate = failing
    out = {"runs": {}, "reference": {}, "eval": {}, "runners": {}}
    for placement, vp, schedules in cases:
        init_parallel(tp, pp, vp if vp > 1 else None)
        pp_rank, tp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
        cfg = _toy_config(pp, vp if vp > 1 else None, h, tp=tp, sp=sp)
        if grad_scale is not None:  # what megatron's fp16 optimizer installs: the loss scale
            cfg.grad_scale_func = lambda loss: loss * grad_scale
        n = pp * vp
        if placement == "v":
            def provider(pre_process, post_process, vp_stage):
                return ToyStage(cfg, first=pre_process, last=post_process, vp_stage=vp_stage)

            chunks = build_model_chunks(provider)
            stages = [pp_rank, 2 * pp - 1 - pp_rank]
        else:
            stages = [c * pp + pp_rank for c in range(vp)]
            chunks = [ToyStage(cfg, first=k == 0, last=k == n - 1, vp_stage=c if vp > 1 else None)
                      for c, k in enumerate(stages)]
        for k, chunk in zip(stages, chunks):
            deterministic_init(chunk.named_parameters(), lambda name, k=k: f"stage{k}.{name}.tp{tp_rank}")

        def run(func, forward_only=False):
            for chunk in chunks:
                chunk.zero_grad(set_to_none=True)
            data = _toy_data(m, s, b, h, shard=(tp_rank, tp) if sp else None)
            iters = [iter(data) for _ in chunks]
            before = linear_weight_grad.deferred_count
            store = func(forward_step_func=_toy_forward_step, data_iterator=iters if vp > 1 else iters[0],
                         model=chunks if vp > 1 else chunks[0], num_microbatches=m, seq_length=s,
                         micro_batch_size=b, forward_only=forward_only)
            losses = [d["loss"] for d in store]
            if forward_only:
                return losses
            grads = {f"stage{k}.{n_}.tp{tp_rank}": p.grad.clone()
                     for k, c in zip(stages, chunks) for n_, p in c.named_parameters()}
            return grads, losses, linear_weight_grad.deferred_count - before

        for name in schedules:
            if name == "megatron":
                out["runs"][(placement, vp, name)] = run(_megatron_own())
                continue
            _apply(name)
            try:
                from megatron.core.pipeline_parallel import get_forward_backward_func

                func = get_forward_backward_func()
                for step in range(_steps_for(name) - 1):
                    run(func)
                    if eval_midway and step == 3:  # an evaluation step inside the second round's timed steps
                        run(func, forward_only=True)
                out["runs"][(placement, vp, name)] = run(func)
                out["eval"][(placement, vp, name)] = run(func, forward_only=True)
                out["runners"][(placement, vp, name)] = [(r.replan, r.executor.timing)
                                                         for r in getattr(func, "runners", {}).values()]
            finally:
                megatron_patches.remove()
        if tp == 1 and vp not in out["reference"]:
            out["reference"][vp] = toy_reference(pp, vp, m, grad_scale or 1.0)
        ps.destroy_model_parallel()
    return out


# --------------------------------------------------------------------------------------------- GPTModel
GPT_VOCAB = 64


def gpt_config(*, tp, pp, vp, layers, hidden=16, heads=4, sp=False, dtype=torch.float32, dropout=0.0):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, use_cpu_initialization=True,
        pipeline_dtype=dtype, params_dtype=dtype, hidden_dropout=dropout, attention_dropout=dropout,
        batch_p2p_comm=False, tensor_model_parallel_size=tp, sequence_parallel=sp,
        pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vp,
    )


def gpt_provider(config, seq_length):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    def model_provider(pre_process=True, post_process=True, vp_stage=None):
        return GPTModel(
            config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=GPT_VOCAB,
            max_sequence_length=seq_length, pre_process=pre_process, post_process=post_process,
            share_embeddings_and_output_weights=True, vp_stage=vp_stage,
        )

    return model_provider


def canonical_names(gpt_model):
    """``{param: model-global name}``: decoder layers by their global layer number, the tied LM-head copy by
    its own name (it is initialised from the embedding's key)."""
    import re

    names = {}
    layers = getattr(gpt_model.decoder, "layers", [])
    for name, p in gpt_model.named_parameters():
        match = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
        if match:
            name = f"decoder.layers.{layers[int(match.group(1))].layer_number}.{match.group(2)}"
        names[p] = name
    return names


def _gpt_data(m, s, b, seed, device=None):
    g = torch.Generator().manual_seed(seed)
    return [
        {"tokens": torch.randint(0, GPT_VOCAB, (b, s), generator=g).to(device),
         "labels": torch.randint(0, GPT_VOCAB, (b, s), generator=g).to(device)}
        for _ in range(m)
    ]


def _gpt_forward_step(data_iterator, model):
    batch = next(data_iterator)
    tokens, labels = batch["tokens"], batch["labels"]
    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool, device=tokens.device), diagonal=1)
    output = model(tokens, position_ids, mask, labels=labels)

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        return loss, {"lm loss": loss.detach().clone()}

    return output, loss_func


@contextlib.contextmanager
def _counting_checkpoints():
    """Count calls of megatron's ``tensor_parallel.checkpoint`` (activation recompute) while the block runs."""
    from megatron.core import tensor_parallel

    calls = []
    original = tensor_parallel.checkpoint

    def checkpoint(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    tensor_parallel.checkpoint = checkpoint
    try:
        yield calls
    finally:
        tensor_parallel.checkpoint = original


def gpt_worker(rank, world, tp, pp, cases, m, *, sp=False, overlap=False, fusion=False, layers_per_chunk=1,
               align_grad_reduce=True, recompute=None, dropout=0.0):
    """megatron's GPTModel (local spec) in megatron's DDP, megatron's own schedule vs interleaf schedules.

    "+graphs" cases also check that replayed graphs follow weights updated in place (as an optimizer step does):
    after the checked step an evaluation step must give the eager schedule's losses, then every weight moves, one
    more replayed step on other data must give the same schedule's eager gradients and losses (else
    AssertionError), and the weights move back.

    ``cases``: list of (placement, vp, [schedules]); "megatron" in the list runs megatron's own schedule.
    ``recompute``: megatron's activation recompute, ``"full"`` (every layer, uniform) or ``"selective"`` (core
    attention); every run then checks that megatron's checkpoint function really ran. On NCCL (one GPU per rank)
    the chunks run on the rank's GPU with megatron's CUDA RNG tracker, reseeded before every run, so ``dropout``
    masks repeat from run to run of the same schedule.
    Returns ``{(placement, vp, schedule): ({global name: main_grad}, [logged losses], deferred W count)}``.
    """
    import megatron_patches
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron_patches import linear_weight_grad
    from megatron_patches.placement import build_model_chunks, unwrap

    if fusion:
        fake_apex()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    s, b = 8, 2
    out = {}
    for placement, vp, schedules in cases:
        init_parallel(tp, pp, vp if vp > 1 else None)
        dp_rank = ps.get_data_parallel_rank()
        tp_rank = ps.get_tensor_model_parallel_rank()
        cfg = gpt_config(tp=tp, pp=pp, vp=vp if vp > 1 else None, layers=pp * 2 * layers_per_chunk, sp=sp,
                         dropout=dropout)
        if recompute == "full":
            cfg.recompute_granularity, cfg.recompute_method, cfg.recompute_num_layers = "full", "uniform", 1
        elif recompute == "selective":
            cfg.recompute_granularity, cfg.recompute_modules = "selective", ["core_attn"]
        provider = gpt_provider(cfg, s)
        if placement == "v":
            chunks = build_model_chunks(provider)
        else:
            chunks = []
            for c in range(vp):
                vps = c if vp > 1 else None
                chunks.append(provider(
                    pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vps),
                    post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vps), vp_stage=vps))
        names = {}
        for chunk in chunks:
            names.update(canonical_names(chunk))

        def init_key(name):
            key = "embedding.word_embeddings.weight" if name == "output_layer.weight" else name
            return f"{key}.tp{tp_rank}"

        for chunk in chunks:
            with torch.no_grad():
                deterministic_init([(names[p], p) for p in chunk.parameters()], init_key)
            if device is not None:
                chunk.to(device)
        if fusion:
            for chunk in chunks:
                for mod in chunk.modules():
                    if hasattr(mod, "gradient_accumulation_fusion"):
                        mod.gradient_accumulation_fusion = True
        ddp_cfg = DistributedDataParallelConfig(overlap_grad_reduce=overlap, use_distributed_optimizer=False,
                                                bucket_size=4000 if overlap else None)
        wrapped = [DistributedDataParallel(cfg, ddp_cfg, chunk) for chunk in chunks]
        cfg.no_sync_func = [w.no_sync for w in wrapped] if vp > 1 else wrapped[0].no_sync
        if overlap and align_grad_reduce:
            cfg.grad_sync_func = [w.start_grad_sync for w in wrapped] if vp > 1 else wrapped[0].start_grad_sync
        cfg.finalize_model_grads_func = finalize_model_grads

        def run(func, *, data_seed=100, forward_only=False):
            for w in wrapped:
                w.zero_grad_buffer()
            if device is not None:
                from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

                model_parallel_cuda_manual_seed(1234)
            data = _gpt_data(m, s, b, seed=data_seed + dp_rank, device=device)
            iters = [iter(data) for _ in wrapped]
            before = linear_weight_grad.deferred_count
            with _counting_checkpoints() as checkpoints:
                store = func(forward_step_func=_gpt_forward_step, data_iterator=iters if vp > 1 else iters[0],
                             model=wrapped if vp > 1 else wrapped[0], num_microbatches=m, seq_length=s,
                             micro_batch_size=b, forward_only=forward_only)
            if recompute and not checkpoints:
                raise AssertionError(f"recompute={recompute!r}: megatron's checkpoint function never ran")
            grads = {}
            for w in wrapped:
                for p in unwrap(w).parameters():
                    grads[f"{names[p]}.tp{tp_rank}.dp{dp_rank}"] = p.main_grad.detach().cpu().clone()
            losses = [d["lm loss"].cpu() for d in store]
            return grads, losses, linear_weight_grad.deferred_count - before

        for name in schedules:
            if name == "megatron":
                out[(placement, vp, name)] = run(_megatron_own())
                continue
            _apply(name)
            from megatron_patches import cuda_graphs

            cuda_graphs.capture_override = graphs_stand_in() if "+graphs" in name else None
            try:
                from megatron.core.pipeline_parallel import get_forward_backward_func

                func = get_forward_backward_func() if "+B" not in name else _mixed_backward_func(name)
                for _ in range(_steps_for(name) - 1):
                    run(func)
                replays = GRAPH_REPLAYS[0]
                out[(placement, vp, name)] = run(func)
                if "+graphs" in name:
                    if GRAPH_REPLAYS[0] == replays:
                        raise AssertionError(f"{name}: the checked step replayed no graph")
                    _check_graphs_follow_weights(wrapped, run, func, name)
                    if device is not None:
                        # real CUDA graphs: the checked step's I replays queue no Python closure, nothing to count
                        grads, losses, _ = out[(placement, vp, name)]
                        out[(placement, vp, name)] = (grads, losses, None)
                if "+B" in name:
                    for runner in func.runners.values():
                        runner.release_graphs()
            finally:
                cuda_graphs.capture_override = None
                megatron_patches.remove()
        cfg.no_sync_func = cfg.grad_sync_func = cfg.finalize_model_grads_func = None
        ps.destroy_model_parallel()
    return out
