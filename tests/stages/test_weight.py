"""`rlfree weight`: the log-weight of each sample (reward, RLIF exponent, proposal correction), its settings' checks,
the stage function, its summary and its warnings.

Expected values are written out from DESIGN.md's formulas with `math`, never read back from the code under test:

    log w_i = r_i / beta  (+ gamma * ref_i for rlif)  + ref_i - proposal_i,   w_i = exp(log w_i) / sum_j exp(log w_j)
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from datasets import load_from_disk

from rlfree.errors import StageInputError
from rlfree.family import family_named
from rlfree.stages.generate import generate
from rlfree.stages.score import ScoreConfig, score
from rlfree.stages.weight import WeightConfig, weight, weight_dataset
from tests.helpers import make_samples, nothing_made, softmax, weigh, weight_config, weights_of, write_reward

PLUS_REWARD = "rlfree.diffusion.toy:plus_component_reward"


# --- the log-weight of each sample -----------------------------------------------------------------------------------


def test_rlhf_weights_are_softmax_of_reward_over_beta_within_each_prompt():
    dataset = make_samples([0, 0, 0, 1, 1], reward=[0.0, 1.0, 2.0, 5.0, 5.0], ref_logprob=[-1, -2, -3, -1, -4])
    weighted, _ = weigh(dataset, weight_config(weighting="rlhf", beta=0.5))

    denominator = 1 + math.exp(2) + math.exp(4)  # r / beta = 0, 2, 4
    expected = [1 / denominator, math.exp(2) / denominator, math.exp(4) / denominator, 0.5, 0.5]
    assert weighted["weight"] == pytest.approx(expected, rel=1e-12)
    assert sum(weighted["weight"][:3]) == pytest.approx(1.0, abs=1e-12)
    assert sum(weighted["weight"][3:]) == pytest.approx(1.0, abs=1e-12)
    assert weighted["log_weight"] == pytest.approx([math.log(w) for w in expected], rel=1e-12)
    assert weighted["log_weight"] == pytest.approx([math.log(w) for w in weighted["weight"]], rel=1e-12)


def test_rlif_weights_with_fixed_exponent_are_ref_logprob_to_the_gamma():
    dataset = make_samples([0, 0, 0], ref_logprob=[-1.0, -2.0, -3.0])
    weights = weights_of(dataset, weight_config(weighting="rlif", rlif_exponent=0.5))
    assert weights == pytest.approx(softmax([-0.5, -1.0, -1.5]), rel=1e-12)


def test_rlif_weights_with_beta_if_use_each_samples_own_length():
    # gamma_i = 1 / (L_i * beta_if - 1) with beta_if = 1: L = 2, 4, 3 -> gamma = 1, 1/3, 1/2
    dataset = make_samples([0, 0, 0], ref_logprob=[-1.0, -2.0, -3.0], num_tokens=[2, 4, 3])
    weights = weights_of(dataset, weight_config(weighting="rlif", beta_if=1.0))
    assert weights == pytest.approx(softmax([-1.0 * 1, -2.0 / 3, -3.0 / 2]), rel=1e-12)


def test_rlif_weights_with_fixed_length_ignore_num_tokens():
    # L = 5, beta_if = 0.5 -> gamma = 1 / (2.5 - 1) = 2/3 for every row, whatever its num_tokens
    dataset = make_samples([0, 0, 0], ref_logprob=[-1.0, -2.0, -3.0], num_tokens=[1, 2, 9])
    weights = weights_of(dataset, weight_config(weighting="rlif", beta_if=0.5, rlif_length=5))
    assert weights == pytest.approx(softmax([-2 / 3, -4 / 3, -6 / 3]), rel=1e-12)


def test_rlhf_plus_rlif_adds_both_terms():
    # beta = 2, gamma = 0.5: log w = r / 2 + 0.5 * ref
    dataset = make_samples([0, 0, 0], reward=[1.0, 3.0, 0.0], ref_logprob=[-1.0, -4.0, -0.5])
    weights = weights_of(dataset, weight_config(weighting="rlhf+rlif", beta=2.0, rlif_exponent=0.5))
    assert weights == pytest.approx(softmax([0.5 - 0.5, 1.5 - 2.0, 0.0 - 0.25]), rel=1e-12)


def test_proposal_correction_adds_ref_minus_proposal_logprob():
    # Equal rewards, so only log pi_ref - log p matters: (-1) - (-3) = 2 and (-2) - (-1) = -1.
    dataset = make_samples([0, 0], reward=[0.0, 0.0], ref_logprob=[-1.0, -2.0], proposal_logprob=[-3.0, -1.0])
    weighted, _ = weigh(dataset, weight_config(weighting="rlhf", beta=1.0))
    expected = [math.exp(2) / (math.exp(2) + math.exp(-1)), math.exp(-1) / (math.exp(2) + math.exp(-1))]
    assert weighted["weight"] == pytest.approx(expected, rel=1e-12)
    assert weighted["log_weight"] == pytest.approx([math.log(w) for w in expected], rel=1e-12)


def test_proposal_correction_applies_to_rlif_too():
    # gamma = 1: log w = ref + (ref - proposal) = [-1 + 1, -2 - 1]
    dataset = make_samples([0, 0], ref_logprob=[-1.0, -2.0], proposal_logprob=[-2.0, -1.0])
    weights = weights_of(dataset, weight_config(weighting="rlif", rlif_exponent=1.0))
    assert weights == pytest.approx(softmax([0.0, -3.0]), rel=1e-12)


# --- settings and inputs: errors name the problem --------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, -1.0, None])
def test_rlhf_needs_a_positive_beta(beta):
    with pytest.raises(StageInputError, match=r"needs --beta > 0"):
        weight_config(weighting="rlhf", beta=beta)


def test_rlhf_plus_rlif_needs_beta_too():
    with pytest.raises(StageInputError, match=r"--weighting rlhf\+rlif needs --beta > 0"):
        weight_config(weighting="rlhf+rlif", rlif_exponent=0.5)


@pytest.mark.parametrize("kwargs", [{}, {"rlif_exponent": 0.5, "beta_if": 1.0}], ids=["neither", "both"])
def test_rlif_needs_exactly_one_of_exponent_or_beta_if(kwargs):
    with pytest.raises(StageInputError, match=r"exactly one of --rlif_exponent or --beta_if"):
        weight_config(weighting="rlif", **kwargs)


@pytest.mark.parametrize("exponent", [-1.0, -2.5])
def test_rlif_exponent_must_exceed_minus_one(exponent):
    with pytest.raises(StageInputError, match=r"--rlif_exponent must be > -1"):
        weight_config(weighting="rlif", rlif_exponent=exponent)


def test_beta_if_must_be_positive():
    with pytest.raises(StageInputError, match=r"--beta_if must be > 0"):
        weight_config(weighting="rlif", beta_if=0.0)


def test_unknown_weighting_is_rejected():
    with pytest.raises(StageInputError, match=r"--weighting must be one of .*'ppo'"):
        weight_config(weighting="ppo", beta=1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beta": 1.0, "target_kl": 0.5}, r"give --beta or --target_kl, not both"),
        ({"target_kl": 0.5, "target_ess": 0.5}, r"at most one of --target_kl and --target_ess"),
        ({"target_ess": 1.0}, r"--target_ess is a fraction .* in \(0, 1\)"),
        ({"target_kl": 0.0}, r"--target_kl must be > 0"),
        ({"beta": 1.0, "beta_scope": "prompt"}, r"--beta_scope prompt needs --target_kl or --target_ess"),
        ({"beta": 1.0, "max_weight_ratio": 0.5}, r"--max_weight_ratio must be >= 1"),
        ({"beta": 1.0, "min_weight": 1.0}, r"--min_weight must be in \[0, 1\)"),
    ],
)
def test_bad_target_and_truncation_settings_are_named(kwargs, message):
    with pytest.raises(StageInputError, match=message):
        weight_config(weighting="rlhf", **kwargs)


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_beta_is_refused(scored, tmp_path, value, run_cli):
    out = tmp_path / "weighted"
    code, _, err = run_cli(["weight", "--input_dir", scored, f"--beta={value}", "--output_dir", out])
    assert code == 2 and "--beta must be a finite number" in err and nothing_made(out)


def test_length_times_beta_if_at_most_one_names_the_row():
    # L * beta_if = 1.5 (fine) on row 0, 0.5 on row 1
    dataset = make_samples([0, 0], num_tokens=[3, 1])
    with pytest.raises(StageInputError, match=r"L \* beta_if must be > 1, but row 1 has L=1"):
        weight_dataset(dataset, weight_config(weighting="rlif", beta_if=0.5), family_named("lm"))


def test_fixed_length_times_beta_if_equal_to_one_is_rejected():
    dataset = make_samples([0, 0], num_tokens=[10, 10])
    with pytest.raises(StageInputError, match=r"L \* beta_if must be > 1, but row 0 has L=2"):
        weight_dataset(dataset, weight_config(weighting="rlif", beta_if=0.5, rlif_length=2), family_named("lm"))


@pytest.mark.parametrize(
    ("column", "bad_value", "row"),
    [
        ("reward", math.nan, 2),
        ("reward", math.inf, 0),
        ("ref_logprob", -math.inf, 1),
        ("proposal_logprob", math.nan, 2),
    ],
)
def test_non_finite_input_names_the_column_and_row(column, bad_value, row):
    columns = {"reward": [0.0, 1.0, 2.0], "ref_logprob": [-1.0, -2.0, -3.0], "proposal_logprob": [-1.0, -2.0, -3.0]}
    columns[column][row] = bad_value
    dataset = make_samples([0, 0, 0], **columns)
    with pytest.raises(StageInputError, match=rf"column '{column}' is not finite in 1 row\(s\), first at row {row}"):
        weight_dataset(dataset, weight_config(weighting="rlhf", beta=1.0), family_named("lm"))


def test_non_finite_input_counts_the_rows_and_names_the_first():
    dataset = make_samples([0, 0, 0, 0], reward=[0.0, math.nan, math.inf, -math.inf])
    with pytest.raises(StageInputError, match=r"column 'reward' is not finite in 3 row\(s\), first at row 1"):
        weight_dataset(dataset, weight_config(weighting="rlhf", beta=1.0), family_named("lm"))


def test_null_reward_names_the_column_and_row():
    dataset = make_samples([0, 0, 0], reward=[0.0, None, 2.0])
    with pytest.raises(StageInputError, match=r"'reward'.*row 1"):
        weight_dataset(dataset, weight_config(weighting="rlhf", beta=1.0), family_named("lm"))


# --- the stage function ----------------------------------------------------------------------------------------------


def test_weight_stage_needs_the_reward_column_for_rlhf(tmp_path):
    make_samples([0, 0]).save_to_disk(str(tmp_path / "generated"))
    cfg = WeightConfig(input_dir=str(tmp_path / "generated"), output_dir=str(tmp_path / "out"), beta=1.0)
    with pytest.raises(StageInputError, match=re.escape("missing column(s) ['reward']")):
        weight(cfg)
    assert not (tmp_path / "out").exists()


def test_weight_stage_rejects_an_empty_dataset(tmp_path):
    # filter(), not select([]): datasets cannot load back an empty dataset made with select([]) (0 shards).
    make_samples([0], reward=[1.0]).filter(lambda row: False).save_to_disk(str(tmp_path / "scored"))
    cfg = WeightConfig(input_dir=str(tmp_path / "scored"), output_dir=str(tmp_path / "out"), beta=1.0)
    with pytest.raises(StageInputError, match=r"the dataset is empty"):
        weight(cfg)


def test_weight_stage_rejects_a_folder_that_is_not_a_dataset(tmp_path):
    (tmp_path / "nothing").mkdir()
    cfg = WeightConfig(input_dir=str(tmp_path / "nothing"), output_dir=str(tmp_path / "out"), beta=1.0)
    with pytest.raises(StageInputError, match=r"not a dataset folder"):
        weight(cfg)


def test_weight_stage_end_to_end(tmp_path, capsys):
    scored = tmp_path / "scored"
    make_samples([0, 0, 0, 1, 1], reward=[0.0, 1.0, 2.0, 5.0, 5.0]).save_to_disk(str(scored))
    generation_settings = {"model_name_or_path": "tiny", "num_samples": 3}
    (scored / "generation.json").write_text(json.dumps(generation_settings))
    (scored / "scoring.json").write_text(json.dumps({"reward": ["r.py:f"]}))
    output = tmp_path / "weighted"

    weight(WeightConfig(input_dir=str(scored), output_dir=str(output), weighting="rlhf", beta=0.5))

    dataset = load_from_disk(str(output)).to_dict()
    assert {"log_weight", "weight", "ess", "kl_estimate", "max_weight", "reward", "prompt"} <= set(dataset)
    denominator = 1 + math.exp(2) + math.exp(4)
    expected = [1 / denominator, math.exp(2) / denominator, math.exp(4) / denominator, 0.5, 0.5]
    assert dataset["weight"] == pytest.approx(expected, rel=1e-12)
    ess_prompt_0 = 1 / sum(w * w for w in expected[:3])
    assert dataset["ess"] == pytest.approx([ess_prompt_0] * 3 + [2.0] * 2, rel=1e-12)

    settings = json.loads((output / "weighting.json").read_text())
    assert settings["weighting"] == "rlhf"
    assert settings["beta"] == 0.5
    assert settings["num_prompts"] == 2
    assert json.loads((output / "generation.json").read_text()) == generation_settings
    assert json.loads((output / "scoring.json").read_text()) == {"reward": ["r.py:f"]}

    out = capsys.readouterr().out
    assert "weighting rlhf" in out
    ess_line = next(line for line in out.splitlines() if "ESS" in line)
    assert f"{ess_prompt_0:.2f}" in ess_line


def test_summary_median_of_two_prompts_is_their_mean():
    # Prompt 0 has uniform weights over 2 samples (ESS 2); prompt 1 is one-hot at beta -> 0 (ESS 1).
    dataset = make_samples([0, 0, 1, 1], reward=[1.0, 1.0, 1000.0, 0.0])
    _, summary = weigh(dataset, weight_config(weighting="rlhf", beta=1.0))
    assert summary["ess_min"] == pytest.approx(1.0)
    assert summary["ess_median"] == pytest.approx(1.5)
    assert summary["share_ess_below_2"] == pytest.approx(0.5)


# --- warnings --------------------------------------------------------------------------------------------------------


def test_weights_resting_on_few_samples_warn_with_the_samples_needed(tmp_path, capsys):
    scored = tmp_path / "scored"
    make_samples([0] * 4, reward=[1000.0, 0.0, 0.0, 0.0]).save_to_disk(str(scored))
    weight(WeightConfig(str(scored), str(tmp_path / "w"), beta=1.0))
    err = capsys.readouterr().err
    # KL = log 4, so 10 * exp(KL) = 40 samples per prompt.
    assert "1 of 1 prompts have a plug-in KL(pi* || p) within log 10 of its ceiling" in err
    assert "at least 40 completions per prompt" in err


def test_well_sampled_weights_do_not_warn(tmp_path, capsys):
    scored = tmp_path / "scored"
    make_samples([0] * 40, reward=[0.0] * 39 + [0.1]).save_to_disk(str(scored))
    weight(WeightConfig(str(scored), str(tmp_path / "w"), beta=1.0))
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("reward", "weighting", "advice"),
    [
        (
            "    return [float(i) for i in kwargs['sample_index']]",
            ["--weighting", "rlhf", "--beta", 0.5],
            "raise --beta",
        ),
        (None, ["--weighting", "rlif", "--rlif_exponent", 1.0], "lower --rlif_exponent"),
        (None, ["--weighting", "rlif", "--target_kl", 0.3], "lower --target_kl"),
        ("    return [1.0] * len(completions)", ["--weighting", "rlhf", "--beta", 0.5], None),
    ],
)
def test_the_few_samples_warning_names_the_weightings_own_knob(
    generated, tmp_path, reward, weighting, advice, run_cli
):
    """N = 4 is below 10·exp(KL) for every prompt; rlif has no beta to raise, and uniform weights (constant rewards,
    KL 0) are estimated exactly, so there is nothing to warn about."""
    source = generated
    if reward is not None:
        source = tmp_path / "scored"
        score(
            ScoreConfig(
                input_dir=str(generated), output_dir=str(source), reward=[write_reward(tmp_path / "r.py", reward)]
            )
        )
    code, _, err = run_cli(["weight", "--input_dir", source, *weighting, "--output_dir", tmp_path / "w"])
    assert code == 0
    if advice is None:
        assert "plug-in KL" not in err
    else:
        assert "plug-in KL(pi* || p) within log 10 of its ceiling" in err and f"or {advice}." in err
        assert "raise beta" not in err


# --- a diffusion pipeline's samples ----------------------------------------------------------------------------------


def test_rewards_see_images_and_rlhf_weights_need_no_log_probabilities(random_pipeline, pipeline_config, tmp_path):
    from rlfree.diffusion import toy

    generate(pipeline_config(random_pipeline, tmp_path / "gen", num_samples=6))
    scored = score(
        ScoreConfig(reward=[PLUS_REWARD], input_dir=str(tmp_path / "gen"), output_dir=str(tmp_path / "scored"))
    )
    images = load_from_disk(str(tmp_path / "gen")).with_format("numpy")[:]["completion"]
    assert scored["reward"] == toy.component(images).astype(float).tolist()
    weighted = weight(WeightConfig(str(tmp_path / "scored"), str(tmp_path / "weighted"), "rlhf", beta=0.5))
    reward, w = np.array(weighted["reward"]), np.array(weighted["weight"])
    expected = np.exp(reward / 0.5) / np.exp(reward / 0.5).sum()  # one group: the unconditional pipeline's N samples
    np.testing.assert_allclose(w, expected, rtol=1e-6)
    with pytest.raises(StageInputError, match="RLIF"):
        weight(WeightConfig(str(tmp_path / "gen"), str(tmp_path / "rlif"), "rlif", rlif_exponent=1.0))
