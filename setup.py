"""Build and install interleaf: the ds_plugins library, the megatron_patches adapter and the csrc ops."""
from setuptools import find_packages, setup

setup(
    name="interleaf",
    version="0.1.0",
    description="Zero-bubble pipeline schedules and interleaved optimizer offloading for DeepSpeed and Megatron",
    packages=find_packages(include=["ds_plugins", "ds_plugins.*", "megatron_patches", "megatron_patches.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "deepspeed>=0.19,<0.20"],
    extras_require={"megatron": ["megatron-core>=0.16,<0.17"], "draw": ["matplotlib"]},
    entry_points={"console_scripts": ["interleaf=ds_plugins.cli:main"]},
)
