"""Cut a list of layers into pipeline stages: pp*vp contiguous chunks, chunk k = stage k."""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from ..schedule.ir import PipelineShape
from .weight_grad import enable_weight_grad_split

__all__ = ["StageModule", "build_stage_modules", "partition_layers"]


def partition_layers(num_layers: int, num_stages: int, *, even: bool = False) -> list[range]:
    """Contiguous layer ranges for ``num_stages`` stages, sizes differing by at most one (earlier stages get
    the extra layers). ``even=True`` requires equal sizes."""
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if num_layers < num_stages:
        raise ValueError(
            f"cannot cut {num_layers} layers into {num_stages} pipeline stages (pp*vp): use fewer stages "
            "(smaller pp or vp) or more layers"
        )
    if even and num_layers % num_stages:
        raise ValueError(
            f"{num_layers} layers do not divide into {num_stages} equal stages (pp*vp): choose pp*vp dividing "
            f"{num_layers}"
        )
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for k in range(num_stages):
        size = base + (1 if k < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


class StageModule(nn.Sequential):
    """Layers run one after another, DeepSpeed ``PipelineModule`` style: each layer takes one value (a tensor
    or a tuple) and returns one. Called with several arguments, the first layer receives them as a tuple."""

    def forward(self, *args: Any) -> Any:  # type: ignore[override]
        value = args[0] if len(args) == 1 else args
        for layer in self:
            value = layer(value)
        return value


def build_stage_modules(
    layers: Sequence[nn.Module],
    shape: PipelineShape,
    rank: int,
    *,
    boundaries: Sequence[range] | None = None,
    split_weight_grads: bool = True,
) -> dict[int, StageModule]:
    """The stage modules of pipeline ``rank``: ``{stage: StageModule(layers of that stage)}`` for the stages
    ``shape`` places on ``rank`` (looped or V). The layers are used as given, not copied. With
    ``split_weight_grads`` their ``nn.Linear`` layers defer weight gradients in I passes
    (:func:`~ds_plugins.runtime.weight_grad.enable_weight_grad_split`)."""
    if boundaries is None:
        boundaries = partition_layers(len(layers), shape.num_stages)
    if len(boundaries) != shape.num_stages:
        raise ValueError(f"boundaries has {len(boundaries)} ranges for pp*vp = {shape.num_stages} stages")
    modules = {}
    for stage in shape.stages_of(rank):
        module = StageModule(*[layers[i] for i in boundaries[stage]])
        if split_weight_grads:
            enable_weight_grad_split(module)
        modules[stage] = module
    return modules
