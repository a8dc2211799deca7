"""DeepSpeed adapter: the ``"interleaf"`` config block drives interleaf's pipeline engine and offload optimizer.

Each hook swaps one DeepSpeed class for a subclass that checks the config and otherwise behaves exactly like
the original:
- pipeline: ``deepspeed.PipelineEngine`` (what ``deepspeed.initialize`` builds for a ``PipelineModule``);
- offload: ``deepspeed.runtime.engine.DeepSpeedZeroOptimizer`` (what the engine builds for ZeRO-1/2).
"""
from __future__ import annotations

__all__ = ["install_hooks", "uninstall_hooks"]


def install_hooks() -> None:
    from . import offload_optimizer, pipeline_engine

    pipeline_engine.install()
    offload_optimizer.install()


def uninstall_hooks() -> None:
    from . import offload_optimizer, pipeline_engine

    pipeline_engine.uninstall()
    offload_optimizer.uninstall()
