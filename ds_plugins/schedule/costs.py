"""The cost model: the one place that says how long an action takes and how much memory it holds.

Times and memory are per *stage* (model chunk). :meth:`CostModel.uniform` takes figures for one rank's whole
share of the model (what ``interleaf simulate --costs F,I,W`` means) and divides them over the rank's ``vp``
chunks, so schedules with different ``vp`` compare on the same model.

Memory accounting (Zero Bubble PP paper, sec. 2): F allocates ``activation_memory``; I (input gradient) frees
all of it except ``weight_grad_memory``, which W frees; a full backward B frees everything at once.
"""
from __future__ import annotations

from dataclasses import dataclass

from .ir import Action, ActionKind, PipelineShape

__all__ = ["CostModel", "UNIFORM_WEIGHT_GRAD_SHARE"]

UNIFORM_WEIGHT_GRAD_SHARE = 32 / 34
"""Default share of a stage's activation memory that W still needs after I, in :meth:`CostModel.uniform`.

A transformer layer keeps about ``34·b·s·h`` bytes of activations for backward with flash/SDPA attention (Zero
Bubble paper, sec. 3.1, after Korthikanti et al.), and its weight GEMMs need ``32·b·s·h`` of them until W: the
inputs and output gradients of the QKV, projection and two MLP linears (what interleaf's W closures hold).
Treating W as free (share 0) lets a generator defer every W to the end of the step, so activation memory grows
with the number of micro-batches (measured on 4x H100, benchmarks/pipeline.py, 2026-11-26)."""


def _check_nonnegative(name: str, values: tuple[float, ...]) -> None:
    for v in values:
        if not v >= 0:  # also rejects NaN
            raise ValueError(f"cost model: {name} must be non-negative numbers, got {values}")


@dataclass(frozen=True, slots=True, kw_only=True)
class CostModel:
    """Per-stage action times and memory."""

    forward: tuple[float, ...]
    """F time of each stage, for one micro-batch."""
    backward_input: tuple[float, ...]
    """I time (input-gradient half of backward) of each stage."""
    backward_weight: tuple[float, ...]
    """W time (weight-gradient half of backward) of each stage."""
    comm: float = 0.0
    """Time for one activation or gradient to travel between two ranks (0 for stages on the same rank)."""
    activation_memory: tuple[float, ...]
    """Memory one micro-batch's F allocates on each stage."""
    weight_grad_memory: tuple[float, ...]
    """Part of ``activation_memory`` kept from I until W (inputs and output grads of the weight GEMMs)."""

    def __post_init__(self) -> None:
        n = len(self.forward)
        fields = {
            "forward": self.forward,
            "backward_input": self.backward_input,
            "backward_weight": self.backward_weight,
            "activation_memory": self.activation_memory,
            "weight_grad_memory": self.weight_grad_memory,
        }
        for name, values in fields.items():
            if len(values) != n:
                raise ValueError(f"cost model: {name} has {len(values)} stages, forward has {n}")
            _check_nonnegative(name, values)
        _check_nonnegative("comm", (self.comm,))
        for s, (a, w) in enumerate(zip(self.activation_memory, self.weight_grad_memory)):
            if w > a:
                raise ValueError(
                    f"cost model: weight_grad_memory ({w}) exceeds activation_memory ({a}) at stage {s}; "
                    "the memory kept for W is part of what F allocated"
                )

    @property
    def num_stages(self) -> int:
        return len(self.forward)

    @classmethod
    def uniform(
        cls,
        shape: PipelineShape,
        *,
        forward: float = 1.0,
        backward_input: float = 1.0,
        backward_weight: float = 1.0,
        comm: float = 0.0,
        activation_memory: float = 1.0,
        weight_grad_memory: float | None = None,
    ) -> "CostModel":
        """Every rank costs the same; each figure is for one rank's whole share, split over its vp chunks."""
        n = shape.num_stages
        v = shape.vp
        if weight_grad_memory is None:
            weight_grad_memory = UNIFORM_WEIGHT_GRAD_SHARE * activation_memory
        return cls(
            forward=(forward / v,) * n,
            backward_input=(backward_input / v,) * n,
            backward_weight=(backward_weight / v,) * n,
            comm=comm,
            activation_memory=(activation_memory / v,) * n,
            weight_grad_memory=(weight_grad_memory / v,) * n,
        )

    def describe(self) -> str:
        """Per stage, for logs: F/I/W in ms (times in seconds, as measured costs are) and the activation memory
        with the part W keeps (GiB when they are bytes, else the model's own units)."""
        times = ", ".join(f"{1e3 * f:.2f}/{1e3 * i:.2f}/{1e3 * w:.2f}"
                          for f, i, w in zip(self.forward, self.backward_input, self.backward_weight))
        in_bytes = max(self.activation_memory, default=0.0) > 2**20
        scale, unit = (2.0**-30, " GiB") if in_bytes else (1.0, "")
        memory = ", ".join(f"{a * scale:.2f}/{k * scale:.2f}"
                           for a, k in zip(self.activation_memory, self.weight_grad_memory))
        return f"F/I/W ms per stage [{times}]; activations / kept for W{unit} per stage [{memory}]"

    def for_shape(self, shape: PipelineShape) -> "CostModel":
        """Check that this model covers ``shape``'s stages; returns self."""
        if self.num_stages != shape.num_stages:
            raise ValueError(
                f"cost model has {self.num_stages} stages but the pipeline has pp*vp = {shape.num_stages}"
            )
        return self

    def duration(self, action: Action) -> float:
        """Time an action occupies its rank. Communication actions cost nothing on the rank itself
        (transfer time ``comm`` is added on the edge between ranks by the simulator)."""
        s, k = action.stage, action.kind
        if k is ActionKind.FORWARD:
            return self.forward[s]
        if k is ActionKind.BACKWARD_INPUT:
            return self.backward_input[s]
        if k is ActionKind.BACKWARD_WEIGHT:
            return self.backward_weight[s]
        if k is ActionKind.BACKWARD:
            return self.backward_input[s] + self.backward_weight[s]
        return 0.0

    def memory_delta(self, action: Action) -> float:
        """Change in a rank's activation memory when ``action`` completes."""
        s, k = action.stage, action.kind
        if k is ActionKind.FORWARD:
            return self.activation_memory[s]
        if k is ActionKind.BACKWARD_INPUT:
            return -(self.activation_memory[s] - self.weight_grad_memory[s])
        if k is ActionKind.BACKWARD_WEIGHT:
            return -self.weight_grad_memory[s]
        if k is ActionKind.BACKWARD:
            return -self.activation_memory[s]
        return 0.0

    def rank_compute_time(self, shape: PipelineShape, rank: int) -> float:
        """One rank's F+I+W time over all micro-batches: the bubble-free lower bound on its step time."""
        per_mb = sum(self.forward[s] + self.backward_input[s] + self.backward_weight[s] for s in shape.stages_of(rank))
        return per_mb * shape.microbatches
