"""The weighting math (`rlfree.weights`): normalization, ESS and KL diagnostics, solving beta for a target,
truncation and pruning, and picks, checked against hand-computed values.

Expected values are written out from DESIGN.md's formulas with `math`, never read back from the code under test:

    log w_i = r_i / beta  (+ gamma * ref_i for rlif)  + ref_i - proposal_i,   w_i = exp(log w_i) / sum_j exp(log w_j)
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from datasets import Dataset, load_from_disk

from rlfree import toy
from rlfree.errors import StageInputError
from rlfree.family import family_named
from rlfree.stages.weight import WeightConfig, weight, weight_dataset
from rlfree.weights import pick, pick_log_weights
from tests.helpers import (
    CHI2_CRITICAL,
    chi_square,
    make_samples,
    replicated,
    softmax,
    weigh,
    weight_config,
    weights_of,
)

# --- numerical stability ---------------------------------------------------------------------------------------------


def test_huge_reward_over_tiny_beta_gives_finite_weights_with_the_top_one_near_one():
    dataset = make_samples([0, 0, 0], reward=[10000.0, 9999.0, 0.0])
    weighted, _ = weigh(dataset, weight_config(weighting="rlhf", beta=1e-3))
    values = weighted["weight"] + weighted["log_weight"] + weighted["ess"] + weighted["kl_estimate"]
    assert all(not math.isnan(v) for v in values)
    assert all(math.isfinite(w) for w in weighted["weight"])
    assert weighted["weight"][0] == pytest.approx(1.0, abs=1e-12)
    assert weighted["weight"][1:] == pytest.approx([0.0, 0.0], abs=1e-12)


def test_large_rewards_with_a_small_gap_keep_the_exact_ratio():
    # r / beta = 10001 and 10000: exp() of either overflows, but the weights are those of logits 1 and 0.
    dataset = make_samples([0, 0], reward=[10001.0, 10000.0])
    weights = weights_of(dataset, weight_config(weighting="rlhf", beta=1.0))
    e = math.exp(1)
    assert weights == pytest.approx([e / (e + 1), 1 / (e + 1)], rel=1e-12)


def test_equal_rewards_at_extreme_scale_give_uniform_weights():
    dataset = make_samples([0, 0, 0, 0], reward=[1e6] * 4)
    weighted, _ = weigh(dataset, weight_config(weighting="rlhf", beta=1e-6))  # r / beta = 1e12
    assert weighted["weight"] == pytest.approx([0.25] * 4, rel=1e-12)
    assert weighted["log_weight"] == pytest.approx([math.log(0.25)] * 4, rel=1e-12)


# --- diagnostics -----------------------------------------------------------------------------------------------------


def test_diagnostics_of_weights_half_quarter_quarter():
    # beta = 1 and r = (log 2, 0, 0) give w = (1/2, 1/4, 1/4) exactly.
    dataset = make_samples([0, 0, 0], reward=[math.log(2), 0.0, 0.0])
    weighted, summary = weigh(dataset, weight_config(weighting="rlhf", beta=1.0))
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
    weighted, _ = weigh(dataset, weight_config(weighting="rlhf", beta=0.1))
    assert weighted["ess"] == pytest.approx([5.0] * 5, rel=1e-12)
    assert weighted["kl_estimate"] == pytest.approx([0.0] * 5, abs=1e-12)
    assert weighted["max_weight"] == pytest.approx([0.2] * 5, rel=1e-12)


def test_one_hot_weights_have_ess_one_and_kl_log_n():
    dataset = make_samples([0] * 4, reward=[1000.0, 0.0, 0.0, 0.0])
    weighted, summary = weigh(dataset, weight_config(weighting="rlhf", beta=1e-3))
    assert weighted["weight"] == [1.0, 0.0, 0.0, 0.0]
    assert weighted["ess"] == pytest.approx([1.0] * 4, rel=1e-12)
    assert weighted["kl_estimate"] == pytest.approx([math.log(4)] * 4, rel=1e-12)
    assert summary["share_ess_below_2"] == 1.0


def test_diagnostics_are_per_prompt():
    # prompt 0: one-hot over 2 samples (ESS 1, KL log 2); prompt 1: uniform over 3 (ESS 3, KL 0)
    dataset = make_samples([0, 0, 1, 1, 1], reward=[1000.0, 0.0, 1.0, 1.0, 1.0])
    weighted, summary = weigh(dataset, weight_config(weighting="rlhf", beta=1e-3))
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
    cfg = weight_config(weighting="rlhf", beta=0.5)
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
    weighted, summary = weigh(dataset, weight_config(weighting="rlhf", beta=1.0))
    e = math.exp(1)
    assert weighted["weight"] == pytest.approx([e / (e + 1), 0.5, 1 / (e + 1), 0.5], rel=1e-12)
    assert summary["num_prompts"] == 2
    assert summary["num_samples"] == 4


# --- beta from a target ----------------------------------------------------------------------------------------------
# Two samples with rewards (0, 1) at 1/beta = log 3 give w = (1/4, 3/4): ESS = 1 / (1/16 + 9/16) = 1.6 (80% of N), and
# KL = 3/4 log(3/4 * 2) + 1/4 log(1/4 * 2).
BETA_AT_THREE_QUARTERS = 1 / math.log(3)
KL_AT_THREE_QUARTERS = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)


@pytest.mark.parametrize(
    "target", [{"target_kl": KL_AT_THREE_QUARTERS}, {"target_ess": 0.8}], ids=["target_kl", "target_ess"]
)
def test_target_solves_beta_exactly(target):
    weighted, summary = weigh(make_samples([0, 0], reward=[0.0, 1.0]), weight_config(weighting="rlhf", **target))
    assert summary["beta"] == pytest.approx(BETA_AT_THREE_QUARTERS, rel=1e-9)
    assert summary["solved"] == "beta"
    assert weighted["weight"] == pytest.approx([0.25, 0.75], rel=1e-9)


def test_global_target_matches_the_mean_over_prompts():
    # Prompt 0 is uniform for any beta (KL 0), so prompt 1 must carry twice the target for the mean to meet it.
    dataset = make_samples([0, 0, 1, 1], reward=[2.0, 2.0, 0.0, 1.0])
    weighted, summary = weigh(dataset, weight_config(weighting="rlhf", target_kl=KL_AT_THREE_QUARTERS / 2))
    assert summary["beta"] == pytest.approx(BETA_AT_THREE_QUARTERS, rel=1e-9)
    assert weighted["kl_ref_estimate"] == pytest.approx([0, 0, KL_AT_THREE_QUARTERS, KL_AT_THREE_QUARTERS], abs=1e-9)


def test_per_prompt_target_writes_each_prompts_beta():
    # A reward gap of 2 needs twice the beta of a gap of 1 for the same weights.
    dataset = make_samples([0, 0, 1, 1, 2, 2], reward=[0.0, 1.0, 0.0, 2.0, 5.0, 5.0])
    weighted, summary = weigh(dataset, weight_config(weighting="rlhf", target_ess=0.8, beta_scope="prompt"))
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
    weighted, _ = weigh(dataset, weight_config(weighting="rlhf", beta=1.0))
    assert weighted["weight"] == pytest.approx([0.75, 0.25], rel=1e-12)
    assert weighted["kl_ref_estimate"] == pytest.approx([0.0, 0.0], abs=1e-12)
    assert weighted["kl_estimate"][0] == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-12)


def test_rlif_target_solves_the_exponent():
    # Samples from pi_ref with log pi_ref = (log 1/4, log 3/4): weights pi_ref^gamma are (1/4, 3/4) at gamma = 1.
    dataset = make_samples([0, 0], ref_logprob=[math.log(0.25), math.log(0.75)])
    weighted, summary = weigh(dataset, weight_config(weighting="rlif", target_ess=0.8))
    assert summary["rlif_exponent"] == pytest.approx(1.0, rel=1e-9)
    assert weighted["weight"] == pytest.approx([0.25, 0.75], rel=1e-9)


def test_unreachable_global_target_explains_the_limit():
    # Binary rewards with one correct sample out of four: the sharpest weights give KL log 4.
    dataset = make_samples([0] * 4, reward=[1.0, 0.0, 0.0, 0.0])
    with pytest.raises(StageInputError, match=r"--target_kl 2.0 is out of reach.*of 1.386"):
        weigh(dataset, weight_config(weighting="rlhf", target_kl=2.0))


def test_target_kl_picks_a_beta_whose_exact_kl_is_on_target(reference_dir, generate_config, tmp_path):
    """On the enumerable toy, the solved beta's exact KL(pi* || pi_ref) is within 25% of the target."""
    import torch

    from rlfree.cli import main
    from rlfree.lm.loading import load_causal_lm, load_tokenizer
    from rlfree.stages.generate import generate
    from rlfree.stages.score import ScoreConfig, score

    generate(generate_config(tmp_path / "gen", num_samples=512, seed=3, batch_size=512))
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
    weighted, summary = weigh(
        weights_as_rewards([0.6, 0.3, 0.05, 0.05]), weight_config(beta=1.0, max_weight_ratio=1.6)
    )
    assert weighted["weight"] == pytest.approx([0.4, 0.4, 0.1, 0.1], rel=1e-12)
    assert weighted["log_weight"] == pytest.approx([math.log(w) for w in (0.4, 0.4, 0.1, 0.1)], rel=1e-12)
    assert summary["truncated_mass_mean"] == pytest.approx(0.2, rel=1e-12)
    assert summary["max_weight_max"] == pytest.approx(0.4, rel=1e-12)


def test_truncation_is_per_prompt_and_ratio_one_is_uniform():
    dataset = weights_as_rewards([0.7, 0.1, 0.1, 0.1, 0.5, 0.5], prompt_index=[0, 0, 0, 0, 1, 1])
    weighted, summary = weigh(dataset, weight_config(beta=1.0, max_weight_ratio=2.0))
    assert weighted["weight"] == pytest.approx([0.5, 1 / 6, 1 / 6, 1 / 6, 0.5, 0.5], rel=1e-12)
    assert summary["truncated_mass_max"] == pytest.approx(0.2, rel=1e-12)
    assert summary["truncated_mass_mean"] == pytest.approx(0.1, rel=1e-12)
    uniform, _ = weigh(dataset, weight_config(beta=1.0, max_weight_ratio=1.0))
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
    weighted, summary = weigh(weights_as_rewards([0.5, 0.3, 0.15, 0.05]), weight_config(beta=1.0, min_weight=0.1))
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
    weighted, summary = weigh(dataset, weight_config(beta=1.0, min_weight=1e-3, drop_uniform_prompts=True))
    assert weighted["prompt_index"] == [1, 3, 3]
    assert weighted["weight"] == pytest.approx([1.0, *softmax([-1.0, -2.0])], rel=1e-12)
    assert summary["dropped_uniform_prompts"] == 2
    assert summary["pruned_samples"] == 2
    kept_all, _ = weigh(dataset, weight_config(beta=1.0, min_weight=1e-3))
    assert kept_all["prompt_index"] == [0, 0, 1, 2, 2, 3, 3]


def test_dropping_uniform_prompts_refuses_when_every_prompt_ties():
    dataset = make_samples([0, 0, 1, 1], reward=[1.0, 1.0, 0.0, 0.0])
    with pytest.raises(StageInputError, match="the weights of all 2 prompts are uniform"):
        weight_dataset(dataset, weight_config(beta=1.0, drop_uniform_prompts=True), family_named("lm"))


# --- picks: one candidate per group with probability softmax(log weight) ---------------------------------------------


def _uniform(size: int, seed: int) -> torch.Tensor:
    return torch.rand(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _position_counts(log_weight: list[float], copies: int = 20000, seed: int = 0) -> torch.Tensor:
    values, group = replicated(log_weight, copies)
    rows = pick(values, group, _uniform(len(values), seed))
    assert torch.equal(group[rows], torch.arange(copies)), "each pick must come from its own group"
    return torch.bincount(rows % len(log_weight), minlength=len(log_weight)).double()


def test_uniform_log_weights_give_uniform_picks():
    counts = _position_counts([0.3] * 5)
    assert chi_square(counts, torch.full((5,), 0.2, dtype=torch.float64)) < CHI2_CRITICAL[4]


def test_pick_frequencies_match_softmax():
    log_weight = [0.0, 1.0, 2.0, -math.inf, -0.5]
    counts = _position_counts(log_weight)
    assert chi_square(counts, torch.tensor(log_weight, dtype=torch.float64).softmax(0)) < CHI2_CRITICAL[3]


def test_small_beta_picks_the_max_and_zero_beta_breaks_ties_uniformly():
    reward, group = replicated([0.2, 0.9, 0.5, 0.1], 1000)
    rows = pick(pick_log_weights(reward, torch.zeros_like(reward), group, 1e-3), group, _uniform(len(reward), 0))
    assert torch.all(rows % 4 == 1)
    reward, group = replicated([1.0, 0.0, 1.0, 1.0, 0.5], 20000)
    values = pick_log_weights(reward, torch.zeros_like(reward), group, 0.0)
    counts = torch.bincount(pick(values, group, _uniform(len(values), 1)) % 5, minlength=5).double()
    expected = torch.tensor([1, 0, 1, 1, 0], dtype=torch.float64) / 3
    assert chi_square(counts, expected) < CHI2_CRITICAL[2]


def test_proposal_correction_retargets_the_picks():
    # Equal rewards: the picks must follow pi_ref/p, not the sampler's own frequencies.
    ref = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).log()
    proposal = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64).log()
    for beta in (1.0, 0.0):  # beta = 0 breaks the (all-tied) rewards by the correction too
        reward, group = replicated([1.0, 1.0, 1.0], 20000)
        correction = (ref - proposal).repeat(20000)
        values = pick_log_weights(reward, correction, group, beta)
        counts = torch.bincount(pick(values, group, _uniform(len(values), 2)) % 3, minlength=3).double()
        assert chi_square(counts, (ref - proposal).softmax(0)) < CHI2_CRITICAL[2]


def test_groups_need_not_be_contiguous_and_bad_weights_are_refused():
    group = torch.tensor([1, 0, 1, 0, 2])
    log_weight = torch.tensor([0.0, -math.inf, -math.inf, 0.0, 5.0], dtype=torch.float64)
    assert pick(log_weight, group, _uniform(len(log_weight), 0)).tolist() == [3, 0, 4]
    with pytest.raises(StageInputError, match="NaN"):
        pick(torch.tensor([0.0, math.nan]), torch.tensor([0, 0]), _uniform(2, 0))
    with pytest.raises(StageInputError, match="group 1"):
        pick(torch.tensor([0.0, -math.inf]), torch.tensor([0, 1]), _uniform(2, 0))


# --- the weighting stage's core, on tensors --------------------------------------------------------------------------


def test_weigh_normalizes_drops_uniform_groups_and_prunes_against_hand_computed_values():
    """Two groups: log-weights log 1, 2, 3 (weights 1/6, 2/6, 3/6) and a tie (1/2, 1/2). Pruning below 0.2 drops the
    1/6 (its mass renormalized onto 2/5, 3/5); dropping uniform groups drops the tie; the diagnostics are those of the
    final weights."""
    from rlfree.weights import weigh

    log_weight = torch.tensor([0.0, math.log(2), math.log(3), 5.0, 5.0], dtype=torch.float64)
    group = torch.tensor([0, 0, 0, 1, 1])
    uniform_reference = torch.tensor([1 / 3] * 3 + [1 / 2] * 2, dtype=torch.float64).log()
    columns, kept, summary = weigh(log_weight, group, uniform_reference)
    assert torch.allclose(columns["weight"], torch.tensor([1 / 6, 2 / 6, 3 / 6, 1 / 2, 1 / 2], dtype=torch.float64))
    assert torch.allclose(columns["ess"][:3], torch.full((3,), 36 / 14, dtype=torch.float64))
    expected_kl = sum(w * math.log(3 * w) for w in (1 / 6, 2 / 6, 3 / 6))
    assert columns["kl_estimate"][0].item() == pytest.approx(expected_kl) and columns["kl_estimate"][3].item() == 0
    assert kept.all() and summary["num_prompts"] == 2 and summary["max_weight_max"] == pytest.approx(0.5)

    columns, kept, summary = weigh(log_weight, group, uniform_reference, drop_uniform=True, min_weight=0.2)
    assert kept.tolist() == [False, True, True, False, False]
    assert torch.allclose(columns["weight"][:3], torch.tensor([0, 2 / 5, 3 / 5], dtype=torch.float64))
    assert summary["dropped_uniform_prompts"] == 1 and summary["pruned_samples"] == 1
    assert summary["pruned_mass_max"] == pytest.approx(1 / 6)
    assert columns["ess"][1].item() == pytest.approx(1 / ((2 / 5) ** 2 + (3 / 5) ** 2))


def test_beta_sweep_gives_the_closed_form_kl_and_ess_of_a_two_sample_prompt():
    """Rewards 0 and 1 sampled from pi_ref: at beta the weights are (1, e^(1/beta)) / Z, so the KL to pi_ref is
    sum w log(2w) and ESS / N is 1 / (2 sum w^2)."""
    from rlfree.weights import beta_sweep

    curve = beta_sweep(
        torch.zeros(2, dtype=torch.float64),
        torch.tensor([0.0, 1.0], dtype=torch.float64),
        torch.tensor([0, 0]),
        [1.0, 0.25],
    )
    for position, beta in enumerate((1.0, 0.25)):
        high = math.exp(1 / beta) / (1 + math.exp(1 / beta))
        weights = (1 - high, high)
        assert curve["beta"][position] == beta
        assert curve["kl_ref_estimate"][position] == pytest.approx(sum(w * math.log(2 * w) for w in weights))
        assert curve["ess_fraction"][position] == pytest.approx(1 / (2 * sum(w * w for w in weights)))
