"""The flag groups every command shares (`rlfree.options`): sampler, prompt and reward settings are checked when a
config is made, naming the flag, before anything is created."""

from __future__ import annotations

import pytest

from rlfree.errors import StageInputError
from rlfree.stages.generate import generate
from rlfree.stages.score import ScoreConfig
from tests.helpers import generate_args, nothing_made


def test_bad_settings_name_the_flag(generate_config, tmp_path):
    settings = {"num_samples": 16, "seed": 0, "batch_size": 24}
    for flag, value in [("num_samples", 0), ("temperature", 0.0), ("top_p", 1.5), ("max_new_tokens", 0)]:
        with pytest.raises(ValueError, match=f"--{flag}"):
            generate(generate_config(tmp_path / "gen", **settings | {flag: value}))


@pytest.mark.parametrize(
    "extra",
    [
        ["--temperature", "nan"],
        ["--temperature", "inf"],
        ["--dtype", "float8"],
        ["--num_sample", "4"],
        ["--top_p", "nan"],
    ],
)
def test_bad_generate_flags_are_refused_before_anything_is_made(reference_dir, prompts_file, tmp_path, extra, run_cli):
    out = tmp_path / "out"
    code, _, err = run_cli(generate_args(reference_dir, prompts_file, out, *extra))
    assert code == 2 and "Traceback" not in err and extra[0] in err
    assert nothing_made(out)


def test_score_config_needs_a_reward():
    with pytest.raises(StageInputError, match=r"at least one --reward"):
        ScoreConfig(input_dir="in", output_dir="out")


def test_score_config_checks_the_number_of_reward_weights():
    with pytest.raises(StageInputError, match=r"--reward_weights has 1 values for 2 rewards"):
        ScoreConfig(input_dir="in", output_dir="out", reward=["a:f", "b:g"], reward_weights=[1.0])
