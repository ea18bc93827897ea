"""The sampler seam: `rlfree sample`'s flags are every registered sampler's options, exactly one sampler is chosen, a
sampler's exclusive flags are refused under another, and reports describe picks through the registry."""

from __future__ import annotations

from dataclasses import fields

import pytest

from rlfree.errors import StageInputError
from rlfree.evaluation.evaluate import describe_sampler
from rlfree.samplers import SAMPLERS, all_samplers, sampler_named
from rlfree.stages.sample import SampleConfig

REWARD = "rlfree.toy:arithmetic_reward"


def test_the_command_takes_every_registered_samplers_flags():
    names = {item.name for item in fields(SampleConfig)}
    assert [sampler.name for sampler in all_samplers()] == list(SAMPLERS)
    for sampler in all_samplers():
        assert {item.name for item in fields(sampler.options)} <= names, sampler.name
        assert sampler.flag.removeprefix("--") in names


def test_exactly_one_sampler_is_chosen(sample_config, tmp_path):
    with pytest.raises(StageInputError, match="choose one sampler \\(got none\\)"):
        sample_config(tmp_path, reward=[REWARD])
    with pytest.raises(StageInputError, match="choose one sampler \\(got --soft_best_of_n, --energy_guided\\)"):
        sample_config(tmp_path, reward=[REWARD], soft_best_of_n=4, energy_guided=True)
    config = sample_config(tmp_path, reward=[REWARD], soft_best_of_n=4)
    assert config.sampler is sampler_named("soft_best_of_n") and config.reward_required


def test_a_samplers_exclusive_flags_are_refused_under_another(sample_config, reference_dir, tmp_path):
    with pytest.raises(StageInputError, match="--ref_model is the reference of --guidance_scale"):
        sample_config(tmp_path, reward=[REWARD], soft_best_of_n=4, ref_model=str(reference_dir))
    with pytest.raises(StageInputError, match="--rollout_model is for --energy_guided"):
        sample_config(tmp_path, reward=[REWARD], soft_best_of_n=4, rollout_model=str(reference_dir))


def test_reports_describe_a_sampler_through_the_registry():
    settings = {"sampler": "soft_best_of_n", "soft_best_of_n": 16, "beta": 0.5, "model_name_or_path": "m"}
    assert describe_sampler(settings) == "soft_best_of_n N=16 beta=0.5 of m"
    settings = {"sampler": "energy_guided", "block_size": 4, "num_candidates": 2, "num_rollouts": 3, "beta": 1.0,
                "model_name_or_path": "m"}  # fmt: skip
    assert describe_sampler(settings) == "energy_guided B=4 M=2 K=3 beta=1.0 of m"
