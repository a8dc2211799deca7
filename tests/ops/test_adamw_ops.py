"""ds_plugins.ops.adamw_step_ on CPU: against torch.optim.Adam/AdamW (for-loop), across ISAs, lowp copy, checks.

Exactness: the kernel applies torch's for-loop AdamW operations in torch's order (lerp as fma, addcmul contracted,
true divisions). The only known difference: torch's CPU sqrt goes through MKL and is not always correctly rounded,
ours is IEEE sqrt; that moves some updated params by an ulp, how many depends on the CPU (~0.01% per step on the
hosts of sessions 1-11; on session 12's AVX2 AMD EPYC torch.sqrt matched IEEE sqrt on 80% of random inputs, and
98.3-99.1% of params were bit-equal to torch's after 3 steps). So m
and v must be bit-equal to torch's (AdamW mode), params within 1e-6 of torch's, and every step's param update
bit-equal to the same operations in IEEE float32 (numpy: correctly rounded sqrt, no fused operations).
"""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

import ds_plugins.ops as ops
from ds_plugins.ops import _extension

pytestmark = pytest.mark.timeout(120)

LR, BETA1, BETA2, EPS = 1e-2, 0.9, 0.999, 1e-8
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_FLAGS = _cpu_flags()
AVAILABLE_ISAS = ["scalar"] + (["avx2"] if {"avx2", "fma", "f16c"} <= _FLAGS else []) + (
    ["avx512"] if {"avx2", "fma", "f16c", "avx512f"} <= _FLAGS else [])


@pytest.fixture(autouse=True)
def _native(monkeypatch):
    """Every test here runs the compiled op unless it says otherwise; a missing build is a failure, not a skip."""
    monkeypatch.setenv("INTERLEAF_OPS", "native")
    monkeypatch.delenv("INTERLEAF_CPU_ISA", raising=False)


def _state(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen), gen


def _ieee_update(param_before, exp_avg, exp_avg_sq, step, weight_decay, adamw_mode) -> torch.Tensor:
    """The kernel's (and torch's for-loop) param update in IEEE float32, from this step's m and v: decoupled decay
    (AdamW), then ``p + (-lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)``; the scalars rounded to float32 from
    double, as the kernel's coefficients are."""
    f32 = np.float32
    p = param_before.numpy().astype(f32)
    if adamw_mode and weight_decay:
        p = p * f32(1.0 - LR * weight_decay)
    denom = np.sqrt(exp_avg_sq.numpy()) / f32(math.pow(1.0 - BETA2 ** step, 0.5)) + f32(EPS)
    return torch.from_numpy(p + (f32(-(LR / (1.0 - BETA1 ** step))) * exp_avg.numpy()) / denom)


def _run_against_torch(n, grad_dtype, weight_decay, adamw_mode, lowp_dtype, steps=3, ieee_steps=None):
    """``ieee_steps``: a list that gets, per step, whether the kernel's param update was bit-equal to
    :func:`_ieee_update` (None: not checked)."""
    param0, gen = _state(n, seed=n)
    ref = param0.clone().requires_grad_(True)
    optimizer_cls = torch.optim.AdamW if adamw_mode else torch.optim.Adam
    ref_opt = optimizer_cls([ref], lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=weight_decay, foreach=False)
    param, exp_avg, exp_avg_sq = param0.clone(), torch.zeros(n), torch.zeros(n)
    lowp = torch.empty(n, dtype=lowp_dtype)
    for step in range(1, steps + 1):
        grad = torch.randn(n, generator=gen).to(grad_dtype)
        ref.grad = grad.float()
        ref_opt.step()
        before = param.clone()
        ops.adamw_step_([param], [grad], [exp_avg], [exp_avg_sq], lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS,
                        weight_decay=weight_decay, step=step, adamw_mode=adamw_mode, lowp_out=[lowp])
        if ieee_steps is not None:
            ieee_steps.append(torch.equal(param, _ieee_update(before, exp_avg, exp_avg_sq, step, weight_decay,
                                                              adamw_mode)))
    state = ref_opt.state[ref]
    return param, exp_avg, exp_avg_sq, lowp, ref.detach(), state["exp_avg"], state["exp_avg_sq"]


@pytest.mark.parametrize("n", [1, 7, 1025, 1_000_003])
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("adamw_mode", [True, False])
def test_matches_torch_adam(n, grad_dtype, weight_decay, adamw_mode):
    lowp_dtype = torch.bfloat16 if grad_dtype != torch.float16 else torch.float16
    ieee_steps: list[bool] = []
    param, m, v, lowp, ref, ref_m, ref_v = _run_against_torch(n, grad_dtype, weight_decay, adamw_mode, lowp_dtype,
                                                              ieee_steps=ieee_steps)
    if adamw_mode or weight_decay == 0:  # the params' sqrt-ulp differences never feed back into m and v
        assert torch.equal(m, ref_m)
        assert torch.equal(v, ref_v)
    torch.testing.assert_close(m, ref_m, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(v, ref_v, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(param, ref, rtol=1e-6, atol=1e-6)
    assert ieee_steps == [True, True, True]  # every step's update exactly the IEEE float32 operations
    assert (param == ref).float().mean().item() >= 0.95  # the rest is torch's MKL sqrt (module docstring)
    assert torch.equal(lowp, param.to(lowp_dtype))


def test_twin_equals_torch_adamw_bitwise(monkeypatch):
    monkeypatch.setenv("INTERLEAF_OPS", "torch")
    assert ops.backend() == "torch"
    for adamw_mode in (True, False):
        param, m, v, lowp, ref, ref_m, ref_v = _run_against_torch(
            4099, torch.bfloat16, 0.1, adamw_mode, torch.bfloat16)
        assert torch.equal(param, ref) and torch.equal(m, ref_m) and torch.equal(v, ref_v)
        assert torch.equal(lowp, param.to(torch.bfloat16))


def _multi_tensor_inputs(seed: int):
    """Several tensors, odd sizes, one crossing a 64K-element chunk boundary, an empty one, mixed dtypes."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [1, 15, 17, 0, 70_001, 1025]
    grad_dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.float16, torch.bfloat16]
    lowp_dtypes = [torch.bfloat16, torch.float16, torch.bfloat16, torch.float16, torch.bfloat16, torch.float16]
    params = [torch.randn(n, generator=gen) for n in sizes]
    grads = [torch.randn(n, generator=gen).to(d) for n, d in zip(sizes, grad_dtypes)]
    exp_avgs = [torch.randn(n, generator=gen) * 0.1 for n in sizes]
    exp_avg_sqs = [torch.rand(n, generator=gen) * 0.01 for n in sizes]
    lowp = [torch.empty(n, dtype=d) for n, d in zip(sizes, lowp_dtypes)]
    lowp[4] = torch.empty(sizes[4] + 1, dtype=lowp_dtypes[4])[1:]  # contiguous but not vector-aligned
    return params, grads, exp_avgs, exp_avg_sqs, lowp


def _clone(tensors):
    return [t.clone() for t in tensors]


@pytest.mark.parametrize("adamw_mode,bias_correction", [(True, True), (False, True), (True, False)])
def test_isa_paths_agree_bitwise(monkeypatch, adamw_mode, bias_correction):
    results = {}
    for isa in AVAILABLE_ISAS:
        monkeypatch.setenv("INTERLEAF_CPU_ISA", isa)
        assert ops.backend() == f"cpp-{isa}"
        params, grads, exp_avgs, exp_avg_sqs, lowp = _multi_tensor_inputs(seed=3)
        for step in (1, 2, 3):
            ops.adamw_step_(params, grads, exp_avgs, exp_avg_sqs, lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS,
                            weight_decay=0.05, step=step, adamw_mode=adamw_mode, bias_correction=bias_correction,
                            lowp_out=lowp)
        results[isa] = (params, exp_avgs, exp_avg_sqs, lowp)
    scalar = results["scalar"]
    for isa, result in results.items():
        for got_list, want_list in zip(result, scalar):
            for got, want in zip(got_list, want_list):
                assert torch.equal(got, want), f"{isa} differs from scalar"
    # and the same multi-tensor call agrees with the twin (bias_correction=False included)
    monkeypatch.setenv("INTERLEAF_OPS", "torch")
    params, grads, exp_avgs, exp_avg_sqs, lowp = _multi_tensor_inputs(seed=3)
    for step in (1, 2, 3):
        ops.adamw_step_(params, grads, exp_avgs, exp_avg_sqs, lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS,
                        weight_decay=0.05, step=step, adamw_mode=adamw_mode, bias_correction=bias_correction,
                        lowp_out=lowp)
    for got, want in zip(params, scalar[0]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_forcing_an_unknown_isa_raises(monkeypatch):
    monkeypatch.setenv("INTERLEAF_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="INTERLEAF_CPU_ISA"):
        ops.backend()


def _special_values() -> torch.Tensor:
    """Random bit patterns (all finite exponents), bf16/fp16 rounding ties, fp16 overflow and subnormal range."""
    gen = torch.Generator().manual_seed(7)
    bits = torch.randint(0, 2**31 - 1, (20_000,), generator=gen, dtype=torch.int64)
    bits = bits & ~(0xFF << 23) | (torch.randint(1, 255, (20_000,), generator=gen) << 23)  # no inf/nan
    random_floats = bits.to(torch.int32).view(torch.float32)
    ties_bf16 = (random_floats[:4096].view(torch.int32) & ~0xFFFF | 0x8000).view(torch.float32)  # exact halves
    ties_fp16 = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 65504.0, 65519.0, 65520.0, 2**-24 * 1.5, 2**-25,
                              2**-25 * 1.0000001, 2**-14 * 0.75, 6e-8, -6e-8, 0.0, -0.0, float("inf"), -float("inf")])
    scaled = torch.randn(8192, generator=gen) * torch.logspace(-9, 6, 8192)
    values = torch.cat([random_floats, ties_bf16, ties_fp16, scaled, -scaled])
    return values.clone()


@pytest.mark.parametrize("lowp_dtype", [torch.bfloat16, torch.float16])
def test_lowp_copy_rounds_like_torch(monkeypatch, lowp_dtype):
    """lr=0 and zero grads leave params unchanged, so lowp_out must equal param.to(dtype) bit for bit."""
    values = _special_values()
    expected = values.to(lowp_dtype).view(torch.int16)
    for isa in AVAILABLE_ISAS:
        monkeypatch.setenv("INTERLEAF_CPU_ISA", isa)
        param = values.clone()
        lowp = torch.empty_like(param, dtype=lowp_dtype)
        ops.adamw_step_([param], [torch.zeros_like(param)], [torch.zeros_like(param)], [torch.zeros_like(param)],
                        lr=0.0, beta1=BETA1, beta2=BETA2, eps=EPS, weight_decay=0.0, step=1, lowp_out=[lowp])
        assert torch.equal(param.view(torch.int32), values.view(torch.int32))
        mismatch = (lowp.view(torch.int16) != expected).nonzero().flatten()
        assert mismatch.numel() == 0, (isa, values[mismatch[:5]].tolist())


def test_opcheck():
    params, grads, exp_avgs, exp_avg_sqs, lowp = _multi_tensor_inputs(seed=5)
    kwargs = dict(lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS, weight_decay=0.01, step=2, adamw_mode=True,
                  bias_correction=True)
    ops.is_native_available("cpu")  # loads the library (and its fake kernel)
    torch.library.opcheck(torch.ops.interleaf.adamw_step_.default, (params, grads, exp_avgs, exp_avg_sqs, lowp),
                          kwargs)
    torch.library.opcheck(torch.ops.interleaf.adamw_step_.default, (params, grads, exp_avgs, exp_avg_sqs, []),
                          kwargs)


def _good_args(n=64):
    return [torch.randn(n)], [torch.randn(n)], [torch.zeros(n)], [torch.zeros(n)]


@pytest.mark.parametrize("ops_mode", ["native", "torch"])
@pytest.mark.parametrize("case", ["param_strided", "grad_strided", "lowp_strided", "numel", "param_dtype",
                                  "grad_dtype", "lowp_dtype", "lengths", "step0", "beta"])
def test_bad_arguments_raise(monkeypatch, ops_mode, case):
    monkeypatch.setenv("INTERLEAF_OPS", ops_mode)
    params, grads, exp_avgs, exp_avg_sqs = _good_args()
    lowp = [torch.empty(64, dtype=torch.bfloat16)]
    hyper = dict(lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS, weight_decay=0.0, step=1)
    if case == "param_strided":
        params = [torch.randn(128)[::2]]
    elif case == "grad_strided":
        grads = [torch.randn(64, 2)[:, 0]]
    elif case == "lowp_strided":
        lowp = [torch.empty(128, dtype=torch.bfloat16)[::2]]
    elif case == "numel":
        exp_avgs = [torch.zeros(63)]
    elif case == "param_dtype":
        params = [torch.randn(64, dtype=torch.float64)]
    elif case == "grad_dtype":
        grads = [torch.randn(64, dtype=torch.float64)]
    elif case == "lowp_dtype":
        lowp = [torch.empty(64)]
    elif case == "lengths":
        grads = grads * 2
    elif case == "step0":
        hyper["step"] = 0
    elif case == "beta":
        hyper["beta2"] = 1.0
    before = params[0].clone()
    with pytest.raises(ValueError):
        ops.adamw_step_(params, grads, exp_avgs, exp_avg_sqs, lowp_out=lowp, **hyper)
    assert torch.equal(params[0], before)  # refused before touching anything


def test_load_failure_warns_once_and_uses_twin(monkeypatch, caplog):
    def fail(module):
        raise ImportError("simulated: extension missing")

    monkeypatch.setenv("INTERLEAF_OPS", "auto")
    monkeypatch.setattr(_extension, "_loaded", {})
    monkeypatch.setattr(_extension, "_warned", False)
    monkeypatch.setattr(_extension, "_load_prebuilt", fail)
    monkeypatch.setattr(_extension, "_load_jit", lambda *a, **k: fail(None))
    with caplog.at_level(logging.WARNING, logger=_extension.__name__):
        assert ops.backend() == "torch"
        params, grads, exp_avgs, exp_avg_sqs = _good_args()
        want = _clone(params)
        ops.adamw_step_torch_(want, grads, _clone(exp_avgs), _clone(exp_avg_sqs), lr=LR, beta1=BETA1, beta2=BETA2,
                              eps=EPS, weight_decay=0.0, step=1)
        ops.adamw_step_(params, grads, exp_avgs, exp_avg_sqs, lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS,
                        weight_decay=0.0, step=1)
        assert torch.equal(params[0], want[0])
        assert not ops.is_native_available()
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    monkeypatch.setenv("INTERLEAF_OPS", "native")
    monkeypatch.setattr(_extension, "_loaded", {})
    with pytest.raises(RuntimeError, match="INTERLEAF_OPS=native"):
        ops.backend()


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16])
def test_every_16bit_grad_decodes_like_torch(monkeypatch, grad_dtype):
    """All 65536 bit patterns (NaN excluded) as grads: m and v after one step equal the twin's bit for bit on
    every ISA, so each path widens bf16/fp16 (subnormals, infinities) exactly as torch does."""
    grad = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(grad_dtype)
    grad = grad[~torch.isnan(grad)].contiguous()
    n = grad.numel()
    hyper = dict(lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS, weight_decay=0.0, step=1)
    want_m, want_v = torch.full((n,), 0.25), torch.full((n,), 0.5)
    ops.adamw_step_torch_([torch.ones(n)], [grad], [want_m], [want_v], **hyper)
    for isa in AVAILABLE_ISAS:
        monkeypatch.setenv("INTERLEAF_CPU_ISA", isa)
        m, v = torch.full((n,), 0.25), torch.full((n,), 0.5)
        ops.adamw_step_([torch.ones(n)], [grad], [m], [v], **hyper)
        assert torch.equal(m, want_m), isa
        assert torch.equal(v, want_v), isa


_OPENMP_PROBE = r"""
import json, torch
from ds_plugins.ops.runtimes import loaded_openmp_runtimes
before = loaded_openmp_runtimes()
import ds_plugins.ops as ops
assert ops.backend("cpu").startswith("cpp-"), ops.backend("cpu")
torch.set_num_threads(2)
n = 3 * (1 << 16)  # three chunks: both threads get work
p, g, m, v = torch.randn(n), torch.randn(n), torch.zeros(n), torch.zeros(n)
ops.adamw_step_([p], [g], [m], [v], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
print(json.dumps({"before": before, "after": loaded_openmp_runtimes(),
                  "info": list(torch.ops.interleaf.cpu_threads_info())}))
"""


@pytest.mark.timeout(120)
def test_op_shares_torchs_openmp_runtime():
    """Loading and running the CPU op maps no OpenMP runtime besides torch's (a second one would double the
    threads on the cores and miss torch.set_num_threads), and the op reports the threads it ran on. Fresh
    process: this one may have loaded the op already."""
    import json
    import os
    import subprocess
    import sys

    if not ops.is_native_available("cpu"):
        pytest.skip("native CPU op not built")
    env = dict(os.environ, INTERLEAF_OPS="native", OMP_NUM_THREADS="2")
    env.pop("INTERLEAF_CPU_ISA", None)
    out = subprocess.run([sys.executable, "-c", _OPENMP_PROBE], env=env, capture_output=True, text=True,
                         timeout=100)
    assert out.returncode == 0, out.stderr[-2000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(probe["before"]) == 1, f"torch itself maps {probe['before']}"
    assert probe["after"] == probe["before"], f"our op mapped another OpenMP runtime: {probe['after']}"
    omp_max_threads, torch_threads, threads_last_call = probe["info"]
    assert omp_max_threads == torch_threads == 2  # the op's runtime sees torch.set_num_threads
    assert threads_last_call == 2


def test_openmp_link_args(monkeypatch, tmp_path):
    """The extension links the one runtime torch mapped, by path; with none or several it falls back to
    -fopenmp; INTERLEAF_OPENMP_LINK=system forces -fopenmp."""
    from ds_plugins.ops import runtimes as openmp

    runtime = tmp_path / "libgomp-a34b3233.so.1"
    runtime.write_bytes(b"")
    maps = tmp_path / "maps"
    maps.write_text(f"7f00-7f10 r-xp 00000000 08:01 1 {runtime}\n"
                    "7f10-7f20 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
                    "7f20-7f30 r--p 00000000 00:00 0 [heap]\n")
    assert openmp.loaded_openmp_runtimes(str(maps)) == [str(runtime)]
    assert openmp.loaded_openmp_runtimes(str(tmp_path / "missing")) == []
    monkeypatch.setattr(openmp, "loaded_openmp_runtimes", lambda: [str(runtime)])
    monkeypatch.delenv("INTERLEAF_OPENMP_LINK", raising=False)
    assert openmp.openmp_link_args() == [str(runtime)]
    monkeypatch.setenv("INTERLEAF_OPENMP_LINK", "system")
    assert openmp.openmp_link_args() == ["-fopenmp"]
    monkeypatch.delenv("INTERLEAF_OPENMP_LINK")
    monkeypatch.setattr(openmp, "loaded_openmp_runtimes", lambda: [str(runtime), "/usr/lib/libgomp.so.1"])
    assert openmp.openmp_link_args() == ["-fopenmp"]


def test_libstdcxx_link_args(monkeypatch, tmp_path):
    """A toolchain with only a static libstdc++ (``-print-file-name=libstdc++.so`` prints the bare name) gets the
    libstdc++.so torch's process mapped, by path; a toolchain with a shared one gets nothing extra."""
    from ds_plugins.ops import runtimes

    lib = tmp_path / "libstdc++.so.6.0.33"
    lib.write_bytes(b"")
    maps = tmp_path / "maps"
    maps.write_text(f"7f00-7f10 r-xp 00000000 08:01 1 {lib}\n"
                    "7f10-7f20 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert runtimes.loaded_libraries(runtimes.LIBSTDCXX_PATTERN, str(maps)) == [str(lib)]
    fake = tmp_path / "fake-g++"
    fake.write_text("#!/bin/sh\necho libstdc++.so\n")  # what a static-only GCC prints
    fake.chmod(0o755)
    assert not runtimes.compiler_has_shared_libstdcxx(str(fake))
    monkeypatch.setattr(runtimes, "loaded_libraries", lambda pattern, maps_path="": [str(lib)])
    assert runtimes.libstdcxx_link_args(str(fake)) == [str(lib)]
    fake.write_text(f"#!/bin/sh\necho {tmp_path}/libstdc++.so\n")  # a shared library found
    assert runtimes.compiler_has_shared_libstdcxx(str(fake))
    assert runtimes.libstdcxx_link_args(str(fake)) == []
    assert runtimes.compiler_has_shared_libstdcxx(str(tmp_path / "no-such-compiler"))  # cannot ask: leave alone


_REFUSAL_PROBE = r"""
import torch
import ds_plugins.ops as ops
assert ops.backend("cpu").startswith("cpp-"), ops.backend("cpu")
p = torch.randn(128)
try:
    ops.adamw_step_([p[::2]], [torch.zeros(64)], [torch.zeros(64)], [torch.zeros(64)], lr=1e-3, beta1=0.9,
                    beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
except ValueError as error:
    print("refused:", error)
"""


@pytest.mark.timeout(120)
def test_refusal_message_formats_in_a_fresh_process():
    """A refused call builds its message with ostream formatting inside the extension (c10::str of an index):
    with a private static libstdc++ in the extension that crashed the process (SIGSEGV) instead of raising.
    Fresh process, native op forced."""
    import os
    import subprocess
    import sys

    if not ops.is_native_available("cpu"):
        pytest.skip("native CPU op not built")
    env = dict(os.environ, INTERLEAF_OPS="native")
    out = subprocess.run([sys.executable, "-c", _REFUSAL_PROBE], env=env, capture_output=True, text=True,
                         timeout=100)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert "refused: interleaf::adamw_step_: params[0] is not contiguous" in out.stdout
