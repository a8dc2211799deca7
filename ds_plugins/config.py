"""The ``"interleaf"`` block of a DeepSpeed JSON config (torch-free).

```json
"interleaf": {
  "pipeline": {"schedule": "zb-v", "virtual_stages": 2, "memory_limit_gib": null},
  "offload":  {"mode": "interleaved", "gpu_fraction": "auto"}
}
```
DeepSpeed keeps unknown top-level keys (``config._param_dict``) but rejects unknown keys inside
``zero_optimization``, so the block lives at the top level. Megatron's adapter builds the same dataclasses
from its command-line flags.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

__all__ = ["PipelineConfig", "OffloadConfig", "InterleafConfig", "CONFIG_KEY"]

CONFIG_KEY = "interleaf"

SCHEDULE_NAMES = ("1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v", "v-half", "v-min", "auto")


def _reject_unknown(section: str, given: Mapping[str, Any], known: tuple[str, ...]) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        where = f"{CONFIG_KEY}.{section}" if section else CONFIG_KEY
        raise ValueError(f'unknown key(s) {unknown} in "{where}" of the DeepSpeed config; allowed: {", ".join(known)}')


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineConfig:
    """Which pipeline schedule to run."""

    schedule: str = "1f1b"
    """One of 1f1b, interleaved-1f1b, zb-h1, zb-h2, zb-v, v-half, v-min, auto."""
    virtual_stages: int | None = None
    """Model chunks per rank (vp). None: the schedule's default (2 for interleaved-1f1b and the V schedules)."""
    memory_limit_gib: float | None = None
    """Per-rank activation-memory cap for ``auto`` (GiB). None: 1F1B's own peak."""
    auto_warmup_iterations: int = 3
    """Iterations timed per action before ``auto`` plans its schedule (running a seed schedule meanwhile) and before
    zb-h1/zb-h2/zb-v are rebuilt from the measured F/I/W times (``measured_costs``)."""
    measured_costs: bool = True
    """zb-h1, zb-h2, zb-v: after ``auto_warmup_iterations`` iterations, rebuild the schedule from every stage's
    measured F/I/W times with its own generator and memory budget, and run the rebuilt order when the simulator
    finds it faster (the order built for F = I = W idles far more when, as on GPUs, I costs ~2x F). false: keep
    the F = I = W order and time nothing. Other schedules: no effect."""
    split_mode: Literal["autograd", "function"] | None = None
    """How the I pass skips the weight GEMMs of ``nn.Linear`` layers (docs/runtime.md): ``autograd`` (recorded
    gradient edges, one ``torch.autograd.grad``; hooks on norm/bias parameters do not run in I) or ``function`` (a
    Python ``autograd.Function`` per layer; more host time). None: ``autograd``, or the environment variable
    ``INTERLEAF_SPLIT_MODE``."""
    timeout_s: float = 600.0
    """A p2p wait longer than this fails instead of hanging. gloo: the step raises an error naming the peer.
    NCCL: it is the timeout of the pipeline's p2p process groups, so torch's NCCL watchdog aborts the process when
    a transfer is stuck that long (keep it above the longest legitimate wait, e.g. a first step that compiles)."""

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULE_NAMES:
            raise ValueError(
                f"unknown pipeline schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULE_NAMES)}"
            )
        if self.virtual_stages is not None and self.virtual_stages < 1:
            raise ValueError(f"virtual_stages must be >= 1 (or null for the default), got {self.virtual_stages}")
        if self.memory_limit_gib is not None and not self.memory_limit_gib > 0:
            raise ValueError(f"memory_limit_gib must be > 0 (or null), got {self.memory_limit_gib}")
        if self.auto_warmup_iterations < 1:
            raise ValueError(f"auto_warmup_iterations must be >= 1, got {self.auto_warmup_iterations}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.split_mode not in (None, "autograd", "function"):
            raise ValueError(f'split_mode must be "autograd", "function" or null, got {self.split_mode!r}')

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PipelineConfig":
        _reject_unknown("pipeline", d, cls.__slots__)  # type: ignore[arg-type]
        return cls(**d)


@dataclass(frozen=True, slots=True, kw_only=True)
class OffloadConfig:
    """How optimizer state offloaded to the host is updated."""

    mode: Literal["interleaved", "cpu"] = "interleaved"
    """``interleaved``: part of the update on the CPU, part on the GPU, overlapped with backward/forward.
    ``cpu``: every group on the CPU (DeepSpeed's ZeRO-Offload behaviour, run through our kernels)."""
    gpu_fraction: float | Literal["auto"] = "auto"
    """Share of parameters updated on the GPU: 0.0-1.0, or ``auto`` to let the planner choose."""
    replan_interval: int = 50
    """Iterations between re-plans from measured timings (``gpu_fraction: auto`` only)."""
    gpu_memory_budget_gib: float | None = None
    """GPU memory the GPU-updated groups' optimizer state may use. None: what is free after warm-up."""
    host_threads: int | Literal["auto"] = "auto"
    """Threads of the host-side AdamW. ``auto``: half of this rank's share of the CPUs it may run on (affinity
    mask divided by the ranks on this host whose affinity overlaps it, gathered at the first step, so ranks bound
    to their own cores keep theirs; without a process group, by the launcher's local size: ``LOCAL_WORLD_SIZE``,
    ``LOCAL_SIZE`` or the MPI launchers' variable); the other half stays with the training thread, which
    issues the GPU work, and the transfers. Independent of ``OMP_NUM_THREADS``, which launchers such as torchrun
    set to 1 when they start several processes. (1x H100, 16 CPUs: with 15 host threads and 55% of the state on
    the host, forward + backward took 1.4-1.7x as long as without host work, with no stall on the host update
    itself; with 8 threads the stretch was smaller and intermittent, and ``gpu_fraction: auto`` charges what
    remains, docs/offload.md.)"""

    def __post_init__(self) -> None:
        if self.mode not in ("interleaved", "cpu"):
            raise ValueError(f'unknown offload mode {self.mode!r}; use "interleaved" or "cpu"')
        if self.gpu_fraction != "auto":
            if isinstance(self.gpu_fraction, bool) or not isinstance(self.gpu_fraction, (int, float)):
                raise ValueError(f'gpu_fraction must be a number in [0, 1] or "auto", got {self.gpu_fraction!r}')
            if not 0.0 <= float(self.gpu_fraction) <= 1.0:
                raise ValueError(f'gpu_fraction must be in [0, 1] or "auto", got {self.gpu_fraction}')
        if self.replan_interval < 1:
            raise ValueError(f"replan_interval must be >= 1, got {self.replan_interval}")
        if self.host_threads != "auto" and (
                isinstance(self.host_threads, bool) or not isinstance(self.host_threads, int) or self.host_threads < 1):
            raise ValueError(f'host_threads must be an integer >= 1 or "auto", got {self.host_threads!r}')

    def resolved_host_threads(self, cpus: int, local_ranks: int) -> int:
        """Threads for the host AdamW given ``cpus`` usable CPUs shared by ``local_ranks`` processes."""
        if self.host_threads != "auto":
            return int(self.host_threads)
        return max(1, cpus // max(1, local_ranks) // 2)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "OffloadConfig":
        _reject_unknown("offload", d, cls.__slots__)  # type: ignore[arg-type]
        return cls(**d)


@dataclass(frozen=True, slots=True, kw_only=True)
class InterleafConfig:
    """The whole ``"interleaf"`` block; a section left out is None (that feature is off)."""

    pipeline: PipelineConfig | None = None
    offload: OffloadConfig | None = None

    @classmethod
    def from_ds_config(cls, ds_config: Mapping[str, Any] | None) -> "InterleafConfig":
        """Read the block from a DeepSpeed config dict (or ``DeepSpeedConfig._param_dict``)."""
        block = (ds_config or {}).get(CONFIG_KEY)
        if block is None:
            return cls()
        if not isinstance(block, Mapping):
            raise ValueError(f'"{CONFIG_KEY}" in the DeepSpeed config must be an object, got {type(block).__name__}')
        _reject_unknown("", block, ("pipeline", "offload"))
        pipe = block.get("pipeline")
        off = block.get("offload")
        return cls(
            pipeline=PipelineConfig.from_dict(pipe) if pipe is not None else None,
            offload=OffloadConfig.from_dict(off) if off is not None else None,
        )
