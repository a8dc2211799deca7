"""Re-partition an ordinary ``deepspeed.pipe.PipelineModule`` into ``pp * vp`` chunks for one rank.

The user builds the module with ``num_stages = pp``; DeepSpeed has already built this rank's single stage.
:func:`repartition` throws those layers away and builds the rank's ``vp`` chunks from the same ``LayerSpec``s
(the template is DeepSpeed 0.19.8's ``DualPipeVModule``: partition for ``num_stages * v`` parts, ``_build`` per
chunk). Placement follows the schedule's :class:`~ds_plugins.schedule.ir.PipelineShape`: looped (chunk c of
rank r is stage ``c*pp + r``) or V (rank r holds stages r and ``2*pp-1-r``).

Every layer keeps its global index, so its parameters are registered under ``str(layer_index)`` as DeepSpeed
does and checkpoints stay layer-indexed (``layer_XX-model_states.pt``): a checkpoint written under one schedule
loads under any other. Tied layers (``TiedLayerSpec``) share one module per rank; ranks that hold the same key
get a process group for the tied-gradient all-reduce, exactly like ``PipelineModule._index_tied_modules``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..schedule.ir import PipelineShape

__all__ = ["ChunkLayout", "compute_parts", "chunk_layout", "repartition", "StageChunk", "is_repartitioned"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ChunkLayout:
    """Which layers each stage holds: stage s owns layers ``parts[s]:parts[s+1]``."""

    shape: PipelineShape
    parts: tuple[int, ...]

    def layer_range(self, stage: int) -> tuple[int, int]:
        return self.parts[stage], self.parts[stage + 1]

    def stage_of_layer(self, layer_index: int) -> int:
        for s in range(self.shape.num_stages):
            if self.parts[s] <= layer_index < self.parts[s + 1]:
                return s
        raise ValueError(f"layer {layer_index} is outside the pipeline's {self.parts[-1]} layers")

    def rank_of_layer(self, layer_index: int) -> int:
        return self.shape.rank_of(self.stage_of_layer(layer_index))


def _layer_param_counts(specs: Sequence[Any]) -> list[int]:
    from deepspeed.pipe import LayerSpec

    counts = []
    for layer in specs:
        if isinstance(layer, LayerSpec):
            built = layer.build()
            counts.append(sum(p.numel() for p in built.parameters() if p.requires_grad))
            del built
        elif isinstance(layer, nn.Module):
            counts.append(sum(p.numel() for p in layer.parameters() if p.requires_grad))
        else:
            counts.append(0)
    return counts


def _layer_type_name(layer: Any) -> str | None:
    from deepspeed.pipe import LayerSpec

    if isinstance(layer, LayerSpec):
        return layer.typename.__name__
    if isinstance(layer, nn.Module):
        return layer.__class__.__name__
    return getattr(layer, "__name__", None)


def compute_parts(specs: Sequence[Any], num_parts: int, method: str) -> tuple[int, ...]:
    """Layer boundaries for ``num_parts`` stages, with DeepSpeed's own partition methods."""
    import re

    from deepspeed.runtime import utils as ds_utils

    method = method.lower()
    if method == "uniform":
        parts = ds_utils.partition_uniform(num_items=len(specs), num_parts=num_parts)
    elif method == "parameters":
        parts = ds_utils.partition_balanced(weights=_layer_param_counts(specs), num_parts=num_parts)
    elif method.startswith("type:"):
        pattern = re.compile(method.split(":", 1)[1], re.IGNORECASE)
        weights = [1 if (n := _layer_type_name(s)) is not None and pattern.search(n) else 0 for s in specs]
        if not any(weights):
            raise ValueError(f"partition_method {method!r} matches none of the pipeline's layers")
        parts = ds_utils.partition_balanced(weights=weights, num_parts=num_parts)
    else:
        raise ValueError(f"partition_method {method!r} is not supported; use 'parameters', 'uniform' or 'type:<regex>'")
    return tuple(int(p) for p in parts)


def chunk_layout(specs: Sequence[Any], shape: PipelineShape, method: str) -> ChunkLayout:
    """Partition ``specs`` into ``shape.num_stages`` non-empty chunks; ``ValueError`` naming the fix otherwise."""
    n = shape.num_stages
    if len(specs) < n:
        raise ValueError(
            f"the PipelineModule has {len(specs)} layers, fewer than pp*vp = {shape.pp}*{shape.vp} = {n} chunks: "
            f"lower interleaf.pipeline.virtual_stages or use a model with more layers"
        )
    parts = compute_parts(specs, n, method)
    empty = [s for s in range(n) if parts[s + 1] <= parts[s]]
    if empty:
        raise ValueError(
            f"partition_method {method!r} leaves stage(s) {empty} of pp*vp = {n} without layers "
            f"(boundaries {list(parts)}): use partition_method='uniform' or a smaller virtual_stages"
        )
    return ChunkLayout(shape=shape, parts=parts)


class StageChunk(nn.Module):
    """One stage (model chunk) of this rank, as the module the executor runs.

    It runs the owning ``PipelineModule``'s forward over the chunk's layers (activation checkpointing and
    per-layer seeding included). The layers are registered here as well so ``parameters()`` and module walks
    see exactly this chunk; the owning module stays the one DeepSpeed saves and optimizes.
    """

    def __init__(self, owner: nn.Module, chunk: int, stage: int, layers: list[nn.Module]) -> None:
        super().__init__()
        self.chunk = chunk
        self.stage = stage
        self.layers = nn.ModuleList(layers)
        self._owner = [owner]  # a list, so the owner is not registered as a submodule (no cycle)
        self.forward_context: Any = None
        """Optional zero-argument callable returning a context manager entered around the forward (the adapter
        puts DeepSpeed's ``torch_autocast`` context here)."""

    def forward(self, *inputs: Any) -> Any:
        owner = self._owner[0]
        owner.activate_chunk(self.chunk)
        x = inputs[0] if len(inputs) == 1 else inputs
        if self.forward_context is None:
            return owner.forward(x)
        with self.forward_context():
            return owner.forward(x)

    def extra_repr(self) -> str:
        return f"stage={self.stage}, chunk={self.chunk}"


class _ChunkedPipelineModule:
    """Mixin put in front of the user's PipelineModule class: makes the module chunk-aware."""

    _interleaf_layout: ChunkLayout
    _interleaf_chunk_funcs: list[list[Any]]
    _interleaf_chunk_bounds: list[tuple[int, int]]
    _interleaf_active_chunk: int

    def activate_chunk(self, chunk: int) -> None:
        """Expose chunk ``chunk``'s layers as this module's forward pass (like DualPipeV's ``activate_phase``)."""
        self._interleaf_active_chunk = chunk
        self.forward_funcs = self._interleaf_chunk_funcs[chunk]
        self._local_start, self._local_stop = self._interleaf_chunk_bounds[chunk]
        if self.activation_checkpoint_interval > 0:
            cache = self._interleaf_checkpointable
            key = (chunk, self.activation_checkpoint_interval)
            if key not in cache:
                self.is_checkpointable_results_interval = None
                super()._precompute_checkpointable_values()  # type: ignore[misc]
                cache[key] = self.is_checkpointable_results
            self.is_checkpointable_results = cache[key]
            self.is_checkpointable_results_interval = self.activation_checkpoint_interval

    def forward(self, forward_input: Any) -> Any:
        """DeepSpeed's forward over the active chunk. Activation checkpointing recomputes a block during
        backward, when another chunk may be active: the recompute is pinned to this chunk's layers."""
        if self.activation_checkpoint_interval <= 0:
            return super().forward(forward_input)  # type: ignore[misc]
        funcs, bounds = self.forward_funcs, (self._local_start, self._local_stop)
        checkpoint = self.activation_checkpoint_func

        def pinned_checkpoint(function, *args):
            def run_on_this_chunk(*inputs):
                saved = self.forward_funcs, (self._local_start, self._local_stop)
                self.forward_funcs, (self._local_start, self._local_stop) = funcs, bounds
                try:
                    return function(*inputs)
                finally:
                    self.forward_funcs, (self._local_start, self._local_stop) = saved

            return checkpoint(run_on_this_chunk, *args)

        self.activation_checkpoint_func = pinned_checkpoint
        try:
            return super().forward(forward_input)  # type: ignore[misc]
        finally:
            self.activation_checkpoint_func = checkpoint

    @property
    def num_chunks(self) -> int:
        return len(self._interleaf_chunk_funcs)

    def _precompute_checkpointable_values(self) -> None:
        active = self._interleaf_active_chunk
        for c in range(self.num_chunks):
            self.activate_chunk(c)
        self.activate_chunk(active)

    def set_checkpoint_interval(self, interval: int) -> None:
        if interval < 0:
            raise ValueError(f"activation checkpoint interval must be >= 0, got {interval}")
        self.activation_checkpoint_interval = interval
        self._precompute_checkpointable_values()

    def stage_owner(self, layer_idx: int) -> int:
        """The pipeline rank that holds ``layer_idx`` (not the chunk's stage number)."""
        return self._interleaf_layout.rank_of_layer(layer_idx)

    def partitions(self) -> tuple[int, ...]:
        return self._interleaf_layout.parts

    def save_state_dict(self, *args: Any, **kwargs: Any) -> None:
        active = self._interleaf_active_chunk
        for c in range(self.num_chunks):
            self.activate_chunk(c)
            super().save_state_dict(*args, **kwargs)  # type: ignore[misc]
        self.activate_chunk(active)

    def load_state_dir(self, *args: Any, **kwargs: Any) -> None:
        active = self._interleaf_active_chunk
        for c in range(self.num_chunks):
            self.activate_chunk(c)
            super().load_state_dir(*args, **kwargs)  # type: ignore[misc]
        self.activate_chunk(active)

    def compile(self, *args: Any, **kwargs: Any) -> None:
        active = self._interleaf_active_chunk
        for c in range(self.num_chunks):
            self.activate_chunk(c)
            super().compile(*args, **kwargs)  # type: ignore[misc]
        self.activate_chunk(active)

    def layer_modules(self) -> dict[int, nn.Module]:
        """Global layer index -> built module, for every layer this rank holds (tied layers included)."""
        out: dict[int, nn.Module] = {}
        for funcs, (start, _stop) in zip(self._interleaf_chunk_funcs, self._interleaf_chunk_bounds):
            for i, f in enumerate(funcs):
                mod = f if isinstance(f, nn.Module) else getattr(f, "args", (None,))[0]
                if isinstance(mod, nn.Module):
                    out[start + i] = mod
        return out


_MIXED_CLASSES: dict[type, type] = {}


def _chunked_class(cls: type) -> type:
    if issubclass(cls, _ChunkedPipelineModule):
        return cls
    if cls not in _MIXED_CLASSES:
        _MIXED_CLASSES[cls] = type(f"Interleaf{cls.__name__}", (_ChunkedPipelineModule, cls), {})
    return _MIXED_CLASSES[cls]


def is_repartitioned(module: nn.Module) -> bool:
    return isinstance(module, _ChunkedPipelineModule)


def _tied_module_of(func: Any) -> nn.Module | None:
    return func if isinstance(func, nn.Module) else None


def repartition(module: nn.Module, layout: ChunkLayout, device: torch.device | str) -> list[StageChunk]:
    """Rebuild ``module`` (a PipelineModule built with ``num_stages = pp``) as this rank's chunks of ``layout``.

    Collective over the whole world (new process groups for tied layers, broadcast of tied weights): every
    rank calls it with the same layout. Returns the rank's :class:`StageChunk` list in model order.
    """
    from deepspeed import comm as dist
    from deepspeed.pipe import PipelineModule, TiedLayerSpec

    shape = layout.shape
    grid = module._grid
    rank = grid.get_stage_id()
    if module.num_stages != shape.pp:
        raise ValueError(f"PipelineModule was built for {module.num_stages} stages but the schedule has pp={shape.pp}")

    # Drop the single stage DeepSpeed built.
    for name in list(module.fwd_map):
        if name in module._modules:
            del module._modules[name]
    module.forward_funcs = []
    module.fwd_map = {}
    module.tied_modules = nn.ModuleDict()
    module.tied_weight_attrs = {}

    module.__class__ = _chunked_class(module.__class__)
    module._interleaf_layout = layout
    module._interleaf_chunk_funcs = []
    module._interleaf_chunk_bounds = []
    module._interleaf_checkpointable = {}
    module.parts = list(layout.parts)

    chunk_modules: list[list[nn.Module]] = []
    for stage in shape.stages_of(rank):
        start, stop = layout.layer_range(stage)
        module._set_bounds(start=start, stop=stop)
        module.forward_funcs = []
        PipelineModule._build(module)
        module._interleaf_chunk_funcs.append(module.forward_funcs)
        module._interleaf_chunk_bounds.append((start, stop))
        mods: list[nn.Module] = []
        for f in module.forward_funcs:
            if isinstance(f, nn.Module):
                mods.append(f)
            elif hasattr(f, "args") and f.args and isinstance(f.args[0], nn.Module):  # tied forward_fn partial
                mods.append(f.args[0])
        chunk_modules.append(mods)
    module._interleaf_active_chunk = 0
    module.activate_chunk(0)
    module.to(device)

    # Tied layers: one group per (key, data-parallel index) over the pipeline ranks that hold the key.
    specs = module._layer_specs
    tied_comms: dict[str, dict[str, Any]] = {}
    keys = sorted({s.key for s in specs if isinstance(s, TiedLayerSpec)})
    global_rank = module.global_rank
    for key in keys:
        layer_idxs = [i for i, s in enumerate(specs) if isinstance(s, TiedLayerSpec) and s.key == key]
        tied_pipe_ranks = sorted({layout.rank_of_layer(i) for i in layer_idxs})
        for dp in range(grid.data_parallel_size):
            ranks = [grid.stage_to_global(stage_id=r, data=dp) for r in tied_pipe_ranks]
            group = dist.new_group(ranks=ranks)
            if global_rank in ranks:
                tied_comms[key] = {
                    "ranks": ranks,
                    "group": group,
                    "weight_attr": module.tied_weight_attrs[key],
                    "module": module.tied_modules[key],
                }
                if global_rank != ranks[0]:
                    for p in module.tied_modules[key].parameters():
                        p.ds_pipe_replicated = True
    # A key held by one rank only needs no gradient exchange (e.g. embedding and head both on rank 0 under V).
    module.tied_comms = {k: v for k, v in tied_comms.items() if len(v["ranks"]) > 1}
    module._synchronize_tied_weights()

    chunks = [StageChunk(module, c, s, mods) for c, (s, mods) in enumerate(zip(shape.stages_of(rank), chunk_modules))]
    logger.info(
        "interleaf: pipeline rank %d holds stages %s, layers %s",
        rank,
        list(shape.stages_of(rank)),
        [layout.layer_range(s) for s in shape.stages_of(rank)],
    )
    return chunks
