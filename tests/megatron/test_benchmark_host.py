"""benchmarks/megatron_host.py on CPU (tiny GPT chunk through the test-only shim): it runs every variant, and the
W pass really runs the queued weight-gradient closures (so I + W covers the whole backward)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytest.importorskip("megatron.core")


@pytest.mark.timeout(180)
def test_host_cost_table_has_every_variant_per_sequence_length():
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(29000 + os.getpid() % 1000))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "megatron_host.py"), "--tiny",
                          "--rounds", "2", "--warmup", "1", "--seq", "16", "8"],
                         capture_output=True, text=True, env=env, timeout=170, check=True).stdout
    rows = [line for line in out.splitlines() if re.match(r"^\| (16|8) \|", line)]
    assert len(rows) == 2, out
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 9
        medians = [float(c.split()[0]) for c in cells[1:6]]
        assert all(m > 0 for m in medians)  # forward, megatron B, interleaf B, I, W: each took time
        # every linear of the chunk deferred its weight GEMM: 4 per layer (QKV, projection, fc1, fc2), the LM head
        assert int(cells[6]) == 4 * 4 + 1
        assert cells[7].endswith("x") and cells[8].endswith("x")
