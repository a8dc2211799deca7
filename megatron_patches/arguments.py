"""Megatron command-line flags for interleaf and the checks that turn a bad combination into a clear error.

``extra_args_provider`` follows megatron's convention (``pretrain(..., extra_args_provider=...)`` or
``parse_args(extra_args_provider)``): it receives megatron's ``argparse.ArgumentParser`` and returns it with an
``interleaf`` group added.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Optional

__all__ = [
    "SCHEDULE_NAMES",
    "V_SCHEDULES",
    "MegatronScheduleConfig",
    "extra_args_provider",
    "config_from_args",
]

SCHEDULE_NAMES = ("1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v", "v-half", "v-min", "auto")
V_SCHEDULES = ("zb-v", "v-half", "v-min")
_ONE_CHUNK_SCHEDULES = ("1f1b", "zb-h1", "zb-h2")


@dataclass(frozen=True, slots=True, kw_only=True)
class MegatronScheduleConfig:
    """Which interleaf schedule megatron's ``get_forward_backward_func()`` hands out."""

    schedule: str
    """One of :data:`SCHEDULE_NAMES`."""
    memory_limit_gib: Optional[float] = None
    """Per-rank activation-memory budget for ``auto`` (GiB); ``None`` means no limit."""
    measured_costs: bool = True
    """zb-h1/zb-h2/zb-v: time the first training steps per action and rebuild the order from the measured F/I/W
    times when the simulator finds it faster (``--pipeline-uniform-costs`` turns it off: the order built for
    F = I = W, nothing timed)."""
    cuda_graphs: bool = False
    """Capture each action of the final order (F, I, W or B of every stage and micro-batch) as a CUDA graph and
    replay them in later steps (``--pipeline-cuda-graphs``; :mod:`megatron_patches.cuda_graphs`)."""

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULE_NAMES:
            raise ValueError(
                f"--pipeline-schedule {self.schedule!r} is not known; choose one of {', '.join(SCHEDULE_NAMES)}"
            )
        if self.memory_limit_gib is not None:
            if self.schedule != "auto":
                raise ValueError(
                    f"--pipeline-memory-limit-gib only applies to --pipeline-schedule auto (got "
                    f"--pipeline-schedule {self.schedule}); drop the limit or choose auto"
                )
            if not self.memory_limit_gib > 0:
                raise ValueError(f"--pipeline-memory-limit-gib must be positive, got {self.memory_limit_gib}")

    @property
    def uses_v_placement(self) -> bool:
        return self.schedule in V_SCHEDULES

    def check_parallel_sizes(self, *, pp: int, vp: Optional[int]) -> None:
        """Raise ``ValueError`` naming the flag to change when the schedule cannot run on ``pp`` x ``vp``."""
        chunks = vp or 1
        if pp < 2:
            raise ValueError(
                f"--pipeline-schedule {self.schedule} needs pipeline parallelism: set "
                f"--pipeline-model-parallel-size >= 2 (got {pp})"
            )
        if self.schedule in V_SCHEDULES and chunks != 2:
            raise ValueError(
                f"--pipeline-schedule {self.schedule} places two model chunks per rank in a V (chunk r and "
                f"2*pp-1-r on rank r): set --virtual-pipeline-model-parallel-size 2 (got {vp}) and build the "
                "chunks with megatron_patches.build_model_chunks"
            )
        if self.schedule == "interleaved-1f1b" and chunks < 2:
            raise ValueError(
                "--pipeline-schedule interleaved-1f1b needs model chunks: set "
                "--virtual-pipeline-model-parallel-size >= 2 (or use --pipeline-schedule 1f1b)"
            )
        if self.schedule in _ONE_CHUNK_SCHEDULES and chunks != 1:
            raise ValueError(
                f"--pipeline-schedule {self.schedule} runs one model chunk per rank but "
                f"--virtual-pipeline-model-parallel-size is {vp}: drop that flag, or choose interleaved-1f1b "
                f"or a V schedule ({', '.join(V_SCHEDULES)})"
            )


def extra_args_provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--pipeline-schedule``, ``--pipeline-memory-limit-gib`` and ``--pipeline-uniform-costs`` to megatron's
    argument parser."""
    group = parser.add_argument_group(title="interleaf pipeline schedules")
    group.add_argument(
        "--pipeline-schedule",
        type=str,
        default=None,
        choices=SCHEDULE_NAMES,
        help="interleaf pipeline schedule used by get_forward_backward_func(); unset keeps megatron's own",
    )
    group.add_argument(
        "--pipeline-memory-limit-gib",
        type=float,
        default=None,
        help="per-rank activation memory budget (GiB) for --pipeline-schedule auto",
    )
    group.add_argument(
        "--pipeline-uniform-costs",
        action="store_true",
        help="zb-h1/zb-h2/zb-v: keep the order built for F = I = W instead of rebuilding it from the F/I/W times "
             "measured in the first training steps",
    )
    group.add_argument(
        "--pipeline-cuda-graphs",
        action="store_true",
        help="capture every action of the schedule's final order as a CUDA graph and replay them (the host no "
             "longer launches each kernel); needs dropout 0, tensor/context parallel 1, a dense model, no "
             "--overlap-grad-reduce / --overlap-param-gather, recompute or autocast (docs/megatron.md)",
    )
    return parser


def check_no_cuda_graphs(settings: Any) -> None:
    """Raise ``ValueError`` when megatron's CUDA graphs are on in ``settings`` (megatron's parsed args or its
    ``TransformerConfig``: the attribute names are the same)."""
    impl = getattr(settings, "cuda_graph_impl", None)
    if impl not in (None, "none"):
        # TransformerConfig turns the deprecated flags into cuda_graph_impl
        flag = f"--cuda-graph-impl {impl}" + {"local": " (or --enable-cuda-graph)",
                                              "transformer_engine": " (or --external-cuda-graph)"}.get(impl, "")
    elif getattr(settings, "enable_cuda_graph", False):
        flag = "--enable-cuda-graph"
    elif getattr(settings, "external_cuda_graph", False):
        flag = "--external-cuda-graph"
    else:
        return
    raise ValueError(
        f"{flag} cannot be combined with --pipeline-schedule: megatron captures its layers' CUDA graphs for the "
        "order its own pipeline schedules run them in (with the local implementation it also creates them from "
        "inside those schedules), and a graphed layer's backward computes its weight gradients, which interleaf's "
        "zero-bubble and V schedules defer into W passes. Drop the CUDA-graph flag, or drop --pipeline-schedule to "
        "train with megatron's own schedule"
    )


def config_from_args(args: argparse.Namespace) -> Optional[MegatronScheduleConfig]:
    """The schedule chosen on megatron's command line, or ``None`` when ``--pipeline-schedule`` is unset.

    Also checks the flag against ``--pipeline-model-parallel-size`` and
    ``--virtual-pipeline-model-parallel-size`` when those are present in ``args``, and against megatron's CUDA-graph
    flags (:func:`check_no_cuda_graphs`).
    """
    schedule = getattr(args, "pipeline_schedule", None)
    limit = getattr(args, "pipeline_memory_limit_gib", None)
    if schedule is None:
        if limit is not None:
            raise ValueError("--pipeline-memory-limit-gib needs --pipeline-schedule auto")
        if getattr(args, "pipeline_cuda_graphs", False):
            raise ValueError("--pipeline-cuda-graphs needs --pipeline-schedule (it graphs interleaf's actions)")
        return None
    config = MegatronScheduleConfig(schedule=schedule, memory_limit_gib=limit,
                                    measured_costs=not getattr(args, "pipeline_uniform_costs", False),
                                    cuda_graphs=bool(getattr(args, "pipeline_cuda_graphs", False)))
    check_no_cuda_graphs(args)
    pp = getattr(args, "pipeline_model_parallel_size", None)
    if pp is not None:
        config.check_parallel_sizes(pp=pp, vp=getattr(args, "virtual_pipeline_model_parallel_size", None))
    return config
