"""Worker processes for the Megatron adapter tests (CPU, gloo). Each worker returns plain results to the test.

Run with :func:`run_ranks`; every worker installs the test-only CPU shim first.
"""
from __future__ import annotations

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


def _entry(rank, world, port, out_dir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    for p in (HERE, ROOT):
        if p not in sys.path:
            sys.path.insert(0, p)
    import cpu_shim

    cpu_shim.install()
    import datetime

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        result = fn(rank, world, *args)
    except BaseException:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(fn, world: int, *args):
    """Run ``fn(rank, world, *args)`` in ``world`` spawned gloo processes; returns the per-rank results."""
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(_entry, args=(world, _free_port(), out_dir, fn, args), nprocs=world,
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


# --------------------------------------------------------------------------------------------- toy model
def _toy_config(pp, vp, h):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=pp * (vp or 1), hidden_size=h, num_attention_heads=1, pipeline_dtype=torch.float32,
        use_cpu_initialization=True, batch_p2p_comm=False, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp, deallocate_pipeline_outputs=True,
    )


def _toy_stage_class():
    from megatron.core import tensor_parallel as tpl
    from megatron.core.enums import ModelType
    from megatron.core.transformer.module import MegatronModule

    class ToyStage(MegatronModule):
        """Residual MLP block of megatron's parallel linears + LayerNorm; stage 0 reads x, last stage is the head."""

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


def _toy_data(m, s, b, h):
    g = torch.Generator().manual_seed(1234)
    return [(torch.randn(s, b, h, generator=g), torch.randn(s, b, h, generator=g)) for _ in range(m)]


def _toy_reference(pp, vp, m, s, b, h):
    """Single-process reference: all stages in one process, plain autograd, loss averaged over micro-batches."""
    ToyStage = _toy_stage_class()
    n = pp * vp
    cfg = _toy_config(1, None, h)
    stages = [ToyStage(cfg, first=k == 0, last=k == n - 1) for k in range(n)]
    for k, st in enumerate(stages):
        deterministic_init(st.named_parameters(), lambda name, k=k: f"stage{k}.{name}")
    losses = []
    for x, y in _toy_data(m, s, b, h):
        act = x
        for st in stages:
            st.set_input_tensor(act)
            act = st(x)
        loss = ((act - y) ** 2).mean()
        (loss / m).backward()
        losses.append(loss.detach())
    grads = {k: {n_: p.grad.clone() for n_, p in st.named_parameters()} for k, st in enumerate(stages)}
    return grads, losses


def toy_worker(rank, world, pp, cases, m):
    """For each (placement, vp, schedules): megatron's own schedule (loop placement) and each interleaf
    schedule on the same weights; returns grads per stage and logged losses, plus the single-process reference."""
    import megatron_patches
    from megatron.core import parallel_state as ps
    from megatron_patches.placement import build_model_chunks

    s, b, h = 3, 2, 8
    ToyStage = _toy_stage_class()
    out = {"runs": {}, "reference": {}}
    for placement, vp, schedules in cases:
        init_parallel(1, pp, vp if vp > 1 else None)
        cfg = _toy_config(pp, vp if vp > 1 else None, h)
        n = pp * vp
        if placement == "v":
            def provider(pre_process, post_process, vp_stage):
                return ToyStage(cfg, first=pre_process, last=post_process, vp_stage=vp_stage)

            chunks = build_model_chunks(provider)
            stages = [rank, 2 * pp - 1 - rank]
        else:
            stages = [c * pp + rank for c in range(vp)]
            chunks = [ToyStage(cfg, first=k == 0, last=k == n - 1, vp_stage=c if vp > 1 else None)
                      for c, k in enumerate(stages)]
        for k, chunk in zip(stages, chunks):
            deterministic_init(chunk.named_parameters(), lambda name, k=k: f"stage{k}.{name}")

        def run(func):
            for chunk in chunks:
                chunk.zero_grad(set_to_none=True)
            data = _toy_data(m, s, b, h)
            iters = [iter(data) for _ in chunks]
            store = func(forward_step_func=_toy_forward_step, data_iterator=iters if vp > 1 else iters[0],
                         model=chunks if vp > 1 else chunks[0], num_microbatches=m, seq_length=s,
                         micro_batch_size=b)
            grads = {k: {n_: p.grad.clone() for n_, p in c.named_parameters()} for k, c in zip(stages, chunks)}
            return grads, [d["loss"] for d in store]

        if placement == "loop":
            out["runs"][(placement, vp, "megatron")] = run(_megatron_own())
        for name in schedules:
            megatron_patches.apply(name)
            try:
                from megatron.core.pipeline_parallel import get_forward_backward_func

                out["runs"][(placement, vp, name)] = run(get_forward_backward_func())
            finally:
                megatron_patches.remove()
        out["reference"][vp] = _toy_reference(pp, vp, m, s, b, h)
        ps.destroy_model_parallel()
    return out
