"""How long the host takes to issue megatron's backward, and interleaf's split of it, for one GPT chunk.

On host-bound machines a pipeline step is as long as its ranks' hosts take to issue their actions (BENCHMARKS.md,
Megatron sections: hosts issuing a 4-layer forward in 5-10 ms whose kernels take ~5 ms). This script measures, for
one chunk of the anchors.md GPT in megatron's ``GPTModel`` (local spec; ``--layers`` decoder layers with the
embedding, the tied LM head and the loss in the one chunk: V placement's rank 0 holds these in its two chunks), the
host's wall time (``perf_counter``, no synchronisation inside) to run:

- ``forward``: the chunk's forward and loss (``Float16Module`` + megatron DDP, as ``benchmarks/megatron.py``);
- ``megatron B``: ``loss.backward()`` with megatron's own linear backward (``megatron_patches`` not applied);
- ``interleaf B``: the same with interleaf's patch installed, no W deferral (what interleaf's full-B actions run);
- ``interleaf I`` + ``interleaf W``: the input-gradient pass with the weight-gradient GEMMs queued, then the
  queued W closures (what zero-bubble schedules split B into).

The GPU is synchronised between these calls (outside the timing), so each starts with an empty launch queue;
``--seq`` smaller than 2048 makes the kernels shorter and the figures closer to pure issue cost. Each round runs
megatron's backward, interleaf's B, then I + W, in that order, each after its own forward (the forward column
pools all three); the table gives the median and the interquartile range over ``--rounds`` (I + W: the sum of the
two medians). Check: the three backwards must leave the same gradients in megatron's ``main_grad`` buffers
(within 1e-2 relative in bf16, 1e-5 in fp32), else the script fails: a W that did not run, or a patch that
changed the math, would show there.

GPU (writes its section of BENCHMARKS.md)::

    python benchmarks/megatron_host.py --seq 2048 256

CPU smoke test (tiny model through the test-only CUDA->CPU shim, no BENCHMARKS.md)::

    OMP_NUM_THREADS=1 python benchmarks/megatron_host.py --tiny --rounds 3
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]  # "megatron" is megatron-core
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks import megatron as bench  # noqa: E402
from benchmarks.device_memory import release_between_rows  # noqa: E402
from benchmarks.report import write_section  # noqa: E402

REPORT_SECTION = "benchmarks/megatron_host.py"
KINDS = ("forward", "megatron B", "interleaf B", "interleaf I", "interleaf W")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, nargs="+", default=[2048, 256], help="sequence lengths, one table row each")
    p.add_argument("--layers", type=int, default=4, help="decoder layers in the chunk (anchors.md pp=4 V: 4)")
    p.add_argument("--rounds", type=int, default=40, help="timed rounds (each runs every variant once)")
    p.add_argument("--warmup", type=int, default=5, help="untimed rounds of megatron's own step first")
    p.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke test)")
    p.add_argument("--out", default=None, help="markdown file to update (default: BENCHMARKS.md on GPU, none on CPU)")
    return p.parse_args(argv)


def measure(seq: int, args: argparse.Namespace, gpu: bool) -> tuple[dict[str, list[float]], int]:
    """Host seconds per round for each of :data:`KINDS` (one chunk, ``seq`` tokens), and how many weight-gradient
    closures one I queued."""
    from megatron_patches import linear_weight_grad

    base = bench.TINY if args.tiny else bench.ANCHOR
    shape = dict(base, layers=args.layers, seq=seq)
    wrapped, config = bench._build("loop1", shape, pp=1, gpu=gpu)
    model = wrapped[0]
    device = torch.device("cuda") if gpu else torch.device("cpu")
    forward_step = bench._forward_step_factory(shape, device)
    g = torch.Generator(device=device).manual_seed(0)
    batch = tuple(torch.randint(0, shape["vocab"], (1, seq), device=device, generator=g) for _ in range(2))
    queue: list = []
    deferring = {"on": False}

    def collecting():
        return queue.append if deferring["on"] else None

    def timed(fn):
        bench._sync(device)
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        bench._sync(device)
        return elapsed, result

    def forward():
        output, loss_func = forward_step(iter([batch]), model)
        return loss_func(output)[0]

    def run_w():
        with torch.no_grad():
            for closure in queue:
                closure()

    times: dict[str, list[float]] = {k: [] for k in KINDS}
    queued = [0]
    grads: dict[str, torch.Tensor] = {}
    params = [p for p in model.parameters() if p.requires_grad]

    def one(kind: str, keep: bool) -> None:
        model.zero_grad_buffer()
        elapsed, loss = timed(forward)
        if kind == "I":
            deferring["on"] = True
            backward, _ = timed(loss.backward)
            deferring["on"] = False
            if not queue:
                raise RuntimeError("the input-gradient pass queued no weight-gradient GEMM: the patch did not defer")
            queued[0] = len(queue)
            weight, _ = timed(run_w)
            queue.clear()
        else:
            backward, _ = timed(loss.backward)
        if kind not in grads:  # the same forward input and weights every time: the same gradients
            grads[kind] = torch.cat([p.main_grad.detach().float().flatten() for p in params]).cpu()
        if keep:
            times["forward"].append(elapsed)
            if kind == "I":
                times["interleaf I"].append(backward)
                times["interleaf W"].append(weight)
            else:
                times["megatron B" if kind == "megatron" else "interleaf B"].append(backward)

    if linear_weight_grad.is_installed():
        raise RuntimeError("megatron_patches is applied in this process; run this script on its own")
    try:
        for _ in range(args.warmup):
            one("megatron", keep=False)
        for _ in range(args.rounds):
            one("megatron", keep=True)
            linear_weight_grad.install(collecting)
            one("B", keep=True)
            one("I", keep=True)
            linear_weight_grad.uninstall()
        rtol = 1e-2 if gpu else 1e-5
        reference = grads["megatron"]
        scale = float(reference.abs().max())
        for kind in ("B", "I"):
            err = float((grads[kind] - reference).abs().max())
            if not err <= rtol * scale:
                raise RuntimeError(f"seq {seq}: interleaf's {'B' if kind == 'B' else 'I + W'} left gradients "
                                   f"{err:.3g} away from megatron's backward (max |grad| {scale:.3g}): not the same math")
    finally:
        linear_weight_grad.uninstall()
        bench.release_layout(wrapped, config)
        del model, wrapped
        release_between_rows(device)
    return times, queued[0]


def table(results: dict[int, tuple[dict[str, list[float]], int]]) -> str:
    lines = ["| seq | " + " | ".join(f"{k} ms" for k in KINDS)
             + " | W closures | I + W vs megatron B | interleaf B vs megatron B |",
             "|---|" + "---|" * (len(KINDS) + 3)]
    for seq, (times, closures) in results.items():
        med = {k: statistics.median(v) for k, v in times.items()}
        cells = []
        for k in KINDS:
            v = sorted(times[k])
            cells.append(f"{1e3 * med[k]:.2f} ({1e3 * v[len(v) // 4]:.2f}-{1e3 * v[(3 * len(v)) // 4]:.2f})")
        split = (med["interleaf I"] + med["interleaf W"]) / med["megatron B"]
        lines.append(f"| {seq} | " + " | ".join(cells)
                     + f" | {closures} | {split:.3f}x | {med['interleaf B'] / med['megatron B']:.3f}x |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> None:
    gpu = torch.cuda.is_available()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    if gpu:
        torch.cuda.set_device(0)
    else:
        sys.path.insert(0, os.path.join(ROOT, "tests", "megatron"))
        import cpu_shim  # test-only CUDA->CPU mapping for megatron-core; never used on GPU

        cpu_shim.install()
    dist.init_process_group("nccl" if gpu else "gloo", rank=0, world_size=1)
    try:
        results = {seq: measure(seq, args, gpu) for seq in args.seq}
    finally:
        dist.destroy_process_group()
    import megatron.core

    base = bench.TINY if args.tiny else bench.ANCHOR
    device_name = torch.cuda.get_device_name(0) if gpu else "CPU (gloo)"
    head = (
        f"## Host issue time of megatron's backward and interleaf's split (benchmarks/megatron_host.py)\n\n"
        f"{datetime.date.today().isoformat()}, 1x {device_name} ({os.cpu_count()} CPUs), torch {torch.__version__}, "
        f"megatron-core {megatron.core.__version__}, Python {sys.version.split()[0]}. One chunk of megatron's GPTModel "
        f"(local spec): {args.layers} decoder layers h{base['hidden']} {base['heads']} heads vocab {base['vocab']} with "
        f"the embedding, the tied LM head and the loss, micro-batch 1, {'bf16 (Float16Module)' if gpu else 'fp32'}, "
        f"megatron DDP. Host wall time (perf_counter, the device synchronised before and after each call, not "
        f"inside) of the forward + loss, megatron's own backward, the backward with interleaf's linear patch (B), "
        f"and the input-gradient pass with the weight-gradient GEMMs queued (I) followed by the queued closures (W); "
        f"median (interquartile range) over {args.rounds} rounds, the variants alternating within a round.\n"
    )
    text = head + "\n" + table(results)
    print(text, flush=True)
    out = args.out or (os.path.join(ROOT, "BENCHMARKS.md") if gpu else None)
    if out:
        write_section(out, REPORT_SECTION, text)
        print(f"updated {out}", flush=True)


if __name__ == "__main__":
    main(parse_args())
