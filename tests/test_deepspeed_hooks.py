"""The DeepSpeed hooks, each check in a fresh interpreter: any import order of ds_plugins, its adapter modules
and deepspeed installs them, uninstall() restores DeepSpeed, and a pipeline block on a plain model is refused."""
import subprocess
import sys

import pytest

MODULES = [
    "ds_plugins.deepspeed.offload_optimizer",
    "ds_plugins.deepspeed._runner",
    "ds_plugins.deepspeed.pipeline_engine",
    "ds_plugins.deepspeed.partition",
]
HOOKED = (
    "from deepspeed.runtime.pipe.engine import PipelineEngine\n"
    "assert deepspeed.PipelineEngine is not PipelineEngine, 'hooks not installed'\n"
)


def _run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("module", MODULES)
def test_adapter_module_imported_before_deepspeed(module):
    _run_python(
        f"import {module}\nimport deepspeed, ds_plugins\n" + HOOKED
        + "ds_plugins.uninstall()\nassert deepspeed.PipelineEngine is PipelineEngine, 'uninstall did not restore'\n"
    )


def test_ds_plugins_before_deepspeed():
    _run_python("import ds_plugins, deepspeed\n" + HOOKED)


def test_pipeline_block_on_a_plain_model_is_refused():
    out = _run_python(
        "import os; os.environ.setdefault('DS_ACCELERATOR', 'cpu')\n"
        "import torch, deepspeed, ds_plugins\n"
        "cfg = {'train_batch_size': 1, 'optimizer': {'type': 'SGD', 'params': {'lr': 0.1}},\n"
        "       'interleaf': {'pipeline': {'schedule': 'zb-v'}}}\n"
        "try:\n"
        "    deepspeed.initialize(model=torch.nn.Linear(4, 4), config=cfg)\n"
        "except ValueError as e:\n"
        "    assert 'PipelineModule' in str(e), e\n"
        "    print('refused:', e)\n"
        "else:\n"
        "    raise SystemExit('a pipeline block on a plain model was accepted')\n"
    )
    assert "refused:" in out
