"""benchmarks/device_gaps.py on a hand-made chrome trace (the format torch.profiler exports on CUDA)."""
from benchmarks.device_gaps import format_gaps, gaps_from_trace


def _k(name, ts, dur, corr, cat="kernel"):
    return {"cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}


def _launch(ts, corr, cat="cuda_runtime"):
    return {"cat": cat, "name": "cudaLaunchKernel", "ts": ts, "dur": 3, "args": {"correlation": corr}}


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
