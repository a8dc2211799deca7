"""ds_plugins.ops.adamw_step_ on CUDA (device machine only): bit-equal to the CPU kernel, close to torch's fused
AdamW, exact low-precision copy, multi-launch tables, argument checks, opcheck."""
from __future__ import annotations

import pytest
import torch

import ds_plugins.ops as ops

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]

LR, BETA1, BETA2, EPS, WD = 1e-2, 0.9, 0.999, 1e-8, 0.05


@pytest.fixture(autouse=True)
def _native(monkeypatch):
    monkeypatch.setenv("INTERLEAF_OPS", "native")
    monkeypatch.delenv("INTERLEAF_CPU_ISA", raising=False)
    yield
    # An asynchronous CUDA error surfaces here, in the test that caused it, not in the next one. (A sticky error
    # still poisons the process: run each gpu test file in its own pytest process, as docs/ops.md says.)
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _inputs(sizes, grad_dtypes, lowp_dtypes, seed, device):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen) for n in sizes]
    grads = [[torch.randn(n, generator=gen).to(d) for n, d in zip(sizes, grad_dtypes)] for _ in range(3)]
    exp_avgs = [torch.zeros(n) for n in sizes]
    exp_avg_sqs = [torch.zeros(n) for n in sizes]
    lowp = [torch.empty(n, dtype=d) for n, d in zip(sizes, lowp_dtypes)]
    move = lambda ts: [t.to(device) for t in ts]  # noqa: E731
    return move(params), [move(g) for g in grads], move(exp_avgs), move(exp_avg_sqs), move(lowp)


def test_backend_is_native():
    assert ops.backend("cuda") == "cuda"


# 64 tensors per launch, one block per 64K elements. The first 72 tensors form one (fp32 grad, bf16 lowp) group
# that needs two launches; the rest cover the other dtype pairs; the 22M tensor has 336 blocks in one launch.
SIZES = [1, 7, 1025, 65_536, 65_537, 1_000_003] * 12 + [3, 5, 22_000_001, 9, 11, 13, 4097, 100_003]
SAME_GROUP = 72


@pytest.mark.parametrize("adamw_mode", [True, False])
def test_cuda_equals_cpu_kernel_bitwise(adamw_mode):
    grad_dtypes = [torch.float32 if i < SAME_GROUP else (torch.float32, torch.bfloat16, torch.float16)[i % 3]
                   for i in range(len(SIZES))]
    lowp_dtypes = [torch.bfloat16 if i < SAME_GROUP else (torch.bfloat16, torch.float16)[i % 2]
                   for i in range(len(SIZES))]
    cpu = _inputs(SIZES, grad_dtypes, lowp_dtypes, seed=1, device="cpu")
    gpu = _inputs(SIZES, grad_dtypes, lowp_dtypes, seed=1, device="cuda")
    for (params, grads, exp_avgs, exp_avg_sqs, lowp) in (cpu, gpu):
        for step in (1, 2, 3):
            ops.adamw_step_(params, grads[step - 1], exp_avgs, exp_avg_sqs, lr=LR, beta1=BETA1, beta2=BETA2,
                            eps=EPS, weight_decay=WD, step=step, adamw_mode=adamw_mode, lowp_out=lowp)
    torch.cuda.synchronize()
    for name, i in (("params", 0), ("exp_avgs", 2), ("exp_avg_sqs", 3), ("lowp", 4)):
        for k, (want, got) in enumerate(zip(cpu[i], gpu[i])):
            assert torch.equal(want, got.cpu()), f"{name}[{k}] (numel {want.numel()}) differs between CPU and CUDA"
    for p, low in zip(gpu[0], gpu[4]):
        assert torch.equal(low, p.to(low.dtype))


def _one_minus_in_float32_rel_error(beta: float) -> float:
    """Relative difference between 1 - beta evaluated in float32 from float32(beta) (what torch's fused CUDA
    AdamW does with its opmath constants) and float32(1 - beta) evaluated in double (ours, and torch's CPU
    AdamW). For beta2 = 0.999 this is 1.29e-5: float32(0.999) = 0.99900001287."""
    in_float = (torch.tensor(1.0, dtype=torch.float32) - torch.tensor(beta, dtype=torch.float32)).item()
    in_double = torch.tensor(1.0 - beta, dtype=torch.float32).item()
    return abs(in_float - in_double) / in_double


def test_close_to_torch_fused_adamw():
    """Against torch's fused CUDA AdamW, which rounds differently (constants such as 1 - beta2 and the bias
    corrections evaluated in float32, its own operation order / contraction), so the comparison is to tolerances
    derived from float32 rounding; bit equality is checked against our CPU kernel above.

    Per element and step each side rounds a few times (unit roundoff u = 2**-24). exp_avg_sq is a sum of
    positive terms (1 - beta2) * beta2**k * g**2: no cancellation, so its relative error is the constant's
    difference (delta2, 1.29e-5) plus a few u per step. exp_avg can cancel, so its error is bounded in absolute
    terms by a few u per step times its scale max|g|. The params see the update through m_hat / sqrt(v_hat),
    where delta2 cancels between v and 1 - beta2**step to first order: a few u per step of |p| plus a few u of
    each update (of size ~lr), with a margin of 2 delta2 * lr per step in case it does not cancel."""
    n, steps = 4_000_037, 5
    u = 2.0**-24
    gen = torch.Generator().manual_seed(2)
    p0 = torch.randn(n, generator=gen).cuda()
    ref = p0.clone().requires_grad_(True)
    ref_opt = torch.optim.AdamW([ref], lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=WD, fused=True)
    param, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    lowp = torch.empty_like(p0, dtype=torch.bfloat16)
    grad_max = 0.0
    for step in range(1, steps + 1):
        grad = torch.randn(n, generator=gen).cuda()
        grad_max = max(grad_max, grad.abs().max().item())
        ref.grad = grad.clone()
        ref_opt.step()
        ops.adamw_step_([param], [grad], [m], [v], lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS, weight_decay=WD,
                        step=step, lowp_out=[lowp])
    state = ref_opt.state[ref]
    delta1, delta2 = _one_minus_in_float32_rel_error(BETA1), _one_minus_in_float32_rel_error(BETA2)
    ulps = 8 * steps * u  # 8 roundings per step and element, a generous count for either side
    torch.testing.assert_close(m, state["exp_avg"], rtol=delta1 + ulps, atol=ulps * grad_max)
    torch.testing.assert_close(v, state["exp_avg_sq"], rtol=delta2 + ulps,
                               atol=ulps * (1 - BETA2) * grad_max**2)
    torch.testing.assert_close(param, ref.detach(), rtol=ulps, atol=steps * LR * (2 * delta2 + 16 * u))
    assert torch.equal(lowp, param.to(torch.bfloat16))


def test_cuda_rejects_noncontiguous_and_cpu_lowp():
    p = torch.randn(128, device="cuda")
    args = dict(lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS, weight_decay=0.0, step=1)
    with pytest.raises(ValueError, match="contiguous"):
        ops.adamw_step_([p[::2]], [torch.randn(64, device="cuda")], [torch.zeros(64, device="cuda")],
                        [torch.zeros(64, device="cuda")], **args)
    with pytest.raises(ValueError, match="device"):
        ops.adamw_step_([p], [torch.randn(128, device="cuda")], [torch.zeros_like(p)], [torch.zeros_like(p)],
                        lowp_out=[torch.empty(128, dtype=torch.bfloat16).pin_memory()], **args)


def test_opcheck_cuda():
    sizes = [1, 1025, 70_001]
    params, grads, exp_avgs, exp_avg_sqs, lowp = _inputs(
        sizes, [torch.float32, torch.bfloat16, torch.float16], [torch.bfloat16] * 3, seed=4, device="cuda")
    kwargs = dict(lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS, weight_decay=WD, step=1, adamw_mode=True,
                  bias_correction=True)
    torch.library.opcheck(torch.ops.interleaf.adamw_step_.default,
                          (params, grads[0], exp_avgs, exp_avg_sqs, lowp), kwargs)


def test_cpu_update_writes_pinned_lowp_then_h2d():
    """The offload path: CPU master params, bf16 copy into a pinned buffer, then an async copy to the GPU."""
    n = 1_000_003
    gen = torch.Generator().manual_seed(5)
    param, grad = torch.randn(n, generator=gen), torch.randn(n, generator=gen).to(torch.bfloat16)
    m, v = torch.zeros(n), torch.zeros(n)
    pinned = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
    ops.adamw_step_([param], [grad], [m], [v], lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS, weight_decay=WD, step=1,
                    lowp_out=[pinned])
    on_gpu = pinned.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.cpu(), param.to(torch.bfloat16))


@pytest.mark.parametrize("misaligned", ["param", "grad", "lowp", "none"])
def test_cuda_vector_and_scalar_paths_agree_with_cpu(misaligned):
    """A tensor whose pointers allow 16-byte access takes the vector path (plus a scalar tail), a misaligned one
    (a view one element in) the scalar path; both must equal the CPU kernel bit for bit."""
    n = 200_003
    gen = torch.Generator().manual_seed(6)
    base = {k: torch.randn(n + 1, generator=gen) for k in ("param", "grad", "m")}
    base["v"] = torch.rand(n + 1, generator=gen)

    def view(name, tensor):
        return tensor[1:] if misaligned == name else tensor[:n]

    results = []
    for device in ("cpu", "cuda"):
        param = view("param", base["param"].to(device).clone())
        grad = view("grad", base["grad"].to(device, torch.bfloat16).clone())
        m, v = base["m"][:n].to(device).clone(), base["v"][:n].to(device).clone()
        lowp = view("lowp", torch.empty(n + 1, dtype=torch.float16, device=device))
        for step in (1, 2):
            ops.adamw_step_([param], [grad], [m], [v], lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS, weight_decay=WD,
                            step=step, lowp_out=[lowp])
        results.append([t.cpu() for t in (param, m, v, lowp)])
    for want, got in zip(*results):
        assert torch.equal(want, got)
