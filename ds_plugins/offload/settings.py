"""Reading and checking the offload part of a DeepSpeed config (torch-free)."""
from __future__ import annotations

from typing import Any, Mapping

from ..config import CONFIG_KEY, InterleafConfig, OffloadConfig

__all__ = ["offload_config_from_ds_config"]

_EXAMPLE = (
    '"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": true}}, '
    f'"{CONFIG_KEY}": {{"offload": {{"mode": "interleaved", "gpu_fraction": "auto"}}}}'
)


def offload_config_from_ds_config(ds_config: Mapping[str, Any] | None) -> OffloadConfig | None:
    """The ``"interleaf": {"offload": ...}`` block, checked against the rest of the DeepSpeed config.

    None when the block is absent (DeepSpeed runs unchanged). Raises ValueError naming the fix when the block is
    present but ZeRO stage 1/2 with ``offload_optimizer.device: "cpu"`` is not configured, or the block is bad.
    """
    offload = InterleafConfig.from_ds_config(ds_config).offload
    if offload is None:
        return None
    zero = (ds_config or {}).get("zero_optimization") or {}
    if not isinstance(zero, Mapping):
        raise ValueError(f'"zero_optimization" must be an object; interleaf offload needs e.g. {_EXAMPLE}')
    stage = int(zero.get("stage", 0) or 0)
    if stage not in (1, 2):
        raise ValueError(
            f'"{CONFIG_KEY}.offload" needs ZeRO stage 1 or 2 (got stage {stage}); set {_EXAMPLE}'
        )
    device = (zero.get("offload_optimizer") or {}).get("device")
    if device is None and zero.get("cpu_offload"):
        device = "cpu"  # DeepSpeed's legacy spelling
    if str(device).lower() != "cpu":
        raise ValueError(
            f'"{CONFIG_KEY}.offload" needs "zero_optimization.offload_optimizer.device": "cpu" (got {device!r}); '
            f"set {_EXAMPLE}"
        )
    return offload
