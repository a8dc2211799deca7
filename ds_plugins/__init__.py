"""interleaf: zero-bubble pipeline schedules and interleaved optimizer offloading for DeepSpeed and Megatron.

``import ds_plugins`` registers the DeepSpeed hooks (idempotent); :func:`uninstall` reverses them. The hooks
act only on a DeepSpeed config that carries an ``"interleaf"`` block; without it DeepSpeed runs unchanged.
Importing this package does not import torch or DeepSpeed: when DeepSpeed is not imported yet, the hooks are
installed right after it is (``ds_plugins.schedule`` stays usable on a machine without torch).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys

__version__ = "0.1.0"
__all__ = ["install", "uninstall", "__version__"]

logger = logging.getLogger(__name__)
_installed = False


def install() -> None:
    """Register interleaf's DeepSpeed hooks now (imports DeepSpeed). Safe to call more than once."""
    global _installed
    if _installed:
        return
    from .deepspeed import install_hooks

    install_hooks()
    _installed = True
    logger.debug("interleaf DeepSpeed hooks installed")


def uninstall() -> None:
    """Undo :func:`install`: DeepSpeed gets its own engine and ZeRO optimizer classes back."""
    global _installed
    _remove_import_hook()
    if not _installed:
        return
    from .deepspeed import uninstall_hooks

    uninstall_hooks()
    _installed = False


class _InstallAfterDeepSpeedImport(importlib.abc.MetaPathFinder):
    """Installs the hooks as soon as ``deepspeed`` finishes importing."""

    def find_spec(self, fullname, path, target=None):  # noqa: D401 - importlib protocol
        if fullname != "deepspeed":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            install()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _remove_import_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _InstallAfterDeepSpeedImport)]


if "deepspeed" in sys.modules:
    install()
elif importlib.util.find_spec("deepspeed") is not None:
    sys.meta_path.insert(0, _InstallAfterDeepSpeedImport())
