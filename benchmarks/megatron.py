"""megatron-core's own pipeline schedules vs interleaf's, on megatron's GPTModel, in ONE process group.

Model: the GPT of ../shared/docs/anchors.md in megatron's ``GPTModel`` with the local layer spec (no Transformer
Engine on the image: unfused attention): 32 layers, hidden 2048, 16 heads, seq 2048, vocab 32000, tied embedding /
LM head, dropout 0, micro-batch 1, bf16 via ``Float16Module`` + megatron DDP (fp32 ``main_grad``), pp = 4
(= world size), dp = tp = 1. Weights come from a generator seeded by each parameter's model-global name (decoder
layers by their global layer number, which megatron_patches.build_model_chunks keeps model-global under V
placement), so every variant, looped or V, trains the same model with the same data: their first-step loss and
gradient norm must agree, and the script checks that they do (see below).

For m = 8 and m = 16 micro-batches:

- ``megatron-1f1b``: ``forward_backward_pipelining_without_interleaving`` (vp = 1);
- ``megatron-interleaved``: ``forward_backward_pipelining_with_interleaving``, vp = 2 (the baseline). On GPU it
  runs twice, ``batch_p2p_comm=True`` and ``overlap_p2p_comm=True, batch_p2p_comm=False`` (megatron's
  recommendation for interleaving); the faster of the two at each m is the baseline for the ratios. On CPU/gloo
  it runs once with both off (batched same-tag p2p mismatches on gloo at pp = 2: integration-notes.md);
- ``zb-h2`` (vp = 1), ``zb-v`` and ``auto`` (V placement, ``megatron_patches.build_model_chunks``):
  megatron's ``get_forward_backward_func()`` after ``megatron_patches.apply(name)``; ``auto`` re-plans from
  measured timings after its warm-up steps (excluded from timing). ``auto`` plans under 1F1B's activation memory
  unless given a budget: ``auto@22`` is ``--pipeline-memory-limit-gib 22`` (activations per rank, GiB; the issue's
  target allows 1.1x megatron interleaved's peak, which leaves room above 1F1B's). ``auto-loop`` (and
  ``auto-loop@22``) is ``auto`` on megatron's usual looped chunks (vp = 2), searched in loop placement: the
  embedding and the LM head on different ranks, no ``build_model_chunks`` needed.
- ``+graphs`` after an interleaf variant (``zb-v+graphs``, ``auto+graphs``, GPU): the same schedule with
  ``megatron_patches.apply(name, cuda_graphs=True)`` (``--pipeline-cuda-graphs``): once its order is final, every
  action (F, I, W or B of each stage and micro-batch) is captured as a CUDA graph and the timed steps replay them
  (``megatron_patches.cuda_graphs``). Their peak adds the graphs' memory pool (reserved, so not in the allocated
  peak), and their check also requires every replayed step's gradient norm to equal their first (eager) step's.
- ``megatron-interleaved-graphed`` (GPU): megatron's interleaved 1F1B with megatron's own CUDA graphs of its layers
  (``cuda_graph_impl="local"``, megatron's graph-safe RNG tracker, ``overlap_p2p_comm``, no
  ``deallocate_pipeline_outputs``, which megatron refuses for graphed outputs), the fair reference for the
  ``+graphs`` rows; its peak adds the private pools that are not interleaf's. Not the baseline.

What any order could reach on this machine (``ideal``, ``ideal-v``, ``ideal-v-split``; anchors.md's "ideal"): each
rank runs its own chunks' forward and at once their backward for m micro-batches on inputs of the right shape,
with no p2p, nothing to wait for and no ``finalize_model_grads``, host time included; the step is the slowest
rank's. ``ideal``: megatron's looped chunks (the interleaved baseline's work), ``ideal-v``: the V chunks (the
embedding, the LM head and the loss on rank 0), both with megatron's own backward; ``ideal-v-split``: the V chunks
with interleaf's split backward (the input-gradient pass, then the queued weight GEMMs: what zb-v and ``auto``
run). ``ideal`` and ``ideal-v-split`` run
by default. ``ideal-graphed`` and ``ideal-v-split-graphed`` (GPU only; an experiment, see ``_ideal_step_func``)
run the work of ``ideal`` / ``ideal-v-split`` as CUDA graphs captured in the first step and replayed after it,
what that work costs once the host no longer issues it kernel by kernel. A row's ratio to the baseline estimates the most a schedule of that work can gain over megatron's
interleaved 1F1B on this machine (one measurement: hosts drift from row to row like every row here); they have no
loss or gradient to check (random activations).

Rows run one after another, each its warm-up and timed steps; on hosts whose speed drifts over tens of seconds
(BENCHMARKS.md, session 14) that moves the ratios by more than the schedules differ. ``--alternate`` (variants on
vp = 2 chunks: megatron's interleaved 1F1B, interleaf's V and looped schedules, the ideal rows) builds every
layout at once, prepares each variant as a row does, then takes the timed steps in turns, one step of each variant
per round with the order rotated every round and reversed every other, so drift slows every variant alike
(``run_alternating``)::

    torchrun --nproc_per_node 4 benchmarks/megatron.py --alternate --steps 10 \
        --variants megatron-interleaved ideal zb-v auto ideal-v-split --interleaved-p2p overlap_p2p_comm

One step = one ``forward_backward_func`` call incl. ``finalize_model_grads`` (no optimizer step: it is the same
for every variant). Reported: tokens/s (mean over timed steps), ratio to megatron interleaved of the same m,
peak allocated memory per rank (GiB, timed steps; every row starts from the model and its DDP buffers alone,
see ``release_row_state``; the log gives each rank's allocated memory before the row), first-step loss and
gradient norm (the same model and data for every variant). Check: a variant whose first-step loss or gradient
norm differs from the reference row's of the same m (megatron 1F1B's, else the row most rows agree with) by
more than 1e-2 relative (bf16; 1e-4 in fp32) is marked MISMATCH in the table; an interleaf row that fails makes
the script exit non-zero after printing/writing it (a megatron row that fails is reported: at pp=2 megatron's
interleaved schedule with batch_p2p_comm returns a wrong gradient on 2x H100). The baseline for the ratios is the
faster megatron-interleaved run that passed the check.

GPU (writes its section of BENCHMARKS.md)::

    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node 4 benchmarks/megatron.py

Why a variant is slow (``--profile``): one more step per variant after its timed ones under torch.profiler; per
rank kernel time, NCCL-kernel time, device busy and gaps, host issue time and step span, and for interleaf rows
kernel time per action kind and stage (benchmarks/device_gaps.py), plus the F/I/W costs interleaf's runner
measured in its warm-up; ``--trace-dir`` keeps every rank's chrome trace::

    torchrun --nproc_per_node 2 benchmarks/megatron.py --microbatches 8 --variants megatron-interleaved zb-h2 zb-v \
        --interleaved-p2p overlap_p2p_comm --profile --trace-dir traces --out megatron_profile.md

Why a row ran slower than its plan (``--timed-actions``, no profiler): interleaf rows time every action of their
timed steps as well (CUDA events) and log those F/I/W costs per stage, the host's time to issue each kind per
stage (GPU only), the simulated step of the running order under them (on GPU also with a host lane per rank under
those issue times: ``simulate(..., host=)``) and under the costs it was planned from (the warm-up's: the first
round's, or the second round's when that re-planned), and the timed step. A simulation under the timed costs close to the step means the actions themselves took longer than in the
warm-up (most often a host late in issuing them: compare its issue times); well below it, the order waited
between its actions. Under the same timed costs (a simulation; they depend on the row) the line also gives the
busiest rank's compute per step, which no order's simulated step undercuts, and what ``auto`` planned from those
costs simulates: what a plan from the running order's own action times would give (the megatron adapter's
second round makes such a plan from its timed warm-up steps).

CPU smoke test (tiny model, gloo, fp32, no BENCHMARKS.md)::

    OMP_NUM_THREADS=1 python benchmarks/megatron.py --tiny --procs 4
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import re
import sys
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# Run as a script, this file's directory comes first on sys.path and "megatron" would name this file, not
# megatron-core: keep benchmarks/ off the path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks.device_gaps import add_profile_arguments, check_profile_arguments  # noqa: E402
from benchmarks.device_memory import allocated_gib_per_rank, release_between_rows  # noqa: E402
from benchmarks.local_ranks import run_local_ranks, show_interleaf_logs  # noqa: E402
from benchmarks.report import write_section  # noqa: E402

LAYOUT_OF = {"megatron-1f1b": "loop1", "zb-h2": "loop1", "megatron-interleaved": "loop2", "zb-v": "v", "auto": "v",
             "zb-h1": "loop1", "1f1b": "loop1", "interleaved-1f1b": "loop2", "v-half": "v", "v-min": "v",
             "auto-loop": "loop2"}
# no-pipeline estimates (``_ideal_step_func``): name -> whether the backward is interleaf's I + W split
IDEAL = {"ideal": False, "ideal-v": False, "ideal-v-split": True, "ideal-graphed": False,
         "ideal-v-split-graphed": True}
GRAPHED = ("ideal-graphed", "ideal-v-split-graphed")  # the same work replayed as CUDA graphs (GPU only)
# megatron's interleaved 1F1B with megatron's own CUDA graphs of its layers (cuda_graph_impl="local"; GPU only)
MEGATRON_GRAPHED = "megatron-interleaved-graphed"
LAYOUT_OF[MEGATRON_GRAPHED] = "loop2g"
LAYOUT_OF.update({"ideal": "loop2", "ideal-v": "v", "ideal-v-split": "v", "ideal-graphed": "loop2",
                  "ideal-v-split-graphed": "v"})
SCHEDULE_OF = {"auto-loop": "auto"}  # row name -> the schedule it runs, where they differ (auto on looped chunks)
BUDGETED = ("auto", "auto-loop")  # variants that take an activation budget: auto@22, auto-loop@22
DEFAULT_VARIANTS = ("megatron-1f1b", "zb-h2", "megatron-interleaved", "ideal", "zb-v", "auto", "ideal-v-split",
                    "zb-v+graphs", "auto+graphs")
BASELINE = "megatron-interleaved"
# (batch_p2p_comm, overlap_p2p_comm) runs of the baseline: both of megatron's p2p modes on GPU; on gloo only
# unbatched, non-overlapped p2p (batched same-tag messages mismatch at pp = 2, ../shared/docs/integration-notes.md)
P2P_MODES = {"batch_p2p_comm": (True, False), "overlap_p2p_comm": (False, True)}
BASELINE_P2P_CPU = ((False, False),)
# first-step loss / grad norm agreement required between variants (relative)
CHECK_RTOL_BF16 = 1e-2
CHECK_RTOL_FP32 = 1e-4
REPORT_SECTION = "benchmarks/megatron.py"  # its BENCHMARKS.md sections, one per pp: "benchmarks/megatron.py pp=4"
ANCHOR = dict(layers=32, hidden=2048, heads=16, seq=2048, vocab=32000)
TINY = dict(layers=8, hidden=64, heads=4, seq=64, vocab=256)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny GPT, fp32 (CPU smoke test)")
    p.add_argument("--microbatches", type=int, nargs="+", default=[8, 16])
    p.add_argument("--variants", nargs="+", default=None,
                   help=f"subset of {sorted(LAYOUT_OF)}; auto@GIB, auto-loop@GIB: auto under that activation budget; "
                        "NAME+graphs: an interleaf schedule with --pipeline-cuda-graphs (GPU); default: "
                        f"{' '.join(DEFAULT_VARIANTS)} (on CPU without the +graphs rows)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (auto, zb-h1/zb-h2/zb-v: + their measured steps)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--procs", type=int, default=0, help="spawn this many CPU gloo processes (no torchrun)")
    p.add_argument("--out", default=None, help="markdown file to update (default: BENCHMARKS.md on GPU, none on CPU)")
    p.add_argument("--json", default=None, help="also write the raw results as JSON here")
    p.add_argument("--interleaved-p2p", nargs="+", choices=sorted(P2P_MODES), default=list(P2P_MODES),
                   help="GPU: the p2p modes megatron-interleaved runs with (default: both; the faster correct one "
                        "is the baseline). CPU/gloo always runs unbatched, non-overlapped p2p")
    p.add_argument("--timed-actions", action="store_true",
                   help="interleaf rows: time every action of the timed steps too (CUDA events), and log the F/I/W "
                        "costs of those steps next to the warm-up's and what the simulator gives the running order "
                        "under each (where a row's timed step differs from its plan), and under the timed costs the "
                        "busiest rank's compute per step and what auto planned from them simulates")
    p.add_argument("--alternate", action="store_true",
                   help="time the variants' steps in turns (one step of each per round, after each has prepared "
                        "and warmed up) instead of one row after another: a host whose speed drifts then slows "
                        "every variant alike. Variants on megatron's looped or the V chunks only (vp = 2); all "
                        "their models stay resident at once")
    add_profile_arguments(p, "every row (megatron-interleaved gets its p2p mode in the trace name)")
    args = p.parse_args(argv)
    if args.variants is None:
        args.variants = [v for v in DEFAULT_VARIANTS if torch.cuda.is_available() or not v.endswith(GRAPHS_SUFFIX)]
    check_profile_arguments(p, args)
    if args.alternate and any(_layout(v) == "loop1" for v in args.variants):
        p.error("--alternate runs variants on vp = 2 chunks only (megatron's looped chunks, the V chunks); drop "
                + ", ".join(v for v in args.variants if _layout(v) == "loop1"))
    if args.alternate and (args.profile or args.timed_actions):
        p.error("--alternate times whole steps only: run --profile / --timed-actions without it")
    if not torch.cuda.is_available() and any(v in GRAPHED or v == MEGATRON_GRAPHED for v in args.variants):
        p.error("the -graphed rows replay CUDA graphs: run them on a GPU, or drop "
                + ", ".join(v for v in args.variants if v in GRAPHED or v == MEGATRON_GRAPHED))
    unknown = [v for v in args.variants if _layout(v) is None]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {sorted(LAYOUT_OF)}, or auto@GIB / auto-loop@GIB (auto "
                "under an activation memory budget of GIB GiB per rank, --pipeline-memory-limit-gib)")
    return args


GRAPHS_SUFFIX = "+graphs"  # zb-v+graphs, auto@22+graphs: the interleaf schedule with cuda_graphs on


def _split_variant(variant: str):
    """``(row name, memory_limit_gib)``: ``auto@22`` -> ``("auto", 22.0)``; ``(None, None)`` for a malformed or
    misplaced budget. A ``+graphs`` suffix (interleaf schedules only) is not part of the row name."""
    if variant.endswith(GRAPHS_SUFFIX):
        variant = variant[:-len(GRAPHS_SUFFIX)]
        if variant in IDEAL or variant.startswith("megatron-"):
            return None, None
    name, at, budget = variant.partition("@")
    if not at:
        return name, None
    try:
        limit = float(budget)
    except ValueError:
        return None, None
    return (name, limit) if name in BUDGETED and 0 < limit < float("inf") else (None, None)


def _schedule_of(variant: str):
    """``(schedule name, memory_limit_gib)`` a variant runs: ``auto@22`` and ``auto-loop@22`` are auto under
    ``--pipeline-memory-limit-gib 22`` (on V and on megatron's looped chunks)."""
    name, limit = _split_variant(variant)
    return SCHEDULE_OF.get(name, name), limit


def _layout(variant: str):
    """The chunk layout a variant runs on ("loop1", "loop2", "v"), or None for an unknown variant."""
    name, _ = _split_variant(variant)
    return LAYOUT_OF.get(name) if name is not None else None


# ------------------------------------------------------------------------------------------------ model
def _config(shape, *, pp, vp, gpu, megatron_graphs: bool = False):
    """``megatron_graphs``: megatron's own CUDA graphs of its layers (``--cuda-graph-impl local``), with
    ``overlap_p2p_comm`` (megatron's recommendation for interleaving) and without ``deallocate_pipeline_outputs``
    (megatron refuses it for its graphed layers' outputs)."""
    from megatron.core.transformer import TransformerConfig

    dtype = torch.bfloat16 if gpu else torch.float32
    return TransformerConfig(
        num_layers=shape["layers"], hidden_size=shape["hidden"], num_attention_heads=shape["heads"],
        hidden_dropout=0.0, attention_dropout=0.0, bf16=gpu, params_dtype=dtype, pipeline_dtype=dtype,
        pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vp, use_cpu_initialization=not gpu,
        # (megatron's graphed layers return views, which its deallocate_output_tensor refuses to free)
        perform_initialization=False, deallocate_pipeline_outputs=not megatron_graphs,
        batch_p2p_comm=gpu and not megatron_graphs,
        overlap_p2p_comm=megatron_graphs, cuda_graph_impl="local" if megatron_graphs else "none",
    )


_RNG_TRACKERS: dict = {}  # graphable (bool) -> megatron's CUDA RNG tracker of that kind, once made


def _use_rng_tracker(graphable: bool) -> None:
    """Make megatron's global CUDA RNG tracker the graph-safe one (what its CUDA graphs need) or the usual one
    (every other row: the same tracker the rows ran with before the megatron-graphed row existed)."""
    from megatron.core.tensor_parallel import random

    if graphable not in _RNG_TRACKERS:
        random.model_parallel_cuda_manual_seed(1234, use_cudagraphable_rng=graphable, force_reset_rng=True)
        _RNG_TRACKERS[graphable] = random._CUDA_RNG_STATE_TRACKER
    random._CUDA_RNG_STATE_TRACKER = _RNG_TRACKERS[graphable]


def _provider(config, shape):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    def model_provider(pre_process=True, post_process=True, vp_stage=None):
        return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(),
                        vocab_size=shape["vocab"], max_sequence_length=shape["seq"], pre_process=pre_process,
                        post_process=post_process, share_embeddings_and_output_weights=True, vp_stage=vp_stage)

    return model_provider


@torch.no_grad()
def _init_by_global_name(model) -> None:
    """Seed each parameter from its model-global name (decoder layers by global layer number): the same weights
    whatever the chunk layout. The tied LM-head copy takes the embedding's values."""
    layers = model.decoder.layers
    for name, p in model.named_parameters():
        m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
        if m:
            name = f"decoder.layers.{layers[int(m.group(1))].layer_number}.{m.group(2)}"
        if name == "output_layer.weight":
            name = "embedding.word_embeddings.weight"
        g = torch.Generator(device=p.device).manual_seed(zlib.crc32(name.encode()))
        if name.endswith("layernorm.weight"):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32) * 0.02)


def _build(layout, shape, *, pp, gpu, keep_parallel_state: bool = False):
    """Chunks of this rank for ``layout`` ("loop1", "loop2", "v"), in Float16Module (GPU) + megatron DDP.
    ``keep_parallel_state``: build into the model-parallel state already initialised (``--alternate`` keeps
    several layouts of the same vp at once) instead of a fresh one."""
    import megatron_patches
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.transformer.module import Float16Module

    vp = None if layout == "loop1" else 2
    megatron_graphs = layout == "loop2g"
    if not keep_parallel_state:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(1, pp, vp)
        _RNG_TRACKERS.clear()
    if gpu:  # megatron's CUDA RNG tracker (forward forks it for dropout); on CPU the test shim stands in for it
        _use_rng_tracker(megatron_graphs)  # (megatron's CUDA graph manager checks it when a layer is built)
    config = _config(shape, pp=pp, vp=vp, gpu=gpu, megatron_graphs=megatron_graphs)
    provider = _provider(config, shape)
    if layout == "v":
        chunks = megatron_patches.build_model_chunks(provider)
    else:
        chunks = []
        for c in range(vp or 1):
            vps = c if vp else None
            chunks.append(provider(pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vps),
                                   post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vps),
                                   vp_stage=vps))
    if gpu:
        _use_rng_tracker(False)
    wrapped = []
    for chunk in chunks:
        if gpu:
            chunk.cuda(torch.cuda.current_device())
        _init_by_global_name(chunk)
        module = Float16Module(config, chunk) if gpu else chunk
        ddp = DistributedDataParallel(
            config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                  use_distributed_optimizer=False), module)
        wrapped.append(ddp)
    config.no_sync_func = [w.no_sync for w in wrapped] if vp else wrapped[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped, config


def _forward_step_factory(shape, device):
    s = shape["seq"]
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool, device=device), diagonal=1)
    position_ids = torch.arange(s, device=device).unsqueeze(0)

    def forward_step(data_iterator, model):
        tokens, labels = next(data_iterator)
        output = model(tokens, position_ids, mask, labels=labels)

        def loss_func(output_tensor):
            loss = output_tensor.float().mean()
            return loss, {"lm loss": loss.detach().clone()}

        return output, loss_func

    return forward_step


# ------------------------------------------------------------------------------------------------ timing
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_step(step, device) -> tuple[float, float]:
    """One timed step after the device and every rank are idle: ``(host seconds until step() returned, seconds
    until the device finished it)``; the first is the step itself where the host was the bottleneck."""
    _sync(device)
    dist.barrier()
    t0 = time.perf_counter()
    step()
    host_s = time.perf_counter() - t0
    _sync(device)
    return host_s, time.perf_counter() - t0


def _p2p_label(batch: bool, overlap: bool) -> str:
    if overlap:
        return "overlap_p2p_comm"
    return "batch_p2p_comm" if batch else "unbatched p2p"


def _measure(variant, wrapped, config, shape, m, args, device, p2p=None):
    """One variant at one m. ``p2p = (batch_p2p_comm, overlap_p2p_comm)`` overrides the config for this run only
    (megatron's interleaved schedule reads both from the model's config at every call)."""
    tag = variant if p2p is None else f"{variant}-{_p2p_label(*p2p).replace(' ', '_')}"
    with _p2p_mode(config, p2p):
        row = _measure_with_config(variant, wrapped, config, shape, m, args, device, tag=tag)
    if p2p is not None:
        row["p2p"] = _p2p_label(*p2p)
    return row


@contextlib.contextmanager
def _p2p_mode(config, p2p):
    """``config.batch_p2p_comm, config.overlap_p2p_comm = p2p`` inside (nothing for ``p2p=None``)."""
    if p2p is None:
        yield
        return
    saved = (config.batch_p2p_comm, config.overlap_p2p_comm)
    config.batch_p2p_comm, config.overlap_p2p_comm = p2p
    try:
        yield
    finally:
        config.batch_p2p_comm, config.overlap_p2p_comm = saved


def _prepare(variant, wrapped, shape, m, args, device):
    """A row up to its timed steps: its data, its ``forward_backward_func``, the first step (its loss and gradient
    norm for the check) and the warm-up steps (interleaf's included). Returns ``(step, enter, func, first_loss,
    first_grad_norm)``: ``step()`` runs one more step, ``enter()`` puts megatron_patches in the state the step needs
    (applied with this schedule, or removed: megatron's own and the ideal rows run without interleaf's linear
    patch) and is called here first; ``--alternate`` calls it again before each of the row's timed steps."""
    import megatron_patches
    from megatron.core.pipeline_parallel import schedules

    g = torch.Generator().manual_seed(7)
    data = [(torch.randint(0, shape["vocab"], (1, shape["seq"]), generator=g).to(device),
             torch.randint(0, shape["vocab"], (1, shape["seq"]), generator=g).to(device)) for _ in range(m)]
    forward_step = _forward_step_factory(shape, device)
    vp = len(wrapped)
    if variant in IDEAL or variant.startswith("megatron-"):
        graphable = variant == MEGATRON_GRAPHED

        def enter():
            megatron_patches.remove()
            if device.type == "cuda":
                _use_rng_tracker(graphable)

        enter()
        func = (_ideal_step_func(split=IDEAL[variant], shape=shape, device=device, graphed=variant in GRAPHED)
                if variant in IDEAL
                else schedules.get_forward_backward_func())
        # graphed: the first step runs eagerly and captures, the second (untimed) is the checked first replay;
        # megatron's graphs: its layers run eagerly for cuda_graph_warmup_steps, record, then capture
        warmup = max(args.warmup, 2) if variant in GRAPHED else args.warmup
        if variant == MEGATRON_GRAPHED:
            warmup += wrapped[0].config.cuda_graph_warmup_steps + 2
    else:
        from megatron_patches.forward_backward import SETTLE_STEPS

        name, memory_limit_gib = _schedule_of(variant)

        def enter():
            megatron_patches.apply(name, memory_limit_gib=memory_limit_gib,
                                   cuda_graphs=variant.endswith(GRAPHS_SUFFIX))
            if device.type == "cuda":
                _use_rng_tracker(False)  # (after a megatron-interleaved-graphed turn of --alternate)

        enter()
        func = schedules.get_forward_backward_func()
        # auto plans, zb-h1/zb-h2/zb-v are rebuilt from the per-action timings of their first steps, then planned
        # again from the timings of the order so planned
        settle = SETTLE_STEPS if name in ("auto", "zb-h1", "zb-h2", "zb-v") else 0
        warmup = args.warmup + settle
        if variant.endswith(GRAPHS_SUFFIX):  # the first step after settling captures: not a timed one
            warmup = max(warmup, settle + 2)

    def step():
        for w in wrapped:
            w.zero_grad_buffer()
        iters = [iter(data) for _ in wrapped]
        return func(forward_step_func=forward_step, data_iterator=iters if vp > 1 else iters[0],
                    model=wrapped if vp > 1 else wrapped[0], num_microbatches=m, seq_length=shape["seq"],
                    micro_batch_size=1)

    store = step()
    first_loss = float(torch.stack([d["lm loss"] for d in store]).mean()) if store else None
    # Gradient check: every variant trains the same model on the same data, so the first step's gradient norm
    # must agree.
    first_grad_norm = _grad_norm(wrapped, device) if variant not in IDEAL else None  # ideal: random activations
    for _ in range(warmup - 1):
        step()
    if variant == MEGATRON_GRAPHED:
        from megatron.core.transformer.cuda_graphs import _CudagraphGlobalRecord

        if not _CudagraphGlobalRecord.cudagraph_created:
            raise RuntimeError(f"{variant}: megatron created no CUDA graphs in {warmup} warm-up steps")
    return step, enter, func, first_loss, first_grad_norm


def _measure_with_config(variant, wrapped, config, shape, m, args, device, *, tag: str):
    """``tag``: the run's name in trace files."""
    import megatron_patches

    step, _, func, first_loss, first_grad_norm = _prepare(variant, wrapped, shape, m, args, device)
    _sync(device)
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    issued = []  # host time until step() returned (~ the step: the host was the bottleneck or waited inside)
    runner = next(iter(getattr(func, "runners", {}).values()), None)  # interleaf's, after its last rebuild
    timed_actions = [] if args.timed_actions and runner is not None else None
    if timed_actions is not None:
        timing_before, runner.executor.timing = runner.executor.timing, "action"
    for _ in range(args.steps):
        host_s, step_s = _timed_step(step, device)
        issued.append(host_s)
        times.append(step_s)
        if timed_actions is not None:
            timed_actions.append((runner.last_result.typical_seconds(), runner.last_result.typical_host_seconds()))
    if timed_actions is not None:
        runner.executor.timing = timing_before
    pool_gib = _graph_pool_gib(runner, variant) if device.type == "cuda" else 0.0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 + pool_gib if device.type == "cuda" else 0.0
    last_grad_norms = [_grad_norm(wrapped, device)] if _replays_graphs(variant) else None
    measured = _measured_costs(runner)
    timed_costs = _timed_step_costs(runner, timed_actions, times) if timed_actions is not None else None
    profile = None
    if args.profile:  # after the timed steps and the peak memory: one more step, not timed
        from benchmarks.device_gaps import profile_step

        profile = profile_step(step, device, label=f"[megatron bench] profile {tag} m={m}",
                               trace_path=args.trace_dir and os.path.join(
                                   args.trace_dir, f"{tag}_m{m}_rank{dist.get_rank()}.json.gz"),
                               annotate=[runner.executor] if runner is not None else [])
    megatron_patches.remove()
    row = _row_of(variant, m, shape, times, issued, peak, first_loss, first_grad_norm, runner, device, pool_gib)
    if last_grad_norms is not None:
        row["last_grad_norms"] = last_grad_norms
    if measured is not None:
        row["measured_costs"] = measured
    if timed_costs is not None:
        row["timed_step_costs"] = timed_costs
    if profile is not None:
        row["profile"] = profile
    return row


def _replays_graphs(variant: str) -> bool:
    """Whether a variant's timed steps replay CUDA graphs captured after its first step (then its replayed steps'
    gradient norms are checked against the first's)."""
    return variant.endswith(GRAPHS_SUFFIX) or variant == MEGATRON_GRAPHED


def _grad_norm(wrapped, device) -> float:
    """The gradient norm over all main_grads of all ranks (tied embedding copies count twice in every layout)."""
    sq = torch.zeros([], dtype=torch.float64, device=device)
    for w in wrapped:
        for p in w.parameters():
            sq += p.main_grad.double().pow(2).sum()
    dist.all_reduce(sq)
    return float(sq.sqrt())


def _graph_pool_gib(runner, variant: str = "") -> float:
    """The memory a row's CUDA graphs keep reserved in their pools (GiB; 0 without graphs): replays allocate nothing,
    so the peak of allocated memory leaves it out and the row's peak adds it. ``+graphs`` rows: their runner's
    pool; megatron's graphs: every private pool on the device less interleaf's live ones."""
    graphs = getattr(runner, "graphs", None)
    if graphs is not None:
        return graphs.pool_bytes() / 2**30
    if variant != MEGATRON_GRAPHED:
        return 0.0
    from megatron_patches import cuda_graphs

    private = sum(seg["total_size"] for seg in torch.cuda.memory_snapshot()
                  if tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0))
    return (private - sum(g.pool_bytes() for g in list(cuda_graphs._LIVE))) / 2**30


def _row_of(variant, m, shape, times, issued, peak, first_loss, first_grad_norm, runner, device,
            pool_gib: float = 0.0) -> dict:
    """A table row from one rank's timed steps (gathers: call on every rank). One figure per step: the slowest
    rank's time (all of them in ``step_ms``, in run order); tokens/s from their mean. ``pool_gib``: this rank's
    CUDA graph pool (``_graph_pool_gib``, already in ``peak``)."""
    t = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak)
    losses = [None] * dist.get_world_size()
    dist.all_gather_object(losses, first_loss)
    loss = next((x for x in losses if x is not None), None)
    pools = [None] * dist.get_world_size()
    dist.all_gather_object(pools, pool_gib)
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, sum(i / max(s, 1e-9) for i, s in zip(issued, times)) / len(times))
    mean_s = float(t.mean())
    row = {"variant": variant, "microbatches": m, "step_s": mean_s,
           "tokens_per_s": m * shape["seq"] / mean_s, "peak_gib": peaks, "first_loss": loss,
           "first_grad_norm": first_grad_norm, "host_issue_share": shares, "step_ms": [1e3 * x for x in t.tolist()]}
    if any(pools):
        row["graph_pool_gib"] = pools  # (inside peak_gib)
    if runner is not None:
        row["schedule"] = runner.schedule.name + (f" ({runner.tuning} for measured costs)" if runner.tuning else "")
        if runner.replan not in (None, "none"):
            row["replan"] = runner.replan
            row["schedule"] += f"; second round {runner.replan}"
        if runner.replan_ms is not None:
            row["replan_ms"] = list(runner.replan_ms)
            row["schedule"] += (f": running order {runner.replan_ms[0]:.1f} ms, re-plan {runner.replan_ms[1]:.1f} ms "
                                "under its timings")
        row["activations_held"] = _activations_held(runner.schedule)
    return row


def _ideal_step_func(*, split: bool, shape, device, graphed: bool = False, capture=None):
    """A ``forward_backward_func`` stand-in for the ``ideal`` rows: each rank runs, for every micro-batch and each
    of its chunks, the chunk's forward and at once its backward, on inputs of the right shape (its tokens on the
    first chunk, a fixed random activation on the others; a fixed random output gradient on non-last chunks), with
    no p2p and nothing to wait for. A step is then the rank's own work alone (anchors.md's "ideal"), host time
    included: the slowest rank's step estimates what any order of the same actions can reach on this machine
    (one measurement: on hosts whose speed drifts a pipelined row can beat it).
    ``split``: the backward as interleaf's zero-bubble schedules run it (the input-gradient pass with megatron's
    linear weight GEMMs queued, then the queued GEMMs) instead of megatron's own. No finalize_model_grads: it is
    communication.
    ``graphed`` (the ``-graphed`` rows, an experiment: what the same work costs once the host no longer issues it
    kernel by kernel): the first call runs eagerly, then captures each micro-batch's forward, backward (I) and
    weight pass (W) of each chunk as its own CUDA graph, in the order they run, all in one memory pool; later calls
    copy each micro-batch's data into the captured input and replay the graphs in that order. The first replay's
    gradients must equal the eager call's (else RuntimeError): a capture that missed work would show there.
    ``capture(fn, pool, stream) -> replay`` records ``fn`` (default: a CUDA graph; the CPU tests pass a stand-in whose
    replay runs ``fn`` again)."""
    from megatron.core.utils import get_attr_wrapped_model
    from megatron_patches import linear_weight_grad
    from megatron_patches.cuda_graphs import (backward_to_main_grads, cuda_graph_capture, grad_accumulators_made_here,
                                              no_rng_fork)

    fixed: dict = {}  # chunk index -> (input activation or None, output gradient or None)
    graphs: list = []  # graphed: per (micro-batch, chunk) in run order: (chunk index, static batch, replays)
    reference: list = []  # graphed: the eager call's main_grads, compared with the first replay's
    queue: list = []

    def inputs(chunk, c, seq_length, micro_batch_size) -> None:
        if c not in fixed:
            g = torch.Generator(device=device).manual_seed(c)
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as _config's
            size = (seq_length, micro_batch_size, shape["hidden"])
            fixed[c] = tuple(None if get_attr_wrapped_model(chunk, end) else
                             torch.randn(size, generator=g, device=device, dtype=dtype)
                             for end in ("pre_process", "post_process"))

    def actions(chunk, c, data_iterator, forward_step_func, *, to_capture: bool = False):
        """One micro-batch of one chunk as (forward, backward[, weight pass]), to run in that order (the weight
        pass with ``split`` only: megatron's own backward leaves nothing queued). ``to_capture``: the backward
        adds the parameters' gradients to ``main_grad`` itself, as megatron DDP's hook would (with
        ``overlap_grad_reduce`` off): the hook runs from the parameters' gradient accumulators, which were made on
        the default stream, and a capture may not make that stream wait for it."""
        x, grad = fixed[c]
        held: dict = {}

        def forward():
            x_in = held["x"] = None if x is None else x.detach().requires_grad_()
            get_attr_wrapped_model(chunk, "set_input_tensor")(x_in)
            output, loss_func = forward_step_func(data_iterator, chunk)
            held["out"] = loss_func(output)[0] if grad is None else output
            get_attr_wrapped_model(chunk, "set_input_tensor")(None)

        def backward():
            out, x_in = held.pop("out"), held.pop("x")
            if not to_capture:
                torch.autograd.backward(out, grad)
            else:
                backward_to_main_grads(out, grad, x_in, [p for p in chunk.parameters() if p.requires_grad])
            held["w"] = list(queue)
            queue.clear()

        def weight():
            with torch.no_grad():
                for closure in held.pop("w"):
                    closure()

        return (forward, backward, weight) if split else (forward, backward)

    def main_grads(chunks):
        return torch.cat([p.main_grad.detach().float().flatten() for w in chunks for p in w.parameters()])

    def func(*, forward_step_func, data_iterator, model, num_microbatches, seq_length, micro_batch_size):
        chunks = model if isinstance(model, list) else [model]
        iters = data_iterator if isinstance(data_iterator, list) else [data_iterator]
        if split:  # (a replayed CUDA graph runs no Python: the patch matters to the eager call and the capture)
            linear_weight_grad.install(lambda: queue.append)
        if graphs:
            try:
                for c, static, replays in graphs:
                    for target, value in zip(static, next(iters[c])):
                        target.copy_(value)
                    for replay in replays:
                        replay()
            finally:
                if split:
                    linear_weight_grad.uninstall()
            if reference:
                _check_replay(main_grads(chunks), reference.pop())
            return []
        for c, chunk in enumerate(chunks):
            inputs(chunk, c, seq_length, micro_batch_size)
        # graphed: the eager call and the captures on one side stream (lazy per-stream set-up, e.g. cuBLAS's
        # workspace, happens before the capture, not inside it)
        stream = torch.cuda.Stream(device) if graphed and capture is None else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                batches: list = [[] for _ in chunks]
                for _ in range(num_microbatches):
                    for c, chunk in enumerate(chunks):
                        tap = _Tap(iters[c], batches[c]) if graphed else iters[c]
                        for run in actions(chunk, c, tap, forward_step_func):
                            run()
                if graphed:
                    reference.append(main_grads(chunks))
                    _capture_all(chunks, batches, forward_step_func, num_microbatches, stream)
        finally:
            if split:
                linear_weight_grad.uninstall()
            if stream is not None:
                torch.cuda.current_stream(device).wait_stream(stream)
        return []

    def _capture_all(chunks, batches, forward_step_func, num_microbatches, stream):
        for chunk in chunks:
            config = get_attr_wrapped_model(chunk, "config")
            if config.hidden_dropout or config.attention_dropout:
                raise ValueError("the -graphed ideal rows capture without megatron's RNG tracker: they need dropout 0")
        record = capture or cuda_graph_capture
        pool = torch.cuda.graph_pool_handle() if capture is None else None
        with no_rng_fork(), grad_accumulators_made_here(chunks, device):
            for j in range(num_microbatches):
                for c, chunk in enumerate(chunks):
                    static = tuple(t.clone() for t in batches[c][j])
                    runs = actions(chunk, c, itertools.repeat(static), forward_step_func, to_capture=True)
                    graphs.append((c, static, [record(run, pool, stream) for run in runs]))

    return func


class _Tap:
    """An iterator that passes ``source``'s items through and keeps them in ``seen``."""

    def __init__(self, source, seen: list) -> None:
        self._source, self._seen = source, seen

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self._source)
        self._seen.append(item)
        return item


def _check_replay(got: torch.Tensor, want: torch.Tensor) -> None:
    """The first replay's main_grads against the eager call's (the same data and weights): equal up to 1e-3 of the
    largest gradient, else RuntimeError. Logs the difference."""
    diff = float((got - want).abs().max())
    scale = float(want.abs().max())
    print(f"[megatron bench] rank {dist.get_rank()}: graphed replay's gradients vs the eager step's: max |diff| "
          f"{diff:.3g} (max |grad| {scale:.3g})", flush=True)
    if not diff <= 1e-3 * scale:
        raise RuntimeError(f"the graphed ideal step's gradients differ from its eager step's by {diff:.3g} (max |grad| "
                           f"{scale:.3g}): the capture missed or repeated work")


def _measured_costs(runner) -> dict | None:
    """What interleaf's runner measured in its warm-up (``runner.measured_costs``, the cost model its rebuild or
    auto's plan came from): mean F/I/W milliseconds per stage, and per pipeline rank its stages and the compute
    one step asks of it (micro-batches x the sum of F + I + W over its stages). None for megatron's own
    schedules and for interleaf schedules run without the measured warm-up."""
    costs = getattr(runner, "measured_costs", None)
    if costs is None:
        return None
    shape = runner.schedule.shape
    return {"fiw_ms_per_stage": _fiw_ms_per_stage(costs), "stages_of_rank": {r: list(shape.stages_of(r))
                                                                             for r in range(shape.pp)},
            "compute_ms_per_step_of_rank": {r: 1e3 * costs.rank_compute_time(shape, r) for r in range(shape.pp)}}


def _fiw_ms_per_stage(costs) -> dict[int, list[float]]:
    """A cost model's F/I/W milliseconds per stage: ``{stage: [F, I, W]}``."""
    return {s: [1e3 * costs.forward[s], 1e3 * costs.backward_input[s], 1e3 * costs.backward_weight[s]]
            for s in range(costs.num_stages)}


def _fiw_text(fiw: list[float]) -> str:
    return "/".join(f"{x:.2f}" for x in fiw)


def _timed_step_costs(runner, timed_actions, times) -> dict:
    """``--timed-actions``: every rank's per-action times of the timed steps (trimmed means per stage and kind),
    the simulated step of the running order under them and under the costs it was planned from, and the timed
    step. Where
    the order ran slower than planned this tells whether its actions took longer than in the warm-up (the
    simulation under timed-step costs matches the step) or it waited longer between them (it does not). Called
    on every rank (it gathers); the result is the same on all."""
    from dataclasses import replace

    from ds_plugins.runtime import costs_from_ranks
    from ds_plugins.schedule import simulate

    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, ([t for t, _ in timed_actions], [], [h for _, h in timed_actions]))
    t = torch.tensor(times, dtype=torch.float64, device=next(runner.chunks[0].parameters()).device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    warm = runner.measured_costs
    shape = runner.schedule.shape
    timed = costs_from_ranks([(seconds, memory) for seconds, memory, _ in everyone], shape)[0]
    if warm is not None:  # memory and transfer time as the warm-up measured them (the timed steps track neither)
        timed = replace(timed, comm=warm.comm, activation_memory=warm.activation_memory,
                        weight_grad_memory=warm.weight_grad_memory)
    out = {
        "fiw_ms_per_stage": _fiw_ms_per_stage(timed),
        "simulated_ms": 1e3 * simulate(runner.schedule, timed).makespan,
        "step_ms": 1e3 * float(t.mean()),
    }
    if warm is not None:
        out["simulated_warmup_ms"] = 1e3 * simulate(runner.schedule, warm).makespan
        # Under the timed steps' costs (a simulation; they depend on the row): the busiest rank's compute, which no
        # order's step undercuts there, and auto planned from them (the warm-up planned from the seed order's
        # timings, which can differ from what the running order's actions take: would a second round of
        # measuring help?).
        out["busiest_rank_ms"] = 1e3 * max(timed.rank_compute_time(shape, r) for r in range(shape.pp))
        plan = runner.plan_auto(timed, measured_memory=runner.measured_memory, quiet=True)  # it does not run
        out["replanned_auto_ms"] = 1e3 * simulate(plan, timed).makespan
    host = [h for _, _, steps in everyone for h in steps if h]
    if host:  # CUDA events: the host's time to issue each action, next to its GPU time above
        issue = costs_from_ranks([(host, [])], shape)[0]
        out["host_fiw_ms_per_stage"] = _fiw_ms_per_stage(issue)
        # the same order with a host lane per rank: no action ends before its host has issued it
        out["simulated_host_ms"] = 1e3 * simulate(runner.schedule, timed, host=issue).makespan
    return out


def _format_timed_step_costs(costs: dict) -> str:
    per_stage = ", ".join(_fiw_text(fiw) for fiw in costs["fiw_ms_per_stage"].values())
    warm = (f", {costs['simulated_warmup_ms']:.1f} ms under the costs it was planned from"
            if "simulated_warmup_ms" in costs else "")
    host = lane = ""
    if "host_fiw_ms_per_stage" in costs:
        host = ("; the host issued them in F/I/W ms per stage ["
                + ", ".join(_fiw_text(fiw) for fiw in costs["host_fiw_ms_per_stage"].values()) + "]")
    if "simulated_host_ms" in costs:
        lane = f" ({costs['simulated_host_ms']:.1f} ms with no action ending before its host issued it)"
    ceiling = ""
    if "busiest_rank_ms" in costs:
        ceiling = (f"; under them the busiest rank computes {costs['busiest_rank_ms']:.1f} ms per step and auto "
                   f"planned from them simulates {costs['replanned_auto_ms']:.1f} ms")
    return (f"timed steps' F/I/W ms per stage [{per_stage}]{host}; the running order simulates "
            f"{costs['simulated_ms']:.1f} ms under them{lane}{warm}{ceiling}; timed step {costs['step_ms']:.1f} ms")


def _format_measured(costs: dict) -> str:
    parts = []
    for r, stages in costs["stages_of_rank"].items():
        own = ", ".join(f"stage {s} {_fiw_text(costs['fiw_ms_per_stage'][s])}" for s in stages)
        parts.append(f"rank {r}: {own} -> {costs['compute_ms_per_step_of_rank'][r]:.1f} ms of F+I+W per step")
    return "measured F/I/W ms per action (its warm-up; CUDA events on GPU): " + "; ".join(parts)


def run_all(args):
    if args.alternate:
        return run_alternating(args)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    shape = TINY if args.tiny else ANCHOR
    pp = dist.get_world_size()
    rows = []
    # one model build per layout, the layouts in the order --variants first names them (what is listed first has
    # printed its numbers even if a later layout fails or the run is cut off)
    for layout in dict.fromkeys(_layout(v) for v in args.variants):
        variants = [v for v in args.variants if _layout(v) == layout]
        if not variants:
            continue
        release_between_rows(device)
        wrapped, config = _build(layout, shape, pp=pp, gpu=gpu)
        model_gib = allocated_gib_per_rank(device)  # weights + DDP grad buffers, nothing run yet
        for m in args.microbatches:
            runs = []
            for variant in variants:
                if variant == BASELINE:
                    runs += [(variant, p2p) for p2p in _interleaved_modes(args, gpu)]
                else:
                    runs.append((variant, None))
            for variant, p2p in runs:
                release_row_state(wrapped)
                release_between_rows(device)
                # every rank's: what a previous row left allocated on a rank shows up under this row's peak there
                before = allocated_gib_per_rank(device)
                row = _measure(variant, wrapped, config, shape, m, args, device, p2p=p2p)
                row["allocated_before_gib"] = before
                row["model_gib"] = model_gib
                rows.append(row)
                _log_row(row)
        release_layout(wrapped, config)
        del wrapped, config
        release_between_rows(device)
    return rows


def _log_row(row) -> None:
    """Rank 0 prints the row's log line (and interleaf's plan figures under it)."""
    if dist.get_rank() != 0:
        return
    before, model_gib = row["allocated_before_gib"], row["model_gib"]
    print(f"{_name(row):40s} m={row['microbatches']:3d}: {row['tokens_per_s']:12,.0f} tokens/s, step "
          f"{row['step_s'] * 1e3:8.1f} ms, first loss {_opt(row['first_loss'], '.5f')}, grad norm "
          f"{_opt(row['first_grad_norm'], '.6g')}, peak GiB "
          f"{' / '.join(f'{p:.1f}' for p in row['peak_gib'])} "
          f"({' / '.join(f'{b:.2f}' for b in before)} GiB per rank still allocated before it; "
          f"model + DDP buffers {' / '.join(f'{b:.2f}' for b in model_gib)}), host issue / step "
          f"{' / '.join(f'{h:.2f}' for h in row['host_issue_share'])}"
          + (f", ran {row['schedule']}" if row.get("schedule") else ""), flush=True)
    if row.get("graph_pool_gib"):
        print(f"    CUDA graph pool GiB per rank (in the peak): {' / '.join(f'{g:.2f}' for g in row['graph_pool_gib'])}"
              f"; replayed steps' grad norms {', '.join(f'{g:.6g}' for g in row.get('last_grad_norms', []))}",
              flush=True)
    if row.get("activations_held"):
        print(f"    {_format_held(row['activations_held'])}", flush=True)
    if row.get("measured_costs"):
        print(f"    {_format_measured(row['measured_costs'])}", flush=True)
    if row.get("timed_step_costs"):
        print(f"    {_format_timed_step_costs(row['timed_step_costs'])}", flush=True)


def run_alternating(args):
    """``--alternate``: every variant's timed steps in turns instead of one row after another. All layouts are
    built at once (megatron's looped chunks and the V chunks share one model-parallel state, vp = 2), each variant
    prepares as in a row (first step for the check, warm-up, interleaf's planning), then ``--steps`` rounds run one
    step of each variant in the order :func:`_round_order` gives: a host whose speed drifts over tens of seconds
    then slows every variant alike, which rows run one after another do not see. Peak memory per rank: the step's
    own rise over what was allocated before it plus its layout's model and DDP buffers (the other layouts stay
    resident); what stays allocated between steps (megatron's global memory buffer, a chunk's last input tensor)
    is not in it, so these peaks read a little below the row-by-row mode's. Returns rows like :func:`run_all`'s
    (without ``measured_costs``)."""
    import megatron_patches

    gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    shape = TINY if args.tiny else ANCHOR
    pp = dist.get_world_size()
    built = {}
    rows = []
    try:
        for layout in dict.fromkeys(_layout(v) for v in args.variants):
            before = allocated_gib_per_rank(device)
            wrapped, config = _build(layout, shape, pp=pp, gpu=gpu, keep_parallel_state=bool(built))
            after = allocated_gib_per_rank(device)
            built[layout] = (wrapped, config, [a - b for a, b in zip(after, before)])
            del wrapped, config
        for m in args.microbatches:
            rows += _alternate_one_m(args, built, shape, m, device)
            release_between_rows(device)
    finally:
        megatron_patches.remove()
        for wrapped, config, _ in built.values():
            release_layout(wrapped, config)
        built.clear()
        release_between_rows(device)
    return rows


def _round_order(n: int, r: int) -> list[int]:
    """Which of ``n`` prepared variants steps when in round ``r`` of ``--alternate``: rotated by ``r`` and, every
    other round, reversed, so each variant starts a round as often as the others (over ``2 n`` rounds) and follows
    either neighbour in turn instead of always the same one (a step can leave the next one a warm or a cold cache,
    allocator, clock)."""
    order = [(k + r) % n for k in range(n)]
    return order[::-1] if r % 2 else order


def _alternate_one_m(args, built, shape, m, device) -> list[dict]:
    """``--alternate`` at one m: prepare every variant, take the timed steps in turns, return the rows."""
    import megatron_patches

    gpu = device.type == "cuda"
    entries = []
    for variant in args.variants:
        wrapped, config, model_gib = built[_layout(variant)]
        for p2p in (_interleaved_modes(args, gpu) if variant == BASELINE else [None]):
            release_row_state(wrapped)
            release_between_rows(device)
            with _p2p_mode(config, p2p):
                prepared = _prepare(variant, wrapped, shape, m, args, device)
            entries.append((variant, p2p, config, model_gib, prepared))
    times = [[] for _ in entries]
    issued = [[] for _ in entries]
    rise = [0.0] * len(entries)
    last_norms: list[list[float]] = [[] for _ in entries]
    allocated = allocated_gib_per_rank(device)
    for r in range(args.steps):
        for i in _round_order(len(entries), r):
            variant, p2p, config, _, (step, enter, *_) = entries[i]
            enter()
            with _p2p_mode(config, p2p):
                base = torch.cuda.memory_allocated(device) if gpu else 0
                if gpu:
                    torch.cuda.reset_peak_memory_stats(device)
                host_s, step_s = _timed_step(step, device)
                issued[i].append(host_s)
                times[i].append(step_s)
                if gpu:
                    rise[i] = max(rise[i], (torch.cuda.max_memory_allocated(device) - base) / 2**30)
                if _replays_graphs(variant):  # (after the timing: checked with check_first_step)
                    last_norms[i].append(_grad_norm(built[_layout(variant)][0], device))
    megatron_patches.remove()
    rows = []
    for i, (variant, p2p, config, model_gib, (_, _, func, first_loss, first_grad_norm)) in enumerate(entries):
        runner = next(iter(getattr(func, "runners", {}).values()), None)
        pool_gib = _graph_pool_gib(runner, variant) if gpu else 0.0
        peak = rise[i] + model_gib[dist.get_rank()] + pool_gib if gpu else 0.0
        row = _row_of(variant, m, shape, times[i], issued[i], peak, first_loss, first_grad_norm, runner, device,
                      pool_gib)
        if p2p is not None:
            row["p2p"] = _p2p_label(*p2p)
        row["allocated_before_gib"], row["model_gib"] = allocated, model_gib
        row["alternate"] = True
        if last_norms[i]:
            row["last_grad_norms"] = last_norms[i]
        rows.append(row)
        _log_row(row)
    return rows


def release_row_state(wrapped) -> None:
    """What a finished row leaves on the model chunks, dropped before the next row so every row starts from the
    same state: the model's weights and DDP grad buffers only.

    - ``TransformerBlock.input_tensor``: megatron's ``set_input_tensor`` keeps the last activation a non-first
      chunk received (and, through it, that activation's gradient) until the next forward replaces it (GPU: one
      s x b x h bf16 tensor + its gradient, 16 MiB per non-first chunk).
    - megatron's global memory buffer (``parallel_state``'s ``GlobalMemoryBuffer``): unfused attention takes its
      ``baddbmm`` input from it (b x heads x s x s: 128 MiB in bf16 on the GPU model); it is allocated again by
      the next row's first forward, in its warm-up like the first row's.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_attr_wrapped_model

    for chunk in wrapped:
        get_attr_wrapped_model(chunk, "set_input_tensor")(None)
    if ps.model_parallel_is_initialized():
        ps.destroy_global_memory_buffer()
        ps._set_global_memory_buffer()  # megatron's own initializer (initialize_model_parallel calls it)


def release_layout(wrapped, config) -> None:
    """Drop what keeps a layout's chunks reachable once its rows are done (then ``del`` them and ``release_between_rows``):
    the row state (:func:`release_row_state`), the chunks' ``no_sync`` methods the config holds (config -> DDP ->
    module -> config: a cycle only ``gc.collect`` frees), interleaf's patch and its cached runner (executor, stage
    wrappers, p2p state: ``megatron_patches.remove``) and megatron's model-parallel state with its global memory
    buffer. tests/megatron/test_benchmark_memory.py checks on CPU that nothing of a layout survives it."""
    import megatron_patches
    from megatron.core import parallel_state as ps

    release_row_state(wrapped)
    megatron_patches.remove()
    config.no_sync_func = None
    config.finalize_model_grads_func = None
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


def _activations_held(schedule) -> list[list[float]]:
    """Per pipeline rank, from the order the row ran: the most micro-batches whose forward has run and whose I
    (input-gradient half) has not, and the most whose W (weight-gradient half) has not - what the order keeps
    alive at once on that rank, counted in micro-batches through all of the rank's layers (a stage of a rank with
    vp chunks counts 1/vp). From F to I a micro-batch keeps all its activations, from I to W the weight GEMMs'
    inputs and output gradients."""
    from ds_plugins.schedule.ir import ActionKind

    vp = schedule.shape.vp
    out = []
    for r in range(schedule.shape.pp):
        until_i = until_w = most_i = most_w = 0
        for a in schedule.compute_actions(r):
            if a.kind is ActionKind.FORWARD:
                until_i += 1
                until_w += 1
            elif a.kind is ActionKind.BACKWARD_INPUT:
                until_i -= 1
            elif a.kind is ActionKind.BACKWARD_WEIGHT:
                until_w -= 1
            elif a.kind is ActionKind.BACKWARD:
                until_i -= 1
                until_w -= 1
            most_i, most_w = max(most_i, until_i), max(most_w, until_w)
        out.append([most_i / vp, most_w / vp])
    return out


def _format_held(held: list[list[float]]) -> str:
    return ("activations the order keeps per rank (micro-batches through the rank's layers), until I / until W: "
            + "; ".join(f"rank {r} {i:g} / {w:g}" for r, (i, w) in enumerate(held)))


def _interleaved_modes(args, gpu: bool):
    """(batch_p2p_comm, overlap_p2p_comm) of each megatron-interleaved run."""
    return [P2P_MODES[name] for name in args.interleaved_p2p] if gpu else BASELINE_P2P_CPU


def _name(row) -> str:
    return row["variant"] + (f" ({row['p2p']})" if row.get("p2p") else "")


def _baseline_row(sel):
    """The fastest megatron-interleaved run (over its p2p modes) among ``sel`` that passed the first-step check
    (any, if none passed), or None."""
    runs = [r for r in sel if r["variant"] == BASELINE]
    passed = [r for r in runs if r.get("check") == "ok"]
    return max(passed or runs, key=lambda r: r["tokens_per_s"], default=None)


def _reference_row(sel, rtol: float):
    """The row the first-step check compares against: megatron's own non-interleaved 1F1B when it ran (plain
    p2p, no chunks); else the row that the most rows agree with (within ``rtol``; among equals megatron's own runs
    first, then run order). Never simply the fastest row or a fixed megatron run: at pp=2 megatron's interleaved
    schedule with batch_p2p_comm returns a wrong gradient (measured on 2x H100, grad norm 1.3e12 against 1.45)."""
    one = next((r for r in sel if r["variant"] == "megatron-1f1b"), None)
    if one is not None:
        return one

    def agrees(a, b) -> bool:
        return all(a[k] is not None and b[k] is not None and _rel(a[k], b[k]) <= rtol
                   for k in ("first_loss", "first_grad_norm"))

    return max(sel, key=lambda r: (sum(agrees(r, o) for o in sel), r["variant"].startswith("megatron-"),
                                   -sel.index(r)))


def _opt(value, spec: str) -> str:
    """``value`` formatted with ``spec``, or "—" for None (the ``ideal`` rows have no loss or gradient to check)."""
    return "—" if value is None else format(value, spec)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def check_first_step(rows, microbatches, rtol: float) -> list[tuple[str, str]]:
    """Mark (row["check"]) and return ``(variant, message)`` for the rows whose first-step loss or gradient norm
    differs from the reference row of the same m (``_reference_row``) by more than ``rtol`` relative. All variants
    here share weights (seeded by model-global parameter name) and data, so any difference beyond rounding is a
    wrong schedule, not a different model."""
    failures = []
    for m in microbatches:
        for r in rows:
            if r["microbatches"] == m and r["variant"] in IDEAL:
                r["check"] = "— (no pipeline: an estimate)"
        sel = [r for r in rows if r["microbatches"] == m and r["variant"] not in IDEAL]
        if not sel:
            continue
        ref = _reference_row(sel, rtol)
        for r in sel:
            problems = []
            for key in ("first_loss", "first_grad_norm"):
                if r[key] is None or ref[key] is None:
                    problems.append(f"{key} missing")
                elif _rel(r[key], ref[key]) > rtol:
                    problems.append(f"{key} {r[key]:.6g} vs {ref[key]:.6g} ({_name(ref)})")
            # +graphs rows: the timed steps replay graphs captured after the first step; the same weights and data
            # must give the first step's gradient norm
            last = r.get("last_grad_norms")
            if last and r["first_grad_norm"] is not None:
                worst = max(last, key=lambda g: _rel(g, r["first_grad_norm"]))
                if _rel(worst, r["first_grad_norm"]) > rtol:
                    problems.append(f"a replayed step's grad norm {worst:.6g} vs its first step's "
                                    f"{r['first_grad_norm']:.6g}")
            r["check"] = "ok" if not problems else "MISMATCH: " + "; ".join(problems)
            if problems:
                failures.append((r["variant"], f"m={m} {_name(r)}: {r['check']}"))
    return failures


def table(rows, microbatches):
    lines = []
    for m in microbatches:
        sel = [r for r in rows if r["microbatches"] == m]
        base_row = _baseline_row(sel)
        base = base_row["tokens_per_s"] if base_row else None
        base_peak = max(base_row["peak_gib"]) if base_row else None
        lines += [f"**m = {m}**", "",
                  "| variant | tokens/s | vs megatron interleaved (fastest p2p mode) | peak GiB per rank | "
                  "max peak vs interleaved | first-step loss | first-step grad norm | loss/grad check |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sel:
            ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "—"
            peak_ratio = f"{max(r['peak_gib']) / base_peak:.2f}x" if base_peak else "—"
            peaks = " / ".join(f"{p:.1f}" for p in r["peak_gib"])
            loss, norm = _opt(r["first_loss"], ".5f"), _opt(r["first_grad_norm"], ".6g")
            name = _name(r) + (" **baseline**" if r is base_row else "")
            lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {ratio} | {peaks} | {peak_ratio} | {loss} | "
                         f"{norm} | {r.get('check', '—')} |")
        lines.append("")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        sys.path.insert(0, os.path.join(ROOT, "tests", "megatron"))
        import cpu_shim  # test-only CUDA->CPU mapping for megatron-core; never used on GPU

        cpu_shim.install()
    dist.init_process_group("nccl" if gpu else "gloo")
    show_interleaf_logs(dist.get_rank(), "ds_plugins.schedule.generators.auto", "megatron_patches.forward_backward")
    rows = run_all(args)
    rtol = CHECK_RTOL_BF16 if gpu else CHECK_RTOL_FP32
    failures = check_first_step(rows, args.microbatches, rtol)  # the same rows on every rank
    if dist.get_rank() == 0:
        import megatron.core
        from megatron_patches.forward_backward import AUTO_WARMUP_STEPS, SETTLE_STEPS

        shape = TINY if args.tiny else ANCHOR
        device_name = torch.cuda.get_device_name(0) if gpu else "CPU (gloo)"
        world = dist.get_world_size()
        alt = ", alternating steps" if args.alternate else ""
        head = (
            f"## Pipeline schedules under megatron-core, pp={world}{alt} (benchmarks/megatron.py)\n\n"
            f"{datetime.date.today().isoformat()}, {world}x {device_name}, torch {torch.__version__}, megatron-core "
            f"{megatron.core.__version__}, Python {sys.version.split()[0]}. megatron GPTModel (local spec, unfused "
            f"attention) {shape['layers']}L h{shape['hidden']} {shape['heads']} heads seq {shape['seq']} vocab "
            f"{shape['vocab']}, tied embedding, micro-batch 1, pp={world}, {'bf16 (Float16Module)' if gpu else 'fp32'}, "
            f"megatron DDP; {args.warmup} warm-up (+{AUTO_WARMUP_STEPS} timed per action for auto's plan and "
            f"zb-h2/zb-v's rebuild from measured costs, +{SETTLE_STEPS - AUTO_WARMUP_STEPS} for their second round "
            f"from the planned order's own timings) + {args.steps} timed steps per variant, "
            + ("taken in turns (--alternate: one step of each variant per round, the order rotated every round "
               "and reversed every other; "
               "every layout's model resident; peak memory: a step's rise over what was allocated before it plus "
               "its layout's model and DDP buffers, so without what stays allocated between steps: a little below "
               "the row-by-row mode's), " if args.alternate else "")
            + "all in one process group. A step is one forward_backward_func call incl. finalize_model_grads, no "
            + ("optimizer step. " if args.alternate else "optimizer step. Peak memory: max allocated during the "
               "timed steps. ")
            + "megatron interleaved runs with "
            f"{' and with '.join(_p2p_label(*p) for p in _interleaved_modes(args, gpu))}; the "
            "faster at each m is the baseline. Every variant starts from the same weights (seeded by model-global "
            f"parameter name) and data; loss/grad check: first-step loss and grad norm within {rtol:g} relative of "
            "megatron 1F1B's (else the row most rows agree with); the baseline is the faster interleaved run "
            "that passed it."
            + (" ideal rows: each rank's own forward + backward of its chunks, no p2p, no waiting and no "
               "finalize_model_grads (the slowest rank's step; ideal on megatron's looped chunks, ideal-v on the V "
               "chunks, both with megatron's own backward; ideal-v-split on the V chunks with interleaf's I + W "
               "split)."
               if any(v in IDEAL for v in args.variants) else "")
            + (" -graphed ideal rows: the same work captured once as one CUDA graph per micro-batch, chunk and "
               "pass (F, B or I, W), then replayed (an experiment: neither megatron's schedules nor interleaf's "
               "replay graphs); their first replay's gradients equal their eager step's."
               if any(v in GRAPHED for v in args.variants) else "")
            + "\n"
        )
        text = head + "\n" + table(rows, args.microbatches)
        print(text, flush=True)
        out = args.out or (os.path.join(ROOT, "BENCHMARKS.md") if gpu else None)
        if out:
            write_section(out, f"{REPORT_SECTION} pp={world}{alt}", text)
            print(f"updated {out}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    # megatron's own runs that fail the check are reported (the table marks them, the baseline skips them), but
    # only a wrong interleaf schedule fails the run
    theirs = [msg for variant, msg in failures if variant.startswith("megatron-")]
    ours = [msg for variant, msg in failures if not variant.startswith("megatron-")]
    if int(os.environ.get("RANK", "0")) == 0:
        if theirs:
            print("megatron's own schedule disagrees with megatron 1F1B (not used as the baseline):\n  "
                  + "\n  ".join(theirs), file=sys.stderr, flush=True)
        if ours:
            print("FIRST-STEP LOSS/GRAD MISMATCH (the variants share weights and data; a schedule is wrong):\n  "
                  + "\n  ".join(ours), file=sys.stderr, flush=True)
    if ours:
        raise SystemExit(1)


if __name__ == "__main__":
    arguments = parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if arguments.procs:
        run_local_ranks(main, arguments, arguments.procs)
    else:
        main(arguments)
