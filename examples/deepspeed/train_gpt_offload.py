"""Train a GPT with ZeRO-2 optimizer offload: DeepSpeed's ZeRO-Offload, then interleaf's interleaved offload.

The only difference between the two runs is the ``"interleaf": {"offload": ...}`` block of the DeepSpeed config
(``examples/deepspeed/offload_config.json``); ``import ds_plugins`` is the whole integration. Prints loss and
seconds per iteration of both runs, and where interleaf put the optimizer state.

One GPU (single process, no launcher needed)::

    python examples/deepspeed/train_gpt_offload.py --size small

CPU (DeepSpeed's CPU accelerator; the "GPU" half runs on the CPU too, so only the control flow is shown)::

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python examples/deepspeed/train_gpt_offload.py --size tiny
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
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

SIZES = {
    "tiny": dict(layers=2, hidden=64, heads=4, seq=32, vocab=128),
    "small": dict(layers=12, hidden=1024, heads=16, seq=1024, vocab=32000),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--config", default=os.path.join(HERE, "offload_config.json"))
    args = p.parse_args()
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29531").items():
        os.environ.setdefault(key, value)

    import torch

    import ds_plugins  # noqa: F401  (registers the hooks: the "interleaf" block now takes effect)
    import deepspeed
    from gpt import GPTConfig, gpt_loss, reference_model, synthetic_batches

    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    with open(args.config) as f:
        interleaf_config = json.load(f)
    if not cuda:  # no pinned memory and no DeepSpeedCPUAdam JIT build on a CPU-only machine
        interleaf_config["zero_optimization"]["offload_optimizer"]["pin_memory"] = False
        interleaf_config.pop("optimizer")
        interleaf_config["zero_force_ds_cpu_optimizer"] = False
        interleaf_config["zero_allow_untested_optimizer"] = True
    zero_offload_config = {k: v for k, v in interleaf_config.items() if k != "interleaf"}

    cfg = GPTConfig(**SIZES[args.size])
    torch.manual_seed(0)
    base = reference_model(cfg)
    batches = synthetic_batches(cfg, interleaf_config["train_micro_batch_size_per_gpu"], args.steps)
    for name, config in (("DeepSpeed ZeRO-Offload", zero_offload_config), ("interleaf interleaved", interleaf_config)):
        model = copy.deepcopy(base)
        optimizer = None if "optimizer" in config else torch.optim.AdamW(model.parameters(), lr=3e-4,
                                                                         weight_decay=0.1)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), optimizer=optimizer,
                                          config=config)
        print(f"== {name} ({type(engine.optimizer).__name__})")
        for step, (ids, labels) in enumerate(batches):
            start = time.perf_counter()
            loss = gpt_loss(engine(ids.to(device)), labels.to(device))
            engine.backward(loss)
            engine.step()
            if cuda:
                torch.cuda.synchronize()
            print(f"step {step}: loss {float(loss.detach()):.4f}  {time.perf_counter() - start:.3f} s")
        plan = getattr(engine.optimizer, "last_plan", None)
        if plan is not None:
            print(f"   {100 * plan.gpu_fraction:.0f}% of parameters updated on the GPU, "
                  f"{100 * plan.host_state_fraction:.0f}% of the optimizer state on the host")
        engine.destroy()


if __name__ == "__main__":
    main()
