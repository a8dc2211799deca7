"""Test-only shim: lets megatron-core 0.16's CUDA-assuming code run on CPU with gloo.

NEVER imported by the shipped package. megatron-core's schedules, P2P communicator, memory buffer, sequence-
parallel linear backward and attention RNG tracker hard-code CUDA (``torch.zeros(..., device="cuda")``,
``torch.cuda.current_device()``, ``torch.cuda.synchronize()``, ``get_cuda_rng_tracker().fork()``,
``tensor.cuda()``). :func:`install` maps all of these to the CPU inside the (spawned, test-only) process.
"""
from __future__ import annotations

import contextlib
import functools

import torch

_installed = False
_CPU = torch.device("cpu")


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _cpu_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = _CPU
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return wrapper


def install() -> None:
    """Map megatron-core's CUDA calls to the CPU for this process (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    for name in ("zeros", "empty", "ones", "full", "tensor", "arange", "randn", "rand", "zeros_like",
                 "empty_like", "ones_like"):
        setattr(torch, name, _cpu_factory(getattr(torch, name)))
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.device_count = lambda: 0
    torch.Tensor.cuda = lambda self, *a, **k: self

    original_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and _is_cuda(args[0]):
            args = (_CPU,) + args[1:]
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = _CPU
        return original_to(self, *args, **kwargs)

    torch.Tensor.to = to

    from megatron.core.tensor_parallel import random as mcore_random

    class _CpuRngTracker(mcore_random.CudaRNGStatesTracker):
        """Forks the CPU generator instead of a CUDA one (dropout is 0 in these tests)."""

        def add(self, name, seed):
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()
            self.seeds_.add(seed)

        @contextlib.contextmanager
        def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            yield

    tracker = _CpuRngTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER = tracker
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mcore_random.get_cuda_rng_tracker = lambda *a, **k: tracker
    mcore_random.model_parallel_cuda_manual_seed = lambda seed, *a, **k: torch.manual_seed(seed)
    # Activation recompute (megatron's CheckpointFunction) saves and restores the CUDA RNG state around the
    # recomputed forward: the CPU generator's state stands in for it (dropout is 0 here, so nothing draws from it).
    mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
