"""Stateless multi-tensor Adam/AdamW step with the low-precision weight copy fused in (csrc/cpu_adam.cpp,
csrc/cuda_adam.cu), and its pure-torch twin.

Math (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", Alg. 2; Kingma & Ba, Alg. 1), in float32 and
in the order of torch.optim.AdamW's for-loop implementation, so results match it to the last bit or nearly:
    p = p * (1 - lr*wd)                       (adamw_mode)     |  g = g + wd*p   (Adam with L2 penalty)
    m = lerp(m, g, 1 - beta1)
    v = v * beta2 + (1 - beta2) * g * g
    p = p - lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)
    lowp = p rounded to nearest even in lowp's dtype (bf16 / fp16), written in the same pass.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._extension import native_available

__all__ = ["adamw_step_", "adamw_step_torch_"]


def adamw_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    adamw_mode: bool = True,
    bias_correction: bool = True,
    lowp_out: list[Tensor] | None = None,
) -> None:
    """One Adam(W) step, in place, over every tensor of the lists (all on one device).

    ``params``, ``exp_avgs``, ``exp_avg_sqs``: float32, contiguous. ``grads``: float32/bfloat16/float16, same
    sizes. ``step`` counts this update (1 for the first) and drives bias correction. ``lowp_out``: optional
    bfloat16/float16 tensors (pinned CPU buffers for CPU params) that receive the updated params. Non-contiguous
    or mismatched tensors raise ValueError; nothing is copied silently. Runs the native kernel of the tensors'
    device when available (see :func:`ds_plugins.ops.backend`), else the torch twin.
    """
    lowp = [] if lowp_out is None else list(lowp_out)
    if not params:
        _check_lists(params, grads, exp_avgs, exp_avg_sqs, lowp)
        return
    if native_available(params[0].device.type):
        torch.ops.interleaf.adamw_step_(
            params, grads, exp_avgs, exp_avg_sqs, lowp, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, step=step, adamw_mode=adamw_mode, bias_correction=bias_correction)
    else:
        adamw_step_torch_(
            params, grads, exp_avgs, exp_avg_sqs, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, step=step, adamw_mode=adamw_mode, bias_correction=bias_correction,
            lowp_out=lowp)


def adamw_step_torch_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    adamw_mode: bool = True,
    bias_correction: bool = True,
    lowp_out: list[Tensor] | None = None,
) -> None:
    """The pure-torch twin of :func:`adamw_step_`: same arguments, same checks, the same torch ops as
    torch.optim.AdamW(foreach=False) applied per tensor (so it equals that optimizer bit for bit)."""
    lowp = [] if lowp_out is None else list(lowp_out)
    _check_args(params, grads, exp_avgs, exp_avg_sqs, lowp, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                weight_decay=weight_decay, step=step, bias_correction=bias_correction)
    if bias_correction:
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
    else:
        bias_correction1 = bias_correction2 = 1.0
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    with torch.no_grad():
        for i, param in enumerate(params):
            grad = grads[i] if grads[i].dtype == torch.float32 else grads[i].float()
            if weight_decay != 0:
                if adamw_mode:
                    param.mul_(1 - lr * weight_decay)
                else:
                    grad = grad.add(param, alpha=weight_decay)
            exp_avgs[i].lerp_(grad, 1 - beta1)
            exp_avg_sqs[i].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sqs[i].sqrt() / bias_correction2_sqrt).add_(eps)
            param.addcdiv_(exp_avgs[i], denom, value=-step_size)
            if lowp:
                lowp[i].copy_(param)


def _check_lists(params, grads, exp_avgs, exp_avg_sqs, lowp) -> None:
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == n):
        raise ValueError(
            "adamw_step_: params, grads, exp_avgs, exp_avg_sqs must have the same length; got "
            f"{n}, {len(grads)}, {len(exp_avgs)}, {len(exp_avg_sqs)}")
    if lowp and len(lowp) != n:
        raise ValueError(f"adamw_step_: lowp_out must be empty or have one tensor per param; got {len(lowp)} for {n}")


_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOWP_DTYPES = (torch.bfloat16, torch.float16)


def _check_args(params, grads, exp_avgs, exp_avg_sqs, lowp, *, lr, beta1, beta2, eps, weight_decay, step,
                bias_correction) -> None:
    """The checks of csrc/adam_checks.h, for the twin (same conditions, same ValueError)."""
    _check_lists(params, grads, exp_avgs, exp_avg_sqs, lowp)
    if bias_correction and step < 1:
        raise ValueError(f"adamw_step_: step must be >= 1 with bias correction (it counts this update); got {step}")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"adamw_step_: betas must lie in [0, 1); got beta1={beta1}, beta2={beta2}")
    if lr < 0 or eps < 0 or weight_decay < 0:
        raise ValueError(f"adamw_step_: lr, eps and weight_decay must be >= 0; got lr={lr}, eps={eps}, "
                         f"weight_decay={weight_decay}")
    for i, param in enumerate(params):
        if param.dtype != torch.float32:
            raise ValueError(f"adamw_step_: params[{i}] has dtype {param.dtype}; the master parameters must be float32")
        if param.device != params[0].device:
            raise ValueError(f"adamw_step_: params[{i}] is on {param.device} but params[0] is on {params[0].device}")
        companions = [("params", param), ("grads", grads[i]), ("exp_avgs", exp_avgs[i]),
                      ("exp_avg_sqs", exp_avg_sqs[i])] + ([("lowp_out", lowp[i])] if lowp else [])
        for name, t in companions:
            if t.numel() != param.numel():
                raise ValueError(f"adamw_step_: {name}[{i}] has {t.numel()} elements but params[{i}] has {param.numel()}")
            if not t.is_contiguous():
                raise ValueError(f"adamw_step_: {name}[{i}] is not contiguous; pass a contiguous tensor "
                                 "(the op never copies silently)")
            if t.device != param.device:
                raise ValueError(f"adamw_step_: {name}[{i}] is on {t.device} but params[{i}] is on {param.device}; "
                                 "all tensors of one call must be on one device")
        if grads[i].dtype not in _GRAD_DTYPES:
            raise ValueError(f"adamw_step_: grads[{i}] has dtype {grads[i].dtype}; expected float32, bfloat16 or float16")
        if exp_avgs[i].dtype != torch.float32 or exp_avg_sqs[i].dtype != torch.float32:
            raise ValueError(f"adamw_step_: exp_avgs[{i}] and exp_avg_sqs[{i}] must be float32")
        if lowp and lowp[i].dtype not in _LOWP_DTYPES:
            raise ValueError(f"adamw_step_: lowp_out[{i}] has dtype {lowp[i].dtype}; expected bfloat16 or float16")
