"""Fused AdamW ops: interleaf's CPU kernel vs DeepSpeedCPUAdam vs torch fused AdamW on CPU (fp32 master, m, v;
bf16 copy of the updated weights into pinned memory), host memory bandwidth measured in the same run, and
interleaf's CUDA kernel vs torch fused AdamW on the GPU. Prints a table and updates its section of BENCHMARKS.md.

    python benchmarks/optimizer_ops.py                  # 400M params, all usable cores (64-core host: ~3 min)
    python benchmarks/optimizer_ops.py --params 5e6     # quick check
    python benchmarks/optimizer_ops.py --diagnose       # threads / OpenMP runtimes of each worker, ~1 min

Fairness: every implementation (bandwidth probe, interleaf, DeepSpeedCPUAdam, torch fused, the GPU part) runs in
its OWN fresh subprocess, so OpenMP runtimes and thread pools are never shared and no spinning threads are left
over from another implementation; each gets the same OMP_NUM_THREADS / torch.set_num_threads, the same tensors
(views of one flat buffer per state, like DeepSpeed's flat partitions), --warmup untimed steps, then --repeats
timed steps (median, min-max spread printed). Each timed row also reports how many cores its process kept busy
(CPU time of all threads / wall time, from /proc/self/task/*/schedstat) and how many threads did work, so a
baseline that ran single-threaded shows it in the table. The baselines' bf16 copy-out uses the fastest of
per-tensor copy_, torch._foreach_copy_ and one flat copy_, measured in the same process.

Byte model per parameter and step (anchors.md): read p, m, v (12 B) + grad (4 B fp32 / 2 B bf16), write p, m, v
(12 B) + the bf16 copy (2 B) = 30 B (fp32 grads) / 28 B (bf16 grads). A separate copy pass (DeepSpeed and torch
have no fused copy-out) reads p again (4 B) and writes bf16 (2 B). "% of bw" = (model bytes / time) over the
larger of two host bandwidths measured with the same threads: copy_ and a triad (reads + writes counted).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.report import merge_from, write_section  # noqa: E402

SECTION = "## Optimizer ops (fused AdamW, benchmarks/optimizer_ops.py)"
REPORT_SECTION = "benchmarks/optimizer_ops.py"  # its BENCHMARKS.md section (benchmarks/report.py)
LR, BETA1, BETA2, EPS, WD = 1e-3, 0.9, 0.999, 1e-8, 0.01
CPU_WORKERS = ("bandwidth", "interleaf", "deepspeed", "torch_fused")
OPENMP_LIB = re.compile(r"/lib(gomp|iomp5|omp)[-.\w]*\.so[.\d]*$")


# ---------------------------------------------------------------------------------------------------------------
# Host facts (no torch needed)

def cgroup_cpu_limit() -> float | None:
    """CPUs allowed by the cgroup CPU quota (v2 cpu.max or v1 cfs_quota), None when unlimited/unknown."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def cgroup_throttling() -> dict[str, int]:
    """nr_throttled / throttled_usec of this cgroup (v2), {} when unavailable."""
    try:
        fields = dict(line.split() for line in Path("/sys/fs/cgroup/cpu.stat").read_text().splitlines())
        return {k: int(fields[k]) for k in ("nr_throttled", "throttled_usec") if k in fields}
    except (OSError, ValueError):
        return {}


def default_threads() -> int:
    """Usable CPUs: the affinity mask, capped by the cgroup quota (more threads than the quota get throttled)."""
    usable = len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit()
    return max(1, min(usable, math.floor(limit))) if limit else usable


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def numa_nodes() -> int:
    try:
        return len([d for d in os.listdir("/sys/devices/system/node") if re.fullmatch(r"node\d+", d)])
    except OSError:
        return 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=400e6, help="parameters updated per step (default 400M)")
    parser.add_argument("--tensor-size", type=float, default=4e6, help="parameters per tensor (default 4M)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for every implementation (default: affinity mask capped by cgroup quota)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing (>= 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per implementation (>= 5; median)")
    parser.add_argument("--gpu-params", type=float, default=None, help="GPU parameters (default: --params)")
    parser.add_argument("--skip-deepspeed", action="store_true")
    parser.add_argument("--skip-gpu", action="store_true")
    parser.add_argument("--diagnose", action="store_true",
                        help="run each worker on a tiny problem and print its threads / OpenMP runtimes only")
    parser.add_argument("--worker-timeout", type=int, default=420, help="seconds per worker subprocess")
    parser.add_argument("--output", default=str(REPO / "BENCHMARKS.md"))
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--merge-from", default=None,
                        help="run nothing: copy this script's section from another BENCHMARKS.md (e.g. one written "
                             "on the device with --output $OUT/BENCHMARKS.md) into --output")
    parser.add_argument("--worker", choices=CPU_WORKERS + ("gpu",), help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = default_threads()
    if not args.diagnose and (args.warmup < 2 or args.repeats < 5):
        parser.error("--warmup must be >= 2 and --repeats >= 5 (the table reports a median and its spread)")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Worker side: one implementation per process

def per_thread_cpu_ns() -> dict[str, int]:
    """CPU time (ns) of every thread of this process: schedstat when the kernel has it, else stat ticks."""
    out = {}
    tick_ns = 1e9 / os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            out[tid] = int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            try:
                fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
                out[tid] = int((int(fields[11]) + int(fields[12])) * tick_ns)
            except (OSError, ValueError, IndexError):
                pass
    return out


def time_it(fn, args, sync=None) -> dict:
    """--warmup untimed calls, then --repeats timed calls: median / min / max seconds, plus the cores the process
    kept busy while timing (CPU time of all its threads over wall time), the threads that did real work (> 25% of
    the busiest thread's CPU time) and involuntary context switches (high = oversubscribed or throttled)."""
    for _ in range(args.warmup):
        fn()
        if sync:
            sync()
    times = []
    cpu_before, usage_before, wall_before = per_thread_cpu_ns(), resource.getrusage(resource.RUSAGE_SELF), \
        time.perf_counter()
    for _ in range(args.repeats):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    wall = time.perf_counter() - wall_before
    cpu_after, usage_after = per_thread_cpu_ns(), resource.getrusage(resource.RUSAGE_SELF)
    busy = [(ns - cpu_before.get(tid, 0)) / 1e9 for tid, ns in cpu_after.items()]
    top = max(busy, default=0.0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "times": times,
            "cores_busy": sum(busy) / wall if wall else 0.0,
            "threads_busy": sum(1 for b in busy if top and b > 0.25 * top),
            "involuntary_switches": usage_after.ru_nivcsw - usage_before.ru_nivcsw}


def process_diag(torch) -> dict:
    """Threads and OpenMP runtimes of this process, each runtime asked for its own omp_get_max_threads()."""
    maps = sorted({line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "/" in line})
    runtimes = []
    for path in (p for p in maps if OPENMP_LIB.search(p)):
        try:
            max_threads = int(ctypes.CDLL(path).omp_get_max_threads())  # the already loaded copy
        except (OSError, AttributeError):
            max_threads = -1
        runtimes.append({"path": path, "omp_get_max_threads": max_threads})
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "openmp_runtimes": runtimes,
        "os_threads": int(status.get("Threads", "0").strip() or 0),
        "affinity": len(os.sched_getaffinity(0)),
        "cgroup_cpu_limit": cgroup_cpu_limit(),
        "env": {k: v for k, v in os.environ.items()
                if k.startswith(("OMP_", "GOMP_", "KMP_", "MKL_")) or k in ("DS_ACCELERATOR", "LD_PRELOAD")},
    }


def split_sizes(total: int, per_tensor: int) -> list[int]:
    sizes = [per_tensor] * (total // per_tensor)
    if total % per_tensor:
        sizes.append(total % per_tensor)
    return sizes


def views(flat, sizes):
    out, offset = [], 0
    for s in sizes:
        out.append(flat[offset:offset + s])
        offset += s
    return out


def make_state(torch, args, device="cpu"):
    """Flat fp32 params / grads / m / v, a flat bf16 copy of the grads and a flat bf16 low-precision buffer (pinned
    on a CUDA host), with per-tensor views of each. Filled by copying one random tensor (parallel copy_, so a
    400M setup takes seconds, not minutes of serial randn)."""
    n = int(args.gpu_params or args.params) if device != "cpu" else int(args.params)
    sizes = split_sizes(n, int(args.tensor_size))
    base = torch.randn(min(n, 1 << 22), generator=torch.Generator().manual_seed(0)).to(device)
    pin = device == "cpu" and torch.cuda.is_available()

    def filled(scale, dtype=torch.float32):
        flat = torch.empty(n, dtype=dtype, device=device)
        for start in range(0, n, base.numel()):
            chunk = flat[start:start + base.numel()]
            chunk.copy_(base[:chunk.numel()] * scale)
        return flat

    flat = {"params": filled(1.0), "grads": filled(1e-2), "exp_avgs": torch.zeros(n, device=device),
            "exp_avg_sqs": torch.zeros(n, device=device)}
    flat["grads_bf16"] = flat["grads"].to(torch.bfloat16)
    flat["lowp"] = torch.empty(n, dtype=torch.bfloat16, device=device, pin_memory=pin)
    state = {k: views(v, sizes) for k, v in flat.items()}
    return n, sizes, flat, state, pin


def copy_variants(torch, params_flat, params, lowp_flat, lowp):
    """The ways torch offers to write a bf16 copy of fp32 params into a buffer."""
    def per_tensor():
        for src, dst in zip(params, lowp):
            dst.copy_(src)
    return {"per-tensor copy_": per_tensor,
            "torch._foreach_copy_": lambda: torch._foreach_copy_(lowp, params),
            "one flat copy_": lambda: lowp_flat.copy_(params_flat)}


def worker_bandwidth(torch, args) -> dict:
    """copy_ and triad over 1 GiB fp32 buffers, and the fp32 -> bf16 conversion copy at this run's size with the
    set threads and with 1 thread (shows whether torch parallelises it)."""
    n = (1 << 28) if not args.diagnose else (1 << 20)
    a, b, c = torch.ones(n), torch.ones(n), torch.empty(n)
    copy = time_it(lambda: c.copy_(a), args)
    triad = time_it(lambda: torch.add(a, b, alpha=0.5, out=c), args)
    del a, b, c
    total, _, flat, _, pin = make_state(torch, args)
    convert = time_it(lambda: flat["lowp"].copy_(flat["params"]), args)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    convert_1 = time_it(lambda: flat["lowp"].copy_(flat["params"]), args)
    torch.set_num_threads(threads)
    return {"copy_bytes_per_s": 2 * n * 4 / copy["median"], "triad_bytes_per_s": 3 * n * 4 / triad["median"],
            "copy": copy, "triad": triad, "pinned": pin,
            "rows": [{"name": f"fp32 -> bf16 copy_ (flat, {threads} threads)", "kind": "part", "grads": "-",
                      "bytes": 6, "n": total, "timing": convert, "note": "probe"},
                     {"name": "fp32 -> bf16 copy_ (flat, 1 thread)", "kind": "part", "grads": "-", "bytes": 6,
                      "n": total, "timing": convert_1, "note": "probe: is the conversion parallel?"}]}


def worker_interleaf(torch, args) -> dict:
    sys.path.insert(0, str(REPO))
    import ds_plugins.ops as ops

    if not ops.is_native_available("cpu"):
        print("warning: the native CPU op is not available; timing the torch twin", file=sys.stderr)
    n, _, flat, s, _ = make_state(torch, args)
    step = [0]

    def ours(grads, lowp):
        def run():
            step[0] += 1
            ops.adamw_step_(s["params"], grads, s["exp_avgs"], s["exp_avg_sqs"], lr=LR, beta1=BETA1, beta2=BETA2,
                            eps=EPS, weight_decay=WD, step=step[0], lowp_out=lowp)
        return run

    name = f"interleaf {ops.backend()}"
    rows = [
        {"name": f"{name} + fused bf16 copy", "kind": "copy", "grads": "fp32", "bytes": 30,
         "timing": time_it(ours(s["grads"], s["lowp"]), args)},
        {"name": f"{name} + fused bf16 copy", "kind": "copy", "grads": "bf16", "bytes": 28,
         "timing": time_it(ours(s["grads_bf16"], s["lowp"]), args)},
        {"name": f"{name}, no copy", "kind": "step", "grads": "fp32", "bytes": 28,
         "timing": time_it(ours(s["grads"], None), args)},
    ]
    try:
        info = list(torch.ops.interleaf.cpu_threads_info()) if ops.is_native_available("cpu") else []
    except (AttributeError, RuntimeError):  # a library built before cpu_threads_info existed
        info = []
    # The offload optimizer runs our op inside the training process, next to torch's own CPU ops: time torch's
    # conversion copy here, after our op, to compare with the same probe in the bandwidth worker (a slowdown
    # would mean our op degrades torch in a shared process, e.g. through a second OpenMP runtime).
    rows.append({"name": f"fp32 -> bf16 copy_ (flat, {torch.get_num_threads()} threads) after our op, same process",
                 "kind": "part", "grads": "-", "bytes": 6, "note": "probe: compare with the bandwidth worker's",
                 "timing": time_it(lambda: flat["lowp"].copy_(flat["params"]), args)})
    for r in rows:
        r["n"] = n
    extra = {"op_threads": {"omp_get_max_threads": info[0], "at_get_num_threads": info[1],
                            "threads_last_call": info[2]} if info else None}
    return {"rows": rows, "extra": extra}


def timed_baseline(torch, args, label, opt, params, flat, s) -> list[dict]:
    """A torch-style optimizer's step alone, the copy-out variants alone, and the step + the fastest copy-out."""
    n = flat["params"].numel()
    step_timing = time_it(opt.step, args)
    variants = copy_variants(torch, flat["params"], [p.data for p in params], flat["lowp"], s["lowp"])
    copies = {name: time_it(fn, args) for name, fn in variants.items()}
    best = min(copies, key=lambda k: copies[k]["median"])
    best_copy = variants[best]

    def step_and_copy():
        opt.step()
        best_copy()

    spread = ", ".join(f"{k} {v['median'] * 1e3:.1f} ms" for k, v in copies.items())
    return [
        {"name": f"{label} step + bf16 copy ({best})", "kind": "copy", "grads": "fp32", "bytes": 34, "n": n,
         "timing": time_it(step_and_copy, args), "note": f"copy-out alone: {spread}"},
        {"name": f"{label} step", "kind": "step", "grads": "fp32", "bytes": 28, "n": n, "timing": step_timing},
        {"name": f"{label}: bf16 copy-out alone ({best})", "kind": "part", "grads": "-", "bytes": 6, "n": n,
         "timing": copies[best]},
    ]


def attach_grads(torch, s):
    params = [torch.nn.Parameter(p) for p in s["params"]]  # views of the flat buffer, as ZeRO's partitions
    for p, g in zip(params, s["grads"]):
        p.grad = g
    return params


def worker_deepspeed(torch, args) -> dict:
    # DeepSpeedCPUAdam is host-only: DeepSpeed's CPU accelerator builds it exactly as its CUDA accelerator does for
    # the host kernel (-O3 -march=native -fopenmp -D__AVX512__/__AVX256__), without needing CUDA/curand.
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    builder = get_accelerator().create_op_builder("CPUAdamBuilder")
    cxx = builder.strip_empty_entries(builder.cxx_args())
    ldflags = builder.strip_empty_entries(builder.extra_ldflags()) if hasattr(builder, "extra_ldflags") else []
    _, _, flat, s, _ = make_state(torch, args)
    params = attach_grads(torch, s)
    start = time.perf_counter()
    opt = DeepSpeedCPUAdam(params, lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=WD, adamw_mode=True)
    load_seconds = time.perf_counter() - start
    rows = timed_baseline(torch, args, "DeepSpeedCPUAdam", opt, params, flat, s)
    op_file = getattr(getattr(opt, "ds_opt_adam", None), "__file__", "?")
    rows[0]["note"] += f"; op load/JIT {load_seconds:.0f} s"
    return {"rows": rows, "extra": {
        "accelerator": get_accelerator()._name, "cxx_args": cxx, "extra_ldflags": ldflags, "op_file": op_file,
        "has_openmp_flag": "-fopenmp" in cxx,
        "simd_flag": next((a for a in cxx if a in ("-D__AVX512__", "-D__AVX256__", "-D__SCALAR__")), "none")}}


def worker_torch_fused(torch, args) -> dict:
    _, _, flat, s, _ = make_state(torch, args)
    params = attach_grads(torch, s)
    opt = torch.optim.AdamW(params, lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=WD, fused=True)
    return {"rows": timed_baseline(torch, args, "torch AdamW(fused=True)", opt, params, flat, s), "extra": {}}


def worker_gpu(torch, args) -> dict:
    sys.path.insert(0, str(REPO))
    import ds_plugins.ops as ops

    n, _, flat, s, _ = make_state(torch, args, device="cuda")
    step = [0]
    sync = torch.cuda.synchronize

    def ours(grads):
        def run():
            step[0] += 1
            ops.adamw_step_(s["params"], grads, s["exp_avgs"], s["exp_avg_sqs"], lr=LR, beta1=BETA1, beta2=BETA2,
                            eps=EPS, weight_decay=WD, step=step[0], lowp_out=s["lowp"])
        return run

    name = f"interleaf {ops.backend('cuda')} multi-tensor + fused bf16 copy"
    rows = [{"name": name, "kind": "copy", "grads": "fp32", "bytes": 30, "timing": time_it(ours(s["grads"]), args,
                                                                                          sync)},
            {"name": name, "kind": "copy", "grads": "bf16", "bytes": 28,
             "timing": time_it(ours(s["grads_bf16"]), args, sync)}]
    params = [torch.nn.Parameter(p.clone()) for p in s["params"]]
    for p, g in zip(params, s["grads"]):
        p.grad = g
    opt = torch.optim.AdamW(params, lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=WD, fused=True)

    @torch.no_grad()
    def torch_step_and_copy():
        opt.step()
        torch._foreach_copy_(s["lowp"], params)

    step_timing = time_it(opt.step, args, sync)
    rows.append({"name": "torch AdamW(fused=True) step + foreach bf16 copy", "kind": "copy", "grads": "fp32",
                 "bytes": 34, "timing": time_it(torch_step_and_copy, args, sync)})
    rows.append({"name": "torch AdamW(fused=True) step", "kind": "step", "grads": "fp32", "bytes": 28,
                 "timing": step_timing})
    for r in rows:
        r["n"] = n
    return {"rows": rows, "extra": {"device": torch.cuda.get_device_name()}}


def run_worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.diagnose:
        args.params, args.tensor_size, args.gpu_params = 2e6, 5e5, 2e6
        args.warmup, args.repeats = 1, 1
    throttle_before = cgroup_throttling()
    result = {"worker": args.worker, "diag_start": process_diag(torch)}
    try:
        body = {"bandwidth": worker_bandwidth, "interleaf": worker_interleaf, "deepspeed": worker_deepspeed,
                "torch_fused": worker_torch_fused, "gpu": worker_gpu}[args.worker](torch, args)
        result.update(body)
    except Exception as error:  # noqa: BLE001 - the parent reports a failed implementation and goes on
        result["error"] = f"{type(error).__name__}: {error}"
    result["diag_end"] = process_diag(torch)
    throttle_after = cgroup_throttling()
    result["cgroup_throttled"] = {k: throttle_after[k] - throttle_before.get(k, 0) for k in throttle_after}
    Path(args.result_file).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------------------
# Parent side: one subprocess per implementation, then the table

def spawn(args, worker: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if worker == "deepspeed":
        env.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_file = f.name
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--result-file", result_file,
           "--params", str(args.params), "--tensor-size", str(args.tensor_size), "--threads", str(args.threads),
           "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    if args.gpu_params:
        cmd += ["--gpu-params", str(args.gpu_params)]
    if args.diagnose:
        cmd.append("--diagnose")
    start = time.perf_counter()
    print(f"[optimizer_ops] {worker}: starting ({args.threads} threads)", file=sys.stderr, flush=True)
    try:
        # Worker chatter (DeepSpeed's build log) goes to stderr; the table goes to stdout.
        proc = subprocess.run(cmd, env=env, stdout=sys.stderr, timeout=args.worker_timeout)
        text = Path(result_file).read_text() if os.path.getsize(result_file) else ""
        result = json.loads(text) if text else {"worker": worker, "error": f"exit status {proc.returncode}"}
    except subprocess.TimeoutExpired:
        result = {"worker": worker, "error": f"timed out after {args.worker_timeout} s"}
    finally:
        os.unlink(result_file)
    print(f"[optimizer_ops] {worker}: done in {time.perf_counter() - start:.0f} s"
          + (f" — FAILED: {result['error']}" if "error" in result else ""), file=sys.stderr, flush=True)
    return result


def runtime_summary(diag: dict) -> str:
    if not diag:
        return "?"
    libs = ", ".join(f"{Path(r['path']).name} ({r['omp_get_max_threads']})" for r in diag["openmp_runtimes"])
    return libs or "none"


def warnings_for(results: dict, threads: int) -> list[str]:
    """Self-diagnosis: anything that would make the comparison unfair is stated next to the table."""
    out = []
    for name, res in results.items():
        diag = res.get("diag_end") or {}
        if len(diag.get("openmp_runtimes", [])) > 1:
            out.append(f"{name}: {len(diag['openmp_runtimes'])} OpenMP runtimes in one process "
                       f"({runtime_summary(diag)})")
        if diag and diag.get("torch_threads") != threads:
            out.append(f"{name}: torch.get_num_threads() = {diag['torch_threads']}, asked {threads}")
        if res.get("cgroup_throttled", {}).get("nr_throttled"):
            out.append(f"{name}: cgroup CPU throttling during the worker "
                       f"({res['cgroup_throttled'].get('throttled_usec', 0) / 1e6:.2f} s throttled)")
        for row in res.get("rows", []):
            t = row["timing"]
            if name != "bandwidth" and threads > 1 and t["threads_busy"] < max(2, threads // 2):
                out.append(f"{row['name']} ({row['grads']}): only {t['threads_busy']} threads did work "
                           f"({t['cores_busy']:.1f} cores busy) of {threads}")
    probes = [r for name in ("bandwidth", "interleaf") for r in results.get(name, {}).get("rows", [])
              if r["name"].startswith("fp32 -> bf16 copy_") and "1 thread" not in r["name"]]
    if len(probes) == 2 and probes[1]["timing"]["median"] > 1.5 * probes[0]["timing"]["median"]:
        out.append(f"torch's conversion copy_ is {probes[1]['timing']['median'] / probes[0]['timing']['median']:.1f}"
                   "× slower after our op in the same process than in a fresh one")
    ds = results.get("deepspeed", {}).get("extra") or {}
    if ds and (not ds.get("has_openmp_flag") or ds.get("simd_flag") in ("none", "-D__SCALAR__")):
        out.append(f"DeepSpeedCPUAdam build flags lack OpenMP or SIMD: {' '.join(ds.get('cxx_args', []))}")
    return out


def _baseline(rows, prefix, row):
    """The baseline row of the same kind (with/without copy-out) and the same gradient dtype as ``row``: a bf16-grad
    row moves fewer bytes than an fp32-grad one, so it is compared only with a baseline that had bf16 grads too."""
    return next(
        (r for r in rows if r["name"].startswith(prefix) and r["kind"] == row["kind"] and r["grads"] == row["grads"]),
        None,
    )


def _ratio(row, baseline) -> str:
    if baseline is None or row["kind"] == "part":
        return "—"
    return f"{baseline['timing']['median'] / row['timing']['median']:.2f}×"


def render(results: dict, args) -> str:
    bw = results.get("bandwidth", {})
    copy_bw, triad_bw = bw.get("copy_bytes_per_s", 0.0), bw.get("triad_bytes_per_s", 0.0)
    bandwidth = max(copy_bw, triad_bw)
    any_diag = next((r["diag_end"] for r in results.values() if r.get("diag_end")), {})
    pinned = "pinned" if bw.get("pinned") else "not pinned (no CUDA here)"
    limit = cgroup_cpu_limit()
    lines = [
        SECTION, "",
        f"{datetime.date.today().isoformat()}; CPU: {cpu_model()}, {os.cpu_count()} CPUs, "
        f"{len(os.sched_getaffinity(0))} in the affinity mask, cgroup quota "
        f"{f'{limit:g} CPUs' if limit else 'none'}, {numa_nodes()} NUMA nodes; {args.threads} threads for every "
        f"implementation; torch {any_diag.get('torch', '?')}; {int(args.params) / 1e6:.0f}M params in "
        f"{len(split_sizes(int(args.params), int(args.tensor_size)))} tensors (views of flat buffers); bf16 "
        f"copy-out {pinned}. Each implementation in its own process, {args.warmup} warm-up steps, median of "
        f"{args.repeats} (spread = min–max). Host memory bandwidth measured in this run (reads + writes): copy_ "
        f"{copy_bw / 1e9:.1f} GB/s, triad {triad_bw / 1e9:.1f} GB/s; \"% of bw\" uses the larger. Neither counts "
        "the write-allocate reads of their stores, while the kernels' byte model has none to omit, so above 100% "
        "is possible. \"cores busy\": CPU time of all the process's threads / wall time while timing (spinning "
        "OpenMP threads count); \"thr\": threads that did work. Ratios compare rows of the same kind (with / "
        "without the bf16 copy-out).", "",
        "| implementation | grads | ms/step (median) | spread ms | G params/s | B/param | GB/s (model) | % of bw "
        "| cores busy | thr | vs DeepSpeedCPUAdam | vs torch fused | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [r for name in CPU_WORKERS for r in results.get(name, {}).get("rows", [])]
    for name in CPU_WORKERS:
        if "error" in results.get(name, {}):
            lines.append(f"| {name} | — | — | — | — | — | — | — | — | — | — | — | FAILED: {results[name]['error']} |")
    for r in rows:
        t = r["timing"]
        rate = r["n"] / t["median"]
        gbps = r["bytes"] * rate
        pct = f"{100 * gbps / bandwidth:.0f}%" if bandwidth else "—"
        lines.append(
            f"| {r['name']} | {r['grads']} | {t['median'] * 1e3:.1f} | {t['min'] * 1e3:.1f}–{t['max'] * 1e3:.1f} | "
            f"{rate / 1e9:.2f} | {r['bytes']} | {gbps / 1e9:.1f} | {pct} | {t['cores_busy']:.1f} | "
            f"{t['threads_busy']} | {_ratio(r, _baseline(rows, 'DeepSpeedCPUAdam', r))} | "
            f"{_ratio(r, _baseline(rows, 'torch AdamW', r))} | {r.get('note', '')} |")
    lines += ["", "Processes (threads at the end of each worker; OpenMP runtimes mapped, each with its own "
              "omp_get_max_threads()):", "",
              "| worker | torch threads | OpenMP runtimes | OS threads | notes |", "|---|---|---|---|---|"]
    for name, res in results.items():
        diag = res.get("diag_end") or {}
        extra = res.get("extra") or {}
        notes = ""
        if name == "interleaf" and extra.get("op_threads"):
            notes = "op: " + ", ".join(f"{k} {v}" for k, v in extra["op_threads"].items())
        elif name == "deepspeed" and extra:
            notes = (f"accelerator {extra.get('accelerator')}; build cxx: {' '.join(extra.get('cxx_args', []))}; "
                     f"ldflags: {' '.join(extra.get('extra_ldflags', [])) or '-'}")
        elif name == "gpu" and extra:
            notes = extra.get("device", "")
        lines.append(f"| {name} | {diag.get('torch_threads', '?')} | {runtime_summary(diag)} | "
                     f"{diag.get('os_threads', '?')} | {notes} |")
    warnings = warnings_for(results, args.threads)
    lines += ["", "Self-check: " + ("; ".join(warnings) if warnings else
                                    "one OpenMP runtime per process, every implementation used its threads, no "
                                    "cgroup throttling seen.")]
    gpu = results.get("gpu")
    if gpu and gpu.get("rows"):
        lines += ["", f"GPU: {gpu['extra'].get('device')}, {int(args.gpu_params or args.params) / 1e6:.0f}M params, "
                  "same tensor split, own process.", "",
                  "| implementation | grads | ms/step (median) | spread ms | G params/s | GB/s (model) | "
                  "vs torch fused (same kind) |", "|---|---|---|---|---|---|---|"]
        for r in gpu["rows"]:
            t = r["timing"]
            lines.append(f"| {r['name']} | {r['grads']} | {t['median'] * 1e3:.2f} | "
                         f"{t['min'] * 1e3:.2f}–{t['max'] * 1e3:.2f} | {r['n'] / t['median'] / 1e9:.1f} | "
                         f"{r['bytes'] * r['n'] / t['median'] / 1e9:.0f} | "
                         f"{_ratio(r, _baseline(gpu['rows'], 'torch AdamW', r))} |")
    elif gpu and "error" in gpu:
        lines += ["", f"GPU part FAILED: {gpu['error']}"]
    lines += ["", "Targets (issue 5): CPU ≥ 1.2× DeepSpeedCPUAdam params/s (both with the bf16 copy-out) and "
              "≥ 85% of the measured host bandwidth.", ""]
    return "\n".join(lines)


def render_diagnose(results: dict, args) -> str:
    limit = cgroup_cpu_limit()
    lines = [f"CPU: {cpu_model()}; os.cpu_count {os.cpu_count()}; affinity {len(os.sched_getaffinity(0))}; cgroup "
             f"quota {limit if limit else 'none'}; NUMA nodes {numa_nodes()}; threads asked {args.threads}"]
    for name, res in results.items():
        lines.append(f"\n== {name}" + (f" — FAILED: {res['error']}" if "error" in res else ""))
        for when in ("diag_start", "diag_end"):
            diag = res.get(when) or {}
            if diag:
                lines.append(f"  {when}: torch {diag['torch']}, torch threads {diag['torch_threads']}, "
                             f"OS threads {diag['os_threads']}, affinity {diag['affinity']}, env {diag['env']}")
                for rt in diag["openmp_runtimes"]:
                    lines.append(f"    OpenMP runtime {rt['path']}: omp_get_max_threads {rt['omp_get_max_threads']}")
        if res.get("extra"):
            lines.append(f"  extra: {json.dumps(res['extra'])}")
        for row in res.get("rows", []):
            t = row["timing"]
            lines.append(f"  {row['name']} ({row['grads']}): {t['median'] * 1e3:.2f} ms, threads that worked "
                         f"{t['threads_busy']}, cores busy {t['cores_busy']:.1f}")
    warnings = warnings_for(results, args.threads)
    lines.append("\nSelf-check: " + ("; ".join(warnings) if warnings else "clean"))
    return "\n".join(lines)


def cuda_available() -> bool:
    """Asked in a throwaway process: the parent never imports torch (nor initialises CUDA or OpenMP)."""
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True)
    return probe.stdout.strip() == "True"


def main() -> None:
    args = parse_args()
    if args.worker:
        run_worker(args)
        return
    if args.merge_from:
        merge_from(args.merge_from, args.output, REPORT_SECTION)
        return
    workers = [w for w in CPU_WORKERS if not (w == "deepspeed" and args.skip_deepspeed)]
    if not args.skip_gpu and cuda_available():
        workers.append("gpu")
    results = {w: spawn(args, w) for w in workers}
    if args.diagnose:
        print(render_diagnose(results, args))
        return
    section = render(results, args)
    print(section)
    if not args.no_write:
        write_section(args.output, REPORT_SECTION, section)


if __name__ == "__main__":
    main()
