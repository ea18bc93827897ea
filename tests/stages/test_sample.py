"""`rlfree sample`'s settings."""

from __future__ import annotations

import math

import pytest

from rlfree.errors import StageInputError
from rlfree.stages.sample import SampleConfig

REWARD = "rlfree.toy:arithmetic_reward"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"soft_best_of_n": 0}, "soft_best_of_n"),
        ({"soft_best_of_n": 2, "beta": -1.0}, "beta"),
        ({"soft_best_of_n": 2, "beta": math.nan}, "beta"),
        ({"soft_best_of_n": 2, "num_picks": 0}, "num_picks"),
    ],
)
def test_config_rejects_bad_settings(overrides, message, tmp_path):
    with pytest.raises(StageInputError, match=message):
        SampleConfig(model_name_or_path="m", prompts="p", output_dir=str(tmp_path), reward=[REWARD], **overrides)
