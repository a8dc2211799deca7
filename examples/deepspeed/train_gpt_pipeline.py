"""Train a small GPT with DeepSpeed pipeline parallelism: DeepSpeed's own 1F1B, then interleaf's schedule.

The only change between the two runs is the ``"interleaf"`` block of the DeepSpeed config
(``examples/deepspeed/ds_config_pipeline.json``). Per iteration it prints loss, tokens/s and bubble % (share of
the step a pipeline rank was not computing, mean over ranks); at the end it draws interleaf's schedule with the
F/I/W times measured in the run (PNG).

CPU (spawns its own gloo processes; what ``make demo`` runs)::

    OMP_NUM_THREADS=1 python examples/deepspeed/train_gpt_pipeline.py --procs 4

GPUs (one process per GPU)::

    torchrun --nproc_per_node 4 examples/deepspeed/train_gpt_pipeline.py --size small
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.local_ranks import run_local_ranks  # noqa: E402

SIZES = {
    # CPU demo: small enough that 4 processes on 2 cores finish in well under a minute of training
    "tiny": dict(layers=8, hidden=64, heads=4, seq=64, vocab=256),
    "small": dict(layers=16, hidden=1024, heads=16, seq=1024, vocab=32000),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(HERE, "ds_config_pipeline.json"), help="DeepSpeed JSON config")
    p.add_argument("--schedule", default=None, help="override interleaf.pipeline.schedule of the config")
    p.add_argument("--steps", type=int, default=8, help="training iterations per engine")
    p.add_argument("--microbatches", type=int, default=None, help="override gradient_accumulation_steps")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--png", default="schedule.png", help="where to draw the measured interleaf schedule ('' = skip)")
    p.add_argument("--no-baseline", action="store_true", help="skip DeepSpeed's own 1F1B run")
    p.add_argument("--procs", type=int, default=0, help="spawn this many CPU (gloo) processes instead of torchrun")
    return p.parse_args(argv)


def patterned_batches(cfg, micro_batch: int, count: int, seed: int):
    """Learnable synthetic text: each sequence follows t[i+1] = (a * t[i] + b) mod vocab with random a, b."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        start = torch.randint(0, cfg.vocab, (micro_batch, 1), generator=g)
        mult = torch.randint(1, 4, (micro_batch, 1), generator=g)
        add = torch.randint(0, 7, (micro_batch, 1), generator=g)
        tokens = [start]
        for _ in range(cfg.seq):
            tokens.append((tokens[-1] * mult + add) % cfg.vocab)
        seq = torch.cat(tokens, dim=1)
        out.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
    return out


def run_engine(label, ds_config, cfg, args, log) -> dict:
    import deepspeed
    from deepspeed.pipe import PipelineModule

    from benchmarks import gpt
    from ds_plugins.deepspeed.baseline_timing import DeepSpeedStepTimer

    world = torch.distributed.get_world_size()
    module = PipelineModule(layers=gpt.layer_specs(cfg), num_stages=world, loss_fn=gpt.gpt_loss,
                            partition_method="type:TransformerLayer")
    engine, *_ = deepspeed.initialize(model=module, config=ds_config, model_parameters=module.parameters())
    runner = getattr(engine, "interleaf_runner", None)
    timer = None if runner is not None else DeepSpeedStepTimer(engine)
    m = engine.gradient_accumulation_steps()
    data = iter(patterned_batches(cfg, engine.train_micro_batch_size_per_gpu(), m * args.steps, seed=7))
    tokens = cfg.seq * engine.train_micro_batch_size_per_gpu() * m * engine.grid.data_parallel_size
    rates = []
    for step in range(args.steps):
        if timer is not None:
            timer.reset()
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = float(engine.train_batch(data))
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        if runner is not None:
            it = runner.history[-1]
            bubble = it.bubble
            wall = it.wall_s
        else:
            # DeepSpeed: idle = step time - (forward + backward) - (reduction + optimizer step), mean over ranks
            mine = torch.tensor([1.0 - (timer.busy_s + timer.tail_s) / wall], dtype=torch.float64)
            torch.distributed.all_reduce(mine)
            bubble = float(mine) / world
        rates.append(tokens / wall)
        log(f"[{label:>18}] step {step + 1:2d}  loss {loss:7.4f}  tokens/s {tokens / wall:9.0f}  "
            f"bubble {100 * max(bubble, 0.0):5.1f}%")
    if runner is not None and runner.tuning:
        log(f"[{label:>18}] after its timed first steps the order was {runner.tuning} for the measured F/I/W costs")
    picture = None
    if runner is not None and args.png:
        costs = runner.measured_cost_model()
        picture = (runner.executor.schedule, costs)
    steady = rates[2:] or rates
    result = {"tokens_per_s": sum(steady) / len(steady), "picture": picture, "loss": loss}
    del engine, module
    return result


def main(args: argparse.Namespace) -> None:
    import deepspeed

    import ds_plugins  # noqa: F401  (registers interleaf's DeepSpeed hooks)
    from ds_plugins.config import InterleafConfig
    from benchmarks import gpt

    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    rank = torch.distributed.get_rank()

    def log(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)

    with open(args.config) as f:
        ds_config = json.load(f)
    if args.microbatches:
        ds_config["gradient_accumulation_steps"] = args.microbatches
    if args.schedule:
        ds_config["interleaf"]["pipeline"]["schedule"] = args.schedule
    InterleafConfig.from_ds_config(ds_config)  # a typo in the "interleaf" block fails now, not after the baseline
    if not torch.cuda.is_available():
        ds_config.pop("bf16", None)  # CPU: fp32
    cfg = gpt.GPTConfig(**SIZES[args.size])
    schedule = ds_config["interleaf"]["pipeline"]["schedule"]
    log(f"GPT {SIZES[args.size]}, pp={torch.distributed.get_world_size()}, "
        f"micro-batches={ds_config['gradient_accumulation_steps']}, micro-batch size="
        f"{ds_config['train_micro_batch_size_per_gpu']}")

    results = {}
    if not args.no_baseline:
        baseline = copy.deepcopy(ds_config)
        baseline.pop("interleaf")
        results["deepspeed"] = run_engine("DeepSpeed 1F1B", baseline, cfg, args, log)
    results["interleaf"] = run_engine(f"interleaf {schedule}", ds_config, cfg, args, log)

    if "deepspeed" in results:
        a, b = results["deepspeed"]["tokens_per_s"], results["interleaf"]["tokens_per_s"]
        log(f"steady-state tokens/s: DeepSpeed 1F1B {a:.0f}, interleaf {schedule} {b:.0f} ({b / a:.2f}x)")
        if float(ds_config.get("gradient_clipping", 1.0)) > 0:  # DeepSpeed's default is 1.0
            log("losses part once clipping engages: DeepSpeed's pipeline engine clips by stage 0's gradient norm "
                "only, interleaf by the norm over all stages (docs/deepspeed.md); with \"gradient_clipping\": 0 "
                "both print the same losses")
        if not torch.cuda.is_available():
            log(f"CPU: {torch.distributed.get_world_size()} processes on {os.cpu_count()} cores; tokens/s and "
                "bubble % here show the mechanics, not the GPU speed-up (BENCHMARKS.md)")
    picture = results["interleaf"]["picture"]
    if picture is not None and rank == 0:
        from ds_plugins.schedule.draw import ascii_timeline, save_png
        from ds_plugins.schedule.simulate import simulate

        sched, costs = picture
        sim = simulate(sched, costs)
        print(ascii_timeline(sim, max_width=120), flush=True)
        # Mean F/I/W times of this run, no p2p time: its bubble is the schedule's, not the measured one above.
        title = f"{sched.name} simulated with the F/I/W times measured in this run"
        save_png(sim, args.png, name=title, shape=sched.shape)
        log(f"schedule picture: {os.path.abspath(args.png)}")
    torch.distributed.barrier()


if __name__ == "__main__":
    arguments = parse_args()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/interleaf_torch_extensions"))
    if arguments.procs:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        run_local_ranks(main, arguments, arguments.procs)
    else:
        main(arguments)
