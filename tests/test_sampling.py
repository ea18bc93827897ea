"""Soft best-of-N picks with probability softmax(r/beta + log pi_ref - log p) and converges to pi* on the toy."""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset, load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlfree import toy
from rlfree.data import StageInputError
from rlfree.seeds import pick_uniforms
from rlfree.stages.sample import SampleConfig, pick_dataset, soft_best_of_n
from rlfree.weights import pick, pick_log_weights

REWARD = "rlfree.toy:arithmetic_reward"
# Chi-square critical values at p = 0.001, so a correct sampler fails one of these checks about 1 run in 1000.
CHI2_CRITICAL = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}


def _replicated(log_weight: list[float], copies: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`copies` groups holding the same candidates, so pick frequencies estimate the per-group probabilities."""
    size = len(log_weight)
    return torch.tensor(log_weight, dtype=torch.float64).repeat(copies), torch.arange(copies).repeat_interleave(size)


def _uniform(size: int, seed: int) -> torch.Tensor:
    return torch.rand(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _position_counts(log_weight: list[float], copies: int = 20000, seed: int = 0) -> torch.Tensor:
    values, group = _replicated(log_weight, copies)
    rows = pick(values, group, _uniform(len(values), seed))
    assert torch.equal(group[rows], torch.arange(copies)), "each pick must come from its own group"
    return torch.bincount(rows % len(log_weight), minlength=len(log_weight)).double()


def _chi_square(counts: torch.Tensor, probabilities: torch.Tensor) -> float:
    support = probabilities > 0
    assert counts[~support].sum() == 0, "a zero-probability candidate was picked"
    expected = counts.sum() * probabilities[support]
    return float(((counts[support] - expected) ** 2 / expected).sum())


def test_uniform_log_weights_give_uniform_picks():
    counts = _position_counts([0.3] * 5)
    assert _chi_square(counts, torch.full((5,), 0.2, dtype=torch.float64)) < CHI2_CRITICAL[4]


def test_pick_frequencies_match_softmax():
    log_weight = [0.0, 1.0, 2.0, -math.inf, -0.5]
    counts = _position_counts(log_weight)
    assert _chi_square(counts, torch.tensor(log_weight, dtype=torch.float64).softmax(0)) < CHI2_CRITICAL[3]


def test_small_beta_picks_the_max_and_zero_beta_breaks_ties_uniformly():
    reward, group = _replicated([0.2, 0.9, 0.5, 0.1], 1000)
    rows = pick(pick_log_weights(reward, torch.zeros_like(reward), group, 1e-3), group, _uniform(len(reward), 0))
    assert torch.all(rows % 4 == 1)
    reward, group = _replicated([1.0, 0.0, 1.0, 1.0, 0.5], 20000)
    values = pick_log_weights(reward, torch.zeros_like(reward), group, 0.0)
    counts = torch.bincount(pick(values, group, _uniform(len(values), 1)) % 5, minlength=5).double()
    expected = torch.tensor([1, 0, 1, 1, 0], dtype=torch.float64) / 3
    assert _chi_square(counts, expected) < CHI2_CRITICAL[2]


def test_counter_based_pick_uniforms_give_softmax_picks():
    """The uniforms soft best-of-N and the samplers pick with: one per (seed, group key, candidate), no generator."""
    log_weight = [0.0, 1.0, 2.0, -0.5]
    values, group = _replicated(log_weight, 20000)
    uniform = pick_uniforms(7, [(int(g), 0) for g in group], (torch.arange(len(values)) % 4).numpy())
    counts = torch.bincount(pick(values, group, uniform) % 4, minlength=4).double()
    assert _chi_square(counts, torch.tensor(log_weight, dtype=torch.float64).softmax(0)) < CHI2_CRITICAL[3]


def test_proposal_correction_retargets_the_picks():
    # Equal rewards: the picks must follow pi_ref/p, not the sampler's own frequencies.
    ref = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).log()
    proposal = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64).log()
    for beta in (1.0, 0.0):  # beta = 0 breaks the (all-tied) rewards by the correction too
        reward, group = _replicated([1.0, 1.0, 1.0], 20000)
        correction = (ref - proposal).repeat(20000)
        values = pick_log_weights(reward, correction, group, beta)
        counts = torch.bincount(pick(values, group, _uniform(len(values), 2)) % 3, minlength=3).double()
        assert _chi_square(counts, (ref - proposal).softmax(0)) < CHI2_CRITICAL[2]


def test_groups_need_not_be_contiguous_and_bad_weights_are_refused():
    group = torch.tensor([1, 0, 1, 0, 2])
    log_weight = torch.tensor([0.0, -math.inf, -math.inf, 0.0, 5.0], dtype=torch.float64)
    assert pick(log_weight, group, _uniform(len(log_weight), 0)).tolist() == [3, 0, 4]
    with pytest.raises(StageInputError, match="NaN"):
        pick(torch.tensor([0.0, math.nan]), torch.tensor([0, 0]), _uniform(2, 0))
    with pytest.raises(StageInputError, match="group 1"):
        pick(torch.tensor([0.0, -math.inf]), torch.tensor([0, 1]), _uniform(2, 0))


def test_pick_dataset_reports_softmax_probability_and_pick_index():
    rewards = [0.0, 1.0, 2.0, 3.0, 0.0, 0.0]
    scored = Dataset.from_dict(
        {
            "prompt_index": [0] * 6,
            "sample_index": list(range(6)),
            "reward": rewards,
            "ref_logprob": [-1.0] * 6,
            "proposal_logprob": [-1.0, -1.0, -1.0, -1.0, -1.0 + math.log(3.0), -1.0],
        }
    )
    correction = torch.tensor(scored["ref_logprob"]) - torch.tensor(scored["proposal_logprob"])
    group = torch.arange(6) // 3
    log_weight = pick_log_weights(torch.tensor(rewards, dtype=torch.float64), correction.double(), group, 2.0)
    picked = pick_dataset(scored, log_weight, num_candidates=3, num_picks=2, seed=0)
    assert picked["pick_index"] == [0, 1]
    first = torch.tensor(rewards[:3]).div(2.0).softmax(0)
    second = (torch.tensor(rewards[3:]) / 2.0 - torch.tensor([0.0, math.log(3.0), 0.0])).softmax(0)
    assert picked[0]["pick_probability"] == pytest.approx(first[picked[0]["sample_index"]].item())
    assert picked[1]["pick_probability"] == pytest.approx(second[picked[1]["sample_index"] - 3].item())


def _config(reference_dir, prompts_file, output_dir, **overrides) -> SampleConfig:
    settings = {"max_new_tokens": 3, "batch_size": 512, "seed": 0} | overrides
    return SampleConfig(
        model_name_or_path=str(reference_dir),
        prompts=str(prompts_file),
        output_dir=str(output_dir),
        reward=[REWARD],
        **settings,
    )


@pytest.fixture(scope="module")
def exact(reference_dir, prompts_file) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact log pi_ref and reward of every possible completion of each prompt (enumerated once per module)."""
    model = AutoModelForCausalLM.from_pretrained(reference_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(reference_dir)
    prompts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()]
    distributions = toy.exact_distributions(model, tokenizer, prompts, max_new_tokens=3)
    return distributions["logprobs"], distributions["rewards"]


def _soft_bon_accuracy(p: torch.Tensor, n: int, beta: float) -> torch.Tensor:
    """Exact accuracy of soft best-of-n with a 0/1 reward: E_K[K e^(1/beta) / (K e^(1/beta) + n - K)], K ~ Bin(n, p)."""
    k = torch.arange(n + 1, dtype=torch.float64)
    log_binomial = math.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
    pmf = (log_binomial + k * p[:, None].log() + (n - k) * torch.log1p(-p[:, None])).exp()
    boost = math.exp(1 / beta)
    return (pmf * k * boost / (k * boost + n - k)).sum(-1)


def test_soft_best_of_n_converges_to_the_exact_tilted_accuracy(exact, reference_dir, prompts_file, tmp_path):
    n, beta, picks = 32, 0.5, 256
    ref_logprobs, rewards = exact
    correct = (rewards == 1).double()
    p = (ref_logprobs.exp() * correct).sum(-1)
    star = (toy.tilt(ref_logprobs, rewards, beta).exp() * correct).sum(-1)
    expected = _soft_bon_accuracy(p, n, beta)
    # The finite-N bias is small at N = 32 and shrinks towards pi* (checked exactly, no sampling involved).
    assert torch.all(expected < star) and torch.all(star - expected < 0.015)
    assert torch.all(_soft_bon_accuracy(p, 4 * n, beta) > expected)

    picked = soft_best_of_n(
        _config(reference_dir, prompts_file, tmp_path, soft_best_of_n=n, beta=beta, num_picks=picks)
    )
    accuracy = torch.tensor(picked["reward"], dtype=torch.float64).view(len(p), picks).mean(-1)
    # Every pick uses its own N fresh candidates, so picks are i.i.d. Bernoulli(expected): 4 sigma per prompt.
    sigma = (expected * (1 - expected) / picks).sqrt()
    assert torch.all((accuracy - expected).abs() < 4 * sigma), (accuracy, expected, star)
    assert torch.all(accuracy > p + 0.2), (accuracy, p)
    mean_sigma = sigma.pow(2).sum().sqrt() / len(p)
    assert abs(accuracy.mean() - star.mean()) < 4 * mean_sigma + (star - expected).mean()


def test_hard_best_of_n_matches_one_minus_miss_probability(exact, reference_dir, prompts_file, tmp_path):
    n, picks = 2, 512
    ref_logprobs, rewards = exact
    p = (ref_logprobs.exp() * (rewards == 1).double()).sum(-1)
    expected = 1 - (1 - p) ** n
    picked = soft_best_of_n(
        _config(reference_dir, prompts_file, tmp_path, soft_best_of_n=n, beta=0.0, num_picks=picks)
    )
    accuracy = torch.tensor(picked["reward"], dtype=torch.float64).view(len(p), picks).mean(-1)
    sigma = (expected * (1 - expected) / picks).sqrt()
    assert torch.all((accuracy - expected).abs() < 4 * sigma), (accuracy, expected)


def test_output_layout_sidecars_and_determinism(reference_dir, prompts_file, tmp_path):
    config = _config(reference_dir, prompts_file, tmp_path / "a", soft_best_of_n=4, beta=1.0, num_picks=3)
    picked = soft_best_of_n(config)
    candidates = load_from_disk(str(tmp_path / "a" / "candidates"))
    scored = load_from_disk(str(tmp_path / "a" / "scored"))
    assert len(candidates) == 4 * 3 * 4 and len(picked) == 4 * 3
    costs = {"cost_sequences", "cost_tokens", "cost_model_tokens", "cost_reward_calls"}
    assert set(picked.column_names) == set(scored.column_names) | {"pick_index", "pick_probability"} | costs
    for row in picked:
        group = [c for c in candidates if c["prompt_index"] == row["prompt_index"] and c["sample_index"] // 4 == row["pick_index"]]  # fmt: skip
        assert row["cost_sequences"] == row["cost_reward_calls"] == len(group) == 4
        assert row["cost_tokens"] == sum(c["num_tokens"] for c in group) == row["cost_model_tokens"] // 2
    assert {"reward", "ref_logprob", "proposal_logprob", "answer"} <= set(picked.column_names)
    assert picked["pick_index"] == [0, 1, 2] * 4
    assert [s // 4 for s in picked["sample_index"]] == picked["pick_index"]
    assert all(0 < q <= 1 for q in picked["pick_probability"])
    on_disk = load_from_disk(str(tmp_path / "a" / "picked"))
    assert on_disk.to_list() == picked.to_list()
    sidecar = json.loads((tmp_path / "a" / "picked" / "sampling.json").read_text())
    assert sidecar["soft_best_of_n"] == 4 and sidecar["beta"] == 1.0 and sidecar["reward"] == [REWARD]
    assert sidecar["sampler"] == "soft_best_of_n" and sidecar["cost"]["total"]["tokens"] == sum(picked["cost_tokens"])
    for carried in ("generation.json", "scoring.json"):
        assert (tmp_path / "a" / "picked" / carried).is_file()

    again = soft_best_of_n(
        _config(reference_dir, prompts_file, tmp_path / "b", soft_best_of_n=4, beta=1.0, num_picks=3)
    )
    assert again.to_list() == picked.to_list()


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
