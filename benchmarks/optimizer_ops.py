"""Fused AdamW ops: interleaf's CPU kernel vs DeepSpeedCPUAdam vs torch fused AdamW on CPU (fp32 master, m, v;
bf16 copy of the updated weights into pinned memory), host memory bandwidth measured in the same run, and
interleaf's CUDA kernel vs torch fused AdamW on the GPU. Prints a table and updates its section of BENCHMARKS.md.

    python benchmarks/optimizer_ops.py                 # 400M params, all cores (device host: ~3-4 min)
    python benchmarks/optimizer_ops.py --params 5e6    # quick check

Byte model per parameter and step (anchors.md): read p, m, v (12 B) + grad (4 B fp32 / 2 B bf16), write p, m, v
(12 B) + the bf16 copy (2 B) = 30 B (fp32 grads) / 28 B (bf16 grads). A separate copy pass (DeepSpeed and torch
have no fused copy-out) reads p again (4 B) and writes bf16 (2 B). "% of bw" = (model bytes / time) over the
larger of two host bandwidths measured here with the same threads: copy_ and a triad (reads + writes counted).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# One OpenMP thread count for every runtime that may be loaded (torch's, ours, DeepSpeed's); before torch import.
_threads_arg = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--threads=")), None)
os.environ.setdefault("OMP_NUM_THREADS", _threads_arg or str(len(os.sched_getaffinity(0))))

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ds_plugins.ops as ops  # noqa: E402

SECTION = "## Optimizer ops (fused AdamW, benchmarks/optimizer_ops.py)"
LR, BETA1, BETA2, EPS, WD = 1e-3, 0.9, 0.999, 1e-8, 0.01


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=400e6, help="parameters updated per step (default 400M)")
    parser.add_argument("--tensor-size", type=float, default=4e6, help="parameters per tensor (default 4M)")
    parser.add_argument("--threads", type=int, default=int(os.environ["OMP_NUM_THREADS"]), help="CPU threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per implementation (median)")
    parser.add_argument("--gpu-params", type=float, default=None, help="GPU parameters (default: --params)")
    parser.add_argument("--skip-deepspeed", action="store_true")
    parser.add_argument("--skip-gpu", action="store_true")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--merge-from", default=None,
                        help="run nothing: copy this script's section from another BENCHMARKS.md (e.g. one written "
                             "on the device with --output $OUT/BENCHMARKS.md) into --output")
    return parser.parse_args()


def split_sizes(total: int, per_tensor: int) -> list[int]:
    sizes = [per_tensor] * (total // per_tensor)
    if total % per_tensor:
        sizes.append(total % per_tensor)
    return sizes


def median_seconds(fn, repeats: int, sync=None) -> float:
    fn()  # warm-up (also state allocation inside the baselines)
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def host_bandwidth(repeats: int) -> tuple[float, float]:
    """Bytes/s (reads + writes counted) of a large fp32 copy_ and of a STREAM-style triad (a = b + s*c), both on
    torch's intra-op threads over 1 GiB buffers. The larger one is the reference for "% of bandwidth"."""
    n = 1024 * 1024 * 1024 // 4
    a, b, c = torch.ones(n), torch.ones(n), torch.empty(n)
    copy_seconds = median_seconds(lambda: c.copy_(a), repeats)
    triad_seconds = median_seconds(lambda: torch.add(a, b, alpha=0.5, out=c), repeats)
    return 2 * n * 4 / copy_seconds, 3 * n * 4 / triad_seconds


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


class Row:
    """One timed implementation. ``kind``: "copy" (step + bf16 copy-out), "step" (no copy-out) or "part" (a
    component); ratios compare rows of the same kind."""

    def __init__(self, name, kind, grads, seconds, n, model_bytes, note=""):
        self.name, self.kind, self.grads, self.seconds = name, kind, grads, seconds
        self.n, self.model_bytes, self.note = n, model_bytes, note

    @property
    def params_per_s(self) -> float:
        return self.n / self.seconds if self.seconds else 0.0


def bench_cpu(args) -> tuple[list[Row], float, str]:
    n_total = int(args.params)
    sizes = split_sizes(n_total, int(args.tensor_size))
    pin = torch.cuda.is_available()
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in sizes]
    grads = [torch.randn(s, generator=gen) * 1e-2 for s in sizes]
    grads_bf16 = [g.to(torch.bfloat16) for g in grads]
    exp_avgs = [torch.zeros(s) for s in sizes]
    exp_avg_sqs = [torch.zeros(s) for s in sizes]
    lowp = [torch.empty(s, dtype=torch.bfloat16, pin_memory=pin) for s in sizes]
    pinned_note = "pinned" if pin else "not pinned (no CUDA here)"
    step = [0]

    def ours(grad_list, lowp_out):
        def run():
            step[0] += 1
            ops.adamw_step_(params, grad_list, exp_avgs, exp_avg_sqs, lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS,
                            weight_decay=WD, step=step[0], lowp_out=lowp_out)
        return run

    copy_bandwidth, triad_bandwidth = host_bandwidth(args.repeats)
    name = f"interleaf {ops.backend()}"
    rows = [
        Row(f"{name} + fused bf16 copy", "copy", "fp32", median_seconds(ours(grads, lowp), args.repeats), n_total, 30),
        Row(f"{name} + fused bf16 copy", "copy", "bf16", median_seconds(ours(grads_bf16, lowp), args.repeats),
            n_total, 28),
        Row(f"{name}, no copy", "step", "fp32", median_seconds(ours(grads, None), args.repeats), n_total, 28),
    ]

    @torch.no_grad()
    def copy_out(source):
        for src, dst in zip(source, lowp):
            dst.copy_(src)

    copy_seconds = median_seconds(lambda: copy_out(params), args.repeats)
    rows.append(Row("bf16 copy pass alone (param -> lowp copy_)", "part", "-", copy_seconds, n_total, 6))

    if not args.skip_deepspeed:
        rows.extend(bench_deepspeed(args, sizes, grads, copy_out, n_total))

    torch_params = [torch.nn.Parameter(p.clone()) for p in params]
    for p, g in zip(torch_params, grads):
        p.grad = g
    torch_opt = torch.optim.AdamW(torch_params, lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=WD, fused=True)
    fused_seconds = median_seconds(torch_opt.step, args.repeats)
    total_seconds = median_seconds(lambda: (torch_opt.step(), copy_out(torch_params)), args.repeats)
    rows.append(Row("torch AdamW(fused=True) step + bf16 copy pass", "copy", "fp32", total_seconds, n_total, 34))
    rows.append(Row("torch AdamW(fused=True) step", "step", "fp32", fused_seconds, n_total, 28))
    del torch_opt, torch_params
    return rows, (copy_bandwidth, triad_bandwidth), pinned_note


def bench_deepspeed(args, sizes, grads, copy_out, n_total) -> list[Row]:
    # DeepSpeedCPUAdam is a host-only kernel: build it for DeepSpeed's CPU accelerator (no CUDA/curand link
    # needed; the same -march=native AVX code), and without interleaf's DeepSpeed hooks: this times DeepSpeed alone.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ds_plugins

    ds_plugins.uninstall()
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        ds_params = [torch.nn.Parameter(torch.randn(s)) for s in sizes]
        for p, g in zip(ds_params, grads):
            p.grad = g
        build_start = time.perf_counter()
        ds_opt = DeepSpeedCPUAdam(ds_params, lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=WD,
                                  adamw_mode=True)
        build_seconds = time.perf_counter() - build_start
        step_seconds = median_seconds(ds_opt.step, args.repeats)
        total_seconds = median_seconds(lambda: (ds_opt.step(), copy_out(ds_params)), args.repeats)
    except Exception as error:  # noqa: BLE001 - report the baseline's failure instead of crashing the run
        print(f"DeepSpeedCPUAdam failed: {type(error).__name__}: {error}", file=sys.stderr)
        return [Row("DeepSpeedCPUAdam", "copy", "fp32", 0.0, n_total, 34,
                    note=f"FAILED: {type(error).__name__}: {error}")]
    return [Row("DeepSpeedCPUAdam step + bf16 copy pass", "copy", "fp32", total_seconds, n_total, 34,
                note=f"JIT load {build_seconds:.0f} s"),
            Row("DeepSpeedCPUAdam step", "step", "fp32", step_seconds, n_total, 28)]


def bench_gpu(args) -> list[Row]:
    n_total = int(args.gpu_params or args.params)
    sizes = split_sizes(n_total, int(args.tensor_size))
    dev = torch.device("cuda")
    params = [torch.randn(s, device=dev) for s in sizes]
    grads = [torch.randn(s, device=dev) * 1e-2 for s in sizes]
    grads_bf16 = [g.to(torch.bfloat16) for g in grads]
    exp_avgs = [torch.zeros(s, device=dev) for s in sizes]
    exp_avg_sqs = [torch.zeros(s, device=dev) for s in sizes]
    lowp = [torch.empty(s, device=dev, dtype=torch.bfloat16) for s in sizes]
    step = [0]
    sync = torch.cuda.synchronize

    def ours(grad_list):
        def run():
            step[0] += 1
            ops.adamw_step_(params, grad_list, exp_avgs, exp_avg_sqs, lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS,
                            weight_decay=WD, step=step[0], lowp_out=lowp)
        return run

    name = f"interleaf {ops.backend('cuda')} multi-tensor + fused bf16 copy"
    rows = [Row(name, "copy", "fp32", median_seconds(ours(grads), args.repeats, sync), n_total, 30),
            Row(name, "copy", "bf16", median_seconds(ours(grads_bf16), args.repeats, sync), n_total, 28)]
    torch_params = [torch.nn.Parameter(p.clone()) for p in params]
    for p, g in zip(torch_params, grads):
        p.grad = g
    torch_opt = torch.optim.AdamW(torch_params, lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=WD, fused=True)

    @torch.no_grad()
    def torch_step_and_copy():
        torch_opt.step()
        torch._foreach_copy_(lowp, torch_params)

    fused_seconds = median_seconds(torch_opt.step, args.repeats, sync)
    rows.append(Row("torch AdamW(fused=True) step + foreach bf16 copy", "copy", "fp32",
                    median_seconds(torch_step_and_copy, args.repeats, sync), n_total, 34))
    rows.append(Row("torch AdamW(fused=True) step", "step", "fp32", fused_seconds, n_total, 28))
    return rows


def _baseline(rows: list[Row], prefix: str, kind: str) -> Row | None:
    return next((r for r in rows if r.name.startswith(prefix) and r.kind == kind and r.seconds), None)


def _ratio(row: Row, baseline: Row | None) -> str:
    if baseline is None or row.kind == "part" or not row.seconds:
        return "—"
    return f"{row.params_per_s / baseline.params_per_s:.2f}×"


def render(cpu_rows, bandwidths, pinned_note, gpu_rows, args) -> str:
    copy_bandwidth, triad_bandwidth = bandwidths
    bandwidth = max(bandwidths)
    lines = [
        SECTION,
        "",
        f"{datetime.date.today().isoformat()}; CPU: {cpu_model()}, {args.threads} threads; "
        f"torch {torch.__version__}; {int(args.params) / 1e6:.0f}M params in "
        f"{len(split_sizes(int(args.params), int(args.tensor_size)))} tensors; bf16 copy-out {pinned_note}. "
        f"Host memory bandwidth measured in this run (reads + writes): copy_ {copy_bandwidth / 1e9:.1f} GB/s, "
        f"triad {triad_bandwidth / 1e9:.1f} GB/s; \"% of bw\" uses the larger. Neither counts the write-allocate "
        "reads of their stores, while the kernels' byte model has none to omit (p, m, v are stored to lines just "
        "read; the lowp copy is streamed), so above 100% is possible. Ratios compare rows of the same kind "
        "(with / without the bf16 copy-out).",
        "",
        "| implementation | grads | ms/step | G params/s | B/param (model) | GB/s (model) | % of bw | "
        "vs DeepSpeedCPUAdam | vs torch fused | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in cpu_rows:
        if not r.seconds:
            lines.append(f"| {r.name} | {r.grads} | — | — | — | — | — | — | — | {r.note} |")
            continue
        gbps = r.model_bytes * r.params_per_s
        vs_ds = _ratio(r, _baseline(cpu_rows, "DeepSpeedCPUAdam", r.kind))
        vs_torch = _ratio(r, _baseline(cpu_rows, "torch AdamW", r.kind))
        lines.append(f"| {r.name} | {r.grads} | {r.seconds * 1e3:.1f} | {r.params_per_s / 1e9:.2f} | "
                     f"{r.model_bytes} | {gbps / 1e9:.1f} | {100 * gbps / bandwidth:.0f}% | {vs_ds} | {vs_torch} | "
                     f"{r.note} |")
    if gpu_rows:
        lines += ["", f"GPU: {torch.cuda.get_device_name()}, {int(args.gpu_params or args.params) / 1e6:.0f}M params, "
                  "same tensor split.", "",
                  "| implementation | grads | ms/step | G params/s | GB/s (model) | vs torch fused (same kind) |",
                  "|---|---|---|---|---|---|"]
        for r in gpu_rows:
            lines.append(f"| {r.name} | {r.grads} | {r.seconds * 1e3:.2f} | {r.params_per_s / 1e9:.1f} | "
                         f"{r.model_bytes * r.params_per_s / 1e9:.0f} | "
                         f"{_ratio(r, _baseline(gpu_rows, 'torch AdamW', r.kind))} |")
    lines += ["", "Targets (issue 5): CPU ≥ 1.2× DeepSpeedCPUAdam params/s (both with the bf16 copy-out) and "
              "≥ 85% of the measured host bandwidth.", ""]
    return "\n".join(lines)


def read_section(path: Path) -> str:
    text = path.read_text()
    start = text.index(SECTION)
    nxt = text.find("\n## ", start + len(SECTION))
    return text[start:nxt + 1] if nxt >= 0 else text[start:]


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = section.rstrip("\n") + "\n\n"
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + (text[nxt + 1:] if nxt >= 0 else "")
    path.write_text(text.rstrip("\n") + "\n")


def main() -> None:
    args = parse_args()
    if args.merge_from:
        write_section(Path(args.output), read_section(Path(args.merge_from)))
        return
    torch.set_num_threads(args.threads)
    if not ops.is_native_available("cpu"):
        print("warning: the native CPU op is not available; timing the torch twin", file=sys.stderr)
    cpu_rows, bandwidths, pinned_note = bench_cpu(args)
    gpu_rows = []
    if not args.skip_gpu and torch.cuda.is_available():
        gpu_rows = bench_gpu(args)
    section = render(cpu_rows, bandwidths, pinned_note, gpu_rows, args)
    print(section)
    if not args.no_write:
        write_section(Path(args.output), section)


if __name__ == "__main__":
    main()
