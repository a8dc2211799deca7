"""The "interleaf" block of a DeepSpeed config: a typo is a ValueError naming where it is and what is allowed."""
import pytest

from ds_plugins.config import InterleafConfig


@pytest.mark.parametrize(
    "block, typo, where, allowed",
    [
        ({"offlaod": {}}, "offlaod", '"interleaf" of', "allowed: pipeline, offload"),
        ({"pipeline": {"schedul": "zb-v"}}, "schedul", '"interleaf.pipeline" of', "allowed: schedule,"),
        ({"offload": {"gpu_fracton": 0.5}}, "gpu_fracton", '"interleaf.offload" of', "allowed: mode, gpu_fraction,"),
    ],
)
def test_unknown_key_names_its_section(block, typo, where, allowed):
    with pytest.raises(ValueError) as err:
        InterleafConfig.from_ds_config({"interleaf": block})
    message = str(err.value)
    assert repr(typo) in message and where in message and allowed in message


def test_no_block_is_no_feature():
    cfg = InterleafConfig.from_ds_config({"train_batch_size": 8})
    assert cfg.pipeline is None and cfg.offload is None
