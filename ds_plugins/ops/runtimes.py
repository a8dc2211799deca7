"""Which shared runtimes the csrc ops link: torch's own OpenMP runtime and C++ standard library, never second
copies (docs/ops.md, build section: "OpenMP runtime", "libstdc++").

**OpenMP.** The CPU op parallelises with ``at::parallel_for``, whose OpenMP pragmas are compiled into our library. Linking it
with plain ``-fopenmp`` records a dependency on the *system* ``libgomp.so.1``. A torch wheel ships its own OpenMP
runtime in ``torch/lib``; when that file's SONAME differs from ``libgomp.so.1`` (pip wheels have used hashed
names such as ``libgomp-<hash>.so.1``), the process ends up with two runtimes, each with its own pool of
``OMP_NUM_THREADS`` threads that spin after every parallel region: twice the threads on the cores, and
``torch.set_num_threads`` reaching only one of them. So the extension is linked against the very runtime file
that libtorch_cpu loaded (found in ``/proc/self/maps`` after ``import torch``), which makes its NEEDED entry
that runtime's SONAME: the loader then reuses the runtime torch already loaded. torch's ``CppExtension`` adds
no OpenMP flag of its own.

**libstdc++.** A toolchain that ships only a static ``libstdc++.a`` (some images install their own GCC next to the
system one; ``g++ -print-file-name=libstdc++.so`` then prints the bare name) links a private copy of the C++
standard library into the extension. That copy numbers its locale facets on its own, so the first ``ostream``
formatting in the extension - building the message of a refused call, ``c10::str(..., index, ...)`` - reads a
facet torch's copy never registered and crashes (SIGSEGV, measured on the device image: GCC 13.3 in /opt/gcc,
system libstdc++.so.6.0.33). Then the extension is linked against the ``libstdc++.so`` this process loaded
(with torch), by path, like the OpenMP runtime. A toolchain with a shared libstdc++ is left alone.

Nothing here imports torch; the caller imports it first.
"""
from __future__ import annotations

import os
import re
import subprocess

__all__ = ["OPENMP_LIBRARY_PATTERN", "libstdcxx_link_args", "loaded_libraries", "loaded_openmp_runtimes",
           "openmp_link_args"]

# GNU (libgomp*), Intel (libiomp5*) and LLVM (libomp*) OpenMP runtimes, including renamed wheel copies.
OPENMP_LIBRARY_PATTERN = re.compile(r"/lib(gomp|iomp5|omp)[-.\w]*\.so[.\d]*$")
LIBSTDCXX_PATTERN = re.compile(r"/libstdc\+\+\.so[.\d]*$")


def loaded_libraries(pattern: re.Pattern, maps_path: str = "/proc/self/maps") -> list[str]:
    """Paths of the shared libraries matching ``pattern`` mapped into this process (Linux), sorted; [] when
    unknown."""
    try:
        with open(maps_path) as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return []
    return sorted(p for p in paths if pattern.search(p))


def loaded_openmp_runtimes(maps_path: str = "/proc/self/maps") -> list[str]:
    """Paths of the OpenMP runtime libraries mapped into this process (Linux), sorted; [] when unknown."""
    return loaded_libraries(OPENMP_LIBRARY_PATTERN, maps_path)


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


def compiler_has_shared_libstdcxx(compiler: str | None = None) -> bool:
    """Whether the C++ compiler torch's extension builds use (``$CXX``, else ``c++``) finds a shared
    ``libstdc++.so`` (``-print-file-name`` prints a path); True when it cannot be asked (not GCC-like)."""
    compiler = compiler or os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([compiler, "-print-file-name=libstdc++.so"], capture_output=True, text=True,
                             timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return True
    return os.sep in out


def libstdcxx_link_args(compiler: str | None = None) -> list[str]:
    """Linker arguments that keep a private static libstdc++ out of an extension; call after ``import torch``.

    ``[]`` when the compiler links a shared libstdc++ (the usual case); else the path of the one libstdc++.so
    mapped into this process (torch's), so the extension's NEEDED entry is its SONAME. ``[]`` too when there is
    no single mapped copy to point at."""
    if compiler_has_shared_libstdcxx(compiler):
        return []
    loaded = loaded_libraries(LIBSTDCXX_PATTERN)
    if len(loaded) == 1 and os.path.exists(loaded[0]):
        return [loaded[0]]
    return []
