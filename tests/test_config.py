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


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "all"])
def test_host_threads_must_be_a_positive_integer_or_auto(bad):
    with pytest.raises(ValueError, match='host_threads must be an integer >= 1 or "auto"'):
        InterleafConfig.from_ds_config({"interleaf": {"offload": {"host_threads": bad}}})


@pytest.mark.parametrize(
    "setting, cpus, local_ranks, expected",
    [
        ("auto", 16, 1, 8),  # half the CPUs: the rest for the training thread and the transfers
        ("auto", 16, 4, 2),  # shared among the ranks of one host
        ("auto", 2, 4, 1),  # never below one
        (6, 16, 4, 6),  # an explicit count wins
    ],
)
def test_host_threads_resolution(setting, cpus, local_ranks, expected):
    offload = InterleafConfig.from_ds_config({"interleaf": {"offload": {"host_threads": setting}}}).offload
    assert offload.resolved_host_threads(cpus, local_ranks) == expected


def test_split_mode_is_checked():
    cfg = InterleafConfig.from_ds_config({"interleaf": {"pipeline": {"schedule": "zb-h2", "split_mode": "function"}}})
    assert cfg.pipeline.split_mode == "function"
    assert InterleafConfig.from_ds_config({"interleaf": {"pipeline": {}}}).pipeline.split_mode is None
    with pytest.raises(ValueError, match='split_mode must be "autograd", "function" or null'):
        InterleafConfig.from_ds_config({"interleaf": {"pipeline": {"split_mode": "hooks"}}})
