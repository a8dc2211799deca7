"""benchmarks/megatron_host.py on CPU (tiny GPT chunk through the test-only shim): it runs every variant, I queues
every linear's weight GEMM, and the script's own check (the three backwards leave the same gradients) passes, so
W really ran the queued closures; a W that skips them makes the script fail."""
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
    # CPU even on a GPU machine (there the script would write its tiny table into BENCHMARKS.md)
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(29000 + os.getpid() % 1000), CUDA_VISIBLE_DEVICES="")
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
        medians = dict(zip(("forward", "megatron B", "interleaf B", "I", "W"), medians))
        # the ratio columns are (I + W) / megatron B and interleaf B / megatron B (2-decimal cells: loose tolerance)
        assert float(cells[7].rstrip("x")) == pytest.approx((medians["I"] + medians["W"]) / medians["megatron B"],
                                                            rel=0.05)
        assert float(cells[8].rstrip("x")) == pytest.approx(medians["interleaf B"] / medians["megatron B"], rel=0.05)


def test_host_cost_script_fails_when_the_weight_gradients_go_missing():
    """Its gradient check catches weight-gradient closures that do nothing (here every closure made a no-op)."""
    code = (
        "import runpy, sys\n"
        "from megatron_patches import linear_weight_grad\n"
        "linear_weight_grad._weight_grad_closure = lambda *args, **kwargs: (lambda: None)\n"
        "sys.argv = ['megatron_host.py', '--tiny', '--rounds', '1', '--warmup', '0', '--seq', '8']\n"
        f"runpy.run_path({os.path.join(ROOT, 'benchmarks', 'megatron_host.py')!r}, run_name='__main__')\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(29000 + (os.getpid() + 7) % 1000),
               CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=170, cwd=ROOT)
    assert run.returncode != 0 and "left gradients" in run.stderr, run.stderr[-2000:]
