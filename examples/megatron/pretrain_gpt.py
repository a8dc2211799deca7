"""GPT pretraining with megatron-core and an interleaf pipeline schedule.

A megatron-core training loop (model provider, forward_step with a loss_func, DDP, megatron optimizer,
``get_forward_backward_func()``) with megatron's command-line flags. The interleaf-specific lines are marked
``# interleaf``; everything else is what a megatron-core training script already has.

Launch (4 GPUs, pp=4, ZB-V)::

    torchrun --nproc_per_node 4 examples/megatron/pretrain_gpt.py \\
        --pipeline-model-parallel-size 4 --virtual-pipeline-model-parallel-size 2 \\
        --num-layers 32 --hidden-size 2048 --num-attention-heads 16 --seq-length 2048 \\
        --micro-batch-size 1 --global-batch-size 8 --train-iters 20 --lr 1e-4 --bf16 \\
        --pipeline-schedule zb-v

Drop ``--pipeline-schedule`` to get megatron's own schedule (1F1B, or interleaved with
``--virtual-pipeline-model-parallel-size``). Other choices: 1f1b, interleaved-1f1b, zb-h1, zb-h2 (no
``--virtual-pipeline-model-parallel-size``), zb-v, v-half, v-min (``--virtual-pipeline-model-parallel-size 2``),
auto (``--pipeline-memory-limit-gib`` caps activation memory per rank). zb-h1, zb-h2 and zb-v time their first 3
steps and then run their order rebuilt for the measured F/I/W times; a rebuilt order (and auto's plan) is timed
for 3 more steps and planned once more from its own timings, so from step 7 on the final order runs untimed
(``--pipeline-uniform-costs`` keeps the F = I = W order and times nothing). ``--pipeline-cuda-graphs`` (GPU)
captures every action of the final order as a CUDA graph and replays them from then on (docs/megatron.md, "CUDA
graphs"): the same losses, less host time per step.

The data is random tokens (the script shows the integration, not a data pipeline). ``--cpu`` runs it on the CPU
with gloo through the repository's test-only CUDA shim (tests/megatron/cpu_shim.py), e.g.::

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/megatron/pretrain_gpt.py --cpu \\
        --pipeline-model-parallel-size 2 --virtual-pipeline-model-parallel-size 2 --num-layers 4 \\
        --hidden-size 64 --num-attention-heads 4 --seq-length 32 --micro-batch-size 2 --global-batch-size 8 \\
        --train-iters 8 --pipeline-schedule zb-v
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import megatron_patches  # noqa: E402  # interleaf


def parse_args(extra_args_provider=None):
    parser = argparse.ArgumentParser(description="megatron-core GPT pretraining with interleaf schedules")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parser.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None)
    parser.add_argument("--num-layers", type=int, required=True)
    parser.add_argument("--hidden-size", type=int, required=True)
    parser.add_argument("--num-attention-heads", type=int, required=True)
    parser.add_argument("--seq-length", type=int, required=True)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--micro-batch-size", type=int, required=True)
    parser.add_argument("--global-batch-size", type=int, required=True)
    parser.add_argument("--train-iters", type=int, required=True)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--overlap-grad-reduce", action="store_true")
    parser.add_argument("--use-distributed-optimizer", action="store_true")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--cpu", action="store_true", help="run on CPU with gloo (test shim; smoke runs only)")
    if extra_args_provider is not None:
        parser = extra_args_provider(parser)
    return parser.parse_args()


def model_provider(args, config):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    def provider(pre_process=True, post_process=True, vp_stage=None):
        return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(),
                        vocab_size=args.vocab_size, max_sequence_length=args.seq_length, pre_process=pre_process,
                        post_process=post_process, share_embeddings_and_output_weights=True, vp_stage=vp_stage)

    return provider


def build_model(args, config, schedule):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    provider = model_provider(args, config)
    vp = args.virtual_pipeline_model_parallel_size
    v_placement = schedule is not None and (schedule.uses_v_placement or (schedule.schedule == "auto" and vp == 2))
    if v_placement:
        chunks = megatron_patches.build_model_chunks(provider)  # interleaf: V placement (the one change)
    else:
        chunks = []
        for i in range(vp or 1):
            vp_stage = i if vp else None
            chunks.append(provider(pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                                   post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                                   vp_stage=vp_stage))
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=args.overlap_grad_reduce,
                                               use_distributed_optimizer=args.use_distributed_optimizer)
    model = []
    for chunk in chunks:
        if not args.cpu:
            chunk.cuda(torch.cuda.current_device())
        if args.bf16:
            chunk = Float16Module(config, chunk)
        model.append(DistributedDataParallel(config, ddp_config, chunk))
    return model


def random_batches(args, device):
    generator = torch.Generator().manual_seed(args.seed + 1)
    while True:
        tokens = torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_length + 1), generator=generator)
        yield {"tokens": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device)}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    tokens, labels = batch["tokens"], batch["labels"]
    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
    attention_mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool, device=tokens.device), diagonal=1)
    output = model(tokens, position_ids, attention_mask, labels=labels)

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        return loss, {"lm loss": loss.detach().clone()}

    return output, loss_func


def main():
    args = parse_args(megatron_patches.extra_args_provider)  # interleaf: --pipeline-schedule and its options
    schedule = megatron_patches.config_from_args(args)  # interleaf: checks the flags, None = megatron's own
    if schedule is not None:
        megatron_patches.apply(schedule.schedule, memory_limit_gib=schedule.memory_limit_gib,  # interleaf
                               measured_costs=schedule.measured_costs, cuda_graphs=schedule.cuda_graphs)
    if args.cpu:
        sys.path.insert(0, os.path.join(ROOT, "tests", "megatron"))
        import cpu_shim

        cpu_shim.install()
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
        device = torch.device("cuda", torch.cuda.current_device())

    from megatron.core import parallel_state as ps
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    ps.initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                 args.virtual_pipeline_model_parallel_size)
    model_parallel_cuda_manual_seed(args.seed)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        bf16=args.bf16, params_dtype=dtype, pipeline_dtype=dtype, use_cpu_initialization=args.cpu,
        hidden_dropout=0.0, attention_dropout=0.0, batch_p2p_comm=not args.cpu,
    )
    model = build_model(args, config, schedule)
    vp = len(model)
    config.no_sync_func = [m.no_sync for m in model] if vp > 1 else model[0].no_sync
    if args.overlap_grad_reduce:
        config.grad_sync_func = [m.start_grad_sync for m in model] if vp > 1 else model[0].start_grad_sync
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=args.lr, bf16=args.bf16, params_dtype=dtype,
                        clip_grad=0.0 if args.cpu else 1.0,  # megatron clips CUDA tensors only
                        use_distributed_optimizer=args.use_distributed_optimizer), model)

    dp = ps.get_data_parallel_world_size()
    num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)
    data = random_batches(args, device)
    forward_backward_func = get_forward_backward_func()
    for iteration in range(1, args.train_iters + 1):
        started = time.perf_counter()
        for m in model:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        # Every chunk reads the same micro-batches (first stage: tokens, last stage: labels).
        batches = [next(data) for _ in range(num_microbatches)]
        iterators = [iter(batches) for _ in model]
        losses = forward_backward_func(
            forward_step_func=forward_step, data_iterator=iterators if vp > 1 else iterators[0],
            model=model if vp > 1 else model[0], num_microbatches=num_microbatches, seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size,
        )
        update_successful, grad_norm, _ = optimizer.step()
        if losses:  # the rank that holds the last stage (rank 0 under V placement)
            loss = torch.stack([d["lm loss"] for d in losses]).mean().item()  # (waits for the step's GPU work)
            name = (schedule.schedule + (" + cuda graphs" if schedule.cuda_graphs else "")) if schedule else "megatron"
            print(f"iteration {iteration:4d} | lm loss {loss:.6f} | grad norm {grad_norm:.6f} | "
                  f"{1e3 * (time.perf_counter() - started):.1f} ms | schedule {name}", flush=True)
    if schedule is not None:
        megatron_patches.remove()  # interleaf
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
