"""Small hand-written schedules shared by the schedule tests: one line of actions per rank ("0F0" = stage 0,
forward, micro-batch 0; see Action.parse)."""
from ds_plugins.schedule import Action, PipelineShape, Schedule


def sched(text: str, pp: int, m: int, vp: int = 1, placement: str = "loop", name: str = "t") -> Schedule:
    """The schedule written in ``text``; ranks without a line get an empty program."""
    rows = [tuple(Action.parse(t) for t in line.split()) for line in text.strip().splitlines()]
    rows += [()] * (pp - len(rows))
    return Schedule(name, PipelineShape(pp=pp, microbatches=m, vp=vp, placement=placement), tuple(rows))


ONE_F_ONE_B = sched("0F0 0F1 0B0 0F2 0B1 0B2\n1F0 1B0 1F1 1B1 1F2 1B2", 2, 3, name="1f1b")
SPLIT = sched("0F0 0F1 0I0 0W0 0I1 0W1\n1F0 1I0 1F1 1I1 1W0 1W1", 2, 2, name="split")
V = sched("0F0 0F1 3F0 3B0 3F1 3B1 0B0 0B1\n1F0 2F0 1F1 2F1 2B0 1B0 2B1 1B1", 2, 2, 2, "v", name="v")
