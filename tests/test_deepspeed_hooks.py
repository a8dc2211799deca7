"""Any import order of ds_plugins and its DeepSpeed adapter modules installs the hooks (fresh interpreters)."""
import subprocess
import sys

import pytest

MODULES = [
    "ds_plugins.deepspeed.offload_optimizer",
    "ds_plugins.deepspeed._runner",
    "ds_plugins.deepspeed.pipeline_engine",
    "ds_plugins.deepspeed.partition",
]


@pytest.mark.parametrize("module", MODULES)
def test_adapter_module_imported_before_deepspeed(module):
    code = (
        f"import {module}\n"
        "import deepspeed, ds_plugins\n"
        "from deepspeed.runtime.pipe.engine import PipelineEngine\n"
        "assert deepspeed.PipelineEngine is not PipelineEngine, 'hooks not installed'\n"
        "ds_plugins.uninstall()\n"
        "assert deepspeed.PipelineEngine is PipelineEngine, 'uninstall did not restore'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]


def test_ds_plugins_before_deepspeed():
    code = (
        "import ds_plugins, deepspeed\n"
        "from deepspeed.runtime.pipe.engine import PipelineEngine\n"
        "assert deepspeed.PipelineEngine is not PipelineEngine, 'hooks not installed'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]


def test_pipeline_block_on_a_plain_model_is_refused():
    code = (
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
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refused:" in result.stdout
