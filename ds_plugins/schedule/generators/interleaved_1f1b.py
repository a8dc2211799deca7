"""Interleaved 1F1B (Narayanan et al., "Efficient Large-Scale Language Model Training on GPU Clusters Using
Megatron-LM", SC 2021, sec. 2.2; megatron-core's ``forward_backward_pipelining_with_interleaving``).

Each rank holds ``vp`` model chunks in looped placement (chunk c of rank r is stage c*pp + r). Micro-batches go
through the chunks in groups of ``g`` micro-batches: forwards run group by group, chunk 0 of the whole group,
then chunk 1, ...; backwards follow the same table with the chunks reversed. Rank r runs
``2(pp-1-r) + (vp-1)g`` warm-up forwards (all of them when m == pp), then one forward / one backward, then the
remaining backwards. The bubble shrinks by vp: ``(pp-1)/(vp*m + pp-1)`` at uniform costs.

Micro-batches not divisible by pp: megatron-core accepts a group size g (``microbatch_group_size_per_vp_stage``)
in [pp, m] when ``m % g == 0`` or ``m % g >= pp``; we take the smallest such g, which is pp when pp divides m.
:func:`megatron_group_size` returns it so a Megatron run can be configured to match.
"""
from __future__ import annotations

from ..costs import CostModel
from ..ir import Action, ActionKind, PipelineShape, Schedule

__all__ = ["interleaved_1f1b", "megatron_group_size"]


def megatron_group_size(pp: int, microbatches: int) -> int:
    """Smallest micro-batch group size megatron-core accepts for this pp and m (pp when pp divides m)."""
    if microbatches < pp:
        raise ValueError(
            f"interleaved-1f1b needs at least pp={pp} micro-batches, got {microbatches}; raise microbatches to >= {pp}"
        )
    for g in range(pp, microbatches + 1):
        rest = microbatches % g
        if rest == 0 or rest >= pp:
            return g
    return microbatches  # unreachable: g == m always qualifies


def _chunk_table(microbatches: int, vp: int, group: int) -> list[tuple[int, int]]:
    """Forward order as (micro-batch, chunk) pairs: per group, chunk by chunk."""
    table = []
    for start in range(0, microbatches, group):
        members = range(start, min(start + group, microbatches))
        table.extend((mb, c) for c in range(vp) for mb in members)
    return table


def interleaved_1f1b(shape: PipelineShape, costs: CostModel | None = None) -> Schedule:
    """Megatron's interleaved 1F1B with full backward (B) actions; the order does not depend on ``costs``."""
    if shape.vp < 2:
        raise ValueError(f"interleaved-1f1b needs vp >= 2 model chunks per rank (got vp={shape.vp}); use 1f1b for vp=1")
    if shape.placement != "loop":
        raise ValueError("interleaved-1f1b uses looped placement: set placement='loop' (V placement is for zb-v)")
    if costs is not None:
        costs.for_shape(shape)
    pp, vp, m = shape.pp, shape.vp, shape.microbatches
    group = megatron_group_size(pp, m)
    table = _chunk_table(m, vp, group)
    total = len(table)
    programs = []
    for rank in range(pp):
        if m == pp:
            warmup = total
        else:
            warmup = min(2 * (pp - 1 - rank) + (vp - 1) * group, total)

        def fwd(k: int) -> Action:
            mb, c = table[k]
            return Action(c * pp + rank, ActionKind.FORWARD, mb)

        def bwd(k: int) -> Action:
            mb, c = table[k]
            return Action((vp - 1 - c) * pp + rank, ActionKind.BACKWARD, mb)

        prog = [fwd(k) for k in range(warmup)]
        for k in range(total - warmup):
            prog.append(fwd(warmup + k))
            prog.append(bwd(k))
        prog.extend(bwd(k) for k in range(total - warmup, total))
        programs.append(tuple(prog))
    return Schedule("interleaved-1f1b", shape, tuple(programs))
