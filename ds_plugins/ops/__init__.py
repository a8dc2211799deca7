"""Python entry to the csrc fused optimizer ops, each with a pure-torch twin (docs/ops.md).

- :func:`adamw_step_`: stateless multi-tensor Adam/AdamW, fp32 master/m/v, fp32/bf16/fp16 grads, optional fused
  bf16/fp16 copy of the updated weights. CPU (AVX-512/AVX2/scalar picked at run time) and CUDA kernels.
- :func:`backend`: which implementation serves a device now; :func:`is_native_available`.

Env vars: ``INTERLEAF_OPS=auto|native|torch`` (native: fail loudly; torch: force the twin),
``INTERLEAF_CPU_ISA=auto|avx512|avx2|scalar`` (force a CPU path).
"""
from __future__ import annotations

import torch

from ._extension import native_available, ops_mode
from .adamw import adamw_step_, adamw_step_torch_

__all__ = ["adamw_step_", "adamw_step_torch_", "backend", "is_native_available", "ops_mode"]


def is_native_available(device: str | torch.device = "cpu") -> bool:
    """True when the compiled op serves ``device`` ("cpu" or "cuda") under the INTERLEAF_OPS policy."""
    return native_available(torch.device(device).type)


def backend(device: str | torch.device = "cpu") -> str:
    """The implementation :func:`adamw_step_` uses on ``device`` now: on CPU ``"cpp-avx512"``, ``"cpp-avx2"``
    or ``"cpp-scalar"`` (INTERLEAF_CPU_ISA honoured), on CUDA ``"cuda"``; ``"torch"`` for the twin."""
    device_type = torch.device(device).type
    if not native_available(device_type):
        return "torch"
    return "cuda" if device_type == "cuda" else torch.ops.interleaf.cpu_isa()
