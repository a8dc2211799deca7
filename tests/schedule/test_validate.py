"""Validator: every kind of broken schedule is caught, with the grid and the failing cell marked."""
import pytest

from ds_plugins.schedule import Action, ActionKind, CostModel, Schedule, add_communication
from ds_plugins.schedule.registry import SCHEDULE_NAMES, build_schedule
from ds_plugins.schedule.validate import ScheduleError, format_grid, validate

from schedule_text import sched


# 1F1B, pp=2, m=3, full backward.
ONE_F_ONE_B = """
0F0 0F1 0B0 0F2 0B1 0B2
1F0 1B0 1F1 1B1 1F2 1B2
"""
# Split backward (I + W), pp=2, m=2.
SPLIT = """
0F0 0F1 0I0 0W0 0I1 0W1
1F0 1I0 1F1 1I1 1W0 1W1
"""
# V placement, pp=2: rank 0 holds stages 0 and 3, rank 1 holds 1 and 2.
V_SCHEDULE = """
0F0 0F1 3F0 3B0 3F1 3B1 0B0 0B1
1F0 2F0 1F1 2F1 2B0 1B0 2B1 1B1
"""
# Same V schedule with rank 1 receiving stage 3's gradient for micro-batch 0 before stage 0's activation of
# micro-batch 1, which rank 0 sends first: fine for compute, wrong for an ordered transport once lowered.
V_OUT_OF_ORDER = """
0F0 0F1 3F0 3B0 3F1 3B1 0B0 0B1
1F0 2F0 2B0 1F1 2F1 1B0 2B1 1B1
"""


def error_of(schedule: Schedule, **kwargs) -> ScheduleError:
    with pytest.raises(ScheduleError) as info:
        validate(schedule, **kwargs)
    return info.value


@pytest.mark.parametrize("text,pp,m,vp,placement", [
    (ONE_F_ONE_B, 2, 3, 1, "loop"),
    (SPLIT, 2, 2, 1, "loop"),
    (V_SCHEDULE, 2, 2, 2, "v"),
    (V_OUT_OF_ORDER, 2, 2, 2, "v"),
])
def test_valid_schedules_pass_plain_and_lowered(text, pp, m, vp, placement):
    schedule = sched(text, pp, m, vp, placement)
    validate(schedule)
    validate(add_communication(schedule))
    if text is not V_OUT_OF_ORDER:
        validate(add_communication(schedule), strict_recv_order=True)


def test_schedule_error_is_value_error_with_grid_and_marked_cell():
    err = error_of(sched("0F0 0F1 0B0 0B1\n1B0 1F0 1F1 1B1", 2, 2))
    assert isinstance(err, ValueError)
    text = str(err)
    assert "1B0 (step 0) runs before 1F0 (step 1)" in text
    assert "move 1B0 after 1F0" in text
    lines = text.splitlines()
    assert lines[1].split() == ["rank", "0", "rank", "1"]
    marked = [line for line in lines if "<-- ERROR HERE" in line]
    assert marked[0].startswith("step 0:") and "[1B0]" in marked[0]
    assert "[1F0]" in marked[1]
    assert err.marks == ((1, 0), (1, 1))


def test_wrong_rank():
    err = error_of(sched("0F0 0B0 1F1\n1F0 1B0 0F1 0B1 1B1", 2, 2))
    assert "acts on stage 1, which the 'loop' placement puts on rank 1" in err.problem
    assert err.marks == ((0, 2),)


def test_v_placement_is_respected():
    # Stage 3 belongs to rank 0 under V placement; moving it to rank 1 (its looped owner) is an error.
    text = "0F0 0F1 0B0 0B1\n1F0 2F0 3F0 3B0 2B0 1B0 1F1 2F1 3F1 3B1 2B1 1B1"
    err = error_of(sched(text, 2, 2, 2, "v"))
    assert "rank 1 step 2: 3F0 acts on stage 3, which the 'v' placement puts on rank 0" in err.problem


@pytest.mark.parametrize("text,fragment", [
    ("0F0 0B0\n1F0 1B0 2F0", "names stage 2, but the pipeline has stages 0..1"),
    ("0F0 0B0 0F2\n1F0 1B0", "names micro-batch 2, but the step has micro-batches 0..0"),
])
def test_out_of_range(text, fragment):
    assert fragment in error_of(sched(text, 2, 1)).problem


def test_duplicate_marks_both_cells():
    err = error_of(sched(ONE_F_ONE_B.replace("1B2", "1B2 1B2"), 2, 3))
    assert "1B2 appears twice (rank 1 step 5 and rank 1 step 6)" in err.problem
    assert err.marks == ((1, 5), (1, 6))


@pytest.mark.parametrize("text,fragment", [
    ("0F0 0B0\n1B0", "stage 1 micro-batch 0 has no forward: add 1F0 to rank 1's program"),
    ("0F0 0B0\n1F0", "stage 1 micro-batch 0 has no backward: add 1B0 (or 1I0 and 1W0)"),
    ("0F0 0B0\n1F0 1W0", "has 1W0 but no input-gradient 1I0"),
    ("0F0 0B0\n1F0 1I0", "has 1I0 but no weight-gradient 1W0"),
    ("0F0 0B0\n1F0 1B0 1I0", "has both a full backward 1B0 and a split 1I0"),
])
def test_incomplete(text, fragment):
    assert fragment in error_of(sched(text, 2, 1)).problem


def test_weight_gradient_before_input_gradient():
    err = error_of(sched(SPLIT.replace("0I0 0W0", "0W0 0I0"), 2, 2))
    assert "rank 0: 0W0 (step 2) runs before 0I0 (step 3)" in err.problem
    assert "weight-gradient backward of a micro-batch needs its input-gradient backward first" in err.problem


def test_deadlock_names_what_each_rank_waits_for():
    err = error_of(sched("0F0 0B0 0F1 0B1\n1F1 1F0 1B0 1B1", 2, 2))
    assert "deadlock" in err.problem
    assert "rank 0 waits at 0B0 for 1B0 (rank 1 step 2); rank 1 waits at 1F1 for 0F1 (rank 0 step 2)" in err.problem
    assert set(err.marks) == {(0, 1), (1, 0), (1, 2), (0, 2)}


def test_memory_limit():
    schedule = sched(ONE_F_ONE_B, 2, 3)
    validate(schedule, memory_limit=2)  # rank 0 holds 2 micro-batches at most: exactly at the cap is fine
    err = error_of(schedule, memory_limit=1.5)
    assert "rank 0 holds 2 activation memory at its peak (first over the cap at step 1" in err.problem
    assert err.marks == ((0, 1),)
    # Per-stage memory from the cost model: doubling activation memory doubles the peak.
    costs = CostModel.uniform(schedule.shape, activation_memory=2.0)
    validate(schedule, costs, memory_limit=4)
    assert "holds 4 activation memory" in error_of(schedule, costs=costs, memory_limit=3.9).problem


def test_memory_limit_counts_weight_gradient_memory_until_w():
    text = "0F0 0I0 0F1 0I1 0W0 0W1\n1F0 1I0 1F1 1I1 1W0 1W1"
    schedule = sched(text, 2, 2)
    # W's memory counted as free (the papers' simplification): I frees everything, peak 1
    validate(schedule, CostModel.uniform(schedule.shape, weight_grad_memory=0.0), memory_limit=1.2)
    # With half the activations kept from I until W, rank 0 holds 0.5 + 1 when 0F1 runs.
    costs = CostModel.uniform(schedule.shape, activation_memory=1.0, weight_grad_memory=0.5)
    err = error_of(schedule, costs=costs, memory_limit=1.2)
    assert "rank 0 holds 1.5 activation memory at its peak (first over the cap at step 2" in err.problem


# ---- lowered schedules (SEND/RECV) ------------------------------------------------------------------------

def lowered(text, pp, m, vp=1, placement="loop"):
    return add_communication(sched(text, pp, m, vp, placement))


def replace_rank(schedule: Schedule, rank: int, tokens: str) -> Schedule:
    programs = list(schedule.actions)
    programs[rank] = tuple(Action.parse(t) for t in tokens.split())
    return Schedule(schedule.name, schedule.shape, tuple(programs))


def test_lowered_text_is_what_add_communication_writes():
    s = lowered(ONE_F_ONE_B, 2, 3)
    assert str(s.actions[1][0]) == "1RECV_F0"
    validate(s)


def test_missing_recv():
    s = lowered(ONE_F_ONE_B, 2, 3)
    tokens = " ".join(str(a) for a in s.actions[1] if str(a) != "1RECV_F2")
    err = error_of(replace_rank(s, 1, tokens))
    assert "0F2 on rank 0 feeds 1F2 on rank 1, but the lowered schedule has no 1RECV_F2" in err.problem


def test_missing_send():
    s = lowered(ONE_F_ONE_B, 2, 3)
    tokens = " ".join(str(a) for a in s.actions[1] if str(a) != "1SEND_B1")
    assert "has no 1SEND_B1: add it to rank 1's program" in error_of(replace_rank(s, 1, tokens)).problem


def test_send_before_its_producer():
    s = lowered(ONE_F_ONE_B, 2, 3)
    tokens = " ".join(str(a) for a in s.actions[0]).replace("0F0 0SEND_F0", "0SEND_F0 0F0")
    err = error_of(replace_rank(s, 0, tokens))
    assert "0SEND_F0 (step 0) sends a value that 0F0 (step 1) has not produced yet" in err.problem


def test_recv_after_its_consumer():
    s = lowered(ONE_F_ONE_B, 2, 3)
    tokens = " ".join(str(a) for a in s.actions[1]).replace("1RECV_F1 1F1", "1F1 1RECV_F1")
    err = error_of(replace_rank(s, 1, tokens))
    assert "1F1 (step" in err.problem and "runs before 1RECV_F1" in err.problem


def test_comm_between_stages_on_one_rank():
    # V placement: stages 1 and 2 are both on rank 1, so 1SEND_F0 has no business there.
    s = lowered(V_SCHEDULE, 2, 2, 2, "v")
    tokens = " ".join(str(a) for a in s.actions[1]).replace("1F0", "1F0 1SEND_F0", 1)
    err = error_of(replace_rank(s, 1, tokens))
    assert "1SEND_F0 crosses from stage 1 to stage 2, but both are on rank 1" in err.problem


def test_comm_at_pipeline_end():
    s = lowered(ONE_F_ONE_B, 2, 3)
    tokens = " ".join(str(a) for a in s.actions[0]) + " 0SEND_B2"
    assert "0SEND_B2 has no peer: stage 0 is the first stage" in error_of(replace_rank(s, 0, tokens)).problem


def test_out_of_order_messages_between_a_pair_of_ranks():
    validate(lowered(V_OUT_OF_ORDER, 2, 2, 2, "v"))  # fine when receives are matched in the sender's order
    err = error_of(lowered(V_OUT_OF_ORDER, 2, 2, 2, "v"), strict_recv_order=True)
    assert "messages from rank 0 to rank 1 are received out of order" in err.problem
    assert "send #1" in err.problem and "activation of stage 0, micro-batch 1" in err.problem
    assert "input gradient of stage 3, micro-batch 0" in err.problem
    assert len(err.marks) == 2


def test_receive_posted_too_early_deadlocks_the_transport():
    # Rank 1 posts the receive of micro-batch 1's activation before its own 1SEND_B0, which rank 0 needs
    # before it produces micro-batch 1. The compute order alone is fine.
    text = "0F0 0B0 0F1 0B1\n1F0 1B0 1F1 1B1"
    s = lowered(text, 2, 2)
    validate(s)
    tokens = " ".join(str(a) for a in s.actions[1]).replace("1RECV_F1 ", "").replace("1B0", "1RECV_F1 1B0")
    err = error_of(replace_rank(s, 1, tokens))
    assert "communication deadlock: rank 0 waits at 0RECV_B0 for the send at rank 1 step 4" in err.problem
    assert "rank 1 waits at 1RECV_F1 for the send at rank 0 step 5" in err.problem
    assert set(err.marks) == {(0, 2), (1, 2), (1, 4), (0, 5)}


def test_long_grid_shows_window_around_error():
    m = 30
    text = " ".join(f"0F{i} 0B{i}" for i in range(m)) + "\n" + " ".join(f"1F{i} 1B{i}" for i in range(m))
    schedule = sched(text, 2, m)
    broken = replace_rank(schedule, 1, " ".join(str(a) for a in schedule.actions[1]).replace("1F25 1B25", "1B25 1F25"))
    err = error_of(broken)
    grid = str(err).splitlines()[1:]
    assert any(line.startswith("step 50:") and "[1B25]" in line and line.endswith("<-- ERROR HERE") for line in grid)
    assert "step 0:" not in "\n".join(grid)
    assert grid[1].startswith("...")
    assert len(grid) < 20


def test_format_grid_without_marks_is_plain():
    grid = format_grid(sched(ONE_F_ONE_B, 2, 3))
    assert "ERROR" not in grid and "[" not in grid
    assert grid.splitlines()[1].split() == ["step", "0:", "0F0", "1F0"]


# ---- every registered schedule, plain and lowered ----------------------------------------------------------

def _registry_cases():
    from ds_plugins.schedule.registry import SCHEDULE_NAMES

    for name in SCHEDULE_NAMES:
        for pp in (2, 3, 4):
            for m in (pp, pp + 1, 2 * pp):
                yield name, pp, m


@pytest.mark.parametrize("name,pp,m", list(_registry_cases()))
def test_registered_schedules_validate_plain_and_lowered(name, pp, m):
    from ds_plugins.schedule.registry import build_schedule

    schedule = build_schedule(name, pp=pp, microbatches=m)
    validate(schedule)
    validate(add_communication(schedule))


# ---- property: any mutation of a valid schedule is either valid or a ScheduleError, never a crash --------------

from hypothesis import given, settings, strategies as st  # noqa: E402

from ds_plugins.schedule import simulate  # noqa: E402

_BASES = [
    sched(ONE_F_ONE_B, 2, 3),
    sched(SPLIT, 2, 2),
    sched(V_SCHEDULE, 2, 2, 2, "v"),
    sched(V_OUT_OF_ORDER, 2, 2, 2, "v"),
]
_BASES += [add_communication(s) for s in _BASES]


def _mutate(schedule: Schedule, ops) -> Schedule:
    programs = [list(p) for p in schedule.actions]
    for op, rank, i, j in ops:
        prog = programs[rank % len(programs)]
        if not prog:
            continue
        i, j = i % len(prog), j % (len(prog) + 1)
        if op == "swap":
            k = j % len(prog)
            prog[i], prog[k] = prog[k], prog[i]
        elif op == "move":
            prog.insert(j, prog.pop(i))
        elif op == "delete":
            prog.pop(i)
        elif op == "duplicate":
            prog.insert(j, prog[i])
        elif op == "to_other_rank":
            other = programs[(rank + 1) % len(programs)]
            other.insert(j % (len(other) + 1), prog.pop(i))
    return Schedule(schedule.name, schedule.shape, tuple(tuple(p) for p in programs))


@settings(max_examples=300, deadline=None)
@given(
    base=st.sampled_from(_BASES),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["swap", "move", "delete", "duplicate", "to_other_rank"]),
            st.integers(0, 7), st.integers(0, 63), st.integers(0, 63),
        ),
        min_size=1,
        max_size=3,
    ),
    strict=st.booleans(),
)
def test_mutations_are_valid_or_schedule_errors(base, ops, strict):
    schedule = _mutate(base, ops)
    try:
        validate(schedule, strict_recv_order=strict)
    except ScheduleError as err:
        assert err.problem and "<-- ERROR HERE" in str(err) or not err.marks
        return
    # Accepted: complete, and it runs to the end with the same work as the original.
    result = simulate(schedule, CostModel.uniform(schedule.shape))
    original = simulate(base, CostModel.uniform(base.shape))
    assert sum(result.busy) == pytest.approx(sum(original.busy))
    assert sorted(map(str, (a for p in schedule.actions for a in p))) == sorted(
        map(str, (a for p in base.actions for a in p))
    )


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8)])
def test_serialized_schedule_is_valid_same_work_and_each_message_used_next(name, pp, m):
    """serialize(): the runtime's first step on CUDA. Same compute actions per rank; lowered, it validates; and
    in the one global sequence every message's consumer is the next action after its producer (or after the
    producer's own W), so blocking transfers cannot deadlock."""
    from ds_plugins.schedule.lowering import serialize

    schedule = build_schedule(name, pp=pp, microbatches=m)
    serial = serialize(schedule)
    assert serial.shape == schedule.shape
    for rank in range(pp):
        assert sorted(map(str, serial.compute_actions(rank))) == sorted(map(str, schedule.compute_actions(rank)))
    validate(add_communication(serial))
    shape = schedule.shape
    sequence = []
    for i in range(m):
        sequence += [Action(s, ActionKind.FORWARD, i) for s in range(shape.num_stages)]
        for s in reversed(range(shape.num_stages)):
            kinds = [a.kind for a in serial.compute_actions(shape.rank_of(s)) if a.stage == s and a.microbatch == i]
            sequence += [Action(s, k, i) for k in kinds if k is not ActionKind.FORWARD]
    for rank in range(pp):  # each rank's program is its share of the global sequence
        assert list(serial.compute_actions(rank)) == [a for a in sequence if shape.rank_of(a.stage) == rank]
    consumers = [a for a in sequence if a.kind is not ActionKind.BACKWARD_WEIGHT]
    for prev, nxt in zip(consumers, consumers[1:]):
        if nxt.kind is ActionKind.FORWARD and nxt.stage > 0:
            assert (prev.stage, prev.microbatch, prev.kind) == (nxt.stage - 1, nxt.microbatch, ActionKind.FORWARD)
        elif nxt.kind is not ActionKind.FORWARD and nxt.stage < shape.num_stages - 1:
            assert (prev.stage, prev.microbatch) == (nxt.stage + 1, nxt.microbatch)
