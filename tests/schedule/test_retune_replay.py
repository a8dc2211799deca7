"""benchmarks/retune_replay.py: the logged warm-ups it replays, and the search over budgets below the cap never
rebuilding a slower order than the search at the cap alone."""
from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchmarks import retune_replay  # noqa: E402
from ds_plugins.schedule.generators import list_scheduler  # noqa: E402

# session 11's fifth-call zb-v warm-up as logged (the 305.4 ms rebuild), and a line with the same costs again
LOGGED = (
    "[interleaf] interleaf zb-v: measured F/I/W ms per stage [5.83/7.27/1.88, 4.93/7.10/1.95, 5.16/7.01/1.92, "
    "5.13/6.79/1.87, 5.24/6.80/1.87, 5.76/7.03/1.92, 4.96/7.11/1.95, 6.09/7.54/2.48]; activations / kept for W GiB "
    "per stage [2.01/0.49, 2.00/0.49, 2.00/0.49, 2.00/0.49, 2.00/0.50, 2.00/0.49, 1.99/0.50, 2.24/0.63]; simulated "
    "step 343.5 ms (bubble 32.7%) as built for F = I = W, 305.4 ms (bubble 24.3%) rebuilt\n"
)


def test_replay_gives_the_logged_rebuild_and_the_descents():
    rows = retune_replay.replay(LOGGED * 2)
    assert len(rows) == 1  # the same warm-up logged twice is replayed once
    row = rows[0]
    assert (row["schedule"], row["pp"], row["m"]) == ("zb-v", 4, 8)
    assert row["cap_only_ms"] == pytest.approx(305.3, abs=0.1)  # what the warm-up's rebuild simulated (305.4 logged)
    assert row["descent_ms"] == pytest.approx(278.7, abs=0.1)
    assert list_scheduler.budget_descent.__name__ == "budget_descent"  # the replay put the real search back


def test_descent_never_slower_on_the_first_logged_warmups():
    with open(os.path.join(ROOT, "BENCHMARKS.md")) as f:
        rows = retune_replay.replay(f.read(), limit=4)
    assert len(rows) == 4
    assert all(r["descent_ms"] <= r["cap_only_ms"] + 1e-9 for r in rows)
