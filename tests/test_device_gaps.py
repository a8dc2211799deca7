"""benchmarks/device_gaps.py on hand-made chrome traces (the format torch.profiler exports on CUDA), and on a real
CPU trace of the executor with its per-action profiler ranges."""
from benchmarks.device_gaps import format_gaps, gaps_from_trace


def _k(name, ts, dur, corr, cat="kernel"):
    return {"cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}


def _launch(ts, corr, cat="cuda_runtime", tid=1):
    return {"cat": cat, "name": "cudaLaunchKernel", "ts": ts, "dur": 3, "pid": 1, "tid": tid,
            "args": {"correlation": corr}}


def _op(name, ts, dur, tid=1):
    return {"cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid}


def test_gaps_split_into_host_bound_and_not():
    trace = {"traceEvents": [
        _op("aten::linear", 0, 30), _op("aten::mm", 1, 20),  # nested: the outer op is the owner
        _launch(2, 1), _k("gemm", 5, 10, 1),                  # kernel 5..15
        _op("aten::layer_norm", 35, 20), _launch(40, 2),
        _k("ln", 50, 10, 2),                                  # gap 15..50 (35 us), launched at 40 > 15: host-bound
        _launch(41, 3, cat="cuda_driver"), _k("add", 62, 8, 3),  # gap 2 us: launch latency, not a gap
        _launch(45, 4), _k("copy", 120, 10, 4, cat="gpu_memcpy"),  # gap 70..120, launched at 45 < 70: queued,
    ]}                                                             # the GPU waited on something else
    s = gaps_from_trace(trace)
    assert s["kernels"] == 3  # kernels only; the copy counts as device work
    assert s["kernel_ms"] == (10 + 10 + 8 + 10) / 1e3
    assert s["busy_ms"] == s["kernel_ms"]
    assert s["extent_ms"] == (130 - 5) / 1e3
    assert abs(s["gap_ms"] - (35 + 2 + 50) / 1e3) < 1e-12
    assert s["host_bound_gap_ms"] == 35 / 1e3
    assert s["host_ops"] == [["aten::layer_norm", 35 / 1e3]]
    assert "waiting for the host" in format_gaps(s)


def test_nccl_kernels_are_waiting_not_compute():
    """A receive kernel spins from its launch until the peer's data arrives: it must not fill a compute gap."""
    trace = {"traceEvents": [
        _launch(0, 1), _k("gemm", 5, 10, 1),
        _launch(1, 2), _k("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", 15, 100, 2),
        _launch(2, 3), _k("gemm", 115, 10, 3),
    ]}
    s = gaps_from_trace(trace)
    assert s["kernels"] == 2 and s["kernel_ms"] == 20 / 1e3 and s["nccl_ms"] == 100 / 1e3
    assert s["busy_ms"] == 20 / 1e3 and abs(s["gap_ms"] - 100 / 1e3) < 1e-12
    assert s["host_bound_gap_ms"] == 0.0  # launched long before the gap: the GPU waited on the peer
    assert "100.00" not in format_gaps(s).split("device busy")[1]


def test_cpu_trace_has_no_device_figures():
    s = gaps_from_trace({"traceEvents": [_op("aten::mm", 0, 10)]})
    assert s["kernels"] == 0 and s["busy_ms"] == 0.0 and s["host_ops"] == []


def _range(name, ts, dur, cat="user_annotation", tid=1):
    return {"cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid}


def test_kernels_are_counted_to_the_action_whose_range_holds_their_launch():
    """Kernel time, span and idle time per (stage, kind) from the executor's "interleaf <action>" ranges, joined to
    kernels through their launches' correlation ids, whichever thread launched them."""
    trace = {"traceEvents": [
        _range("interleaf 0F0", 0, 30),
        _range("interleaf 0F0", 10, 15, cat="gpu_user_annotation"),  # its copy on the GPU timeline: not a host range
        _range("interleaf 1I0", 40, 60),
        _range("interleaf 1F0", 100, 20),
        _range("interleaf not-an-action", 130, 50),                # shares the prefix, not an action: ignored
        _launch(2, 1), _k("gemm", 10, 10, 1),                      # 0F: 10..20
        _launch(5, 2), _k("gelu", 20, 5, 2),                       # 0F: 20..25, no gap
        _launch(33, 3), _k("copy", 40, 2, 3, cat="gpu_memcpy"),    # outside every range (between them)
        _launch(35, 4), _k("ncclDevKernel_SendRecv", 36, 30, 4),   # outside, NCCL: not compute
        _launch(50, 5, tid=2), _k("gemm", 60, 20, 5),              # 1I, launched by another thread (autograd)
        _launch(85, 6, tid=2), _k("gemm", 90, 5, 6),               # 1I: idle 80..90 inside the action
        _launch(88, 7), _k("ncclDevKernel_Recv", 95, 5, 7),        # 1I, NCCL
        _launch(150, 8), _k("add", 200, 10, 8),                    # launched inside the ignored range: outside
    ]}
    s = gaps_from_trace(trace)
    a = s["actions"]
    assert list(a) == ["0F", "1F", "1I"]  # by stage, then F B I W
    assert a["0F"]["count"] == 1 and a["0F"]["host_ms"] == 30 / 1e3
    assert a["0F"]["kernel_ms"] == 15 / 1e3 and a["0F"]["span_ms"] == 15 / 1e3
    assert a["0F"]["gap_before_ms"] == 0.0 and a["0F"]["gap_inside_ms"] == 0.0
    assert a["1I"]["kernel_ms"] == 25 / 1e3 and a["1I"]["nccl_ms"] == 5 / 1e3
    assert a["1I"]["span_ms"] == 35 / 1e3
    assert a["1I"]["gap_before_ms"] == (60 - 42) / 1e3 and a["1I"]["gap_inside_ms"] == 10 / 1e3
    assert a["1F"]["count"] == 1 and a["1F"]["kernel_ms"] == 0.0 and a["1F"]["span_ms"] == 0.0
    assert s["outside_actions_kernel_ms"] == (2 + 10) / 1e3
    # every compute kernel is either in an action or outside them
    assert abs(sum(x["kernel_ms"] for x in a.values()) + s["outside_actions_kernel_ms"] - s["kernel_ms"]) < 1e-12
    text = format_gaps(s)
    assert "1I" in text and "kernel ms per kind: F 0.01, I 0.03; outside the actions 0.01" in text


def test_trace_without_action_ranges_has_no_action_table():
    s = gaps_from_trace({"traceEvents": [_launch(0, 1), _k("gemm", 5, 10, 1)]})
    assert s["actions"] is None and s["outside_actions_kernel_ms"] is None
    assert "per (stage, kind)" not in format_gaps(s)


def _executor_profile(tmp_path, annotate: bool):
    """One step of a real executor (pp=1, zb-v: stages 0 and 1, F/I/W each) under the CPU profiler, read back
    from the exported chrome trace."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.device_gaps import device_gaps
    from ds_plugins.runtime import PipelineExecutor, build_stage_modules
    from ds_plugins.schedule.registry import build_schedule

    torch.manual_seed(0)
    schedule = build_schedule("zb-v", pp=1, microbatches=3)
    layers = [torch.nn.Linear(8, 8) for _ in range(4)]
    modules = build_stage_modules(layers, schedule.shape, 0)
    inputs = [torch.randn(2, 8) for _ in range(3)]
    targets = [torch.randn(2, 8) for _ in range(3)]
    executor = PipelineExecutor(schedule, 0, modules, p2p=None, loss_fn=torch.nn.functional.mse_loss,
                                device="cpu", timing="none")
    assert executor.annotate_actions is False  # off unless asked for
    executor.annotate_actions = annotate
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        executor.run(inputs, targets)
    return device_gaps(prof, trace_path=str(tmp_path / "step.json.gz"))


def test_executor_annotates_each_compute_action_in_a_real_trace(tmp_path):
    s = _executor_profile(tmp_path, annotate=True)
    assert (tmp_path / "step.json.gz").exists()
    assert set(s["actions"]) == {"0F", "0I", "0W", "1F", "1I", "1W"}
    assert all(a["count"] == 3 for a in s["actions"].values())
    assert all(a["host_ms"] > 0 for a in s["actions"].values())
    assert s["kernels"] == 0 and s["outside_actions_kernel_ms"] == 0.0  # a CPU run: no device figures


def test_executor_does_not_annotate_by_default(tmp_path):
    assert _executor_profile(tmp_path, annotate=False)["actions"] is None
