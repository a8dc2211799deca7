"""Busy/idle measurement of DeepSpeed's own ``PipelineEngine`` (the baseline interleaf is compared against).

DeepSpeed does not report how long its pipeline ranks compute versus wait. :class:`DeepSpeedStepTimer` wraps the
engine's ``ForwardPass``/``BackwardPass`` instructions (busy time) and its ``ReduceTiedGrads``/``ReduceGrads``/
``OptimizerStep`` instructions (step tail) with timers: CUDA events on a GPU (resolved once per step), wall
clock otherwise. It changes only this engine instance's instruction table.
"""
from __future__ import annotations

import time
from types import MethodType
from typing import Any

import torch

__all__ = ["DeepSpeedStepTimer"]


class DeepSpeedStepTimer:
    """Per-step busy (forward + backward) and tail (grad reduction + optimizer step) time of one engine."""

    def __init__(self, engine: Any) -> None:
        from deepspeed.runtime.pipe import schedule as ds_schedule

        self.engine = engine
        self.device = engine.device if isinstance(engine.device, torch.device) else torch.device(engine.device)
        self._cuda = self.device.type == "cuda"
        self._busy: list[Any] = []
        self._tail: list[Any] = []
        table = dict(engine._INSTRUCTION_MAP)
        for kind, bucket in (
            (ds_schedule.ForwardPass, self._busy),
            (ds_schedule.BackwardPass, self._busy),
            (ds_schedule.ReduceTiedGrads, self._tail),
            (ds_schedule.ReduceGrads, self._tail),
            (ds_schedule.OptimizerStep, self._tail),
        ):
            table[kind] = self._timed(table[kind], bucket)
        engine._INSTRUCTION_MAP = table  # instance attribute: DeepSpeed looks it up through self

    def _timed(self, handler: Any, bucket: list[Any]) -> Any:
        timer = self

        def timed(engine: Any, **kwargs: Any) -> Any:
            if timer._cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = MethodType(handler, engine)(**kwargs)
                end.record()
                bucket.append((start, end))
                return out
            t0 = time.perf_counter()
            out = MethodType(handler, engine)(**kwargs)
            bucket.append(time.perf_counter() - t0)
            return out

        return timed

    def reset(self) -> None:
        self._busy.clear()
        self._tail.clear()

    def _total(self, bucket: list[Any]) -> float:
        if not bucket:
            return 0.0
        if self._cuda:
            bucket[-1][1].synchronize()
            return sum(s.elapsed_time(e) for s, e in bucket) / 1000.0
        return float(sum(bucket))

    @property
    def busy_s(self) -> float:
        """Forward + backward compute of this rank since :meth:`reset` (seconds)."""
        return self._total(self._busy)

    @property
    def tail_s(self) -> float:
        """Gradient reduction + optimizer step of this rank since :meth:`reset` (seconds)."""
        return self._total(self._tail)
