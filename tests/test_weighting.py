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
from rlfree.weighting import WeightConfig, weight, weight_dataset


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
