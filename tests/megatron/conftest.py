"""tests/megatron: the repository root (``benchmarks``, ``megatron_patches``) and this folder (``megatron_workers``,
``cpu_shim``) on ``sys.path`` for the test modules and the ranks they spawn (spawn hands its parent's path on)."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(os.path.dirname(HERE)), HERE):
    if path not in sys.path:
        sys.path.insert(0, path)
