"""Schedule IR: per-rank ordered action lists over (stage, micro-batch).

Text tokens follow torch.distributed.pipelining's ``_Action`` form: ``2F0`` is stage 2, forward, micro-batch 0;
``1SEND_B3`` sends the input gradient of stage 1 for micro-batch 3 to the previous stage. Tokens parse back
with :meth:`Action.parse`, so schedules round-trip through CSV (see :mod:`ds_plugins.schedule.io`).
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Iterator, Literal

__all__ = ["ActionKind", "Action", "Placement", "PipelineShape", "Schedule"]


class ActionKind(str, enum.Enum):
    """What one action does. Values are the text tokens of torch.distributed.pipelining."""

    FORWARD = "F"
    BACKWARD = "B"  #: full backward: input and weight gradient together
    BACKWARD_INPUT = "I"  #: input-gradient half of a split backward
    BACKWARD_WEIGHT = "W"  #: weight-gradient half of a split backward
    SEND_F = "SEND_F"  #: send this stage's output activation to the next stage
    RECV_F = "RECV_F"  #: receive this stage's input activation from the previous stage
    SEND_B = "SEND_B"  #: send this stage's input gradient to the previous stage
    RECV_B = "RECV_B"  #: receive this stage's output gradient from the next stage

    def __str__(self) -> str:
        return self.value

    @property
    def is_compute(self) -> bool:
        return self in _COMPUTE

    @property
    def is_comm(self) -> bool:
        return not self.is_compute


_COMPUTE = frozenset({ActionKind.FORWARD, ActionKind.BACKWARD, ActionKind.BACKWARD_INPUT, ActionKind.BACKWARD_WEIGHT})
# Longest alternatives first so "SEND_F" is not read as "S" + ...
_TOKEN = re.compile(r"^(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|B|I|W)(\d+)$")


@dataclass(frozen=True, slots=True)
class Action:
    """One step of a rank's program: ``kind`` applied to ``stage`` for ``microbatch``."""

    stage: int
    kind: ActionKind
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind.value}{self.microbatch}"

    __repr__ = __str__

    @classmethod
    def parse(cls, token: str) -> "Action":
        """Parse a token such as ``2F0`` or ``1SEND_B3``; raises ``ValueError`` naming the bad token."""
        match = _TOKEN.match(token.strip())
        if match is None:
            raise ValueError(
                f"cannot parse schedule action {token!r}: expected <stage><kind><microbatch> with kind one of "
                f"{', '.join(k.value for k in ActionKind)} (e.g. '2F0', '1SEND_B3')"
            )
        return cls(int(match.group(1)), ActionKind(match.group(2)), int(match.group(3)))


Placement = Literal["loop", "v"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineShape:
    """The pipeline a schedule runs on: ``pp`` ranks, ``vp`` model chunks per rank, ``microbatches`` per step.

    Stages are numbered 0..pp*vp-1 in model order. ``placement`` maps stages to ranks:

    - ``"loop"`` (Megatron interleaving): chunk c of rank r is stage c*pp + r.
    - ``"v"`` (ZB-V, V-Half, V-Min; needs vp == 2): rank r holds stages r and 2*pp-1-r, so the first and the
      last stage (the loss) both live on rank 0.
    """

    pp: int
    """Pipeline-parallel ranks."""
    microbatches: int
    """Micro-batches per optimizer step."""
    vp: int = 1
    """Model chunks (virtual stages) per rank."""
    placement: Placement = "loop"
    """Stage-to-rank placement, ``"loop"`` or ``"v"``."""

    def __post_init__(self) -> None:
        if self.pp < 1:
            raise ValueError(f"pp must be >= 1, got {self.pp}")
        if self.vp < 1:
            raise ValueError(f"vp (virtual stages per rank) must be >= 1, got {self.vp}")
        if self.microbatches < 1:
            raise ValueError(f"microbatches must be >= 1, got {self.microbatches}")
        if self.placement not in ("loop", "v"):
            raise ValueError(f"placement must be 'loop' or 'v', got {self.placement!r}")
        if self.placement == "v" and self.vp != 2:
            raise ValueError(f"V placement puts exactly 2 chunks on each rank: set vp=2 (got vp={self.vp})")

    @property
    def num_stages(self) -> int:
        return self.pp * self.vp

    def rank_of(self, stage: int) -> int:
        """The rank that holds ``stage``."""
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage {stage} out of range 0..{self.num_stages - 1}")
        if self.placement == "v":
            return stage if stage < self.pp else 2 * self.pp - 1 - stage
        return stage % self.pp

    def chunk_of(self, stage: int) -> int:
        """Index of ``stage`` among its rank's chunks (0..vp-1), in model order."""
        return stage // self.pp

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """The stages on ``rank``, in model order (chunk 0 first)."""
        if self.placement == "v":
            return (rank, 2 * self.pp - 1 - rank)
        return tuple(c * self.pp + rank for c in range(self.vp))

    def stage_order(self) -> tuple[int, ...]:
        return tuple(range(self.num_stages))


@dataclass(frozen=True, slots=True)
class Schedule:
    """A named schedule: for each rank, its ordered actions.

    Generators emit compute actions only (F, B, I, W); :func:`ds_plugins.schedule.lowering.add_communication`
    inserts the SEND/RECV actions that a runtime executes.
    """

    name: str
    shape: PipelineShape
    actions: tuple[tuple[Action, ...], ...]

    def __post_init__(self) -> None:
        if len(self.actions) != self.shape.pp:
            raise ValueError(f"schedule {self.name!r} has {len(self.actions)} rank programs for pp={self.shape.pp}")

    def rank_actions(self, rank: int) -> tuple[Action, ...]:
        return self.actions[rank]

    def compute_actions(self, rank: int) -> Iterator[Action]:
        return (a for a in self.actions[rank] if a.kind.is_compute)

    @property
    def splits_backward(self) -> bool:
        """True when the schedule uses separate I and W actions."""
        return any(a.kind is ActionKind.BACKWARD_INPUT for prog in self.actions for a in prog)

    def to_text(self) -> str:
        """One line per rank, tokens separated by spaces."""
        return "\n".join(" ".join(str(a) for a in prog) for prog in self.actions)
