"""The weighting stage: self-normalized importance weights and their diagnostics, checked against hand-computed values.

Expected values are written out from DESIGN.md's formulas with `math`, never read back from the code under test:

    log w_i = r_i / beta  (+ gamma * ref_i for rlif)  + ref_i - proposal_i,   w_i = exp(log w_i) / sum_j exp(log w_j)
"""

from __future__ import annotations

import json
import math
import random
import re

import pytest
from datasets import Dataset, load_from_disk

from rlfree.data import StageInputError
from rlfree.stages.weight import WeightConfig, weight, weight_dataset


def make_samples(prompt_index, reward=None, ref_logprob=None, proposal_logprob=None, num_tokens=None) -> Dataset:
    """A generate/score-shaped dataset; the proposal is pi_ref itself unless `proposal_logprob` says otherwise."""
    n = len(prompt_index)
    ref_logprob = [-1.0] * n if ref_logprob is None else ref_logprob
    columns = {
        "prompt": [f"prompt {q}" for q in prompt_index],
        "completion": [f"completion {i}" for i in range(n)],
        "prompt_index": list(prompt_index),
        "sample_index": list(range(n)),
        "ref_logprob": list(ref_logprob),
        "proposal_logprob": list(ref_logprob if proposal_logprob is None else proposal_logprob),
        "num_tokens": [3] * n if num_tokens is None else list(num_tokens),
    }
    if reward is not None:
        columns["reward"] = list(reward)
    return Dataset.from_dict(columns)


def config(**kwargs) -> WeightConfig:
    return WeightConfig(input_dir="unused", output_dir="unused", **kwargs)


def softmax(logits: list[float]) -> list[float]:
    """Plain softmax by hand (callers keep the logits small enough for math.exp)."""
    exps = [math.exp(x) for x in logits]
    return [e / sum(exps) for e in exps]


def weigh(dataset: Dataset, cfg: WeightConfig) -> tuple[dict[str, list], dict[str, float]]:
    """`weight_dataset`, with the output columns as plain lists."""
    weighted, summary = weight_dataset(dataset, cfg)
    return weighted.to_dict(), summary


def weights_of(dataset: Dataset, cfg: WeightConfig) -> list[float]:
    return weigh(dataset, cfg)[0]["weight"]


# --- the weights -----------------------------------------------------------------------------------------------------


def test_rlhf_weights_are_softmax_of_reward_over_beta_within_each_prompt():
    dataset = make_samples([0, 0, 0, 1, 1], reward=[0.0, 1.0, 2.0, 5.0, 5.0], ref_logprob=[-1, -2, -3, -1, -4])
    weighted, _ = weigh(dataset, config(weighting="rlhf", beta=0.5))

    denominator = 1 + math.exp(2) + math.exp(4)  # r / beta = 0, 2, 4
    expected = [1 / denominator, math.exp(2) / denominator, math.exp(4) / denominator, 0.5, 0.5]
    assert weighted["weight"] == pytest.approx(expected, rel=1e-12)
    assert sum(weighted["weight"][:3]) == pytest.approx(1.0, abs=1e-12)
    assert sum(weighted["weight"][3:]) == pytest.approx(1.0, abs=1e-12)
    assert weighted["log_weight"] == pytest.approx([math.log(w) for w in expected], rel=1e-12)
    assert weighted["log_weight"] == pytest.approx([math.log(w) for w in weighted["weight"]], rel=1e-12)


def test_rlif_weights_with_fixed_exponent_are_ref_logprob_to_the_gamma():
    dataset = make_samples([0, 0, 0], ref_logprob=[-1.0, -2.0, -3.0])
    weights = weights_of(dataset, config(weighting="rlif", rlif_exponent=0.5))
    assert weights == pytest.approx(softmax([-0.5, -1.0, -1.5]), rel=1e-12)


def test_rlif_weights_with_beta_if_use_each_samples_own_length():
    # gamma_i = 1 / (L_i * beta_if - 1) with beta_if = 1: L = 2, 4, 3 -> gamma = 1, 1/3, 1/2
    dataset = make_samples([0, 0, 0], ref_logprob=[-1.0, -2.0, -3.0], num_tokens=[2, 4, 3])
    weights = weights_of(dataset, config(weighting="rlif", beta_if=1.0))
    assert weights == pytest.approx(softmax([-1.0 * 1, -2.0 / 3, -3.0 / 2]), rel=1e-12)


def test_rlif_weights_with_fixed_length_ignore_num_tokens():
    # L = 5, beta_if = 0.5 -> gamma = 1 / (2.5 - 1) = 2/3 for every row, whatever its num_tokens
    dataset = make_samples([0, 0, 0], ref_logprob=[-1.0, -2.0, -3.0], num_tokens=[1, 2, 9])
    weights = weights_of(dataset, config(weighting="rlif", beta_if=0.5, rlif_length=5))
    assert weights == pytest.approx(softmax([-2 / 3, -4 / 3, -6 / 3]), rel=1e-12)


def test_rlhf_plus_rlif_adds_both_terms():
    # beta = 2, gamma = 0.5: log w = r / 2 + 0.5 * ref
    dataset = make_samples([0, 0, 0], reward=[1.0, 3.0, 0.0], ref_logprob=[-1.0, -4.0, -0.5])
    weights = weights_of(dataset, config(weighting="rlhf+rlif", beta=2.0, rlif_exponent=0.5))
    assert weights == pytest.approx(softmax([0.5 - 0.5, 1.5 - 2.0, 0.0 - 0.25]), rel=1e-12)


def test_proposal_correction_adds_ref_minus_proposal_logprob():
    # Equal rewards, so only log pi_ref - log p matters: (-1) - (-3) = 2 and (-2) - (-1) = -1.
    dataset = make_samples([0, 0], reward=[0.0, 0.0], ref_logprob=[-1.0, -2.0], proposal_logprob=[-3.0, -1.0])
    weighted, _ = weigh(dataset, config(weighting="rlhf", beta=1.0))
    expected = [math.exp(2) / (math.exp(2) + math.exp(-1)), math.exp(-1) / (math.exp(2) + math.exp(-1))]
    assert weighted["weight"] == pytest.approx(expected, rel=1e-12)
    assert weighted["log_weight"] == pytest.approx([math.log(w) for w in expected], rel=1e-12)


def test_proposal_correction_applies_to_rlif_too():
    # gamma = 1: log w = ref + (ref - proposal) = [-1 + 1, -2 - 1]
    dataset = make_samples([0, 0], ref_logprob=[-1.0, -2.0], proposal_logprob=[-2.0, -1.0])
    weights = weights_of(dataset, config(weighting="rlif", rlif_exponent=1.0))
    assert weights == pytest.approx(softmax([0.0, -3.0]), rel=1e-12)


# --- numerical stability ---------------------------------------------------------------------------------------------


def test_huge_reward_over_tiny_beta_gives_finite_weights_with_the_top_one_near_one():
    dataset = make_samples([0, 0, 0], reward=[10000.0, 9999.0, 0.0])
    weighted, _ = weigh(dataset, config(weighting="rlhf", beta=1e-3))
    values = weighted["weight"] + weighted["log_weight"] + weighted["ess"] + weighted["kl_estimate"]
    assert all(not math.isnan(v) for v in values)
    assert all(math.isfinite(w) for w in weighted["weight"])
    assert weighted["weight"][0] == pytest.approx(1.0, abs=1e-12)
    assert weighted["weight"][1:] == pytest.approx([0.0, 0.0], abs=1e-12)


def test_large_rewards_with_a_small_gap_keep_the_exact_ratio():
    # r / beta = 10001 and 10000: exp() of either overflows, but the weights are those of logits 1 and 0.
    dataset = make_samples([0, 0], reward=[10001.0, 10000.0])
    weights = weights_of(dataset, config(weighting="rlhf", beta=1.0))
    e = math.exp(1)
    assert weights == pytest.approx([e / (e + 1), 1 / (e + 1)], rel=1e-12)


def test_equal_rewards_at_extreme_scale_give_uniform_weights():
    dataset = make_samples([0, 0, 0, 0], reward=[1e6] * 4)
    weighted, _ = weigh(dataset, config(weighting="rlhf", beta=1e-6))  # r / beta = 1e12
    assert weighted["weight"] == pytest.approx([0.25] * 4, rel=1e-12)
    assert weighted["log_weight"] == pytest.approx([math.log(0.25)] * 4, rel=1e-12)


# --- diagnostics -----------------------------------------------------------------------------------------------------


def test_diagnostics_of_weights_half_quarter_quarter():
    # beta = 1 and r = (log 2, 0, 0) give w = (1/2, 1/4, 1/4) exactly.
    dataset = make_samples([0, 0, 0], reward=[math.log(2), 0.0, 0.0])
    weighted, summary = weigh(dataset, config(weighting="rlhf", beta=1.0))
    assert weighted["weight"] == pytest.approx([0.5, 0.25, 0.25], rel=1e-12)
    ess = 1 / (0.5**2 + 0.25**2 + 0.25**2)  # = 8/3
    kl = 0.5 * math.log(3 * 0.5) + 2 * 0.25 * math.log(3 * 0.25)  # = 0.5 * log(9/8)
    assert ess == pytest.approx(8 / 3)
    assert weighted["ess"] == pytest.approx([8 / 3] * 3, rel=1e-12)
    assert weighted["kl_estimate"] == pytest.approx([kl] * 3, rel=1e-12)
    assert weighted["kl_estimate"][0] == pytest.approx(0.5 * math.log(9 / 8), rel=1e-12)
    assert weighted["max_weight"] == pytest.approx([0.5] * 3, rel=1e-12)
    assert summary["num_prompts"] == 1
    assert summary["num_samples"] == 3
    assert summary["ess_min"] == pytest.approx(8 / 3, rel=1e-12)
    assert summary["max_weight_max"] == pytest.approx(0.5, rel=1e-12)


def test_uniform_weights_have_ess_n_and_zero_kl():
    dataset = make_samples([0] * 5, reward=[2.0] * 5)
    weighted, _ = weigh(dataset, config(weighting="rlhf", beta=0.1))
    assert weighted["ess"] == pytest.approx([5.0] * 5, rel=1e-12)
    assert weighted["kl_estimate"] == pytest.approx([0.0] * 5, abs=1e-12)
    assert weighted["max_weight"] == pytest.approx([0.2] * 5, rel=1e-12)


def test_one_hot_weights_have_ess_one_and_kl_log_n():
    dataset = make_samples([0] * 4, reward=[1000.0, 0.0, 0.0, 0.0])
    weighted, summary = weigh(dataset, config(weighting="rlhf", beta=1e-3))
    assert weighted["weight"] == [1.0, 0.0, 0.0, 0.0]
    assert weighted["ess"] == pytest.approx([1.0] * 4, rel=1e-12)
    assert weighted["kl_estimate"] == pytest.approx([math.log(4)] * 4, rel=1e-12)
    assert summary["share_ess_below_2"] == 1.0


def test_diagnostics_are_per_prompt():
    # prompt 0: one-hot over 2 samples (ESS 1, KL log 2); prompt 1: uniform over 3 (ESS 3, KL 0)
    dataset = make_samples([0, 0, 1, 1, 1], reward=[1000.0, 0.0, 1.0, 1.0, 1.0])
    weighted, summary = weigh(dataset, config(weighting="rlhf", beta=1e-3))
    assert weighted["ess"] == pytest.approx([1.0, 1.0, 3.0, 3.0, 3.0], rel=1e-12)
    assert weighted["kl_estimate"] == pytest.approx([math.log(2)] * 2 + [0.0] * 3, abs=1e-12)
    assert summary["num_prompts"] == 2
    assert summary["ess_min"] == pytest.approx(1.0)
    assert summary["kl_estimate_max"] == pytest.approx(math.log(2))
    assert summary["kl_estimate_mean"] == pytest.approx(math.log(2) / 2)
    assert summary["share_ess_below_2"] == pytest.approx(0.5)


# --- grouping --------------------------------------------------------------------------------------------------------


def test_prompt_groups_need_not_be_contiguous_or_sorted():
    prompt_index = [0, 0, 0, 1, 1, 2, 2, 2]
    reward = [0.0, 1.0, 2.0, 3.0, 1.0, 0.5, 0.5, 1.5]
    ref_logprob = [-1.0, -2.0, -3.0, -1.5, -2.5, -0.5, -1.0, -4.0]
    cfg = config(weighting="rlhf", beta=0.5)
    expected = softmax([0.0, 2.0, 4.0]) + softmax([6.0, 2.0]) + softmax([1.0, 1.0, 3.0])

    order = list(range(len(prompt_index)))
    random.Random(0).shuffle(order)
    assert order != sorted(order)
    shuffled = make_samples(
        [prompt_index[i] for i in order],
        reward=[reward[i] for i in order],
        ref_logprob=[ref_logprob[i] for i in order],
    )
    weighted, summary = weigh(shuffled, cfg)
    assert weighted["weight"] == pytest.approx([expected[i] for i in order], rel=1e-12)
    expected_ess = [1 / sum(w * w for w in expected[i : i + n]) for i, n in ((0, 3), (3, 2), (5, 3))]
    group_ess = dict(zip([0, 1, 2], expected_ess, strict=True))
    assert weighted["ess"] == pytest.approx([group_ess[prompt_index[i]] for i in order], rel=1e-12)
    assert summary["num_prompts"] == 3


def test_prompt_indices_with_gaps_are_separate_groups():
    dataset = make_samples([5, 2, 5, 2], reward=[1.0, 0.0, 0.0, 0.0])
    weighted, summary = weigh(dataset, config(weighting="rlhf", beta=1.0))
    e = math.exp(1)
    assert weighted["weight"] == pytest.approx([e / (e + 1), 0.5, 1 / (e + 1), 0.5], rel=1e-12)
    assert summary["num_prompts"] == 2
    assert summary["num_samples"] == 4


# --- errors name the problem -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, -1.0, None])
def test_rlhf_needs_a_positive_beta(beta):
    with pytest.raises(StageInputError, match=r"needs --beta > 0"):
        config(weighting="rlhf", beta=beta)


def test_rlhf_plus_rlif_needs_beta_too():
    with pytest.raises(StageInputError, match=r"--weighting rlhf\+rlif needs --beta > 0"):
        config(weighting="rlhf+rlif", rlif_exponent=0.5)


@pytest.mark.parametrize("kwargs", [{}, {"rlif_exponent": 0.5, "beta_if": 1.0}], ids=["neither", "both"])
def test_rlif_needs_exactly_one_of_exponent_or_beta_if(kwargs):
    with pytest.raises(StageInputError, match=r"exactly one of --rlif_exponent or --beta_if"):
        config(weighting="rlif", **kwargs)


@pytest.mark.parametrize("exponent", [-1.0, -2.5])
def test_rlif_exponent_must_exceed_minus_one(exponent):
    with pytest.raises(StageInputError, match=r"--rlif_exponent must be > -1"):
        config(weighting="rlif", rlif_exponent=exponent)


def test_beta_if_must_be_positive():
    with pytest.raises(StageInputError, match=r"--beta_if must be > 0"):
        config(weighting="rlif", beta_if=0.0)


def test_unknown_weighting_is_rejected():
    with pytest.raises(StageInputError, match=r"--weighting must be one of .*'ppo'"):
        config(weighting="ppo", beta=1.0)


def test_length_times_beta_if_at_most_one_names_the_row():
    # L * beta_if = 1.5 (fine) on row 0, 0.5 on row 1
    dataset = make_samples([0, 0], num_tokens=[3, 1])
    with pytest.raises(StageInputError, match=r"L \* beta_if must be > 1, but row 1 has L=1"):
        weight_dataset(dataset, config(weighting="rlif", beta_if=0.5))


def test_fixed_length_times_beta_if_equal_to_one_is_rejected():
    dataset = make_samples([0, 0], num_tokens=[10, 10])
    with pytest.raises(StageInputError, match=r"L \* beta_if must be > 1, but row 0 has L=2"):
        weight_dataset(dataset, config(weighting="rlif", beta_if=0.5, rlif_length=2))


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
        weight_dataset(dataset, config(weighting="rlhf", beta=1.0))


def test_non_finite_input_counts_the_rows_and_names_the_first():
    dataset = make_samples([0, 0, 0, 0], reward=[0.0, math.nan, math.inf, -math.inf])
    with pytest.raises(StageInputError, match=r"column 'reward' is not finite in 3 row\(s\), first at row 1"):
        weight_dataset(dataset, config(weighting="rlhf", beta=1.0))


def test_null_reward_names_the_column_and_row():
    dataset = make_samples([0, 0, 0], reward=[0.0, None, 2.0])
    with pytest.raises(StageInputError, match=r"'reward'.*row 1"):
        weight_dataset(dataset, config(weighting="rlhf", beta=1.0))


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
    _, summary = weigh(dataset, config(weighting="rlhf", beta=1.0))
    assert summary["ess_min"] == pytest.approx(1.0)
    assert summary["ess_median"] == pytest.approx(1.5)
    assert summary["share_ess_below_2"] == pytest.approx(0.5)


# --- beta from a target ----------------------------------------------------------------------------------------------
# Two samples with rewards (0, 1) at 1/beta = log 3 give w = (1/4, 3/4): ESS = 1 / (1/16 + 9/16) = 1.6 (80% of N), and
# KL = 3/4 log(3/4 * 2) + 1/4 log(1/4 * 2).
BETA_AT_THREE_QUARTERS = 1 / math.log(3)
KL_AT_THREE_QUARTERS = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)


@pytest.mark.parametrize(
    "target", [{"target_kl": KL_AT_THREE_QUARTERS}, {"target_ess": 0.8}], ids=["target_kl", "target_ess"]
)
def test_target_solves_beta_exactly(target):
    weighted, summary = weigh(make_samples([0, 0], reward=[0.0, 1.0]), config(weighting="rlhf", **target))
    assert summary["beta"] == pytest.approx(BETA_AT_THREE_QUARTERS, rel=1e-9)
    assert summary["solved"] == "beta"
    assert weighted["weight"] == pytest.approx([0.25, 0.75], rel=1e-9)


def test_global_target_matches_the_mean_over_prompts():
    # Prompt 0 is uniform for any beta (KL 0), so prompt 1 must carry twice the target for the mean to meet it.
    dataset = make_samples([0, 0, 1, 1], reward=[2.0, 2.0, 0.0, 1.0])
    weighted, summary = weigh(dataset, config(weighting="rlhf", target_kl=KL_AT_THREE_QUARTERS / 2))
    assert summary["beta"] == pytest.approx(BETA_AT_THREE_QUARTERS, rel=1e-9)
    assert weighted["kl_ref_estimate"] == pytest.approx([0, 0, KL_AT_THREE_QUARTERS, KL_AT_THREE_QUARTERS], abs=1e-9)


def test_per_prompt_target_writes_each_prompts_beta():
    # A reward gap of 2 needs twice the beta of a gap of 1 for the same weights.
    dataset = make_samples([0, 0, 1, 1, 2, 2], reward=[0.0, 1.0, 0.0, 2.0, 5.0, 5.0])
    weighted, summary = weigh(dataset, config(weighting="rlhf", target_ess=0.8, beta_scope="prompt"))
    beta = BETA_AT_THREE_QUARTERS
    assert weighted["beta"][:4] == pytest.approx([beta, beta, 2 * beta, 2 * beta], rel=1e-9)
    assert weighted["weight"][:4] == pytest.approx([0.25, 0.75, 0.25, 0.75], rel=1e-9)
    assert weighted["weight"][4:] == pytest.approx([0.5, 0.5])  # equal rewards: out of reach, uniform anyway
    assert summary["prompts_out_of_reach"] == 1
    assert summary["beta_scope"] == "prompt"
    assert summary["solved_min"] == pytest.approx(beta, rel=1e-9)


def test_target_kl_is_measured_against_pi_ref_not_the_proposal():
    # The proposal over-samples the second completion 3:1 relative to pi_ref (log pi_ref - log p = log(1/3) - log(3/4)
    # ... the self-normalized pi_ref weights are v = (3/4, 1/4)). Equal rewards: the weights are v and pi* = pi_ref, so
    # KL(pi* || pi_ref) is 0 even though KL(pi* || p), the plug-in against the proposal, is not.
    dataset = make_samples(
        [0, 0], reward=[1.0, 1.0], ref_logprob=[math.log(0.75), math.log(0.25)], proposal_logprob=[math.log(0.5)] * 2
    )
    weighted, _ = weigh(dataset, config(weighting="rlhf", beta=1.0))
    assert weighted["weight"] == pytest.approx([0.75, 0.25], rel=1e-12)
    assert weighted["kl_ref_estimate"] == pytest.approx([0.0, 0.0], abs=1e-12)
    assert weighted["kl_estimate"][0] == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-12)


def test_rlif_target_solves_the_exponent():
    # Samples from pi_ref with log pi_ref = (log 1/4, log 3/4): weights pi_ref^gamma are (1/4, 3/4) at gamma = 1.
    dataset = make_samples([0, 0], ref_logprob=[math.log(0.25), math.log(0.75)])
    weighted, summary = weigh(dataset, config(weighting="rlif", target_ess=0.8))
    assert summary["rlif_exponent"] == pytest.approx(1.0, rel=1e-9)
    assert weighted["weight"] == pytest.approx([0.25, 0.75], rel=1e-9)


def test_unreachable_global_target_explains_the_limit():
    # Binary rewards with one correct sample out of four: the sharpest weights give KL log 4.
    dataset = make_samples([0] * 4, reward=[1.0, 0.0, 0.0, 0.0])
    with pytest.raises(StageInputError, match=r"--target_kl 2.0 is out of reach.*of 1.386"):
        weigh(dataset, config(weighting="rlhf", target_kl=2.0))


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
        config(weighting="rlhf", **kwargs)


def test_target_kl_picks_a_beta_whose_exact_kl_is_on_target(reference_dir, prompts_file, tmp_path):
    """On the enumerable toy, the solved beta's exact KL(pi* || pi_ref) is within 25% of the target."""
    import torch

    from rlfree import toy
    from rlfree.cli import main
    from rlfree.lm.modeling import load_causal_lm, load_tokenizer
    from rlfree.stages.generate import GenerateConfig, generate
    from rlfree.stages.score import ScoreConfig, score

    generate(
        GenerateConfig(
            model_name_or_path=str(reference_dir),
            prompts=str(prompts_file),
            output_dir=str(tmp_path / "gen"),
            num_samples=512,
            max_new_tokens=3,
            seed=3,
            batch_size=512,
        )
    )
    reward = "rlfree.toy:arithmetic_reward"
    score(ScoreConfig(input_dir=str(tmp_path / "gen"), output_dir=str(tmp_path / "scored"), reward=[reward]))
    main(
        ["weight", "--input_dir", str(tmp_path / "scored"), "--target_kl", "0.2", "--output_dir", str(tmp_path / "w")]
    )
    beta = json.loads((tmp_path / "w" / "weighting.json").read_text())["beta"]

    prompts = load_from_disk(str(tmp_path / "gen")).unique("prompt")
    model = load_causal_lm(str(reference_dir), device=torch.device("cpu"))
    exact = toy.exact_distributions(model, load_tokenizer(str(reference_dir)), sorted(prompts), 3)
    target = toy.tilt(exact["logprobs"], exact["rewards"], beta=beta)
    exact_kl = toy.kl(target, exact["logprobs"]).mean().item()
    assert exact_kl == pytest.approx(0.2, rel=0.25)


# --- truncation and pruning ------------------------------------------------------------------------------------------


def weights_as_rewards(weights: list[float], prompt_index: list[int] | None = None) -> Dataset:
    """At beta = 1, rewards log w_i give back exactly the normalized weights w_i."""
    return make_samples(prompt_index or [0] * len(weights), reward=[math.log(w) for w in weights])


def test_truncation_caps_at_ratio_times_mean_and_keeps_the_cap_after_renormalizing():
    # cap = 1.6 / 4 = 0.4. A single cap-and-renormalize would give (0.4, 0.45, 0.075, 0.075): 0.45 breaks the cap.
    weighted, summary = weigh(weights_as_rewards([0.6, 0.3, 0.05, 0.05]), config(beta=1.0, max_weight_ratio=1.6))
    assert weighted["weight"] == pytest.approx([0.4, 0.4, 0.1, 0.1], rel=1e-12)
    assert weighted["log_weight"] == pytest.approx([math.log(w) for w in (0.4, 0.4, 0.1, 0.1)], rel=1e-12)
    assert summary["truncated_mass_mean"] == pytest.approx(0.2, rel=1e-12)
    assert summary["max_weight_max"] == pytest.approx(0.4, rel=1e-12)


def test_truncation_is_per_prompt_and_ratio_one_is_uniform():
    dataset = weights_as_rewards([0.7, 0.1, 0.1, 0.1, 0.5, 0.5], prompt_index=[0, 0, 0, 0, 1, 1])
    weighted, summary = weigh(dataset, config(beta=1.0, max_weight_ratio=2.0))
    assert weighted["weight"] == pytest.approx([0.5, 1 / 6, 1 / 6, 1 / 6, 0.5, 0.5], rel=1e-12)
    assert summary["truncated_mass_max"] == pytest.approx(0.2, rel=1e-12)
    assert summary["truncated_mass_mean"] == pytest.approx(0.1, rel=1e-12)
    uniform, _ = weigh(dataset, config(beta=1.0, max_weight_ratio=1.0))
    assert uniform["weight"] == pytest.approx([0.25] * 4 + [0.5] * 2, rel=1e-12)


def test_pruning_drops_negligible_weights_and_renormalizes(tmp_path):
    scored = tmp_path / "scored"
    weights_as_rewards([0.5, 0.3, 0.15, 0.05, 0.4, 0.3, 0.3], prompt_index=[0] * 4 + [1] * 3).save_to_disk(str(scored))
    weight(WeightConfig(str(scored), str(tmp_path / "w"), beta=1.0, min_weight=0.35))
    weighted = load_from_disk(str(tmp_path / "w")).to_dict()
    # prompt 0 keeps 0.5 only; prompt 1 has nothing above 0.35 but keeps its largest weight.
    assert weighted["sample_index"] == [0, 4]
    assert weighted["weight"] == pytest.approx([1.0, 1.0])
    settings = json.loads((tmp_path / "w" / "weighting.json").read_text())
    assert settings["pruned_samples"] == 5
    assert settings["pruned_mass_mean"] == pytest.approx((0.5 + 0.6) / 2, rel=1e-12)
    assert settings["num_samples"] == 2


def test_pruning_keeps_what_is_above_the_threshold():
    weighted, summary = weigh(weights_as_rewards([0.5, 0.3, 0.15, 0.05]), config(beta=1.0, min_weight=0.1))
    assert weighted["weight"] == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95], rel=1e-12)
    assert summary["pruned_mass_max"] == pytest.approx(0.05, rel=1e-12)


def test_dropping_uniform_prompts_removes_tied_prompts_before_pruning():
    # prompt 0 ties (uniform), prompt 1 keeps one sample above min_weight (a single weight of 1 is not a tie),
    # prompt 2 ties at another reward; prompt 3's proposal is not pi_ref, so its tied rewards still give weights.
    dataset = make_samples(
        [0, 0, 1, 1, 1, 2, 2, 3, 3],
        reward=[0.0, 0.0, 0.0, 0.0, 1000.0, 1.0, 1.0, 0.0, 0.0],
        ref_logprob=[0.0] * 7 + [-1.0, -2.0],
        proposal_logprob=[0.0] * 9,
    )
    weighted, summary = weigh(dataset, config(beta=1.0, min_weight=1e-3, drop_uniform_prompts=True))
    assert weighted["prompt_index"] == [1, 3, 3]
    assert weighted["weight"] == pytest.approx([1.0, *softmax([-1.0, -2.0])], rel=1e-12)
    assert summary["dropped_uniform_prompts"] == 2
    assert summary["pruned_samples"] == 2
    kept_all, _ = weigh(dataset, config(beta=1.0, min_weight=1e-3))
    assert kept_all["prompt_index"] == [0, 0, 1, 2, 2, 3, 3]


def test_dropping_uniform_prompts_refuses_when_every_prompt_ties():
    dataset = make_samples([0, 0, 1, 1], reward=[1.0, 1.0, 0.0, 0.0])
    with pytest.raises(StageInputError, match="the weights of all 2 prompts are uniform"):
        weight_dataset(dataset, config(beta=1.0, drop_uniform_prompts=True))


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
