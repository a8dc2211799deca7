"""Replay ``retune`` on every warm-up BENCHMARKS.md logs: the rebuild with its search over memory budgets below
the cap (as shipped) against the search at the cap alone (every knob combination, no tighter budget; what
``retune`` did before session 12). CPU only, no GPU run: the inputs are the warm-ups' logged costs.

Each ``[interleaf] interleaf zb-v|zb-h1|zb-h2: measured F/I/W ms per stage [...]; activations / kept for W GiB per
stage [...]; simulated step X ms ...`` line of the file is rebuilt once per search; a line is used when its costs
(rounded as logged) reproduce its logged step ``X`` to 0.15 ms for m = 8 or 16 (identical lines once). Prints one
row per warm-up and a summary::

    python benchmarks/retune_replay.py [--file BENCHMARKS.md] [--limit N]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from typing import Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from ds_plugins.schedule import CostModel, build_schedule, retune  # noqa: E402
from ds_plugins.schedule.generators import list_scheduler  # noqa: E402

LINE = re.compile(r"interleaf (zb-v|zb-h2|zb-h1): measured F/I/W ms per stage \[([^\]]*)\]; activations / kept for W "
                  r"GiB per stage \[([^\]]*)\]; simulated step ([\d.]+) ms")


def warmups(text: str) -> Iterator[tuple[str, CostModel, float]]:
    """``(schedule name, the logged costs in ms and GiB, the logged step of the F = I = W order)``, each logged
    warm-up once."""
    seen = set()
    for match in LINE.finditer(text):
        name, fiw, memory, before = match.groups()
        if (name, fiw, memory) in seen:
            continue
        seen.add((name, fiw, memory))
        times = [tuple(map(float, x.split("/"))) for x in fiw.split(", ")]
        held = [tuple(map(float, x.split("/"))) for x in memory.split(", ")]
        yield name, CostModel(forward=tuple(t[0] for t in times), backward_input=tuple(t[1] for t in times),
                              backward_weight=tuple(t[2] for t in times),
                              activation_memory=tuple(a for a, _ in held),
                              weight_grad_memory=tuple(k for _, k in held)), float(before)


@contextlib.contextmanager
def search_at_the_cap_only() -> Iterator[None]:
    """``zero_bubble_schedule(search=True)`` with the runs under the cap alone (the descent's first round)."""
    descent = list_scheduler.budget_descent

    def first_round(name, shape, costs, cap, **kwargs):
        for policy, budget, run in descent(name, shape, costs, cap, **kwargs):
            if budget < max(cap):
                return
            yield policy, budget, run

    list_scheduler.budget_descent = first_round
    try:
        yield
    finally:
        list_scheduler.budget_descent = descent


def replay(text: str, limit: int | None = None) -> list[dict]:
    rows = []
    for name, costs, before in warmups(text):
        pp = costs.num_stages // 2 if name == "zb-v" else costs.num_stages
        for m in (8, 16):
            schedule = build_schedule(name, pp=pp, microbatches=m)
            now = retune(schedule, costs)
            if abs(now.before.makespan - before) < 0.15:
                break
        else:
            continue  # the logged costs (rounded) do not reproduce the logged step
        with search_at_the_cap_only():
            at_cap = retune(schedule, costs)
        rows.append({"schedule": name, "pp": pp, "m": m, "before_ms": before, "cap_only_ms": at_cap.after.makespan,
                     "descent_ms": now.after.makespan, "bound_ms": now.bound.makespan})
        if limit is not None and len(rows) >= limit:
            break
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--file", default=os.path.join(ROOT, "BENCHMARKS.md"))
    p.add_argument("--limit", type=int, default=None, help="stop after this many warm-ups")
    args = p.parse_args(argv)
    with open(args.file) as f:
        rows = replay(f.read(), args.limit)
    print("| schedule | pp | m | F = I = W order ms | rebuilt, search at the cap ms | rebuilt, with budgets below ms | "
          "lower bound ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['schedule']} | {r['pp']} | {r['m']} | {r['before_ms']:.1f} | {r['cap_only_ms']:.1f} | "
              f"{r['descent_ms']:.1f} | {r['bound_ms']:.1f} |")
    shorter = [1 - r["descent_ms"] / r["cap_only_ms"] for r in rows if r["descent_ms"] < r["cap_only_ms"] - 0.05]
    longer = sum(r["descent_ms"] > r["cap_only_ms"] + 0.05 for r in rows)
    print(f"\n{len(rows)} warm-ups: the search over budgets below the cap shortened {len(shorter)} rebuilt orders "
          f"(by up to {100 * max(shorter, default=0):.1f}%) and lengthened {longer}")


if __name__ == "__main__":
    main()
