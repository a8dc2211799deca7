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


# Import DeepSpeed here, once the two functions above exist, and not first from inside a submodule: when
# ``import ds_plugins`` left its post-import hook pending, DeepSpeed finishing its import runs install_hooks(),
# which needs pipeline_engine and offload_optimizer fully loaded. Had a submodule's own ``import deepspeed``
# been the first, that submodule would still be half-initialised at that moment.
import deepspeed  # noqa: E402,F401
