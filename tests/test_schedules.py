import math

import pytest

from huayu.train.schedules import lr_multiplier


def test_warmup_then_cosine_to_min():
    assert lr_multiplier("cosine", 0, 100, 10) == pytest.approx(0.1)
    assert lr_multiplier("cosine", 9, 100, 10) == pytest.approx(1.0)
    assert lr_multiplier("cosine", 55, 100, 10) == pytest.approx(0.5)
    assert lr_multiplier("cosine", 100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)


def test_linear_decay():
    assert lr_multiplier("linear", 50, 100, 0) == pytest.approx(0.5)
    assert lr_multiplier("linear", 100, 100, 0, min_ratio=0.2) == pytest.approx(0.2)


def test_noam_matches_the_gpt3_seed_scaled_to_peak_one():
    w = 100
    for step in (0, 49, 99, 399):
        s = step + 1
        seed_value = min(s ** -0.5, s * w ** -1.5)  # the seed's noam_lambda
        assert lr_multiplier("noam", step, 1000, w) == pytest.approx(seed_value * math.sqrt(w))
    assert lr_multiplier("noam", 99, 1000, w) == pytest.approx(1.0)
    assert lr_multiplier("noam", 399, 1000, w) == pytest.approx(0.5)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_multiplier("step", 1, 10, 0)
