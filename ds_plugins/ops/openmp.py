"""Which OpenMP runtime the csrc ops use: torch's own, never a second one (docs/ops.md, "OpenMP runtime").

The CPU op parallelises with ``at::parallel_for``, whose OpenMP pragmas are compiled into our library. Linking it
with plain ``-fopenmp`` records a dependency on the *system* ``libgomp.so.1``. A torch wheel ships its own OpenMP
runtime in ``torch/lib``; when that file's SONAME differs from ``libgomp.so.1`` (pip wheels have used hashed
names such as ``libgomp-<hash>.so.1``), the process ends up with two runtimes, each with its own pool of
``OMP_NUM_THREADS`` threads that spin after every parallel region: twice the threads on the cores, and
``torch.set_num_threads`` reaching only one of them. So the extension is linked against the very runtime file
that libtorch_cpu loaded (found in ``/proc/self/maps`` after ``import torch``), which makes its NEEDED entry
that runtime's SONAME: the loader then reuses the runtime torch already loaded. torch's ``CppExtension`` adds
no OpenMP flag of its own. Nothing here imports torch; the caller imports it first.
"""
from __future__ import annotations

import os
import re

__all__ = ["OPENMP_LIBRARY_PATTERN", "loaded_openmp_runtimes", "openmp_link_args"]

# GNU (libgomp*), Intel (libiomp5*) and LLVM (libomp*) OpenMP runtimes, including renamed wheel copies.
OPENMP_LIBRARY_PATTERN = re.compile(r"/lib(gomp|iomp5|omp)[-.\w]*\.so[.\d]*$")


def loaded_openmp_runtimes(maps_path: str = "/proc/self/maps") -> list[str]:
    """Paths of the OpenMP runtime libraries mapped into this process (Linux), sorted; [] when unknown."""
    try:
        with open(maps_path) as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return []
    return sorted(p for p in paths if OPENMP_LIBRARY_PATTERN.search(p))


def openmp_link_args() -> list[str]:
    """Linker arguments binding an extension to torch's OpenMP runtime; call after ``import torch``.

    Exactly one runtime mapped (torch's): link that file by path, so the extension's dependency is its SONAME
    and the loader reuses the copy torch loaded. Otherwise (not Linux, or several already mapped): ``-fopenmp``.
    ``INTERLEAF_OPENMP_LINK=system`` forces ``-fopenmp`` (the system runtime)."""
    if os.environ.get("INTERLEAF_OPENMP_LINK", "torch").strip().lower() == "system":
        return ["-fopenmp"]
    runtimes = loaded_openmp_runtimes()
    if len(runtimes) == 1 and os.path.exists(runtimes[0]):
        return [runtimes[0]]
    return ["-fopenmp"]
