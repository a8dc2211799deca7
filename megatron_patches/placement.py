"""Build megatron model chunks in V placement (ZB-V, V-Half, V-Min).

Megatron loops its chunks: chunk c of pipeline rank r is stage ``c*pp + r``. V schedules need rank r to hold
stage ``r`` and stage ``2*pp-1-r``, so the first stage (embedding) and the last (LM head + loss) are both on
rank 0 (Qi et al., "Pipeline Parallelism with Controllable Memory", NeurIPS 2024, sec. 3).

The one change a user makes: build the chunks with :func:`build_model_chunks` instead of looping over
``vp_stage`` (megatron.training's ``get_model`` does that loop); wrap them in DDP / Float16Module as usual.

Chunk 1 of rank r is built while megatron sees pipeline rank ``pp-1-r`` with ``vp_stage=1``: under megatron's
own looped arithmetic that is stage ``pp + (pp-1-r) = 2*pp-1-r``, so layer offsets, layer numbers (checkpoint
names), ``pre_process``/``post_process`` and ``is_pp_last_stage`` checks inside the model all come out right
without touching megatron's code. The chunks are built with no cross-rank embedding group (both tied copies
live on rank 0); the LM-head copy is initialised from the embedding here, and its gradient is summed with the
embedding's by :mod:`megatron_patches.forward_backward` after the last W and before the DP reduction.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, List

import torch

__all__ = ["build_model_chunks", "v_stage_of_chunk", "chunk_stage", "unwrap"]

STAGE_ATTR = "interleaf_stage"
PLACEMENT_ATTR = "interleaf_placement"


def v_stage_of_chunk(pp_rank: int, pp: int, chunk: int) -> int:
    """Stage index (model order) of ``chunk`` (0 or 1) on ``pp_rank`` under V placement."""
    if chunk not in (0, 1):
        raise ValueError(f"V placement has chunks 0 and 1, got {chunk}")
    return pp_rank if chunk == 0 else 2 * pp - 1 - pp_rank


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The innermost model under megatron's wrappers (DDP, Float16Module, ...)."""
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


def chunk_stage(module: torch.nn.Module):
    """``(stage, placement)`` recorded by :func:`build_model_chunks`, or ``(None, None)``."""
    while True:
        if hasattr(module, STAGE_ATTR):
            return getattr(module, STAGE_ATTR), getattr(module, PLACEMENT_ATTR)
        inner = getattr(module, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return None, None
        module = inner


class _MirroredPipelineGroup:
    """Stands in for the pipeline group while a V chunk is built: reports rank ``pp-1-r``.

    Megatron's model code reads only ``rank()`` and ``size()`` of the pipeline group (layer offsets, first/last
    stage checks); it is never used for communication.
    """

    def __init__(self, group, rank: int):
        self._group = group
        self._rank = rank

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._group.size()

    def __getattr__(self, name):
        return getattr(self._group, name)


@contextlib.contextmanager
def _megatron_sees(pp_rank_seen: int | None):
    """Build-time view of the process groups: no embedding groups; optionally a mirrored pipeline rank."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    original = ProcessGroupCollection.__dict__["use_mpu_process_groups"]
    saved_rank = parallel_state._MPU_PIPELINE_MODEL_PARALLEL_RANK

    def use_mpu_process_groups(cls, *args, **kwargs):
        groups = copy.copy(original.__func__(cls, *args, **kwargs))
        groups.embd = None
        groups.pos_embd = None
        if pp_rank_seen is not None:
            groups.pp = _MirroredPipelineGroup(groups.pp, pp_rank_seen)
        return groups

    ProcessGroupCollection.use_mpu_process_groups = classmethod(use_mpu_process_groups)
    if pp_rank_seen is not None:
        parallel_state.set_pipeline_model_parallel_rank(pp_rank_seen)
    try:
        yield
    finally:
        ProcessGroupCollection.use_mpu_process_groups = original
        parallel_state._MPU_PIPELINE_MODEL_PARALLEL_RANK = saved_rank


def build_model_chunks(model_provider_func: Callable[..., torch.nn.Module]) -> List[torch.nn.Module]:
    """Build this rank's two model chunks in V placement: ``[stage r, stage 2*pp-1-r]``.

    ``model_provider_func(pre_process=..., post_process=..., vp_stage=...)`` is megatron's usual model provider
    (e.g. the one in ``pretrain_gpt.py``). Needs ``initialize_model_parallel(...,
    virtual_pipeline_model_parallel_size=2)``. Returns unwrapped chunks; wrap them in DDP as usual.
    """
    from megatron.core import parallel_state
    from megatron.core.enums import ModelType

    pp = parallel_state.get_pipeline_model_parallel_world_size()
    vp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if pp < 2:
        raise ValueError(f"V placement needs --pipeline-model-parallel-size >= 2, got {pp}")
    if vp != 2:
        raise ValueError(
            f"V placement holds two chunks per rank: initialize_model_parallel(..., "
            f"virtual_pipeline_model_parallel_size=2) (got {vp})"
        )
    rank = parallel_state.get_pipeline_model_parallel_rank()
    chunks = []
    for chunk in (0, 1):
        stage = v_stage_of_chunk(rank, pp, chunk)
        seen_rank = rank if chunk == 0 else pp - 1 - rank
        with _megatron_sees(seen_rank):
            module = model_provider_func(
                pre_process=stage == 0, post_process=stage == 2 * pp - 1, vp_stage=chunk
            )
        if not hasattr(module, "model_type"):
            module.model_type = ModelType.encoder_or_decoder
        module.vp_stage = chunk
        setattr(module, STAGE_ATTR, stage)
        setattr(module, PLACEMENT_ATTR, "v")
        chunks.append(module)
    if rank == 0:
        _tie_output_to_embedding(chunks)
    return chunks


def _tie_output_to_embedding(chunks: List[torch.nn.Module]) -> None:
    """Rank 0 holds both tied copies: initialise the LM-head copy from the embedding (megatron would have
    all-reduced it over the embedding group)."""
    first, last = unwrap(chunks[0]), unwrap(chunks[1])
    if not getattr(last, "share_embeddings_and_output_weights", False):
        return
    with torch.no_grad():
        last.shared_embedding_or_output_weight().copy_(first.shared_embedding_or_output_weight())


def tied_embedding_weights(chunks: List[torch.nn.Module]):
    """On rank 0 under V placement with tied embeddings: ``(embedding weight, LM-head weight)``, else ``None``."""
    if len(chunks) != 2:
        return None
    first, last = unwrap(chunks[0]), unwrap(chunks[1])
    if not (getattr(first, "pre_process", False) and getattr(last, "post_process", False)):
        return None
    if not getattr(last, "share_embeddings_and_output_weights", False):
        return None
    return first.shared_embedding_or_output_weight(), last.shared_embedding_or_output_weight()
