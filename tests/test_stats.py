import pytest

from ds_plugins._stats import trimmed_mean


def test_trimmed_mean_drops_the_tails_only():
    assert trimmed_mean([5.0]) == 5.0
    assert trimmed_mean([1.0, 3.0]) == 2.0  # too few to trim
    assert trimmed_mean([1.0, 2.0, 100.0]) == 2.0  # one of each end from three values on
    assert trimmed_mean([2.0] * 15 + [130.0]) == pytest.approx(2.0)  # one stall among 16 actions
    assert trimmed_mean([1.0] * 8 + [3.0] * 8) == pytest.approx(2.0)  # bimodal: the average cost, not a mode
    with pytest.raises(ValueError):
        trimmed_mean([])
