"""benchmarks/megatron_drift.py on CPU (tiny GPT, 2 gloo ranks under torchrun): rows alternate the collector on /
off or the issuing threads unpinned / pinned, and every rank logs each row with its host-speed probe."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
pytest.importorskip("megatron.core")

ARGS = ["--tiny", "--microbatches", "2", "--warmup", "1", "--steps", "1",
        "--variants", "megatron-interleaved", "megatron-interleaved"]


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.join(ROOT, "benchmarks", "megatron_drift.py"), *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode, tag, settings", [("gc", "gc", ["gc on", "gc off"]),
                                                ("pinning", "pin", ["pinned False", "pinned True"])])
def test_drift_rows_alternate_and_log_the_probe(mode, tag, settings):
    done = _run("--drift", mode, *ARGS)
    assert done.returncode == 0, done.stderr[-3000:]
    # two processes print at once: a line can hold both ranks' records, so find the records, not the lines
    records = re.findall(rf"\[{tag}\] rank (\d) row (\d) megatron-interleaved m=2 ({'|'.join(settings)}).*?"
                         r"probe before: python loop [0-9.]+ ms, 3000 launches [0-9.]+ ms", done.stdout)
    assert sorted(records) == [("0", "0", settings[0]), ("0", "1", settings[1]), ("1", "0", settings[0]),
                               ("1", "1", settings[1])], done.stdout[-3000:]
    assert "| megatron-interleaved (unbatched p2p) **baseline** |" in done.stdout
    if mode == "pinning":
        assert sum(l.startswith("[threads] rank 0 row ") for l in done.stdout.splitlines()) == 2


def test_drift_needs_a_mode_and_rows_run_one_after_another():
    done = _run(*ARGS)
    assert done.returncode != 0 and "--drift gc or --drift pinning" in done.stderr
    done = _run("--drift", "gc", "--alternate", *ARGS)
    assert done.returncode != 0 and "drop --alternate" in done.stderr
