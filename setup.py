"""Build and install interleaf: the ds_plugins library, the megatron_patches adapter and the csrc ops.

The csrc ops (docs/ops.md): the CPU AdamW op is always built (one TU per ISA, the ISA picked at run time; never
-march=native); the CUDA op is built when torch has CUDA (`torch.version.cuda`) and a toolkit is found
(`CUDA_HOME`). No GPU is probed: without TORCH_CUDA_ARCH_LIST set, a fixed list of architectures is used.
INTERLEAF_BUILD_OPS: "auto" (default) builds them and, if a build fails, warns and installs without it
(ds_plugins.ops then tries a JIT build, else its torch twin); "1" makes a failed build fatal; "0" skips them.
"""
import os

from setuptools import find_packages, setup

CPU_SOURCES = ["csrc/cpu_adam.cpp", "csrc/cpu_adam_scalar.cpp", "csrc/cpu_adam_avx2.cpp", "csrc/cpu_adam_avx512.cpp"]
CUDA_SOURCES = ["csrc/cuda_adam.cu"]
# -ffp-contract=off: the kernels spell out every fused multiply-add, so all ISAs round identically.
CPU_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
NVCC_FLAGS = ["-O3", "--threads=4"]
DEFAULT_CUDA_ARCHS = "8.0;9.0;10.0+PTX"


def _torch_runtime_link_args(openmp: bool):
    """Link an op library against the OpenMP runtime (``openmp``) and libstdc++ torch loaded, not second copies
    (ds_plugins/ops/runtimes.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_interleaf_runtimes", os.path.join(os.path.dirname(os.path.abspath(__file__)), "ds_plugins", "ops",
                                            "runtimes.py"))
    runtimes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runtimes)
    return (runtimes.openmp_link_args() if openmp else []) + runtimes.libstdcxx_link_args()


def _extensions():
    """The extension modules to build, and the build_ext command class (empty when torch is missing)."""
    mode = os.environ.get("INTERLEAF_BUILD_OPS", "auto")
    if mode not in ("auto", "1", "0"):
        raise ValueError(f"INTERLEAF_BUILD_OPS must be auto, 1 or 0; got {mode!r}")
    if mode == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # pure-Python install; ds_plugins.ops JIT-builds or falls back to torch
        return [], {}

    class BuildExtensionOrWarn(cpp_extension.BuildExtension):
        """torch's BuildExtension; in "auto" mode a failed extension is reported and skipped, not fatal."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # noqa: BLE001 - compiler/ninja errors come as several types
                if mode == "1":
                    raise
                self.warn(f"building {ext.name} failed ({error}); installing without it: ds_plugins.ops will "
                          "try a JIT build, then its pure-torch twin. Set INTERLEAF_BUILD_OPS=1 to make this fatal.")

    modules = [
        cpp_extension.CppExtension(
            "ds_plugins.ops._interleaf_cpu",
            CPU_SOURCES,
            extra_compile_args=CPU_FLAGS,
            extra_link_args=_torch_runtime_link_args(openmp=True),
        )
    ]
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        modules.append(
            cpp_extension.CUDAExtension(
                "ds_plugins.ops._interleaf_cuda",
                CUDA_SOURCES,
                extra_compile_args={"cxx": ["-O3"], "nvcc": NVCC_FLAGS},
                extra_link_args=_torch_runtime_link_args(openmp=False),
            )
        )
    return modules, {"build_ext": BuildExtensionOrWarn}


ext_modules, cmdclass = _extensions()

setup(
    name="interleaf",
    version="0.1.0",
    description="Zero-bubble pipeline schedules and interleaved optimizer offloading for DeepSpeed and Megatron",
    packages=find_packages(include=["ds_plugins", "ds_plugins.*", "megatron_patches", "megatron_patches.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "deepspeed>=0.19,<0.20"],
    extras_require={"megatron": ["megatron-core>=0.16,<0.17"], "draw": ["matplotlib"]},
    entry_points={"console_scripts": ["interleaf=ds_plugins.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
