"""megatron's ``forward_backward_func`` contract on top of interleaf's one executor.

:func:`make_forward_backward_func` returns a function with exactly the keyword signature of megatron-core's
``forward_backward_pipelining_with_interleaving`` / ``..._without_interleaving``. Per call it:

1. builds (once per pipeline shape, cached) the schedule with ``ds_plugins.schedule.registry.build_schedule``
   and a :class:`ds_plugins.runtime.PipelineExecutor` whose stage modules are thin wrappers around megatron's
   own ``schedules.forward_step`` (so ``forward_step_func(data_iterator, model) -> (output, loss_func)``,
   ``set_input_tensor``, autocast, loss division by ``num_microbatches``, ``forward_data_store`` and token
   counting behave as in megatron);
2. runs the rank's program with DP grad sync disabled (``config.no_sync_func``) — weight gradients of
   megatron's linear layers are deferred into W passes (:mod:`megatron_patches.linear_weight_grad`);
3. after the executor has drained the last W: sums the two tied embedding copies that V placement puts on
   rank 0, re-enables grad sync and starts it (``config.grad_sync_func`` per chunk, or the DDP chunk's
   ``start_grad_sync`` when ``overlap_grad_reduce`` is on), then calls ``config.finalize_model_grads_func``;
4. returns megatron's ``forward_data_store`` (the loss dicts its training loop logs).

No schedule logic lives here: the order of actions is the generator's, their execution the executor's.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ds_plugins.schedule.ir import ActionKind

from .arguments import MegatronScheduleConfig, check_no_cuda_graphs
from .placement import chunk_stage, tied_embedding_weights

logger = logging.getLogger(__name__)

__all__ = ["make_forward_backward_func"]


class _StepContext:
    """What the stage wrappers need from the current ``forward_backward_func`` call."""

    def __init__(self) -> None:
        self.forward_step_func: Optional[Callable] = None
        self.data_iterators: List[Any] = []
        self.num_microbatches = 0
        self.forward_data_store: List[Any] = []
        self.collect_non_loss_data = False
        self.first_val_step: Optional[bool] = None
        self.forward_only = False
        self.cp_size = 1
        self.total_num_tokens: Optional[torch.Tensor] = None
        self.forwards_done: Dict[int, int] = {}


class _MegatronStage(torch.nn.Module):
    """Stage ``stage`` = chunk ``chunk`` of this rank, run through megatron's own ``forward_step``."""

    def __init__(self, context: _StepContext, model_chunk: torch.nn.Module, chunk: int, stage: int,
                 *, last_stage: int, vp: Optional[int], config) -> None:
        super().__init__()
        self._context = context
        self._chunk_index = chunk
        self._stage = stage
        self._is_last = stage == last_stage
        self._vp = vp
        self._config = config
        # Not registered as a submodule: the executor never needs the chunk's parameters.
        self.__dict__["_model_chunk"] = model_chunk

    def forward(self, input_tensor=None):
        from megatron.core.pipeline_parallel import schedules

        ctx = self._context
        microbatch = ctx.forwards_done.get(self._stage, 0)
        ctx.forwards_done[self._stage] = microbatch + 1
        first = microbatch == 0
        if ctx.forward_only and ctx.first_val_step is not None:
            first = bool(ctx.first_val_step) and first
        output, num_tokens = schedules.forward_step(
            ctx.forward_step_func,
            ctx.data_iterators[self._chunk_index],
            self._model_chunk,
            ctx.num_microbatches,
            input_tensor,
            ctx.forward_data_store,
            self._config,
            ctx.cp_size,
            ctx.collect_non_loss_data,
            None,
            is_first_microbatch=first,
            current_microbatch=microbatch,
            vp_stage=self._chunk_index if self._vp is not None else None,
            is_last_stage=self._is_last,
        )
        ctx.total_num_tokens += num_tokens  # as megatron: a 0-dim CPU count adds onto a device tensor
        # On the last stage this is the loss megatron already divided by num_microbatches (its backward root).
        return output


def _last_stage_loss(config) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    def loss_fn(loss: torch.Tensor, _target: Any) -> torch.Tensor:
        # megatron's backward_step applies grad_scale_func (fp16 loss scale) to the last stage's output.
        if config.grad_scale_func is not None:
            return config.grad_scale_func(loss)
        return loss

    return loss_fn


AUTO_WARMUP_STEPS = 3
"""Training steps timed per action before ``auto`` picks its schedule (running a seed schedule meanwhile) and before
zb-h1/zb-h2/zb-v are rebuilt from the measured F/I/W times and activation memory of every stage; as many again
time the order so planned (the second round, see :class:`_Runner`)."""
SETTLE_STEPS = 2 * AUTO_WARMUP_STEPS
"""Training steps after which ``auto`` and the measured zb-h1/zb-h2/zb-v run their final order, untimed."""
REPLAN_MIN_GAIN = 0.01
"""The second round installs its re-plan only when that simulates at least this much faster (relative) than the
running order under the same timings."""
_AUTO_SEED = {"v": "zb-v", "loop-1": "zb-h1", "loop-n": "interleaved-1f1b"}


class _Runner:
    """The executor for one (model chunks, micro-batches) pair, reused across steps.

    For ``auto`` the first :data:`AUTO_WARMUP_STEPS` training steps run a seed schedule of the chunks' placement
    with per-action timing; then the timings are gathered from all pipeline ranks, turned into a cost model
    (:func:`ds_plugins.runtime.measured_costs`) and ``auto`` is built from it. zb-h1/zb-h2/zb-v (unless
    ``measured_costs`` is off) run timed for those steps too, then are rebuilt from the cost model
    (:func:`ds_plugins.schedule.registry.retune`) when the simulator finds the rebuilt order faster.

    Second round: an order planned (or rebuilt) that way runs timed for :data:`AUTO_WARMUP_STEPS` more steps, and is
    planned once more from its own timings; the re-plan replaces it when it simulates at least
    :data:`REPLAN_MIN_GAIN` faster under them. A host that issues megatron's layers about as fast as the GPU runs
    them makes an action's time depend on what runs around it, so the seed order's timings can mislead the first
    plan (BENCHMARKS.md, megatron pp=4, session 13's second call, simulated: an `auto` order that ran 304.2 ms
    simulates 295.3 ms under its own timings, a plan from them 265.3 ms; in the one run with the second round on,
    its re-plans simulated 2.5-8.1% faster at m = 8 and no row ran faster than in earlier runs). After
    :data:`SETTLE_STEPS` the order runs untimed.
    """

    def __init__(self, *, schedule_config, build_schedule, chunks, config, pp_group, pp_rank, pp, placement,
                 num_microbatches, seq_length, micro_batch_size) -> None:
        self.schedule_config = schedule_config
        self.build_schedule = build_schedule
        self.chunks, self.config = chunks, config
        self.pp_group, self.pp_rank, self.pp, self.placement = pp_group, pp_rank, pp, placement
        self.num_microbatches, self.seq_length, self.micro_batch_size = num_microbatches, seq_length, micro_batch_size
        self.context = _StepContext()
        self.device = next(chunks[0].parameters()).device
        self.last_result = None
        self.auto_samples: List[Any] = []
        if schedule_config.schedule == "auto":
            seed = _AUTO_SEED["v" if placement == "v" else ("loop-1" if len(chunks) == 1 else "loop-n")]
            self._install(build_schedule(seed, pp=pp, microbatches=num_microbatches, vp=len(chunks)), timing="action")
            self.measuring = True
        else:
            from ds_plugins.schedule.registry import COST_TUNED

            schedule = build_schedule(
                schedule_config.schedule, pp=pp, microbatches=num_microbatches, vp=len(chunks),
                memory_limit=_estimated_memory_limit(schedule_config, config, seq_length, micro_batch_size, pp),
            )
            # (a build_schedule of the caller's may hand out an order under another name: not rebuilt)
            self.measuring = schedule_config.measured_costs and schedule.name in COST_TUNED
            self._install(schedule, timing="action" if self.measuring else "none")
        self.tuning: Optional[str] = None
        """zb-h1/zb-h2/zb-v after the measured warm-up: "rebuilt" or "kept" (None before, or without it)."""
        self.measured_costs = None
        """The cost model (mean F/I/W seconds per stage, from every pipeline rank) the running order was planned
        from: the first round's (the seed or built order's timings), or the second round's when that re-planned;
        None before the first plan, or without a measured warm-up."""
        self.measured_memory = False
        """Whether :attr:`measured_costs` holds measured activation memory (else the uniform memory model)."""
        self.replan: Optional[str] = None
        """The second round: None before the first plan, "pending" while the planned order runs timed, then
        "re-planned", "kept" or "not planned" (the re-plan failed: the order kept running); "none" when the first
        round kept the order it timed (nothing new to time)."""
        self.replan_ms: Optional[Tuple[float, float]] = None
        """The second round's simulated steps (ms) under the running order's timings: (running order, re-plan)."""
        self.graphs = None
        """:class:`~megatron_patches.cuda_graphs.ChunkGraphs` with ``cuda_graphs`` on (else None)."""
        if schedule_config.cuda_graphs:
            from . import cuda_graphs

            cuda_graphs.check_graphable(config, chunks)
            if self.device.type != "cuda" and cuda_graphs.capture_override is None:
                raise ValueError("--pipeline-cuda-graphs needs CUDA devices; drop it")
            context = self.context  # (not self: the graphs must not keep their runner alive)
            self.graphs = cuda_graphs.ChunkGraphs(
                chunks, _chunk_stages(chunks, pp_rank, pp, placement),
                lambda stage: context.forwards_done[stage] - 1, self.device,
                capture=cuda_graphs.capture_override)

    def release_graphs(self) -> None:
        """Give the model chunks their own ``forward`` back and drop the CUDA graphs (when the runner goes)."""
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None

    def graphs_for_step(self, forward_only: bool) -> bool:
        """Whether this step replays CUDA graphs: captures them first when the order is final (no more timed
        warm-up) and not captured yet, once an eager step has shown every stage's call."""
        graphs = self.graphs
        if graphs is None:
            return False
        graphs.install()  # (apply / remove unwrap the chunks between interleaf's steps)
        executor = self.executor
        if forward_only or self.measuring or (executor.serialize_first and not executor._first_done[False]):
            return False  # (a serialized first step runs its actions in another order than the one captured)
        if graphs.captured_for is self.schedule and graphs.moved():
            logger.warning("interleaf: a parameter or main_grad buffer moved since the CUDA graphs were captured; "
                           "capturing again")
            graphs.captured_for = None
        if graphs.captured_for is not self.schedule:
            if not graphs.ready():
                return False
            graphs.capture(self.schedule, self.pp_rank, executor.queue)
        return True

    def _install(self, schedule, *, timing: str, serialize_first: Optional[bool] = None) -> None:
        from ds_plugins.runtime import P2PCommunicator, PipelineExecutor

        if schedule.shape.placement != self.placement:
            raise ValueError(
                f"schedule {schedule.name} runs in {schedule.shape.placement!r} placement but the model chunks are "
                f"in {self.placement!r} placement; "
                + ("build them with megatron_patches.build_model_chunks" if schedule.shape.placement == "v"
                   else "build them with megatron's usual looped vp_stage loop")
            )
        stages = _chunk_stages(self.chunks, self.pp_rank, self.pp, self.placement)
        expected = list(schedule.shape.stages_of(self.pp_rank))
        if sorted(stages) != sorted(expected):
            raise ValueError(f"pipeline rank {self.pp_rank}: chunks hold stages {stages}, schedule expects {expected}")
        for stage in stages:
            # megatron's data iterators hand out micro-batches in call order: each stage must run F in order.
            order = [a.microbatch for a in schedule.compute_actions(self.pp_rank)
                     if a.stage == stage and a.kind is ActionKind.FORWARD]
            if order != sorted(order):
                raise ValueError(f"schedule {schedule.name} runs stage {stage}'s forwards out of micro-batch order "
                                 f"{order}; megatron's data iterators need them in order")
        last_stage = schedule.shape.num_stages - 1
        vp_arg = self.config.virtual_pipeline_model_parallel_size
        stage_modules = {
            stage: _MegatronStage(self.context, self.chunks[c], c, stage, last_stage=last_stage, vp=vp_arg,
                                  config=self.config)
            for c, stage in enumerate(stages)
        }
        ranks = dist.get_process_group_ranks(self.pp_group)
        p2p = P2PCommunicator.for_shape(schedule.shape, ranks, group=self.pp_group, device=self.device)
        self.schedule = schedule
        self.executor = PipelineExecutor(
            schedule, self.pp_rank, stage_modules, p2p=p2p, loss_fn=_last_stage_loss(self.config),
            device=self.device, timing=timing, track_memory=timing == "action",  # the warm-up reads memory
            serialize_first=serialize_first,
        )
        logger.info("interleaf: %s schedule, pp=%d vp=%d m=%d, %s placement", schedule.name, self.pp,
                    len(self.chunks), self.num_microbatches, self.placement)

    def after_step(self, result, forward_only: bool) -> None:
        self.last_result = result
        if not self.measuring or forward_only:
            return
        self.auto_samples.append((result.typical_seconds(), result.mean_memory_bytes()))
        if len(self.auto_samples) < AUTO_WARMUP_STEPS:
            return
        timed = self.auto_samples[1:]  # the first step pays one-off costs (allocations, p2p metadata)
        mine = ([t for t, _ in timed], [mem for _, mem in timed])
        # from every rank, not just this pipeline: each rank then builds the same schedule from the same data.
        # Tensor-parallel ranks of a stage must run one order (their collectives inside layers pair up), and so
        # must data-parallel replicas (DDP's overlapped grad-sync collectives follow the order chunks finish in).
        everyone: List[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        self.auto_samples = []
        if self.replan is None:  # first round: plan from the seed (or built) order's timings
            running = self.schedule
            schedule = self._auto(everyone) if self.schedule_config.schedule == "auto" else self._retuned(everyone)
            if schedule is running:  # nothing new to time: zb-h1/zb-h2/zb-v kept their order
                self.replan = "none"
                self.measuring = False
                timing = "none"
            else:
                self.replan = "pending"
                timing = "action"
        else:  # second round: plan from the running order's own timings
            schedule = self._replanned(everyone)
            self.measuring = False
            timing = "none"
        # the warm-up loaded every kernel these actions launch: no serialized first step for the new executor
        self._install(schedule, timing=timing, serialize_first=False)

    def _replanned(self, everyone):
        """The second round: ``auto`` (or the zb-h1/zb-h2/zb-v rebuild) planned again from the running order's own
        timings; it replaces the running order when it simulates :data:`REPLAN_MIN_GAIN` faster under them."""
        from ds_plugins.runtime import costs_from_ranks
        from ds_plugins.schedule import simulate
        from ds_plugins.schedule.registry import retune

        running = self.schedule
        try:
            costs, measured_memory = costs_from_ranks(everyone, running.shape)
            if self.schedule_config.schedule == "auto":  # a candidate only: the line below says whether it runs
                candidate = self.plan_auto(costs, measured_memory, quiet=True)
            else:
                candidate = retune(running, costs).schedule
            before, after = simulate(running, costs).makespan, simulate(candidate, costs).makespan
        except ValueError as err:  # an optimisation only: training goes on with the order it has
            logger.warning("interleaf %s: second round not planned (%s); keeping the current order",
                           self.schedule_config.schedule, err)
            self.replan = "not planned"
            return running
        better = after < before * (1.0 - REPLAN_MIN_GAIN)
        self.replan = "re-planned" if better else "kept"
        self.replan_ms = (1e3 * before, 1e3 * after)
        logger.info("interleaf %s, second round (the running order's own timings: %s): the running order simulates "
                    "%.1f ms, a re-plan %.1f ms; %s", self.schedule_config.schedule, costs.describe(), 1e3 * before,
                    1e3 * after, "re-planned" if better else "kept the running order")
        if better:
            self.measured_costs, self.measured_memory = costs, measured_memory
            return candidate
        return running

    def _auto(self, everyone):
        """``auto`` built from every rank's measurements, searched in the chunks' placement."""
        from ds_plugins.runtime import costs_from_ranks

        self.measured_costs, self.measured_memory = costs_from_ranks(everyone, self.schedule.shape)
        return self.plan_auto(self.measured_costs, self.measured_memory)

    def plan_auto(self, costs, measured_memory: bool, *, quiet: bool = False):
        """``auto`` for ``costs`` under this runner's memory limit, searched in the chunks' placement (they are
        built). ``quiet``: a plan that may not run, so without the planner's "auto: picked" line."""
        limit = None
        if self.schedule_config.memory_limit_gib is not None:
            limit = (self.schedule_config.memory_limit_gib * 2**30 if measured_memory else _estimated_memory_limit(
                self.schedule_config, self.config, self.seq_length, self.micro_batch_size, self.pp))
        planner_log = logging.getLogger("ds_plugins.schedule.generators.auto")
        level = planner_log.level
        if quiet:
            planner_log.setLevel(logging.WARNING)
        try:
            return self.build_schedule("auto", pp=self.pp, microbatches=self.num_microbatches, vp=len(self.chunks),
                                       costs=costs, memory_limit=limit, placement=self.placement)
        finally:
            planner_log.setLevel(level)

    def _retuned(self, everyone):
        """zb-h1/zb-h2/zb-v rebuilt from every rank's measurements when that simulates faster, else the running
        one."""
        from ds_plugins.runtime import costs_from_ranks
        from ds_plugins.schedule.registry import retune

        try:
            self.measured_costs, self.measured_memory = costs_from_ranks(everyone, self.schedule.shape)
            outcome = retune(self.schedule, self.measured_costs)
        except ValueError as err:  # an optimisation only: training goes on with the order it has
            logger.warning("interleaf %s: not rebuilt from measured costs (%s); keeping the current order",
                           self.schedule.name, err)
            self.tuning = "kept"
            return self.schedule
        self.tuning = "rebuilt" if outcome.changed else "kept"
        logger.info("interleaf %s: measured %s; %s", self.schedule.name, self.measured_costs.describe(),
                    outcome.summary())
        return outcome.schedule


def _placement_of(model: List[torch.nn.Module]) -> str:
    placements = {chunk_stage(m)[1] for m in model}
    if placements == {"v"}:
        return "v"
    if "v" in placements:
        raise ValueError("only some model chunks were built with megatron_patches.build_model_chunks; build all")
    return "loop"


def _chunk_stages(model: List[torch.nn.Module], pp_rank: int, pp: int, placement: str) -> List[int]:
    if placement == "v":
        return [chunk_stage(m)[0] for m in model]
    return [c * pp + pp_rank for c in range(len(model))]


def _pg_collection_for(placement: str, pg_collection):
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    if pg_collection is None:
        pg_collection = ProcessGroupCollection()
        pg_collection.tp = parallel_state.get_tensor_model_parallel_group()
        pg_collection.cp = parallel_state.get_context_parallel_group()
        pg_collection.pp = parallel_state.get_pipeline_model_parallel_group()
        pg_collection.embd = parallel_state.get_embedding_group(check_initialized=False)
        pg_collection.pos_embd = parallel_state.get_position_embedding_group(check_initialized=False)
        pg_collection.dp_cp = parallel_state.get_data_parallel_group(
            with_context_parallel=True, partial_data_parallel=False
        )
    if placement == "v":
        # Both ends of the model (embedding and LM head) live on pipeline rank 0: no cross-rank embedding sync.
        # finalize_model_grads falls back to parallel_state's group when embd is None, so give it a group of one.
        pg_collection = copy.copy(pg_collection)
        pg_collection.embd = _own_rank_group()
        pg_collection.pos_embd = pg_collection.embd
    return pg_collection


_OWN_RANK_GROUP = None


def _own_rank_group():
    """A process group holding only this rank (created once, by this rank alone)."""
    global _OWN_RANK_GROUP
    if _OWN_RANK_GROUP is None:
        _OWN_RANK_GROUP = dist.new_group([dist.get_rank()], use_local_synchronization=True)
    return _OWN_RANK_GROUP


def _per_chunk(funcs, n: int) -> List[Optional[Callable]]:
    if funcs is None:
        return [None] * n
    if isinstance(funcs, (list, tuple)):
        return list(funcs)
    return [funcs] * n


def _check_unsupported(config, forward_only: bool) -> None:
    if getattr(config, "defer_embedding_wgrad_compute", False) and not forward_only:
        raise ValueError(
            "--defer-embedding-wgrad-compute cannot be combined with --pipeline-schedule: interleaf already "
            "defers every linear layer's weight gradient (including the LM head) into W passes; drop that flag"
        )
    if getattr(config, "overlap_moe_expert_parallel_comm", False) and not forward_only:
        raise ValueError("--overlap-moe-expert-parallel-comm has its own combined 1F1B schedule; drop --pipeline-schedule")
    check_no_cuda_graphs(config)
    if getattr(config, "num_microbatches_with_partial_activation_checkpoints", None) is not None and not forward_only:
        raise ValueError(
            "--num-microbatches-with-partial-activation-checkpoints picks which micro-batches recompute from the "
            "number megatron's own 1F1B keeps in flight; interleaf schedules hold a different number (zb-h2, V "
            "schedules, auto). Drop that flag (every micro-batch then recomputes as --recompute-granularity says), "
            "or bound activation memory with --pipeline-schedule v-half / v-min / auto --pipeline-memory-limit-gib"
        )
    if getattr(config, "variable_seq_lengths", False) and not forward_only:
        logger.info("variable_seq_lengths: interleaf's p2p sends shapes once per stage pair; lengths must not change")


def _check_decoder_only(chunk: torch.nn.Module) -> None:
    """Encoder-decoder models (megatron marks them ``xattn_needed``, e.g. ``T5Model``) pass the encoder output to
    the decoder's cross-attention alongside each stage's activations: interleaf's stages carry one tensor."""
    from megatron.core.utils import get_model_xattn

    if get_model_xattn(chunk):
        raise ValueError(
            "encoder-decoder models (cross-attention: the model sets xattn_needed, e.g. megatron's T5Model) are not "
            "supported by interleaf schedules: they pass the encoder output alongside each stage's activations; "
            "drop --pipeline-schedule for this model"
        )


def make_forward_backward_func(
    schedule_config: MegatronScheduleConfig,
    *,
    build_schedule: Callable[..., Any],
    fallback: Callable[..., Any],
):
    """The ``forward_backward_func`` for ``schedule_config`` (see module docstring). ``fallback`` is megatron's
    own function for the same pp/vp, used when pipeline parallelism is off."""
    runners: Dict[Tuple, _Runner] = {}

    def forward_backward_func(
        *,
        forward_step_func,
        data_iterator,
        model,
        num_microbatches: int,
        seq_length: int,
        micro_batch_size: int,
        decoder_seq_length: Optional[int] = None,
        forward_only: bool = False,
        collect_non_loss_data: bool = False,
        first_val_step: Optional[bool] = None,
        adjust_tensor_shapes_fn: Optional[Callable] = None,
        p2p_communicator=None,
        pg_collection=None,
        force_all_reduce: Optional[bool] = False,
    ):
        from megatron.core.utils import get_model_config

        chunks = model if isinstance(model, list) else [model]
        iterators = data_iterator if isinstance(data_iterator, list) else [data_iterator]
        if len(iterators) != len(chunks):
            raise ValueError(f"{len(chunks)} model chunks but {len(iterators)} data iterators: pass one per chunk")
        config = get_model_config(chunks[0])
        _check_unsupported(config, forward_only)
        _check_decoder_only(chunks[0])
        if adjust_tensor_shapes_fn is not None:
            raise ValueError("adjust_tensor_shapes_fn is not needed with interleaf schedules (shapes travel once)")

        if pg_collection is not None:
            pp_group = pg_collection.pp
        elif p2p_communicator is not None:
            pp_group = p2p_communicator.pp_group
        else:
            from megatron.core import parallel_state

            pp_group = parallel_state.get_pipeline_model_parallel_group()
        pp = pp_group.size()
        if pp == 1:
            return fallback(
                forward_step_func=forward_step_func, data_iterator=data_iterator, model=model,
                num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=micro_batch_size,
                decoder_seq_length=decoder_seq_length, forward_only=forward_only,
                collect_non_loss_data=collect_non_loss_data, first_val_step=first_val_step,
                adjust_tensor_shapes_fn=adjust_tensor_shapes_fn, p2p_communicator=p2p_communicator,
                pg_collection=pg_collection, force_all_reduce=force_all_reduce,
            )
        pp_rank = pp_group.rank()
        vp = len(chunks)
        placement = _placement_of(chunks)
        schedule_config.check_parallel_sizes(pp=pp, vp=vp if vp > 1 else None)
        if schedule_config.uses_v_placement and placement != "v":
            raise ValueError(
                f"--pipeline-schedule {schedule_config.schedule} needs the model chunks in V placement (chunk r "
                "and 2*pp-1-r on rank r): build them with megatron_patches.build_model_chunks(model_provider)"
            )
        if placement == "v" and not schedule_config.uses_v_placement and schedule_config.schedule != "auto":
            raise ValueError(
                f"the model chunks were built in V placement but --pipeline-schedule is "
                f"{schedule_config.schedule}; use zb-v, v-half, v-min or auto"
            )

        key = (tuple(id(c) for c in chunks), num_microbatches, id(pp_group))
        runner = runners.get(key)
        if runner is None:
            for stale in runners.values():
                stale.release_graphs()
            runner = _Runner(
                schedule_config=schedule_config, build_schedule=build_schedule, chunks=chunks, config=config,
                pp_group=pp_group, pp_rank=pp_rank, pp=pp, placement=placement, num_microbatches=num_microbatches,
                seq_length=seq_length, micro_batch_size=micro_batch_size,
            )
            runners.clear()  # one live model at a time; drop stale executors (and their p2p state)
            runners[key] = runner

        pgc = _pg_collection_for(placement, pg_collection)
        ctx = runner.context
        ctx.forward_step_func = forward_step_func
        ctx.data_iterators = iterators
        ctx.num_microbatches = num_microbatches
        ctx.forward_data_store = []
        ctx.collect_non_loss_data = collect_non_loss_data
        ctx.first_val_step = first_val_step
        ctx.forward_only = forward_only
        ctx.cp_size = pgc.cp.size() if pgc.cp is not None else 1
        device = runner.device
        ctx.total_num_tokens = torch.zeros([], dtype=torch.int, device=device)
        ctx.forwards_done = {}

        if config.timers is not None:
            config.timers("forward-backward", log_level=1).start(barrier=config.barrier_with_L1_time)

        no_sync_funcs = _per_chunk(config.no_sync_func, vp)
        grad_sync_funcs = _per_chunk(config.grad_sync_func, vp)
        param_sync_funcs = _per_chunk(config.param_sync_func, vp)
        if not forward_only:
            for c in range(1, vp):
                if param_sync_funcs[c] is not None:
                    param_sync_funcs[c](chunks[c].parameters())

        m = num_microbatches
        with contextlib.ExitStack() as no_sync:
            if not forward_only:
                for f in no_sync_funcs:
                    if f is not None:
                        no_sync.enter_context(f())
            replaying = runner.graphs_for_step(forward_only)
            if replaying:
                runner.graphs.replaying = True
            try:
                result = runner.executor.run(
                    [None] * m,
                    None if forward_only else [None] * m,
                    forward_only=forward_only,
                    tokens=m * micro_batch_size * seq_length,
                )
            finally:
                if replaying:
                    runner.graphs.replaying = False
            if not forward_only:
                _sum_tied_embedding_grads(chunks)
        runner.after_step(result, forward_only)

        if not forward_only:
            for c, chunk in enumerate(chunks):
                if grad_sync_funcs[c] is not None:
                    grad_sync_funcs[c](chunk.parameters())
                elif getattr(getattr(chunk, "ddp_config", None), "overlap_grad_reduce", False):
                    chunk.start_grad_sync()
            if config.finalize_model_grads_func is not None:
                config.finalize_model_grads_func(
                    chunks if isinstance(model, list) else [model],
                    ctx.total_num_tokens if config.calculate_per_token_loss else None,
                    pg_collection=pgc,
                    force_all_reduce=force_all_reduce,
                )
        if config.timers is not None:
            config.timers("forward-backward").stop()
        store = ctx.forward_data_store
        ctx.forward_data_store = []
        ctx.data_iterators = []
        ctx.forward_step_func = None
        return store

    forward_backward_func.interleaf_schedule = schedule_config.schedule  # type: ignore[attr-defined]
    forward_backward_func.runners = runners  # type: ignore[attr-defined]
    return forward_backward_func


def _sum_tied_embedding_grads(chunks: List[torch.nn.Module]) -> None:
    """V placement, rank 0: the embedding and the LM head are two copies of one tied weight in two chunks;
    give both the summed gradient (what megatron's cross-rank embedding all-reduce does) before DP sync."""
    pair = tied_embedding_weights(chunks)
    if pair is None:
        return
    first, last = pair
    for attr in ("main_grad", "grad"):
        a, b = getattr(first, attr, None), getattr(last, attr, None)
        if a is not None and b is not None:
            a.add_(b)
            b.copy_(a)
            return
        if a is not None or b is not None:
            raise RuntimeError(f"tied embedding: only one copy has .{attr}; wrap both chunks the same way")


def _estimated_memory_limit(schedule_config, config, seq_length, micro_batch_size, pp) -> Optional[float]:
    """``--pipeline-memory-limit-gib`` in the units of ``CostModel.uniform`` (one rank's activations for one
    micro-batch) when no measured memory is available, from megatron's activation estimate (Korthikanti et al. 2022, sec. 4.1:
    ``s*b*h*(34 + 5*a*s/h)`` bytes per layer without recomputation, divided by tp)."""
    if schedule_config.memory_limit_gib is None:
        return None
    s, b, h = seq_length, micro_batch_size, config.hidden_size
    a = config.num_attention_heads
    tp = max(1, config.tensor_model_parallel_size)
    per_layer = s * b * h * (34 + 5 * a * s / h) / tp
    layers_per_rank = config.num_layers / pp
    per_microbatch_gib = per_layer * layers_per_rank / 2**30
    return schedule_config.memory_limit_gib / per_microbatch_gib
