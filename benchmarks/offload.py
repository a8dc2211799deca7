"""Optimizer-state offload, side by side in ONE process: GPU-resident ZeRO-2, DeepSpeed ZeRO-Offload
(offload_optimizer cpu, DeepSpeedCPUAdam; with overlap_comm false and true) and interleaf interleaved offload
(gpu_fraction auto and 0.5), without and with gradient clipping.

Runs (default order; baselines first):

    gpu                   GPU-resident ZeRO-2, fused torch AdamW, no clipping         baseline of the no-clip rows
    zero-offload          ZeRO-Offload, overlap_comm false, no clipping
    zero-offload-overlap  ZeRO-Offload, overlap_comm true (grad copies to host overlap backward), no clipping;
                          every "ZeRO-Offload ÷ this" ratio uses the FASTER of the two ZeRO-Offload runs
    interleaf-auto        interleaf, gpu_fraction auto, no clipping (host updates may start during backward)
    gpu-clip              gpu with gradient_clipping 1.0                              baseline of the clip rows
    interleaf-auto-clip   interleaf-auto with gradient_clipping 1.0 (host updates wait for the global norm)
    interleaf-0.5         interleaf, gpu_fraction 0.5, no clipping
    interleaf-auto-overlap  (not run by default) interleaf-auto with overlap_comm true
    interleaf-1.0         (not run by default) interleaf, gpu_fraction 1.0: nothing on the host, no state ever moved;
                          against `gpu` it is the cost of the path itself (gradients routed per tensor, the update)

Without clipping (and bf16 with check_grad_overflow false) DeepSpeed can neither skip nor rescale a step, which is
the only case where interleaf starts host updates during backward: its best case. The clip rows show the common
configuration; they are compared with gpu-clip (which pays for clipping too), and with the faster unclipped
ZeRO-Offload run (clipping would add a scaling pass over host gradients to ZeRO-Offload, so that ratio
understates interleaf's margin).

The model is the 1.34B GPT of anchors.md (benchmarks/gpt.py: 24 layers, hidden 2048, 16 heads, seq 2048, vocab
32000), micro-batch 4, bf16, one GPU, single process (RANK=0 WORLD_SIZE=1, no launcher). Every run starts from
the same weights and sees the same batches; per-step losses of all runs are compared. Prints a table and updates
its section of BENCHMARKS.md.

    python benchmarks/offload.py                       # device: nvidia-h100-x1, ~6-8 min incl. JIT builds
    python benchmarks/offload.py --tiny                # a tiny GPT; runs on CPU (DS_ACCELERATOR=cpu) in ~1 min
    python benchmarks/offload.py --runs gpu,interleaf-auto --steps 8
    python benchmarks/offload.py --runs gpu,interleaf-0.5 --host-threads 14   # more host threads for a fixed split

s/iter: median over the timed iterations (after --warmup), each iteration ended by a device synchronize.
"host state": share of the fp32 optimizer state (master, m, v) that lives in host memory between steps.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from benchmarks.report import write_section  # noqa: E402

SECTION = "## Optimizer-state offload (benchmarks/offload.py)"
REPORT_SECTION = "benchmarks/offload.py"  # its BENCHMARKS.md section (benchmarks/report.py)
RUNS = ("gpu", "zero-offload", "zero-offload-overlap", "interleaf-auto", "gpu-clip", "interleaf-auto-clip",
        "interleaf-0.5")
OPTIONAL_RUNS = ("interleaf-auto-overlap", "interleaf-1.0")  # selectable with --runs; not in the default set (device time)
ZERO_OFFLOAD_RUNS = ("zero-offload", "zero-offload-overlap")
CLIP_NORM = 1.0  # gradient_clipping of the *-clip runs
LOSS_RTOL = 2e-2  # bf16 runs with different (but exact-math) update orders; the fp32 parity is in tests/


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny GPT (CPU-friendly) to check the script runs")
    p.add_argument("--runs", default=",".join(RUNS),
                   help=f"comma-separated subset of {','.join(RUNS + OPTIONAL_RUNS)} (default: all but "
                        f"{','.join(OPTIONAL_RUNS)})")
    p.add_argument("--steps", type=int, default=None, help="timed iterations (default 8; tiny 4)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed iterations first (default 16: auto plans host work after its first 6 all-GPU "
                        "iterations and needs a few more to charge interference and move back; tiny 2)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds since start after which the remaining runs are skipped (and listed as skipped) "
                        "so the table still comes out under the device's per-command limit (default 450; tiny: "
                        "none)")
    p.add_argument("--micro-batch", type=int, default=None, help="default 4 (tiny 2)")
    p.add_argument("--layers", type=int, default=None, help="override the layer count")
    p.add_argument("--zero-offload-optimizer", choices=("deepspeed", "torch"), default=None,
                   help="ZeRO-Offload baseline optimizer: DeepSpeedCPUAdam (default on GPU) or torch AdamW "
                        "(default with --tiny: avoids the cpu_adam JIT build)")
    p.add_argument("--host-threads", default="auto",
                   help="interleaf.offload.host_threads of the interleaf rows: an integer or auto (default: half of "
                        "the CPUs in the affinity mask, see docs/offload.md)")
    p.add_argument("--output", default=None,
                   help="markdown file whose section to update (default: BENCHMARKS.md on GPU; none on CPU or with "
                        "--tiny, whose figures are no benchmark)")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    p.add_argument("--json", default=None, help="also write the raw results here")
    args = p.parse_args()
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    for run in args.runs:
        if run not in RUNS + OPTIONAL_RUNS:
            p.error(f"unknown run {run!r}; choose from {', '.join(RUNS + OPTIONAL_RUNS)}")
    if args.host_threads != "auto" and not (args.host_threads.isdigit() and int(args.host_threads) >= 1):
        p.error(f"--host-threads must be an integer >= 1 or auto, got {args.host_threads!r}")
    if args.steps is None:
        args.steps = 4 if args.tiny else 8
    if args.warmup is None:
        args.warmup = 2 if args.tiny else 16
    if args.time_budget is None and not args.tiny:
        args.time_budget = 450.0
    if args.micro_batch is None:
        args.micro_batch = 2 if args.tiny else 4
    if args.zero_offload_optimizer is None:
        args.zero_offload_optimizer = "torch" if args.tiny else "deepspeed"
    return args


def setup_process() -> None:
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")


def is_clip_run(run: str) -> bool:
    return run.endswith("-clip")


def is_overlap_run(run: str) -> bool:
    return run.endswith("-overlap")


def gpu_baseline_of(run: str) -> str:
    """The GPU-resident run a row's "× GPU-resident" ratio and loss check use: the one with the same clipping."""
    return "gpu-clip" if is_clip_run(run) else "gpu"


def ds_config(run: str, args, cuda: bool) -> dict:
    # 50M-element buckets (~one layer): gradients leave the GPU while backward continues (same for every run).
    # overlap_comm true only for the *-overlap runs: reduction and ZeRO-Offload's gradient copies to the host then
    # run on DeepSpeed's reduction stream, overlapping backward (double-buffered buckets).
    zero: dict = {"stage": 2, "contiguous_gradients": True, "overlap_comm": is_overlap_run(run),
                  "reduce_bucket_size": int(5e7), "allgather_bucket_size": int(5e8)}
    cfg: dict = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        # no overflow check (every run) and no clipping (all but the *-clip runs): a bf16 step is then never skipped
        # or rescaled, which lets interleaf start host updates during backward
        "bf16": {"enabled": True, "check_grad_overflow": False},
        "zero_optimization": zero,
        "gradient_clipping": CLIP_NORM if is_clip_run(run) else 0.0,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if not run.startswith("gpu"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if run in ZERO_OFFLOAD_RUNS and args.zero_offload_optimizer == "deepspeed":
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                                                          "weight_decay": 0.1}}
    else:
        cfg["zero_force_ds_cpu_optimizer"] = False
    if run.startswith("interleaf"):
        fraction = run.split("-")[1]  # interleaf-<auto|0.5>[-clip|-overlap]
        cfg["interleaf"] = {"offload": {"mode": "interleaved",
                                        "gpu_fraction": "auto" if fraction == "auto" else float(fraction),
                                        "host_threads": host_threads_arg(args)}}
    return cfg


def host_threads_arg(args) -> int | str:
    """--host-threads as the config takes it: "auto" or an integer."""
    value = getattr(args, "host_threads", "auto")
    return value if value == "auto" else int(value)


def host_threads_label(args, results: list[dict]) -> str:
    """--host-threads for the header, with what ``auto`` resolved to when the rows recorded it."""
    value = host_threads_arg(args)
    resolved = sorted({r["host_threads"] for r in results if r.get("host_threads") is not None})
    if value == "auto" and resolved:
        return f"auto (= {', '.join(map(str, resolved))})"
    return str(value)


def make_optimizer(run: str, args, params, cuda: bool):
    import torch

    if run in ZERO_OFFLOAD_RUNS and args.zero_offload_optimizer == "deepspeed":
        return None  # DeepSpeed builds DeepSpeedCPUAdam from the config
    kwargs = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    if run.startswith("gpu") and cuda:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    return torch.optim.AdamW(params, foreach=False, **kwargs)


def one_run(run: str, args, base_model, batches, device) -> dict:
    import deepspeed
    import torch
    from gpt import gpt_loss

    cuda = device.type == "cuda"
    model = copy.deepcopy(base_model).to(device)
    params = list(model.parameters())
    cfg = ds_config(run, args, cuda)
    optimizer = make_optimizer(run, args, params, cuda)
    t0 = time.perf_counter()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer, config=cfg)
    init_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    losses, times = [], []
    for i, (ids, labels) in enumerate(batches):
        ids, labels = ids.to(device), labels.to(device)
        sync()
        start = time.perf_counter()
        loss = gpt_loss(engine(ids), labels)
        engine.backward(loss)
        engine.step()
        sync()
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    opt = engine.optimizer
    timed = times[args.warmup:]
    result = {
        "run": run,
        "optimizer": type(opt).__name__ + "/" + type(getattr(opt, "optimizer", opt)).__name__,
        "s_per_iter": statistics.median(timed),
        "iter_times": times,
        "losses": losses,
        "init_s": init_s,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan"),
        "host_state": 0.0 if run.startswith("gpu") else 1.0,
        "overlap_comm": bool(getattr(opt, "overlap_comm", cfg["zero_optimization"]["overlap_comm"])),
        "gradient_clipping": float(cfg["gradient_clipping"]),
    }
    if hasattr(opt, "_executor") and opt._executor is not None:
        opt.wait_for_updates()  # after the timed loop: the last step's host half is complete, its timings final
        ex = opt._executor
        plan = opt.last_plan
        result["host_state"] = ex.host_state_fraction()
        result["host_threads"] = ex._host_threads  # what host_threads resolved to (auto: half of the CPUs)
        result["gpu_fraction"] = plan.gpu_fraction if plan is not None else None
        result["plan"] = {"placements": [p.value for p in plan.placements],
                          "predicted_overhead_s": plan.estimate.overhead_s,
                          "predicted_stall_s": plan.estimate.forward_stall_s,
                          "predicted_cpu_busy_s": plan.estimate.cpu_busy_s} if plan is not None else None
        result["rates"] = {k: getattr(opt._rates, k) for k in opt._rates.__slots__} if opt._rates else None
        history = list(getattr(opt, "plan_history", []))
        result["plan_history"] = history
        result["probe_host_rate"] = history[0]["host_rate"] if history else None
        result["cpu_busy_s_last"] = ex.timings.cpu_busy_s
        result["cpu_numel_last"] = ex.timings.cpu_numel
        result["early_share_last"] = ex.timings.early_numel / max(1, ex.timings.cpu_numel)
        obs = getattr(opt, "last_observation", None)
        result["observed"] = {"period_s": obs.period_s, "stall_s": obs.stall_s, "host_numel": obs.host_numel,
                              "host_busy_s": obs.host_busy_s} if obs is not None else None
    del loss
    if hasattr(engine, "destroy"):
        engine.destroy()
    elif hasattr(opt, "destroy"):
        opt.destroy()
    del engine, opt, optimizer, model, params
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        host_empty = getattr(torch._C, "_host_emptyCache", None)
        if host_empty is not None:
            host_empty()
    return result


def loss_reference(run: str, results: list[dict]) -> dict:
    """The run whose per-step losses a row is checked against: its GPU-resident baseline (same clipping), else the
    first measured run with the same clipping (clipping changes the updates, so losses differ across the two)."""
    by_run = {r["run"]: r for r in results}
    base = by_run.get(gpu_baseline_of(run))
    if base is not None:
        return base
    return next(r for r in results if is_clip_run(r["run"]) == is_clip_run(run))


def max_loss_diff(r: dict, ref: dict) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"]))


def fastest_zero_offload(results: list[dict]) -> dict | None:
    """The faster of the measured ZeRO-Offload runs (overlap_comm false / true): every ZeRO-Offload ratio uses it."""
    runs = [r for r in results if r["run"] in ZERO_OFFLOAD_RUNS]
    return min(runs, key=lambda r: r["s_per_iter"]) if runs else None


def render(results: list[dict], args, device_name: str, torch_version: str, ds_version: str, shape: str) -> str:
    by_run = {r["run"]: r for r in results}
    offl = fastest_zero_offload(results)
    interleaf_rows = [r for r in results if r["run"].startswith("interleaf")]
    lines = [
        SECTION,
        "",
        f"{datetime.date.today().isoformat()} · {device_name} · torch {torch_version} · deepspeed {ds_version} · "
        f"{shape} · interleaf host_threads {host_threads_label(args, results)} · "
        f"{args.steps} timed iterations after {args.warmup} warm-up (median; each iteration ends with a "
        "device synchronize) · baselines measured in the same process.",
        "",
        "Which row is compared with which: \"× GPU-resident\" divides by the GPU-resident run with the SAME "
        f"clipping (`gpu` for rows without clipping, `gpu-clip` for `*-clip` rows, gradient_clipping {CLIP_NORM}); "
        "\"ZeRO-Offload ÷ this\" divides the FASTER of the two ZeRO-Offload runs (overlap_comm false / true"
        + (f", here `{offl['run']}` at {offl['s_per_iter']:.3f} s/iter" if offl else ", none measured") + ") by the "
        "row; the loss check compares each row with the run in \"loss ref\".",
        "",
        "| run | overlap_comm | clipping | optimizer | s/iter | × GPU-resident (baseline) | ZeRO-Offload ÷ this | "
        "host state | max loss diff (loss ref) | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    footnote = False
    for r in results:
        base_name = gpu_baseline_of(r["run"])
        base = by_run.get(base_name)
        ratio = f"{r['s_per_iter'] / base['s_per_iter']:.2f}× ({base_name})" if base else f"— ({base_name} not run)"
        speedup = f"{offl['s_per_iter'] / r['s_per_iter']:.2f}×" if offl else "—"
        if offl and r["gradient_clipping"] != offl["gradient_clipping"]:
            speedup += " †"
            footnote = True
        ref = loss_reference(r["run"], results)
        lines.append(
            f"| {r['run']} | {str(r['overlap_comm']).lower()} | {r['gradient_clipping']:g} | {r['optimizer']} | "
            f"{r['s_per_iter']:.3f} | {ratio} | {speedup} | {host_state_column(r, args.warmup)} | "
            f"{max_loss_diff(r, ref):.1e} ({ref['run']}) | {r['peak_gib']:.1f} |")
    lines.append("")
    if footnote:
        lines.append(f"† against ZeRO-Offload measured WITHOUT clipping: with gradient_clipping {CLIP_NORM} "
                     "DeepSpeed adds a scaling pass over the host gradients to ZeRO-Offload, so this ratio "
                     "understates the clipped row's margin.")
    if interleaf_rows:
        measured = "measured in `interleaf-auto-overlap`" if "interleaf-auto-overlap" in by_run else (
            "`interleaf-auto-overlap` measures it; not in the default set")
        lines.append("interleaf rows keep overlap_comm false (except `*-overlap`): interleaf already sends host-bound "
                     "gradients down on its own side stream. Its hook accepts overlap_comm true (neither refused nor "
                     f"ignored: DeepSpeed then routes gradients from its reduction stream; {measured}).")
    lines += ["", "Per-step losses:", ""]
    for r in results:
        lines.append(f"- {r['run']}: " + ", ".join(f"{x:.4f}" for x in r["losses"]))
    for r in results:
        if r.get("plan"):
            lines.append(plan_line(r, warmup=args.warmup))
    lines += ["", "Targets (issue 5): interleaf ≤ 1.15× GPU-resident with ≥ 50% host state, ≥ 2.8× faster than "
              "ZeRO-Offload; losses equal to tolerance " f"({LOSS_RTOL:g} relative, bf16).", ""]
    return "\n".join(lines)


def _rate(params_per_s) -> str:
    return "n/a" if params_per_s is None else f"{params_per_s / 1e9:.2f} G params/s"


def host_state_column(r: dict, warmup: int) -> str:
    """The share of optimizer state on the host while the row was timed: the final plan's, or, when a re-plan
    moved state during the timed iterations, each share in the order they ran ("40% → 5%")."""
    history = r.get("plan_history") or []
    final = f"{100 * r['host_state']:.0f}%"
    if not history:
        return final
    shares = []
    for i in range(warmup, len(r["iter_times"])):
        # iteration i runs the last plan made at step <= i (a plan at step s moved state inside iteration s - 1)
        share = next((h["host_state"] for h in reversed(history) if h["step"] <= i), history[0]["host_state"])
        if not shares or shares[-1] != share:
            shares.append(share)
    if len(shares) <= 1 and (not shares or f"{100 * shares[0]:.0f}%" == final):
        return final
    return " → ".join(f"{100 * x:.0f}%" for x in shares) + f" (timed; final {final})"


def plan_line(r: dict, *, warmup: int) -> str:
    """One line per interleaf row: the final plan, what training measured, and every re-plan with its reason;
    says so when a move fell among the timed iterations (its s/iter then mixes two plans and a transition) or
    when the plan was still changing at the end of the run."""
    rates = r.get("rates") or {}
    obs = r.get("observed")
    busy = r.get("cpu_busy_s_last") or 0.0
    line = (
        f"- {r['run']} plan: {100 * (r['gpu_fraction'] or 0):.0f}% of parameters updated on the GPU, predicted "
        f"overhead {1e3 * r['plan']['predicted_overhead_s']:.0f} ms (forward stall "
        f"{1e3 * r['plan']['predicted_stall_s']:.0f} ms); start-up probe host AdamW {_rate(r.get('probe_host_rate'))}"
        f", planned with {_rate(rates.get('cpu_update_params_per_s'))}; H2D "
        f"{rates.get('h2d_bytes_per_s', float('nan')) / 1e9:.0f} GB/s, D2H "
        f"{rates.get('d2h_bytes_per_s', float('nan')) / 1e9:.0f} GB/s, both "
        f"{rates.get('duplex_bytes_per_s', float('nan')) / 1e9:.0f} GB/s; last step host update "
        f"{r.get('cpu_numel_last', 0) / 1e6:.0f} M params in {1e3 * busy:.0f} ms"
        + (f" = {_rate(r['cpu_numel_last'] / busy)}" if busy > 0 else "")
        + f" ({100 * r['early_share_last']:.0f}% started during backward)")
    if obs is not None:
        line += (f"; last measured iteration {1e3 * obs['period_s']:.0f} ms with {1e3 * obs['stall_s']:.1f} ms "
                 "of stall waiting for host updates (device idle time from CUDA events; on CPU the blocked time)")
    history = r.get("plan_history") or []
    if len(history) > 1:
        line += "; plans: " + " → ".join(
            f"step {h['step']} {100 * h['gpu_fraction']:.0f}%" + ("" if h["moved"] or h["step"] == 0 else " (kept)")
            for h in history)
        reasons = [f"step {h['step']}: {h['reason']}" for h in history[1:] if h["moved"]]
        if reasons:
            line += " [" + "; ".join(reasons) + "]"
        # a plan "at step s" moves state inside iteration s - 1 (0-based; that iteration drains and streams it)
        n = len(r["iter_times"])
        # a move at step == warmup falls in the last untimed iteration, but the first timed one re-allocates
        timed = [s for s in (h["step"] for h in history[1:] if h["moved"]) if warmup <= s <= n]
        if timed:
            line += (f". NOT SETTLED: state moved during the timed iterations (plans at step "
                     f"{', '.join(map(str, timed))}; timed: iterations {warmup}-{n - 1}), so its s/iter mixes "
                     "plans and a move; give --warmup more iterations to time the settled plan")
    return line


def main() -> int:
    args = parse_args()
    setup_process()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("ds_plugins").setLevel(logging.INFO)
    import torch

    import ds_plugins
    import deepspeed
    from gpt import ANCHOR, TINY, reference_model, synthetic_batches, with_size

    ds_plugins.install()
    clock = time.perf_counter()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               auto_mpi_discovery=False)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cfg = with_size(TINY, layers=2, hidden=64, heads=4, seq=32, vocab=128) if args.tiny else with_size(
        ANCHOR, layers=24)
    if args.layers:
        cfg = with_size(cfg, layers=args.layers)
    torch.manual_seed(0)
    base_model = reference_model(cfg)
    numel = sum(p.numel() for p in base_model.parameters())
    shape = (f"GPT {numel / 1e9:.2f}B ({cfg.layers} layers, hidden {cfg.hidden}, {cfg.heads} heads, seq {cfg.seq}, "
             f"vocab {cfg.vocab}), micro-batch {args.micro_batch}, bf16, ZeRO-2, 1 process")
    print(f"# {shape}; model built in {time.perf_counter() - clock:.0f} s", flush=True)
    from ds_plugins import ops

    print(f"# interleaf ops backend: cpu={ops.backend('cpu')} device={ops.backend(device)}", flush=True)
    batches = synthetic_batches(cfg, args.micro_batch, args.warmup + args.steps)
    results = []
    failed = {}
    skipped = []
    for run in args.runs:
        if args.time_budget is not None and time.perf_counter() - clock > args.time_budget:
            skipped.append(run)
            print(f"# {run}: skipped, {time.perf_counter() - clock:.0f} s elapsed > --time-budget "
                  f"{args.time_budget:g} s", flush=True)
            continue
        start = time.perf_counter()
        try:
            result = one_run(run, args, base_model, batches, device)
        except Exception as exc:  # one broken baseline must not cost the other measurements
            import traceback

            traceback.print_exc()
            failed[run] = f"{type(exc).__name__}: {exc}"[:300]
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        results.append(result)
        print(f"# {run}: {result['s_per_iter']:.3f} s/iter (init {result['init_s']:.0f} s, total "
              f"{time.perf_counter() - start:.0f} s) losses {[round(x, 4) for x in result['losses']]}", flush=True)
    if not results:
        print(f"no run measured: failed {failed}, skipped (time budget) {skipped}", file=sys.stderr)
        return 1
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (DeepSpeed CPU accelerator)"
    # the host half's speed is the host's (memory bandwidth, cores): name it next to the card
    device_name += f" · host {len(os.sched_getaffinity(0))} CPUs in the affinity mask ({os.cpu_count()} on the machine)"
    if device.type == "cuda":
        device_name += f", {torch.cuda.device_count()} GPU(s) visible to the process"
    section = render(results, args, device_name, torch.__version__, deepspeed.__version__, shape)
    if failed:
        section += "\nFailed runs: " + "; ".join(f"{k}: {v}" for k, v in failed.items()) + "\n"
    if skipped:
        section += (f"\nNot measured (--time-budget {args.time_budget:g} s reached): {', '.join(skipped)}; run them "
                    f"with --runs.\n")
    print(section)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    output = args.output
    if output is None and device.type == "cuda" and not args.tiny:
        output = str(ROOT / "BENCHMARKS.md")
    if output is not None and not args.no_write:
        write_section(output, REPORT_SECTION, section)
        print(f"updated {output}", flush=True)
    bad = [r["run"] for r in results if max_loss_diff(r, loss_reference(r["run"], results)) > LOSS_RTOL]
    if bad or failed:
        print(f"LOSS MISMATCH beyond {LOSS_RTOL}: {bad}; failed runs: {sorted(failed)}", file=sys.stderr)
        return 1
    print(f"# total {time.perf_counter() - clock:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
