"""Loading of the csrc extensions: the prebuilt modules from setup.py, else a JIT build, else nothing.

``INTERLEAF_OPS`` picks the policy: ``auto`` (default: native if it loads, else one warning and the torch twin),
``native`` (a load failure raises) or ``torch`` (never load; always the twin). JIT builds go to
``TORCH_EXTENSIONS_DIR`` (torch's default cache when unset) and need the csrc/ sources next to the package,
which an editable install or a source checkout has.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import threading
from pathlib import Path

import torch

from .runtimes import libstdcxx_link_args, openmp_link_args

logger = logging.getLogger(__name__)

OPS_MODE_ENV = "INTERLEAF_OPS"
_MODES = ("auto", "native", "torch")
_CSRC = Path(__file__).resolve().parents[2] / "csrc"
_CPU_SOURCES = ("cpu_adam.cpp", "cpu_adam_scalar.cpp", "cpu_adam_avx2.cpp", "cpu_adam_avx512.cpp")
_CUDA_SOURCES = ("cuda_adam.cu",)
# Same flags as setup.py: -ffp-contract=off keeps all ISAs bit-identical; no -march=native.
_CPU_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]

_lock = threading.Lock()
_loaded: dict[str, bool] = {}
_warned = False


def ops_mode() -> str:
    """The INTERLEAF_OPS policy in force (``auto``, ``native`` or ``torch``)."""
    mode = os.environ.get(OPS_MODE_ENV, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"{OPS_MODE_ENV} must be one of {', '.join(_MODES)}; got {mode!r}")
    return mode


def _load_prebuilt(module: str) -> bool:
    spec = importlib.util.find_spec(f"ds_plugins.ops.{module}")
    if spec is None or spec.origin is None:
        return False
    torch.ops.load_library(spec.origin)
    logger.debug("loaded prebuilt %s from %s", module, spec.origin)
    return True


def _load_jit(name: str, sources: tuple[str, ...], cuda: bool) -> None:
    from torch.utils import cpp_extension

    paths = [str(_CSRC / s) for s in sources]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"no prebuilt extension and no sources to JIT-build it from: {missing}")
    logger.info("JIT-building %s from %s (once per TORCH_EXTENSIONS_DIR)", name, _CSRC)
    cpp_extension.load(
        name=name,
        sources=paths,
        extra_cflags=["-O3"] if cuda else _CPU_FLAGS,
        extra_cuda_cflags=["-O3"] if cuda else None,
        extra_ldflags=([] if cuda else openmp_link_args()) + libstdcxx_link_args(),
        is_python_module=False,
        verbose=False,
    )


def _load(kind: str) -> bool:
    """Load the ``cpu`` or ``cuda`` op library once; True when its kernels are registered."""
    with _lock:
        if kind in _loaded:
            return _loaded[kind]
        if kind == "cuda" and not _load_locked("cpu"):  # the CPU library defines the op schema
            _loaded[kind] = False
            return False
        return _load_locked(kind)


def _load_locked(kind: str) -> bool:
    if kind in _loaded:
        return _loaded[kind]
    module, sources = ("_interleaf_cpu", _CPU_SOURCES) if kind == "cpu" else ("_interleaf_cuda", _CUDA_SOURCES)
    try:
        if kind == "cuda" and (torch.version.cuda is None or not torch.cuda.is_available()):
            raise RuntimeError("torch has no usable CUDA")
        if not _load_prebuilt(module):
            _load_jit(f"interleaf_{kind}_ops", sources, cuda=kind == "cuda")
        _register_fake_once()
        _loaded[kind] = True
    except Exception as error:  # noqa: BLE001 - any build/load failure means: use the torch twin
        if ops_mode() == "native":
            raise RuntimeError(f"INTERLEAF_OPS=native but the {kind} op library failed to load: {error}") from error
        _warn_once(kind, error)
        _loaded[kind] = False
    return _loaded[kind]


def _warn_once(kind: str, error: BaseException) -> None:
    global _warned
    if not _warned:
        reason = str(error).strip()
        reason = reason if len(reason) <= 400 else reason[:400] + " ..."
        logger.warning(
            "interleaf native %s ops unavailable (%s: %s); using the pure-torch twin (same math, slower). "
            "Set %s=torch to silence this.", kind, type(error).__name__, reason, OPS_MODE_ENV)
        _warned = True


_fake_registered = False


def _register_fake_once() -> None:
    """Shape-only (fake/meta) implementation: the op returns nothing and mutates in place."""
    global _fake_registered
    if _fake_registered:
        return

    @torch.library.register_fake("interleaf::adamw_step_")
    def _adamw_step_fake(params, grads, exp_avgs, exp_avg_sqs, lowp_out, *, lr, beta1, beta2, eps,
                         weight_decay, step, adamw_mode, bias_correction):
        return None

    _fake_registered = True


def native_available(device_type: str) -> bool:
    """True when the native op serves tensors on ``device_type`` ("cpu" or "cuda") under the current policy."""
    if ops_mode() == "torch" or device_type not in ("cpu", "cuda"):
        return False
    return _load(device_type)
